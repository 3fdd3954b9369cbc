// Group-scale helpers of the x86 variants with F16C (kern_avx2.cpp, kern_avx512.cpp): each includes this
// into its own translation unit and anonymous namespace, so every copy is compiled with that variant's
// flags and none is shared across variants by the linker.
#pragma once
#include <immintrin.h>

#include "kern.h"

namespace moeinfer_native {
namespace {

// Group scales stored in fp32 or fp16 (kern.h Scales), read as fp32: one, four or eight at a time
// (F16C widens fp16 exactly, so both give the same products).
inline float scale1(const float* s) { return *s; }
inline float scale1(const uint16_t* s) { return _cvtsh_ss(*s); }
inline __m128 scale4(const float* s) { return _mm_loadu_ps(s); }
inline __m128 scale4(const uint16_t* s) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))); }
inline __m256 scale8(const float* s) { return _mm256_loadu_ps(s); }
inline __m256 scale8(const uint16_t* s) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))); }

// Per-block scales d_b * s_g in block order without a division per block (gs = bpg blocks).
template <class S>
struct GroupScale {
  const S* s;
  int64_t bpg, left;
  float next() {
    const float c = scale1(s);
    if (--left == 0) ++s, left = bpg;
    return c;
  }
};

// `rows(scales)` with the R rows' scales as typed pointers: fp16 (uint16_t) or fp32, the one storage type
// the rows of a kernel call share, so each row kernel is instantiated for both.
template <int R, class Rows>
inline void with_scales(const Scales* s, Rows rows) {
  const float* f[R];
  const uint16_t* h[R];
  for (int r = 0; r < R; ++r) f[r] = s[r].f, h[r] = s[r].h;
  if (s[0].h)
    rows(h);
  else
    rows(f);
}

}  // namespace
}  // namespace moeinfer_native
