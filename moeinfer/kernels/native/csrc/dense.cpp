// Fused dense ops of the decode step (torch.ops.moeinfer_native.*, a fragment of the library that
// ops.cpp defines). At batch 1 a transformer's small elementwise steps cost more in dispatch than in
// arithmetic (RMSNorm is eight torch ops on 2048 numbers, ~9 us each on a 2-core machine); one call
// computes the same formula in a single pass over the row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "kern.h"

namespace moeinfer_native {
namespace {

// fp32 -> bf16 with round-to-nearest-even, as torch's .to(torch.bfloat16) (NaN stays a quiet NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

// Row r of x [R, D]: y = w * cast(x32 * rsqrt(mean(x32^2) + eps)), moeinfer.model.norm.RMSNorm's formula:
// normalised in fp32, cast to the input's dtype, then scaled by the weight in that dtype.
template <class T, class Load, class Store>
void norm_rows(const T* x, const T* w, T* y, int64_t R, int64_t D, float eps, Load load, Store store) {
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* xr = x + r * D;
      T* yr = y + r * D;
      double ss = 0.0;  // the mean in double: no worse than torch's fp32 reduction whatever its order
      for (int64_t j = 0; j < D; ++j) {
        const double v = load(xr[j]);
        ss += v * v;
      }
      const float mean = float(ss / double(D));
      const float inv = 1.f / std::sqrt(mean + eps);
      for (int64_t j = 0; j < D; ++j) yr[j] = store(load(w[j]) * load(store(load(xr[j]) * inv)));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "moeinfer_native: rms_norm needs CPU tensors");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "moeinfer_native: rms_norm needs x and weight both bfloat16 or both float32, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "moeinfer_native: rms_norm weight must be [", x.size(-1), "], got ", weight.sizes());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t D = x.size(-1), R = D ? xc.numel() / D : 0;
  const float e = float(eps);
  if (x.scalar_type() == at::kFloat) {
    auto id = [](float v) { return v; };
    norm_rows(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), R, D, e, id, id);
  } else {
    auto load = [](uint16_t v) { return bf16_to_f32(v); };
    auto store = [](float v) { return f32_to_bf16(v); };
    norm_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
              reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()),
              reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), R, D, e, load, store);
  }
  return y;
}

}  // namespace
}  // namespace moeinfer_native

TORCH_LIBRARY_FRAGMENT(moeinfer_native, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &moeinfer_native::rms_norm);
}
