// AVX2 + FMA + F16C variant (compiled with -mavx2 -mfma -mf16c; run only where the CPU has them):
// bf16 weights widened to fp32 in registers (a 16-bit shift), int8/int4 codes widened with
// vpmovzxbd, every product accumulated in fp32 with FMA, one horizontal sum per row.
// Int8 activations (kern.h): integer block dots with vpmaddubsw (unsigned x signed bytes -> int16 pair
// sums) then vpmaddwd against ones (-> int32), as llama.cpp's Q4_0/Q8_0 x Q8_0 AVX2 dot products do;
// one int32 -> fp32 conversion and one FMA with the block scale per 32 columns. The quantized GEMM
// (gemm_q8) runs the same block products on a tile of GEMM_RM weight rows x up to GEMM_RN activation
// rows held in GEMM_RM * GEMM_RN vector accumulators (llamafile tinyBLAS's register tiling); where the
// rows are whole blocks, gemm_x8 instead puts 8 activation rows in the lanes (kern.h X8Rows), which
// takes the per-block conversion and scaling from every output element to every 8 (1.5-2x the
// GEMM's rate on an AVX2 Zen 3).
#include <immintrin.h>

#include <algorithm>

#include "kern.h"
#include "kern_scales.h"

namespace moeinfer_native {
namespace {

constexpr int PREFETCH = 1024;  // bytes ahead of the weight stream (rows are contiguous, so past a row's end too)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load_bf16(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline __m256 u8x8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

inline __m256 load_w(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_w(const uint16_t* p) { return load_bf16(p); }
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_f32(v); }

// R rows of fp32 or bf16 weights against x: per row two accumulators over runs of 32 columns (runs of
// 8 alternating between them), then runs of 8 into the first, one horizontal sum, the scalar tail.
// R = 1 is the one-row kernel; R = 4 computes each row in the same order (the same bits) while reading
// four weight streams at once: 8 accumulators and x's 4 vectors stay in the 16 registers (four per row
// would need all 16 for the accumulators alone, and spill to the stack in the inner loop).
template <int R, class T>
inline void dot_rows(const T* const* w, const float* x, int64_t n, float* out) {
  __m256 a[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m256 xv[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) xv[k] = _mm256_loadu_ps(x + j + 8 * k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const char* pw = reinterpret_cast<const char*>(w[r] + j);
      _mm_prefetch(pw + PREFETCH, _MM_HINT_T0);
      if (sizeof(T) == 4) _mm_prefetch(pw + PREFETCH + 64, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) a[r][k & 1] = _mm256_fmadd_ps(load_w(w[r] + j + 8 * k), xv[k], a[r][k & 1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    int64_t i = j;
    for (; i + 8 <= n; i += 8) a[r][0] = _mm256_fmadd_ps(load_w(w[r] + i), _mm256_loadu_ps(x + i), a[r][0]);
    float acc = hsum(_mm256_add_ps(a[r][0], a[r][1]));
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

float qrow8(const uint8_t* q, const float* s, const float* z, const float* x, const float* xsum,
            int64_t cols, int64_t gs) {
  __m256 y = _mm256_setzero_ps();
  float ys = 0.f;  // scalar part: tails and the zero-point terms
  for (int64_t g = 0, c = 0; c < cols; ++g, c += gs) {
    const int64_t end = c + gs < cols ? c + gs : cols;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = c;
    for (; j + 32 <= end; j += 32) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j));
      __m128i b2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j + 16));
      a0 = _mm256_fmadd_ps(u8x8(b), _mm256_loadu_ps(x + j), a0);
      a1 = _mm256_fmadd_ps(u8x8(_mm_unpackhi_epi64(b, b)), _mm256_loadu_ps(x + j + 8), a1);
      a2 = _mm256_fmadd_ps(u8x8(b2), _mm256_loadu_ps(x + j + 16), a2);
      a3 = _mm256_fmadd_ps(u8x8(_mm_unpackhi_epi64(b2, b2)), _mm256_loadu_ps(x + j + 24), a3);
    }
    for (; j + 8 <= end; j += 8)
      a0 = _mm256_fmadd_ps(u8x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j))),
                           _mm256_loadu_ps(x + j), a0);
    const __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    y = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), acc, y);
    ys += s[g] * (tail_u8(q, x, j, end) - zero_at(z, g, 128.f) * xsum[g]);
  }
  return hsum(y) + ys;
}

float qrow4(const uint8_t* q, const float* s, const float* z, const float* x, const float* xperm,
            const float* xsum, int64_t cols, int64_t gs) {
  const __m128i m = _mm_set1_epi8(0x0F);
  __m256 y = _mm256_setzero_ps();
  float ys = 0.f;
  for (int64_t g = 0, c = 0; c < cols; ++g, c += gs) {
    const int64_t end = c + gs < cols ? c + gs : cols;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = c;
    if (c % 16 == 0) {  // nibble-ordered activations exist per run of 16 columns from column 0
      for (; j + 32 <= end; j += 32) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j / 2));  // 32 codes
        __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        a0 = _mm256_fmadd_ps(u8x8(lo), _mm256_loadu_ps(xperm + j), a0);
        a1 = _mm256_fmadd_ps(u8x8(hi), _mm256_loadu_ps(xperm + j + 8), a1);
        a2 = _mm256_fmadd_ps(u8x8(_mm_unpackhi_epi64(lo, lo)), _mm256_loadu_ps(xperm + j + 16), a2);
        a3 = _mm256_fmadd_ps(u8x8(_mm_unpackhi_epi64(hi, hi)), _mm256_loadu_ps(xperm + j + 24), a3);
      }
      for (; j + 16 <= end; j += 16) {
        __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j / 2));  // 16 codes
        a0 = _mm256_fmadd_ps(u8x8(_mm_and_si128(b, m)), _mm256_loadu_ps(xperm + j), a0);
        a1 = _mm256_fmadd_ps(u8x8(_mm_and_si128(_mm_srli_epi16(b, 4), m)), _mm256_loadu_ps(xperm + j + 8), a1);
      }
    }
    const __m256 acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    y = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), acc, y);
    ys += s[g] * (tail_u4(q, x, j, end) - zero_at(z, g, 8.f) * xsum[g]);
  }
  return hsum(y) + ys;
}

// 8-bit codes: u * xq pairs reach 2 * 255 * 127 > 32767 and vpmaddubsw would saturate, so the codes are
// centred, v = u - 128 in [-128, 127] (a xor with 0x80), and multiplied as |v| (unsigned, <= 128) by
// xq carrying v's sign: pairs stay <= 2 * 128 * 127 = 32512. The 128 * sum(xq) put back is folded into
// the group term: sum_b d_b (u . xq)_b = sum_b d_b (v . xq)_b + 128 * xsum_g.
inline __m256i dot_centred(__m256i u, __m256i xq, __m256i flip, __m256i ones) {
  const __m256i v = _mm256_xor_si256(u, flip);
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(xq, v));
  return _mm256_madd_epi16(p, ones);
}

// sum_g s_g * (off - z_g) * xsum_g over the G groups of a row, 8 groups at a time (z == nullptr: every
// z_g = mid, not read).
template <class S>
inline float zero_terms(const S* s, const float* z, const float* xsum, int64_t G, float off, float mid) {
  __m256 a = _mm256_setzero_ps();
  const __m256 o = _mm256_set1_ps(off), m = _mm256_set1_ps(mid);
  int64_t g = 0;
  for (; g + 8 <= G; g += 8)
    a = _mm256_fmadd_ps(_mm256_mul_ps(scale8(s + g), _mm256_sub_ps(o, z ? _mm256_loadu_ps(z + g) : m)),
                        _mm256_loadu_ps(xsum + g), a);
  float r = hsum(a);
  for (; g < G; ++g) r += scale1(s + g) * (off - zero_at(z, g, mid)) * xsum[g];
  return r;
}

// Both int8-activation rows, R at a time: blocks in order, two independent accumulators per row
// (even and odd blocks) across group boundaries (each block's product scaled by d_b * s_g), so small
// groups do not serialise on one sum, and R = 4 keeps its 8 accumulators in registers; `dot(r, b)` is row r's block b as int32 x 8 products and `tail(r, c)` the integer sum of
// its partial last block from column c. Each row's operations are those of R = 1, in the same order.
template <int R, class S, class Dot, class Tail>
inline void qrow_q8(const S* const* s, const float* const* z, const Q8Act& x, int64_t cols, int64_t gs, float off,
                    float mid, Dot dot, Tail tail, float* out) {
  const int64_t nfull = cols / QBLOCK;
  GroupScale<S> sc[R];
  __m256 a[R][2];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    sc[r] = {s[r], gs / QBLOCK, gs / QBLOCK};
    a[r][0] = a[r][1] = _mm256_setzero_ps();
  }
  int64_t b = 0;
  for (; b + 4 <= nfull; b += 4)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        a[r][k & 1] = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b + k] * sc[r].next()), _mm256_cvtepi32_ps(dot(r, b + k)),
                                      a[r][k & 1]);
  for (; b < nfull; ++b)
    for (int r = 0; r < R; ++r)
      a[r][0] = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * sc[r].next()), _mm256_cvtepi32_ps(dot(r, b)), a[r][0]);
  for (int r = 0; r < R; ++r) {
    float ys = nfull * QBLOCK < cols ? x.d[nfull] * sc[r].next() * float(tail(r, nfull * QBLOCK)) : 0.f;
    ys += zero_terms(s[r], z[r], x.gsum, (cols + gs - 1) / gs, off, mid);
    out[r] = hsum(_mm256_add_ps(a[r][0], a[r][1])) + ys;
  }
}

template <int R, class S>
void qrow8_q8_rows(const uint8_t* const* q, const S* const* s, const float* const* z, const Q8Act& x, int64_t cols,
                   int64_t gs, float* out) {
  const __m256i flip = _mm256_set1_epi8(char(0x80)), ones = _mm256_set1_epi16(1);
  auto dot = [&](int r, int64_t b) {
    const int64_t c = b * QBLOCK;
    _mm_prefetch(reinterpret_cast<const char*>(q[r] + c) + PREFETCH, _MM_HINT_T0);
    return dot_centred(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + c)),
                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + c)), flip, ones);
  };
  auto tail = [&](int r, int64_t c) { return itail_u8(q[r], x.q, c, cols, 128); };
  qrow_q8<R>(s, z, x, cols, gs, 128.f, 128.f, dot, tail, out);
}

float qrow8_q8(const uint8_t* q, Scales s, const float* z, const Q8Act& x, int64_t cols, int64_t gs) {
  float out;
  with_scales<1>(&s, [&](auto sc) { qrow8_q8_rows<1>(&q, sc, &z, x, cols, gs, &out); });
  return out;
}

void qrow8_q8_x4(const uint8_t* const* q, const Scales* s, const float* const* z, const Q8Act& x, int64_t cols,
                 int64_t gs, float* out) {
  with_scales<4>(s, [&](auto sc) { qrow8_q8_rows<4>(q, sc, z, x, cols, gs, out); });
}

// 4-bit codes (<= 15) cannot saturate: 16 packed bytes give the 16 low nibbles (even columns) and the 16
// high ones (odd columns), multiplied with activations nibble-ordered per block (x.q4's order).
inline __m256i dot_nibbles(const uint8_t* q, const int8_t* xq4, __m256i m, __m256i ones) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m);
  const __m256i p = _mm256_maddubs_epi16(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq4)));
  return _mm256_madd_epi16(p, ones);
}

// Two blocks of 4-bit codes (32 packed bytes) against the pair-ordered activations x.q4p (kern.h
// pair_order): int32 x 8, lanes 0-3 the partial sums of the first block, lanes 4-7 those of the second.
// One load and two masks unpack both blocks, and the two products' int16 pair sums add without
// saturating (each <= 2 * 15 * 127), so a block costs about half the instructions of `dot_nibbles`.
inline __m256i dot_nibble_pair(const uint8_t* q, const int8_t* xq4p, __m256i m, __m256i ones) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i lo = _mm256_and_si256(raw, m), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m);
  const __m256i p =
      _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq4p))),
                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq4p + QBLOCK))));
  return _mm256_madd_epi16(p, ones);
}

// 4-bit rows two blocks at a time (dot_nibble_pair), R rows together, each pair's products scaled by a
// vector holding the two blocks' d_b * s_g; groups of one block (Q4_0's) take four blocks' scales in one
// multiply. Each row's operations are those of R = 1 (qrow4_q8), in the same order.
template <int R, class S>
void qrow4_q8_rows(const uint8_t* const* q, const S* const* s, const float* const* z, const Q8Act& x, int64_t cols,
                   int64_t gs, float* out) {
  const __m256i m = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t nfull = cols / QBLOCK, bpg = gs / QBLOCK;
  auto pair = [&](int r, int64_t b) {
    if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(q[r] + b * QBLOCK / 2) + PREFETCH, _MM_HINT_T0);
    return _mm256_cvtepi32_ps(dot_nibble_pair(q[r] + b * QBLOCK / 2, x.q4p + b * QBLOCK, m, ones));
  };
  auto scale = [&](int r, int64_t b) { return x.d[b] * scale1(s[r] + b / bpg); };
  __m256 a0[R], a1[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t b = 0;
  if (bpg == 1) {
    const __m256i first = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), second = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    for (; b + 4 <= nfull; b += 4) {
      const __m128 d = _mm_loadu_ps(x.d + b);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 c = _mm256_castps128_ps256(_mm_mul_ps(d, scale4(s[r] + b)));
        a0[r] = _mm256_fmadd_ps(pair(r, b), _mm256_permutevar8x32_ps(c, first), a0[r]);
        a1[r] = _mm256_fmadd_ps(pair(r, b + 2), _mm256_permutevar8x32_ps(c, second), a1[r]);
      }
    }
  } else {
    GroupScale<S> sc[R];
    for (int r = 0; r < R; ++r) sc[r] = {s[r], bpg, bpg};
    for (; b + 2 <= nfull; b += 2)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const float c0 = x.d[b] * sc[r].next(), c1 = x.d[b + 1] * sc[r].next();
        a0[r] = _mm256_fmadd_ps(pair(r, b), _mm256_set_m128(_mm_set1_ps(c1), _mm_set1_ps(c0)), a0[r]);
      }
  }
  for (; b + 2 <= nfull; b += 2)
    for (int r = 0; r < R; ++r)
      a1[r] = _mm256_fmadd_ps(pair(r, b), _mm256_set_m128(_mm_set1_ps(scale(r, b + 1)), _mm_set1_ps(scale(r, b))), a1[r]);
  for (int r = 0; r < R; ++r) {
    if (b < nfull)  // an unpaired last whole block, ordered in x.q4p as in x.q4
      a1[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale(r, b)),
                              _mm256_cvtepi32_ps(dot_nibbles(q[r] + b * QBLOCK / 2, x.q4p + b * QBLOCK, m, ones)), a1[r]);
    float ys = nfull * QBLOCK < cols ? scale(r, nfull) * float(itail_u4(q[r], x.q, nfull * QBLOCK, cols)) : 0.f;
    ys += zero_terms(s[r], z[r], x.gsum, (cols + gs - 1) / gs, 0.f, 8.f);
    out[r] = hsum(_mm256_add_ps(a0[r], a1[r])) + ys;
  }
}

float qrow4_q8(const uint8_t* q, Scales s, const float* z, const Q8Act& x, int64_t cols, int64_t gs) {
  float out;
  with_scales<1>(&s, [&](auto sc) { qrow4_q8_rows<1>(&q, sc, &z, x, cols, gs, &out); });
  return out;
}

void qrow4_q8_x4(const uint8_t* const* q, const Scales* s, const float* const* z, const Q8Act& x, int64_t cols,
                 int64_t gs, float* out) {
  with_scales<4>(s, [&](auto sc) { qrow4_q8_rows<4>(q, sc, z, x, cols, gs, out); });
}

// --- quantized GEMM (kern.h) ---

#ifndef MOEINFER_GEMM_RM
#define MOEINFER_GEMM_RM 4
#endif
#ifndef MOEINFER_GEMM_RN
#define MOEINFER_GEMM_RN 3
#endif
// Tile: RM weight rows x RN activation rows, RM * RN accumulators plus the unpacked weight block, its
// scale and the RN activation scales in the 16 ymm registers.
constexpr int GEMM_RM = MOEINFER_GEMM_RM, GEMM_RN = MOEINFER_GEMM_RN;

// One tile: out[i][j] = row i of `w` (pointers wq/ws/wz) . activation row j0 + j. Per full block (4-bit:
// per pair of them, as qrow4_q8): each weight row's codes unpacked once (8-bit: centred v and |v|, as dot_centred),
// then one integer product per activation row, scaled by d_b * s_g; then the partial last block (scalar)
// and the zero-point terms, as the row kernels.
template <int RM, int RN, bool Q4>
inline void gemm_tile(const uint8_t* const* wq, const float* const* ws, const float* const* wz, const Q8Rows& x,
                      int64_t j0, int64_t cols, int64_t gs, float out[][GEMM_RN]) {
  const int64_t nb = x.nb, nfull = cols / QBLOCK, bpg = gs / QBLOCK, xs = nb * QBLOCK;
  const int8_t* xb = (Q4 ? x.q4 : x.q) + j0 * xs;
  const float* xd = x.d + j0 * nb;
  const __m256i ones = _mm256_set1_epi16(1), m = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(char(0x80));
  // the accumulators are named registers only when every loop over them is unrolled
  __m256 acc[RM][RN];
#pragma GCC unroll 8
  for (int i = 0; i < RM; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t g = 0, left = bpg, b = 0;
  if constexpr (Q4) {
    // two blocks at a time, as qrow4_q8: each weight row's 32 packed bytes unpacked once against the
    // pair-ordered activation rows, lanes 0-3 of every product block b's and lanes 4-7 block b + 1's
    const int8_t* xp = x.q4p + j0 * xs;
    for (; b + 2 <= nfull; b += 2) {
      const int64_t g0 = g;
      if (--left == 0) ++g, left = bpg;
      const int64_t g1 = g;
      if (--left == 0) ++g, left = bpg;
      __m256 dx[RN];
#pragma GCC unroll 8
      for (int j = 0; j < RN; ++j)
        dx[j] = _mm256_set_m128(_mm_broadcast_ss(xd + j * nb + b + 1), _mm_broadcast_ss(xd + j * nb + b));
#pragma GCC unroll 8
      for (int i = 0; i < RM; ++i) {
        const uint8_t* wb = wq[i] + b * QBLOCK / 2;
        _mm_prefetch(reinterpret_cast<const char*>(wb) + PREFETCH, _MM_HINT_T0);
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
        const __m256i lo = _mm256_and_si256(raw, m), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m);
        const __m256 si = _mm256_set_m128(_mm_broadcast_ss(ws[i] + g1), _mm_broadcast_ss(ws[i] + g0));
#pragma GCC unroll 8
        for (int j = 0; j < RN; ++j) {
          const int8_t* xj = xp + j * xs + b * QBLOCK;
          const __m256i p = _mm256_add_epi16(
              _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xj))),
              _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xj + QBLOCK))));
          acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_mul_ps(si, dx[j]),
                                      acc[i][j]);
        }
      }
    }
  }
  for (; b < nfull; ++b) {  // 8-bit codes; for 4-bit codes an unpaired last whole block
    __m256 dx[RN];
#pragma GCC unroll 8
    for (int j = 0; j < RN; ++j) dx[j] = _mm256_broadcast_ss(xd + j * nb + b);
#pragma GCC unroll 8
    for (int i = 0; i < RM; ++i) {
      // the weight rows stream from memory when the tile has few activation rows (decode-like sizes)
      const uint8_t* wb = wq[i] + b * (Q4 ? QBLOCK / 2 : QBLOCK);
      _mm_prefetch(reinterpret_cast<const char*>(wb) + PREFETCH, _MM_HINT_T0);
      __m256i u, v;
      if (Q4) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb));
        u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m);
        v = u;
      } else {
        v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb)), flip);
        u = _mm256_sign_epi8(v, v);
      }
      const __m256 si = _mm256_set1_ps(ws[i][g]);
#pragma GCC unroll 8
      for (int j = 0; j < RN; ++j) {
        __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + j * xs + b * QBLOCK));
        if (!Q4) xq = _mm256_sign_epi8(xq, v);
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xq), ones);
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(si, dx[j]), acc[i][j]);
      }
    }
    if (--left == 0) ++g, left = bpg;
  }
  const int64_t c = nfull * QBLOCK, G = x.G;
#pragma GCC unroll 8
  for (int i = 0; i < RM; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < RN; ++j) out[i][j] = hsum(acc[i][j]);
  // the partial last block and the zero-point terms, as the row kernels
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) {
      const int8_t* xq = x.q + (j0 + j) * xs;
      float t = 0.f;
      if (c < cols)
        t = xd[j * nb + nfull] * ws[i][c / gs] *
            float(Q4 ? itail_u4(wq[i], xq, c, cols) : itail_u8(wq[i], xq, c, cols, 128));
      out[i][j] += t + zero_terms(ws[i], wz[i], x.gsum + (j0 + j) * G, G, Q4 ? 0.f : 128.f, Q4 ? 8.f : 128.f);
    }
}

// Activation rows [j, j1) of one weight-row tile in tiles of RN rows, the remainder in a narrower tile.
template <int RN, bool Q4>
inline void gemm_tiles(const uint8_t* const* wq, const float* const* ws, const float* const* wz, int rows,
                       const Q8Rows& x, int64_t j, int64_t j1, int64_t cols, int64_t gs, float* y, int64_t ldy,
                       int64_t r) {
  float out[GEMM_RM][GEMM_RN];
  // RN + 1 rows left go as two narrower tiles rather than a full one and a single row (whose weight
  // unpacking would serve one row); tiles do not change any sum, each element being one tile's
  for (; j + RN <= j1 && !(RN > 2 && j1 - j == RN + 1); j += RN) {
    gemm_tile<GEMM_RM, RN, Q4>(wq, ws, wz, x, j, cols, gs, out);
    for (int jj = 0; jj < RN; ++jj)
      for (int i = 0; i < rows; ++i) y[(j + jj) * ldy + r + i] = out[i][jj];
  }
  if constexpr (RN > 1)
    if (j < j1) gemm_tiles<RN - 1, Q4>(wq, ws, wz, rows, x, j, j1, cols, gs, y, ldy, r);
}

template <bool Q4>
void gemm_q8_bits(const QRows& w, int64_t r0, int64_t r1, const Q8Rows& x, int64_t cols, int64_t gs, float* y,
                  int64_t ldy) {
  const int64_t tc = (token_chunk(cols) + GEMM_RN - 1) / GEMM_RN * GEMM_RN;
  for (int64_t j0 = 0; j0 < x.n; j0 += tc) {
    const int64_t j1 = j0 + tc < x.n ? j0 + tc : x.n;
    for (int64_t r = r0; r < r1; r += GEMM_RM) {
      const uint8_t* wq[GEMM_RM];
      const float *ws[GEMM_RM], *wz[GEMM_RM];
      const int rows = tile_rows<GEMM_RM>(w, r, r1, wq, ws, wz);
      gemm_tiles<GEMM_RN, Q4>(wq, ws, wz, rows, x, j0, j1, cols, gs, y, ldy, r);
    }
  }
}

void gemm_q8(int bits, const QRows& w, int64_t r0, int64_t r1, const Q8Rows& x, int64_t cols, int64_t gs, float* y,
             int64_t ldy) {
  if (bits == 4)
    gemm_q8_bits<true>(w, r0, r1, x, cols, gs, y, ldy);
  else
    gemm_q8_bits<false>(w, r0, r1, x, cols, gs, y, ldy);
}

// --- quantized GEMM on interleaved activation rows (kern.h X8Rows) ---

#ifndef MOEINFER_X8_RM
#define MOEINFER_X8_RM 3
#endif
#ifndef MOEINFER_X8_RG
#define MOEINFER_X8_RG 2
#endif
constexpr int X8_RM = MOEINFER_X8_RM, X8_RG = MOEINFER_X8_RG;

// One tile: RM weight rows x RG groups of 8 activation rows, out[i][j][l] = row i . row 8 j + l. Per
// block: each weight row's 4-byte runs broadcast to every lane (4-bit: split into low and high
// nibbles, 8-bit: centred, its magnitude and sign as dot_centred), one vpmaddubsw per run and group;
// 4-bit products summed in int16 over the block (at most 8 x 2 x 15 x 127 = 30480), 8-bit ones
// widened per run; the 4-bit midpoint 8 subtracted in the integers (8 x the rows' code sums; 8-bit
// codes are centred already); then per (row, group) one conversion and one fma by s_g * d (the 8
// rows' scales). With zero-points (ZEROS), the terms s_g * (mid - z_g) * xsum_g after the blocks, 8
// rows at a time: exactly zero where z_g is the midpoint, so stored midpoints give the bits of none.
// Every lane sums its blocks in order, as any tile does.
template <int RM, int RG, bool Q4, bool ZEROS>
inline void x8_tile(const uint8_t* const* wq, const float* const* ws, const float* const* wz, const X8Rows& x,
                    const int64_t* grp, int64_t gs, float out[][X8_RG][X8]) {
  const int64_t nb = x.nb, bpg = gs / QBLOCK;
  const int8_t* A[RG];
  const float* D[RG];
  const int32_t* BS[RG];
#pragma GCC unroll 8
  for (int j = 0; j < RG; ++j)
    A[j] = x.a + grp[j] * nb * X8 * QBLOCK, D[j] = x.d + grp[j] * nb * X8, BS[j] = x.bsum + grp[j] * nb * X8;
  const __m256i m = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  __m256 acc[RM][RG];
#pragma GCC unroll 8
  for (int i = 0; i < RM; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < RG; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t g = 0, left = bpg;  // block b's weight group, without a division per block
  for (int64_t b = 0; b < nb; ++b) {
    __m256i sum[RM][RG];
#pragma GCC unroll 8
    for (int i = 0; i < RM; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < RG; ++j) sum[i][j] = _mm256_setzero_si256();
#pragma GCC unroll 1  // one run at a time: its broadcasts and nibbles live briefly, no accumulator spills
    for (int k = 0; k < (Q4 ? 4 : 8); ++k) {
#pragma GCC unroll 8
      for (int i = 0; i < RM; ++i) {
        int32_t run;
        __builtin_memcpy(&run, wq[i] + b * (Q4 ? QBLOCK / 2 : QBLOCK) + 4 * k, 4);
        const __m256i bc = _mm256_set1_epi32(run);
        if constexpr (Q4) {
          const __m256i lo = _mm256_and_si256(bc, m), hi = _mm256_and_si256(_mm256_srli_epi16(bc, 4), m);
#pragma GCC unroll 8
          for (int j = 0; j < RG; ++j) {
            const int8_t* a = A[j] + (b * X8 + 2 * k) * QBLOCK;
            sum[i][j] = _mm256_add_epi16(
                sum[i][j],
                _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + QBLOCK)))));
          }
        } else {
          const __m256i v = _mm256_xor_si256(bc, flip), u = _mm256_sign_epi8(v, v);
#pragma GCC unroll 8
          for (int j = 0; j < RG; ++j) {
            const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A[j] + (b * X8 + k) * QBLOCK));
            sum[i][j] = _mm256_add_epi32(sum[i][j],
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(xa, v)), ones));
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < RG; ++j) {
      const __m256 dj = _mm256_loadu_ps(D[j] + b * X8);
      __m256i mid;
      if constexpr (Q4)
        mid = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(BS[j] + b * X8)), 3);
#pragma GCC unroll 8
      for (int i = 0; i < RM; ++i) {
        __m256i p = Q4 ? _mm256_madd_epi16(sum[i][j], ones) : sum[i][j];
        if constexpr (Q4) p = _mm256_sub_epi32(p, mid);
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(_mm256_set1_ps(ws[i][g]), dj), acc[i][j]);
      }
    }
    if (--left == 0) ++g, left = bpg;
  }
  if constexpr (ZEROS) {  // sum_g s_g * (mid - z_g) * xsum_g
    const float mid = Q4 ? 8.f : 128.f;
    for (int j = 0; j < RG; ++j) {
      const float* gsum = x.gsum + grp[j] * x.G * X8;
      for (int i = 0; i < RM; ++i) {
        __m256 zt = acc[i][j];
        for (int64_t g = 0; g < x.G; ++g)
          zt = _mm256_fmadd_ps(_mm256_set1_ps(ws[i][g] * (mid - wz[i][g])), _mm256_loadu_ps(gsum + g * X8), zt);
        acc[i][j] = zt;
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RM; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < RG; ++j) _mm256_storeu_ps(out[i][j], acc[i][j]);
}

template <bool Q4, bool ZEROS>
void gemm_x8_bits(const QRows& w, int64_t r0, int64_t r1, const X8Rows& x, int64_t gs, float* y, int64_t ldy) {
  const int64_t groups = (x.n + X8 - 1) / X8;
  // groups a chunk: about 128 KiB of codes, kept in cache while the weight rows pass
  const int64_t gc = std::max<int64_t>(X8_RG, (int64_t(128) << 10) / (x.nb * X8 * QBLOCK) / X8_RG * X8_RG);
  float out[X8_RM][X8_RG][X8];
  for (int64_t g0 = 0; g0 < groups; g0 += gc) {
    const int64_t g1 = std::min(groups, g0 + gc);
    for (int64_t r = r0; r < r1; r += X8_RM) {
      const uint8_t* wq[X8_RM];
      const float *ws[X8_RM], *wz[X8_RM];
      const int rows = tile_rows<X8_RM>(w, r, r1, wq, ws, wz);
      // a partial tile of groups repeats its last group (computed, not written)
      for (int64_t g = g0; g < g1; g += X8_RG) {
        int64_t grp[X8_RG];
        for (int j = 0; j < X8_RG; ++j) grp[j] = std::min(g + j, g1 - 1);
        x8_tile<X8_RM, X8_RG, Q4, ZEROS>(wq, ws, wz, x, grp, gs, out);
        for (int j = 0; j < X8_RG && g + j < g1; ++j)
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

// F16C: eight halves a conversion (exact, as the scalar tail).
void half_to_f32(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  for (; i < n; ++i) out[i] = f16_to_f32(h[i]);
}

// kern.h quantize_q8, 32 columns at a time: the block's largest magnitude (exact in any order: no NaN
// gets here), one division, then round-half-even products (vroundps in the default rounding mode, as
// nearbyint), clamped, narrowed to int8 in column order. A block holding inf or NaN, and a partial last
// block, go through the scalar code. Same codes and scales, bit for bit.
void quantize_act(const float* x, int64_t n, int8_t* q, float* d) {
  const int64_t whole = n / QBLOCK;
  const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(3.4028235e38f), lim = _mm256_set1_ps(127.f),
               nlim = _mm256_set1_ps(-127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < whole; ++b) {
    const float* xb = x + b * QBLOCK;
    __m256 v[4], amax = _mm256_setzero_ps();
    int finite = 0xFF;
    for (int t = 0; t < 4; ++t) {
      v[t] = _mm256_loadu_ps(xb + 8 * t);
      const __m256 a = _mm256_andnot_ps(sign, v[t]);
      finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ));
      amax = _mm256_max_ps(amax, a);
    }
    if (finite != 0xFF) {
      quantize_q8(xb, QBLOCK, q + b * QBLOCK, d + b);
      continue;
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float db = _mm_cvtss_f32(m4) / 127.f, id = db != 0.f ? 1.f / db : 0.f;
    d[b] = db;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i r[4];
    for (int t = 0; t < 4; ++t) {
      const __m256 c = _mm256_round_ps(_mm256_mul_ps(v[t], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r[t] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(c, nlim), lim));
    }
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QBLOCK), _mm256_permutevar8x32_epi32(packed, order));
  }
  if (whole * QBLOCK < n) quantize_q8(x + whole * QBLOCK, n - whole * QBLOCK, q + whole * QBLOCK, d + whole);
}

const Kern table{"avx2",   dot_f32,  dot_bf16,  qrow8,       qrow4,       qrow8_q8,   qrow4_q8,
                 gemm_q8,  dot4_f32, dot4_bf16, qrow8_q8_x4, qrow4_q8_x4, half_to_f32, gemm_x8,
                 quantize_act};

}  // namespace

const Kern* kern_avx2() { return &table; }

}  // namespace moeinfer_native
