// AVX-512 variant: F + BW + VL + VNNI, with the avx2 variant's AVX2 + FMA + F16C (compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx2 -mfma -mf16c; run only where the CPU and the OS
// have them: Intel from Cascade Lake, AMD from Zen 4). What it changes from avx2:
// - bf16/fp32 rows 16 columns a vector (bf16 widened by a 16-bit shift, fp32 accumulation);
// - int8-activation block dots with vpdpbusd, which multiplies unsigned code bytes with signed
//   activation bytes and sums each four into an int32 lane (the technique of llama.cpp's AVX512-VNNI
//   Q8_0/Q4_0 dot products): 8-bit codes need no centring and 4-bit ones no int16 stage, and one
//   instruction takes two blocks (64 codes);
// - the GEMM on interleaved activation rows (kern.h X8Rows) with two groups of 8 rows in a vector's 16
//   lanes, so one broadcast weight run meets 16 activation rows.
// The rest (fp32-activation quantized rows, the tinyBLAS tile for rows of partial blocks, the activation
// quantizer, fp16 widening) is the avx2 variant's, which every CPU with these instructions runs.
#include <immintrin.h>

#include <algorithm>

#include "kern.h"
#include "kern_scales.h"

namespace moeinfer_native {
namespace {

constexpr int PREFETCH = 1024;  // bytes ahead of the weight stream, as in the avx2 variant

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_f32(v); }

// R rows of fp32 or bf16 weights against x: per row two accumulators over runs of 64 columns (runs of
// 16 alternating between them), then runs of 16 into the first, one horizontal sum, the scalar tail.
// R = 4 computes each row as R = 1 does (the same bits) while reading four weight streams at once.
template <int R, class T>
inline void dot_rows(const T* const* w, const float* x, int64_t n, float* out) {
  __m512 a[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    __m512 xv[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) xv[k] = _mm512_loadu_ps(x + j + 16 * k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const char* pw = reinterpret_cast<const char*>(w[r] + j);
#pragma GCC unroll 4
      for (int l = 0; l < int(sizeof(T)); ++l) _mm_prefetch(pw + PREFETCH + 64 * l, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) a[r][k & 1] = _mm512_fmadd_ps(load16(w[r] + j + 16 * k), xv[k], a[r][k & 1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    int64_t i = j;
    for (; i + 16 <= n; i += 16) a[r][0] = _mm512_fmadd_ps(load16(w[r] + i), _mm512_loadu_ps(x + i), a[r][0]);
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
    for (; i < n; ++i) acc += widen(w[r][i]) * x[i];
    out[r] = acc;
  }
}

float dot_f32(const float* w, const float* x, int64_t n) {
  float out;
  dot_rows<1>(&w, x, n, &out);
  return out;
}

float dot_bf16(const uint16_t* w, const float* x, int64_t n) {
  float out;
  dot_rows<1>(&w, x, n, &out);
  return out;
}

void dot4_f32(const float* const* w, const float* x, int64_t n, float* out) { dot_rows<4>(w, x, n, out); }
void dot4_bf16(const uint16_t* const* w, const float* x, int64_t n, float* out) { dot_rows<4>(w, x, n, out); }

// --- int8-activation rows (decode) ---

// Group scales sixteen at a time (kern_scales.h: one, four or eight).
inline __m512 scale16(const float* s) { return _mm512_loadu_ps(s); }
inline __m512 scale16(const uint16_t* s) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
}

// sum_g s_g * (-z_g) * xsum_g over the G groups of a row, 16 groups at a time (z == nullptr: every z_g =
// mid, not read): the zero-point term of rows whose block dots take the codes as stored.
template <class S>
inline float zero_terms(const S* s, const float* z, const float* xsum, int64_t G, float mid) {
  __m512 a = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(mid);
  int64_t g = 0;
  for (; g + 16 <= G; g += 16)
    a = _mm512_fmadd_ps(_mm512_mul_ps(scale16(s + g), _mm512_sub_ps(_mm512_setzero_ps(), z ? _mm512_loadu_ps(z + g) : m)),
                        _mm512_loadu_ps(xsum + g), a);
  float r = _mm512_reduce_add_ps(a);
  for (; g < G; ++g) r += scale1(s + g) * (0.f - zero_at(z, g, mid)) * xsum[g];
  return r;
}

// Two blocks of codes (64 columns) against their activations: int32 x 16. 8-bit: 64 stored bytes against
// x.q, lanes 0-7 block b's partial sums and 8-15 block b + 1's. 4-bit: 32 packed bytes, their low
// nibbles (the even columns of both blocks) then their high ones, against the pair-ordered activations
// x.q4p (kern.h pair_order), lanes 0-3 and 8-11 block b's, 4-7 and 12-15 block b + 1's.
template <bool Q4>
inline __m512i dot_pair(const uint8_t* q, const int8_t* xq) {
  __m512i u;
  if constexpr (Q4) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    u = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1),
                         _mm512_set1_epi8(0x0F));
  } else {
    u = _mm512_loadu_si512(q);
  }
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(xq));
}

// One whole block (32 columns), the same way (4-bit: an unpaired last block, ordered in x.q4p as in
// x.q4): int32 x 8 in the low lanes, zeros above.
template <bool Q4>
inline __m512i dot_block(const uint8_t* q, const int8_t* xq) {
  __m256i u;
  if constexpr (Q4) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
  } else {
    u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  }
  const __m256i p =
      _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
  return _mm512_zextsi256_si512(p);
}

// Int8-activation rows of `bits`-bit codes, R at a time: four blocks an iteration as two pairs
// (dot_pair) into two accumulators per row, each pair's int32 lanes converted once and multiplied by a
// vector of its two blocks' d_b * s_g (built from four blocks' scales computed together); then a last
// pair, an unpaired whole block, the partial last block (scalar) and the zero-point terms. Each row's
// operations are those of R = 1, in the same order.
template <int R, bool Q4, class S>
void qrow_q8_rows(const uint8_t* const* q, const S* const* s, const float* const* z, const Q8Act& x, int64_t cols,
                  int64_t gs, float* out) {
  const int64_t nfull = cols / QBLOCK, bpg = gs / QBLOCK, cb = Q4 ? QBLOCK / 2 : QBLOCK;  // code bytes a block
  const int8_t* xq = Q4 ? x.q4p : x.q;
  // lanes of a pair's product -> its block (0 or 1) among the four scales, for pairs (0, 1) and (2, 3)
  const __m512i lo = Q4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
                        : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(2));
  GroupScale<S> sc[R];
  __m512 a[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    sc[r] = {s[r], bpg, bpg};
    a[r][0] = a[r][1] = _mm512_setzero_ps();
  }
  int64_t b = 0;
  for (; b + 4 <= nfull; b += 4) {
    const __m128 d = _mm_loadu_ps(x.d + b);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* qb = q[r] + b * cb;
#pragma GCC unroll 2
      for (int l = 0; l < (Q4 ? 2 : 4); ++l) _mm_prefetch(reinterpret_cast<const char*>(qb) + PREFETCH + 32 * l, _MM_HINT_T0);
      __m128 c;
      if (bpg == 1) {
        c = _mm_mul_ps(d, scale4(s[r] + b));
      } else {
        const float s0 = sc[r].next(), s1 = sc[r].next(), s2 = sc[r].next(), s3 = sc[r].next();
        c = _mm_mul_ps(d, _mm_setr_ps(s0, s1, s2, s3));
      }
      const __m512 c16 = _mm512_castps128_ps512(c);
      a[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_pair<Q4>(qb, xq + b * QBLOCK)), _mm512_permutexvar_ps(lo, c16),
                                a[r][0]);
      a[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_pair<Q4>(qb + 2 * cb, xq + (b + 2) * QBLOCK)),
                                _mm512_permutexvar_ps(hi, c16), a[r][1]);
    }
  }
  if (bpg == 1)
    for (int r = 0; r < R; ++r) sc[r].s = s[r] + b;  // the four-block loop read these scales as vectors
  for (int r = 0; r < R; ++r) {
    int64_t i = b;
    if (i + 2 <= nfull) {
      const float c0 = x.d[i] * sc[r].next(), c1 = x.d[i + 1] * sc[r].next();
      const __m512 c16 = _mm512_castps128_ps512(_mm_setr_ps(c0, c1, 0.f, 0.f));
      a[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_pair<Q4>(q[r] + i * cb, xq + i * QBLOCK)),
                                _mm512_permutexvar_ps(lo, c16), a[r][0]);
      i += 2;
    }
    if (i < nfull) {
      a[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_block<Q4>(q[r] + i * cb, xq + i * QBLOCK)),
                                _mm512_set1_ps(x.d[i] * sc[r].next()), a[r][1]);
      ++i;
    }
    float ys = nfull * QBLOCK < cols
                   ? x.d[nfull] * sc[r].next() *
                         float(Q4 ? itail_u4(q[r], x.q, nfull * QBLOCK, cols) : itail_u8(q[r], x.q, nfull * QBLOCK, cols, 0))
                   : 0.f;
    ys += zero_terms(s[r], z[r], x.gsum, (cols + gs - 1) / gs, Q4 ? 8.f : 128.f);
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1])) + ys;
  }
}

template <bool Q4>
float qrow_q8(const uint8_t* q, Scales s, const float* z, const Q8Act& x, int64_t cols, int64_t gs) {
  float out;
  with_scales<1>(&s, [&](auto sc) { qrow_q8_rows<1, Q4>(&q, sc, &z, x, cols, gs, &out); });
  return out;
}

template <bool Q4>
void qrow_q8_x4(const uint8_t* const* q, const Scales* s, const float* const* z, const Q8Act& x, int64_t cols,
                int64_t gs, float* out) {
  with_scales<4>(s, [&](auto sc) { qrow_q8_rows<4, Q4>(q, sc, z, x, cols, gs, out); });
}

// --- quantized GEMM on interleaved activation rows (kern.h X8Rows), two groups a vector ---

#ifndef MOEINFER_X16_RM
#define MOEINFER_X16_RM 4
#endif
#ifndef MOEINFER_X16_RP
#define MOEINFER_X16_RP 2
#endif
constexpr int X16_RM = MOEINFER_X16_RM, X16_RP = MOEINFER_X16_RP;  // weight rows, pairs of groups

// Two groups' 256-bit vectors (at a and b) as one: group 2p in lanes 0-7, group 2p + 1 in 8-15.
inline __m512i two_groups(const void* a, const void* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(static_cast<const __m256i*>(b)), 1);
}
inline __m512 two_groups_ps(const float* a, const float* b) {
  return _mm512_castsi512_ps(two_groups(a, b));
}

// One tile: RM weight rows x RP pairs of groups of 8 activation rows, out[i][2p + h][l] = row i . row
// 8 grp[2p + h] + l. Per block: each weight row's 4-byte runs broadcast to every lane (4-bit: split into
// low and high nibbles), one vpdpbusd per run (4-bit: two) and pair into int32 sums; then the midpoint
// times the rows' code sums subtracted in the integers (8 or 128 x bsum: the codes are taken as
// stored), one conversion and one fma by s_g * d per (row, pair). Zero-points (ZEROS) after the blocks,
// as the avx2 tile. Each lane sums its blocks in order with the avx2 tile's operations, so both give
// the same bits.
template <int RM, int RP, bool Q4, bool ZEROS>
inline void x16_tile(const uint8_t* const* wq, const float* const* ws, const float* const* wz, const X8Rows& x,
                     const int64_t* grp, int64_t gs, float out[][2 * X16_RP][X8]) {
  const int64_t nb = x.nb, bpg = gs / QBLOCK;
  const int8_t* A[2 * RP];
  const float* D[2 * RP];
  const int32_t* BS[2 * RP];
#pragma GCC unroll 8
  for (int j = 0; j < 2 * RP; ++j)
    A[j] = x.a + grp[j] * nb * X8 * QBLOCK, D[j] = x.d + grp[j] * nb * X8, BS[j] = x.bsum + grp[j] * nb * X8;
  const __m512i m = _mm512_set1_epi8(0x0F);
  __m512 acc[RM][RP];
#pragma GCC unroll 8
  for (int i = 0; i < RM; ++i)
#pragma GCC unroll 8
    for (int p = 0; p < RP; ++p) acc[i][p] = _mm512_setzero_ps();
  int64_t g = 0, left = bpg;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i sum[RM][RP];
#pragma GCC unroll 8
    for (int i = 0; i < RM; ++i)
#pragma GCC unroll 8
      for (int p = 0; p < RP; ++p) sum[i][p] = _mm512_setzero_si512();
#pragma GCC unroll 1
    for (int k = 0; k < (Q4 ? 4 : 8); ++k) {
      __m512i a0[RP], a1[RP];  // 4-bit: the run's even-column (a0) and odd-column (a1) activation vectors
#pragma GCC unroll 8
      for (int p = 0; p < RP; ++p) {
        const int64_t v = (b * X8 + (Q4 ? 2 * k : k)) * QBLOCK;
        a0[p] = two_groups(A[2 * p] + v, A[2 * p + 1] + v);
        if constexpr (Q4) a1[p] = two_groups(A[2 * p] + v + QBLOCK, A[2 * p + 1] + v + QBLOCK);
      }
#pragma GCC unroll 8
      for (int i = 0; i < RM; ++i) {
        int32_t run;
        __builtin_memcpy(&run, wq[i] + b * (Q4 ? QBLOCK / 2 : QBLOCK) + 4 * k, 4);
        const __m512i bc = _mm512_set1_epi32(run);
        if constexpr (Q4) {
          const __m512i lo = _mm512_and_si512(bc, m), hi = _mm512_and_si512(_mm512_srli_epi16(bc, 4), m);
#pragma GCC unroll 8
          for (int p = 0; p < RP; ++p)
            sum[i][p] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum[i][p], lo, a0[p]), hi, a1[p]);
        } else {
#pragma GCC unroll 8
          for (int p = 0; p < RP; ++p) sum[i][p] = _mm512_dpbusd_epi32(sum[i][p], bc, a0[p]);
        }
      }
    }
#pragma GCC unroll 8
    for (int p = 0; p < RP; ++p) {
      const __m512 dp = two_groups_ps(D[2 * p] + b * X8, D[2 * p + 1] + b * X8);
      const __m512i mid = _mm512_slli_epi32(two_groups(BS[2 * p] + b * X8, BS[2 * p + 1] + b * X8), Q4 ? 3 : 7);
#pragma GCC unroll 8
      for (int i = 0; i < RM; ++i)
        acc[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum[i][p], mid)),
                                    _mm512_mul_ps(_mm512_set1_ps(ws[i][g]), dp), acc[i][p]);
    }
    if (--left == 0) ++g, left = bpg;
  }
  if constexpr (ZEROS) {  // sum_g s_g * (mid - z_g) * xsum_g
    const float mid = Q4 ? 8.f : 128.f;
    for (int p = 0; p < RP; ++p) {
      const float* g0 = x.gsum + grp[2 * p] * x.G * X8;
      const float* g1 = x.gsum + grp[2 * p + 1] * x.G * X8;
      for (int i = 0; i < RM; ++i) {
        __m512 zt = acc[i][p];
        for (int64_t gg = 0; gg < x.G; ++gg)
          zt = _mm512_fmadd_ps(_mm512_set1_ps(ws[i][gg] * (mid - wz[i][gg])), two_groups_ps(g0 + gg * X8, g1 + gg * X8),
                               zt);
        acc[i][p] = zt;
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RM; ++i)
#pragma GCC unroll 8
    for (int p = 0; p < RP; ++p) {
      _mm256_storeu_ps(out[i][2 * p], _mm512_castps512_ps256(acc[i][p]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i][2 * p + 1]),
                          _mm512_extracti64x4_epi64(_mm512_castps_si512(acc[i][p]), 1));
    }
}

template <bool Q4, bool ZEROS>
void gemm_x8_bits(const QRows& w, int64_t r0, int64_t r1, const X8Rows& x, int64_t gs, float* y, int64_t ldy) {
  constexpr int TG = 2 * X16_RP;  // groups a tile
  const int64_t groups = (x.n + X8 - 1) / X8;
  // groups a chunk: about 128 KiB of codes, kept in cache while the weight rows pass
  const int64_t gc = std::max<int64_t>(TG, (int64_t(128) << 10) / (x.nb * X8 * QBLOCK) / TG * TG);
  float out[X16_RM][TG][X8];
  for (int64_t g0 = 0; g0 < groups; g0 += gc) {
    const int64_t g1 = std::min(groups, g0 + gc);
    for (int64_t r = r0; r < r1; r += X16_RM) {
      const uint8_t* wq[X16_RM];
      const float *ws[X16_RM], *wz[X16_RM];
      const int rows = tile_rows<X16_RM>(w, r, r1, wq, ws, wz);
      // a partial tile of groups repeats its last group (computed, not written)
      for (int64_t g = g0; g < g1; g += TG) {
        int64_t grp[TG];
        for (int j = 0; j < TG; ++j) grp[j] = std::min(g + j, g1 - 1);
        x16_tile<X16_RM, X16_RP, Q4, ZEROS>(wq, ws, wz, x, grp, gs, out);
        for (int j = 0; j < TG && g + j < g1; ++j)
          for (int64_t l = 0; l < X8 && (g + j) * X8 + l < x.n; ++l)
            for (int i = 0; i < rows; ++i) y[((g + j) * X8 + l) * ldy + r + i] = out[i][j][l];
      }
    }
  }
}

void gemm_x8(int bits, const QRows& w, int64_t r0, int64_t r1, const X8Rows& x, int64_t gs, float* y, int64_t ldy) {
  with_bits_and_zeros(bits, w.z != nullptr, [&](auto q4, auto zeros) {
    gemm_x8_bits<decltype(q4)::value, decltype(zeros)::value>(w, r0, r1, x, gs, y, ldy);
  });
}

}  // namespace

const Kern* kern_avx512() {
  static const Kern table = [] {
    Kern k = *kern_avx2();
    k.name = "avx512";
    k.dot_f32 = dot_f32, k.dot_bf16 = dot_bf16, k.dot4_f32 = dot4_f32, k.dot4_bf16 = dot4_bf16;
    k.qrow8_q8 = qrow_q8<false>, k.qrow4_q8 = qrow_q8<true>;
    k.qrow8_q8_x4 = qrow_q8_x4<false>, k.qrow4_q8_x4 = qrow_q8_x4<true>;
    k.gemm_x8 = gemm_x8;
    return k;
  }();
  return &table;
}

}  // namespace moeinfer_native
