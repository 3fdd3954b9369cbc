// Fused dense ops of the decode step (torch.ops.moeinfer_native.*, a fragment of the library that
// ops.cpp defines). At batch 1 a transformer's small elementwise steps cost more in dispatch than in
// arithmetic (RMSNorm is eight torch ops on 2048 numbers, ~9 us each on a 2-core machine; the rotary
// embedding of q and k about eight each); one call computes the same formula in a single pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "kern.h"

namespace moeinfer_native {
namespace {

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

// Rotary embedding, "rotate half" layout (moeinfer.model.rope.RotaryEmbedding.rotate, the reference):
// x [B, H, T, R] (any strides, last dim contiguous), cos/sin [B, T, R] -> y [B, H, T, R] contiguous,
//     y = x * cos + cat(-x[R/2:], x[:R/2]) * sin
// with the reference's roundings: each product rounded to x's dtype, then the sum (bf16: computed in
// fp32 and rounded, as torch's bf16 ops; this file has no FMA, so fp32 rounds each step as well).
template <class T, class Load, class Store>
void rope_rows(const T* x, const T* cs, const T* sn, T* y, int64_t B, int64_t H, int64_t T_, int64_t R,
               const int64_t* st, Load load, Store store) {
  const int64_t half = R / 2;
  at::parallel_for(0, B * H * T_, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t bi = i / (H * T_), hi = i / T_ % H, ti = i % T_;
      const T* xr = x + bi * st[0] + hi * st[1] + ti * st[2];
      const T* c = cs + (bi * T_ + ti) * R;
      const T* s = sn + (bi * T_ + ti) * R;
      T* yr = y + i * R;
      for (int64_t j = 0; j < R; ++j) {
        const float rot = j < half ? -load(xr[j + half]) : load(xr[j - half]);
        const float a = load(store(load(xr[j]) * load(c[j])));
        const float bb = load(store(rot * load(s[j])));
        yr[j] = store(a + bb);
      }
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "moeinfer_native: rope needs CPU tensors");
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                  cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "moeinfer_native: rope needs x, cos and sin all bfloat16 or all float32, got ", x.scalar_type(), ", ",
              cos.scalar_type(), ", ", sin.scalar_type());
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "moeinfer_native: rope x must be [B, H, T, R] with R even and contiguous, got ", x.sizes());
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), R = x.size(3);
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == T_ && t->size(2) == R,
                "moeinfer_native: rope cos/sin must be [", B, ", ", T_, ", ", R, "], got ", t->sizes());
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor y = at::empty({B, H, T_, R}, x.options());
  const int64_t st[3] = {x.stride(0), x.stride(1), x.stride(2)};
  if (x.scalar_type() == at::kFloat) {
    auto id = [](float v) { return v; };
    rope_rows(x.data_ptr<float>(), cc.data_ptr<float>(), sc.data_ptr<float>(), y.data_ptr<float>(), B, H, T_, R, st,
              id, id);
  } else {
    auto load = [](uint16_t v) { return bf16_to_f32(v); };
    auto store = [](float v) { return f32_to_bf16(v); };
    auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    rope_rows(u16(x), u16(cc), u16(sc), reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), B, H, T_, R, st,
              load, store);
  }
  return y;
}

}  // namespace
}  // namespace moeinfer_native

TORCH_LIBRARY_FRAGMENT(moeinfer_native, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &moeinfer_native::rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &moeinfer_native::rope);
}
