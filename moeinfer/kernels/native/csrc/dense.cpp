// Fused dense ops of the decode step (torch.ops.moeinfer_native.*, a fragment of the library that
// ops.cpp defines). At batch 1 a transformer's small elementwise steps cost more in dispatch than in
// arithmetic (RMSNorm is eight torch ops on 2048 numbers, ~9 us each on a 2-core machine; the rotary
// embedding of q and k about eight each); one call computes the same formula in a single pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

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
// Row (b, h, t) of x is read at b * st[0] + h * st[1] + t * st[2] and written at the same offsets of y by yst.
template <class T, class Load, class Store>
void rope_rows(const T* x, const T* cs, const T* sn, T* y, int64_t B, int64_t H, int64_t T_, int64_t R,
               const int64_t* st, const int64_t* yst, Load load, Store store) {
  const int64_t half = R / 2;
  at::parallel_for(0, B * H * T_, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t bi = i / (H * T_), hi = i / T_ % H, ti = i % T_;
      const T* xr = x + bi * st[0] + hi * st[1] + ti * st[2];
      const T* c = cs + (bi * T_ + ti) * R;
      const T* s = sn + (bi * T_ + ti) * R;
      T* yr = y + bi * yst[0] + hi * yst[1] + ti * yst[2];
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
  const int64_t st[3] = {x.stride(0), x.stride(1), x.stride(2)}, yst[3] = {H * T_ * R, T_ * R, R};
  if (x.scalar_type() == at::kFloat) {
    auto id = [](float v) { return v; };
    rope_rows(x.data_ptr<float>(), cc.data_ptr<float>(), sc.data_ptr<float>(), y.data_ptr<float>(), B, H, T_, R, st,
              yst, id, id);
  } else {
    auto load = [](uint16_t v) { return bf16_to_f32(v); };
    auto store = [](float v) { return f32_to_bf16(v); };
    auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    rope_rows(u16(x), u16(cc), u16(sc), reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), B, H, T_, R, st,
              yst, load, store);
  }
  return y;
}

// Attention of one new token per row over its cached keys (decode, no mask):
// q [B, H, 1, Dk], k [B, Hkv, S, Dk], v [B, Hkv, S, Dv] (any strides, last dims contiguous; head h reads
// kv head h / (H / Hkv)) -> out [B, H, 1, Dv] contiguous in q's dtype:
//     out = softmax(scale * q . k_s over s) . v
// computed in fp32 (scores by the variant's row dot products, max-subtracted exponentials, their sum, the
// weighted sum of v), rounded once at the end, as torch's CPU flash attention does for bf16; threads over
// (row, head) pairs.
template <class T, class Load, class Store, class Dot>
void attend_rows(const T* q, const T* k, const T* v, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t S,
                 int64_t Dk, int64_t Dv, const int64_t* qs, const int64_t* ks, const int64_t* vs, float scale,
                 Load load, Store store, Dot dot_row) {
  const int64_t rep = H / Hkv;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, S * (Dk + Dv)));
  at::parallel_for(0, B * H, grain, [&](int64_t b0, int64_t e0) {
    std::vector<float> p(S), qf(Dk), acc(Dv);
    for (int64_t i = b0; i < e0; ++i) {
      const int64_t b = i / H, h = i % H, g = h / rep;
      const T* qr = q + b * qs[0] + h * qs[1];
      for (int64_t d = 0; d < Dk; ++d) qf[d] = load(qr[d]);
      const T* kb = k + b * ks[0] + g * ks[1];
      const T* vb = v + b * vs[0] + g * vs[1];
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        p[s] = dot_row(kb + s * ks[2], qf.data(), Dk) * scale;
        mx = std::max(mx, p[s]);
      }
      float sum = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        p[s] = std::exp(p[s] - mx);
        sum += p[s];
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < S; ++s) {
        const T* vr = vb + s * vs[2];
        const float w = p[s];
        for (int64_t d = 0; d < Dv; ++d) acc[d] += w * load(vr[d]);
      }
      T* o = out + i * Dv;
      for (int64_t d = 0; d < Dv; ++d) o[d] = store(acc[d] / sum);
    }
  });
}

at::Tensor attend_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                         const std::string& variant) {
  const Kern* kern = pick_kern(variant.c_str());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "moeinfer_native: attend_decode needs CPU tensors");
  TORCH_CHECK((q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "moeinfer_native: attend_decode needs q, k, v all bfloat16 or all float32");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "moeinfer_native: attend_decode takes q [B, H, 1, D], k/v [B, Hkv, S, D], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), S = k.size(2), Dk = q.size(3), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == S && k.size(3) == Dk &&
                  Hkv > 0 && H % Hkv == 0 && S > 0,
              "moeinfer_native: attend_decode shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "moeinfer_native: attend_decode needs the head dimension contiguous");
  at::Tensor out = at::empty({B, H, 1, Dv}, q.options());
  const int64_t qs[2] = {q.stride(0), q.stride(1)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float sc = float(scale);
  if (q.scalar_type() == at::kFloat) {
    auto id = [](float x) { return x; };
    auto dot = [kern](const float* w, const float* x, int64_t n) { return kern->dot_f32(w, x, n); };
    attend_rows(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(), B, H, Hkv,
                S, Dk, Dv, qs, ks, vs, sc, id, id, dot);
  } else {
    auto load = [](uint16_t x) { return bf16_to_f32(x); };
    auto store = [](float x) { return f32_to_bf16(x); };
    auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    auto dot = [kern](const uint16_t* w, const float* x, int64_t n) { return kern->dot_bf16(w, x, n); };
    attend_rows(u16(q), u16(k), u16(v), reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), B, H, Hkv, S,
                Dk, Dv, qs, ks, vs, sc, load, store, dot);
  }
  return out;
}

// One decode step of a layer's attention after its projections, for rows that all write the same cache
// slot (batch-1 decode, unpadded batches), in one call instead of about twenty torch ops:
// 1. q rotated (rope_rows) into a scratch row;
// 2. k rotated straight into the key cache at `slot`, v copied into the value cache there;
// 3. q attended over slots [0, slot] (attend_rows).
// The arithmetic of `rope`, KVCache's write and `attend_decode` one after the other, so the same bits.
// q [B, 1, H * Dk] (any contiguous tensor of B * H * Dk numbers, row-major [B, H, Dk]), k [B, 1, Hkv * Dk],
// v [B, 1, Hkv * Dv] and cos/sin [B, 1, Dk] contiguous; k_cache [B, Hkv, S, Dk], v_cache [B, Hkv, S, Dv]
// (any strides, last dims contiguous), written at `slot` -> out [B, 1, H * Dv] in q's dtype.
at::Tensor attend_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                              const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              int64_t slot, double scale, const std::string& variant) {
  const Kern* kern = pick_kern(variant.c_str());
  const auto dt = q.scalar_type();
  for (const at::Tensor* t : {&q, &k, &v, &cos, &sin, &k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dt && (dt == at::kBFloat16 || dt == at::kFloat),
                "moeinfer_native: attend_decode_step needs CPU tensors, all bfloat16 or all float32");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "moeinfer_native: attend_decode_step caches must be [B, Hkv, S, D] with D contiguous, got ",
              k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), S = k_cache.size(2), Dk = k_cache.size(3),
                Dv = v_cache.size(3);
  TORCH_CHECK(v_cache.size(0) == B && v_cache.size(1) == Hkv && v_cache.size(2) == S && B > 0 && Hkv > 0 &&
                  Dk > 0 && Dk % 2 == 0,
              "moeinfer_native: attend_decode_step caches do not match: ", k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(slot >= 0 && slot < S, "moeinfer_native: attend_decode_step slot ", slot, " outside the cache's ", S,
              " slots");
  const int64_t H = q.numel() / (B * Dk);
  TORCH_CHECK(q.is_contiguous() && q.dim() >= 1 && q.size(0) == B && q.numel() == B * H * Dk && H % Hkv == 0 && H > 0,
              "moeinfer_native: attend_decode_step q must hold B x H x ", Dk, " numbers (H a multiple of ", Hkv,
              "), got ", q.sizes());
  TORCH_CHECK(k.is_contiguous() && k.numel() == B * Hkv * Dk && v.is_contiguous() && v.numel() == B * Hkv * Dv,
              "moeinfer_native: attend_decode_step k/v must hold one new token per row, got ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * Dk && sin.numel() == B * Dk,
              "moeinfer_native: attend_decode_step cos/sin must be [", B, ", 1, ", Dk, "], got ", cos.sizes());
  at::Tensor out = at::empty({B, 1, H * Dv}, q.options());
  const int64_t qst[3] = {H * Dk, Dk, Dk}, kst[3] = {Hkv * Dk, Dk, Dk}, qs[2] = {H * Dk, Dk};
  const int64_t kcs[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)},
                vcs[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const float sc = float(scale);
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* cp, auto* sp, auto* kc, auto* vc, auto* op, auto load,
                 auto store, auto dot) {
    using T = std::remove_pointer_t<decltype(op)>;
    std::vector<T> qr(B * H * Dk);
    rope_rows(qp, cp, sp, qr.data(), B, H, 1, Dk, qst, qst, load, store);  // 1.
    rope_rows(kp, cp, sp, kc + slot * kcs[2], B, Hkv, 1, Dk, kst, kcs, load, store);  // 2.
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h)
        std::copy_n(vp + (b * Hkv + h) * Dv, Dv, vc + b * vcs[0] + h * vcs[1] + slot * vcs[2]);
    attend_rows(static_cast<const T*>(qr.data()), static_cast<const T*>(kc), static_cast<const T*>(vc), op, B, H,
                Hkv, slot + 1, Dk, Dv, qs, kcs, vcs, sc, load, store, dot);  // 3.
  };
  if (dt == at::kFloat) {
    auto id = [](float x) { return x; };
    auto dot = [kern](const float* w, const float* x, int64_t n) { return kern->dot_f32(w, x, n); };
    run(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
        k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>(), id, id, dot);
  } else {
    auto load = [](uint16_t x) { return bf16_to_f32(x); };
    auto store = [](float x) { return f32_to_bf16(x); };
    auto u16 = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    auto dot = [kern](const uint16_t* w, const float* x, int64_t n) { return kern->dot_bf16(w, x, n); };
    run(u16(q), u16(k), u16(v), u16(cos), u16(sin), u16(k_cache), u16(v_cache), u16(out), load, store, dot);
  }
  return out;
}

}  // namespace
}  // namespace moeinfer_native

TORCH_LIBRARY_FRAGMENT(moeinfer_native, m) {
  m.def("attend_decode(Tensor q, Tensor k, Tensor v, float scale, str variant) -> Tensor",
        &moeinfer_native::attend_decode);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &moeinfer_native::rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &moeinfer_native::rope);
  m.def("attend_decode_step(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int slot, float scale, str variant) -> Tensor",
        &moeinfer_native::attend_decode_step);
}
