// AVX2 + FMA + F16C variant (compiled with -mavx2 -mfma -mf16c; run only where the CPU has them):
// bf16 weights widened to fp32 in registers (a 16-bit shift), int8/int4 codes widened with
// vpmovzxbd, every product accumulated in fp32 with FMA, one horizontal sum per row.
#include <immintrin.h>

#include "kern.h"

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

float dot_f32(const float* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + j) + PREFETCH, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + j) + PREFETCH + 64, _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
  }
  for (; j + 8 <= n; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; j < n; ++j) s += w[j] * x[j];
  return s;
}

float dot_bf16(const uint16_t* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + j) + PREFETCH, _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(load_bf16(w + j), _mm256_loadu_ps(x + j), a0);
    a1 = _mm256_fmadd_ps(load_bf16(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    a2 = _mm256_fmadd_ps(load_bf16(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
    a3 = _mm256_fmadd_ps(load_bf16(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
  }
  for (; j + 8 <= n; j += 8) a0 = _mm256_fmadd_ps(load_bf16(w + j), _mm256_loadu_ps(x + j), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; j < n; ++j) s += bf16_to_f32(w[j]) * x[j];
  return s;
}

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
    ys += s[g] * (tail_u8(q, x, j, end) - z[g] * xsum[g]);
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
    ys += s[g] * (tail_u4(q, x, j, end) - z[g] * xsum[g]);
  }
  return hsum(y) + ys;
}

const Kern table{"avx2", dot_f32, dot_bf16, qrow8, qrow4};

}  // namespace

const Kern* kern_avx2() { return &table; }

}  // namespace moeinfer_native
