// Inner loops of the native CPU kernels, one table per instruction set (kern_generic.cpp,
// kern_avx2.cpp, ...). ops.cpp owns threading and the torch-facing ops; these see raw rows.
//
// Quantized rows use moeinfer's group-wise storage (moeinfer/compress/quant): w = (u - z) * s per
// group of `gs` columns, codes u packed by moeinfer/compress/quant/packing.py (8-bit: one byte per
// code; 4-bit: byte j holds code 2j in its low nibble and code 2j+1 in its high one). A row's dot
// product with x is computed without materialising w:
//     y = sum_g s_g * (sum_{j in g} u_j x_j - z_g * sum_{j in g} x_j)
// so the codes are widened in registers and the per-group sums of x are computed once per vector.
// For 4-bit codes x is also given "nibble-ordered" per run of 16 columns (xperm: the 8 even columns,
// then the 8 odd ones), so the low and high nibbles of 8 packed bytes meet their activations in order.
#pragma once
#include <cstdint>

namespace moeinfer_native {

struct Kern {
  const char* name;
  float (*dot_f32)(const float* w, const float* x, int64_t n);
  float (*dot_bf16)(const uint16_t* w, const float* x, int64_t n);
  float (*qrow8)(const uint8_t* q, const float* s, const float* z, const float* x, const float* xsum,
                 int64_t cols, int64_t gs);
  float (*qrow4)(const uint8_t* q, const float* s, const float* z, const float* x, const float* xperm,
                 const float* xsum, int64_t cols, int64_t gs);
};

const Kern* kern_generic();
const Kern* kern_avx2();

// Scalar tails shared by every variant: columns [begin, end) of a row, in storage order.
inline float tail_u8(const uint8_t* q, const float* x, int64_t begin, int64_t end) {
  float acc = 0.f;
  for (int64_t j = begin; j < end; ++j) acc += float(q[j]) * x[j];
  return acc;
}

inline float tail_u4(const uint8_t* q, const float* x, int64_t begin, int64_t end) {
  float acc = 0.f;
  for (int64_t j = begin; j < end; ++j) acc += float((q[j >> 1] >> ((j & 1) * 4)) & 0xF) * x[j];
  return acc;
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

}  // namespace moeinfer_native
