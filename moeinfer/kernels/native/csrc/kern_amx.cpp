// AMX variant: the avx512 variant with its GEMM on interleaved activation rows (kern.h gemm_x8, the
// quantized prefill) on AMX-INT8 tiles (compiled with the avx512 flags and -mamx-tile -mamx-int8; run
// where the CPU has AMX-TILE and AMX-INT8 and Linux grants the process the tile state: Intel from
// Sapphire Rapids). The technique of llama.cpp's AMX backend and oneDNN's int8 GEMMs: one tdpbusd
// multiplies a tile of 16 (or 8) weight rows x 32 codes (unsigned bytes, one block) with one group of
// 8 activation rows in kern.h's X8Rows order, which is already the tile's "VNNI" layout (row v of the
// tile = columns 4v..4v+3 of the 8 rows), giving 16 x 8 int32 block products per instruction. 4-bit
// codes are unpacked to bytes per block first, in the order that layout expects (per run of 4 packed
// bytes: their low nibbles, then their high ones). Each product tile is stored and scaled in AVX-512
// registers as the other tiles scale theirs (midpoint times the rows' code sums subtracted in the
// integers, one conversion, one fma by s_g * d per element and block, in block order), so every
// element has the avx2 and avx512 tiles' bits. Everything else is the avx512 variant's.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kern.h"

namespace moeinfer_native {
namespace {

constexpr int ROWS_A = 16, ROWS_B = 8;  // weight rows of the two weight tiles: an item of up to 24 rows
// tile registers (literal numbers: GCC's tile intrinsics paste them into the register names)
#define T_A0 0
#define T_A1 1
#define T_X 2
#define T_C0 3
#define T_C1 4

// The tile configuration (palette 1): weight tiles 16 and 8 rows of 32 bytes (one block of codes), the
// activation tile 8 rows of 32 bytes (one group's block: 32 columns of 8 rows, 4 bytes a row per tile
// row), product tiles 16 and 8 rows of 8 int32.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure() {
  TileConfig c;
  c.rows[T_A0] = ROWS_A, c.colsb[T_A0] = QBLOCK;
  c.rows[T_A1] = ROWS_B, c.colsb[T_A1] = QBLOCK;
  c.rows[T_X] = QBLOCK / 4, c.colsb[T_X] = X8 * 4;
  c.rows[T_C0] = ROWS_A, c.colsb[T_C0] = X8 * 4;
  c.rows[T_C1] = ROWS_B, c.colsb[T_C1] = X8 * 4;
  _tile_loadconfig(&c);
}

// Block b of weight rows wq[0..n) as bytes in the tile's column order, into out [n][32]: 8-bit codes as
// stored; 4-bit, per run of 4 packed bytes, their 4 low nibbles (columns 8k, 8k+2, 8k+4, 8k+6) then their
// 4 high ones (8k+1, ..., 8k+7), the order of X8Rows' vectors 2k and 2k+1.
template <bool Q4>
inline void block_bytes(const uint8_t* const* wq, int n, int64_t b, uint8_t* out) {
  for (int i = 0; i < n; ++i) {
    if constexpr (Q4) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq[i] + b * QBLOCK / 2));
      const __m128i m = _mm_set1_epi8(0x0F);
      const __m128i lo = _mm_and_si128(raw, m), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * QBLOCK), _mm_unpacklo_epi32(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * QBLOCK + 16), _mm_unpackhi_epi32(lo, hi));
    } else {
      std::memcpy(out + i * QBLOCK, wq[i] + b * QBLOCK, QBLOCK);
    }
  }
}

// acc[m][l] (weight rows m, 8 activation rows l) += (c[m][l] - mid[l]) * (s[m] * d[l]), two rows a vector
// (sm[m / 2]: s[m] in lanes 0-7, s[m + 1] in 8-15), as the other tiles' fma(cvt(p), s_g * d, acc).
template <int R>
inline void scale_into(const int32_t* c, const __m512* sm, const __m512 d2, const __m512i mid2, float* acc) {
#pragma GCC unroll 16
  for (int m = 0; m < R; m += 2) {
    const __m512 p = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c + m * X8), mid2));
    _mm512_storeu_ps(acc + m * X8, _mm512_fmadd_ps(p, _mm512_mul_ps(sm[m / 2], d2), _mm512_loadu_ps(acc + m * X8)));
  }
}

inline __m512i twice(const int32_t* v) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}
inline __m512 twice(const float* v) { return _mm512_castsi512_ps(twice(reinterpret_cast<const int32_t*>(v))); }

// Weight rows [r, r + n) (n <= 24) of w against groups [g0, g1) of x: acc [groups][24][8] per block as
// above, then the zero-point terms (ZEROS) and the rows written to y.
template <bool Q4, bool ZEROS>
void item(const QRows& w, int64_t r, int n, const X8Rows& x, int64_t g0, int64_t g1, int64_t gs, float* y,
          int64_t ldy, std::vector<float>& accbuf) {
  constexpr int R = ROWS_A + ROWS_B;
  const uint8_t* wq[R];
  const float *ws[R], *wz[R];
  for (int i = 0; i < R; ++i) {
    const int64_t ri = r + std::min(i, n - 1);  // rows past the item repeat its last (computed, not written)
    wq[i] = w.q + ri * w.P, ws[i] = w.s + ri * w.G, wz[i] = row_of(w.z, ri, w.G);
  }
  const int64_t nb = x.nb, bpg = gs / QBLOCK, groups = g1 - g0;
  accbuf.assign(groups * R * X8, 0.f);
  float* acc = accbuf.data();
  alignas(64) uint8_t a[R * QBLOCK];
  alignas(64) int32_t c[R * X8];
  __m512 sm[R / 2];
  int64_t g = 0, left = bpg;
  for (int64_t b = 0; b < nb; ++b) {
    block_bytes<Q4>(wq, R, b, a);
    for (int i = 0; i < R; i += 2)
      sm[i / 2] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(ws[i][g]), _mm512_set1_ps(ws[i + 1][g]));
    _tile_loadd(T_A0, a, QBLOCK);
    _tile_loadd(T_A1, a + ROWS_A * QBLOCK, QBLOCK);
    for (int64_t k = 0; k < groups; ++k) {
      const int64_t gi = g0 + k;
      _tile_loadd(T_X, x.a + (gi * nb + b) * X8 * QBLOCK, X8 * 4);
      _tile_zero(T_C0);
      _tile_zero(T_C1);
      _tile_dpbusd(T_C0, T_A0, T_X);
      _tile_dpbusd(T_C1, T_A1, T_X);
      _tile_stored(T_C0, c, X8 * 4);
      _tile_stored(T_C1, c + ROWS_A * X8, X8 * 4);
      const __m512 d2 = twice(x.d + (gi * nb + b) * X8);
      const __m512i mid2 = _mm512_slli_epi32(twice(x.bsum + (gi * nb + b) * X8), Q4 ? 3 : 7);
      scale_into<R>(c, sm, d2, mid2, acc + k * R * X8);
    }
    if (--left == 0) ++g, left = bpg;
  }
  for (int64_t k = 0; k < groups; ++k) {
    const int64_t gi = g0 + k;
    float* ak = acc + k * R * X8;
    for (int i = 0; i < n; ++i) {
      __m256 v = _mm256_loadu_ps(ak + i * X8);
      if constexpr (ZEROS) {  // sum_g s_g * (mid - z_g) * xsum_g, as the other tiles
        const float mid = Q4 ? 8.f : 128.f;
        for (int64_t gg = 0; gg < x.G; ++gg)
          v = _mm256_fmadd_ps(_mm256_set1_ps(ws[i][gg] * (mid - wz[i][gg])), _mm256_loadu_ps(x.gsum + (gi * x.G + gg) * X8),
                              v);
      }
      alignas(32) float o[X8];
      _mm256_store_ps(o, v);
      for (int64_t l = 0; l < X8 && gi * X8 + l < x.n; ++l) y[(gi * X8 + l) * ldy + r + i] = o[l];
    }
  }
}

template <bool Q4, bool ZEROS>
void gemm_x8_bits(const QRows& w, int64_t r0, int64_t r1, const X8Rows& x, int64_t gs, float* y, int64_t ldy) {
  const int64_t groups = (x.n + X8 - 1) / X8;
  // groups a chunk: about 128 KiB of codes, kept in cache while the weight rows pass
  const int64_t gc = std::max<int64_t>(1, (int64_t(128) << 10) / (x.nb * X8 * QBLOCK));
  thread_local std::vector<float> accbuf;
  configure();
  for (int64_t g0 = 0; g0 < groups; g0 += gc)
    for (int64_t r = r0; r < r1; r += ROWS_A + ROWS_B)
      item<Q4, ZEROS>(w, r, int(std::min<int64_t>(ROWS_A + ROWS_B, r1 - r)), x, g0, std::min(groups, g0 + gc), gs, y,
                      ldy, accbuf);
  _tile_release();
}

void gemm_x8(int bits, const QRows& w, int64_t r0, int64_t r1, const X8Rows& x, int64_t gs, float* y, int64_t ldy) {
  with_bits_and_zeros(bits, w.z != nullptr, [&](auto q4, auto zeros) {
    gemm_x8_bits<decltype(q4)::value, decltype(zeros)::value>(w, r0, r1, x, gs, y, ldy);
  });
}

}  // namespace

bool amx_usable() {
  // Linux keeps the tile data state off until a process asks for it (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA, 18); the answer is the process's for good, so asking again is harmless
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

const Kern* kern_amx() {
  static const Kern table = [] {
    Kern k = *kern_avx512();
    k.name = "amx";
    k.gemm_x8 = gemm_x8;
    return k;
  }();
  return &table;
}

}  // namespace moeinfer_native
