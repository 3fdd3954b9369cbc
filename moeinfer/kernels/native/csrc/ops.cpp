// Torch-facing ops of moeinfer's native CPU kernels (torch.ops.moeinfer_native.*), registered with
// TORCH_LIBRARY so the library needs no Python headers. Threads: torch's own intra-op pool
// (at::parallel_for), so the op shares the pool and the thread count of the rest of the model.
//
// Batch-1 decode of an MoE layer's routed experts in one call (gpt-fast / llama.cpp style GEMV):
// 1. gate_up: rows (k, i) split over threads; h[k, i] = silu(gate_k[i] . x) * (up_k[i] . x);
// 2. per expert: group sums (and the nibble order) of h for the quantized down rows;
// 3. down: output rows r split over threads; out[r] = sum_k w_k * (down_k[r] . h_k)
//    (quantized experts: rows (k, r) split over threads, then the sum over k).
// Weights are read once, straight from their stored layout (bf16, fp32, or packed codes with
// group scales/zeros); nothing the size of a weight matrix is allocated.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "kern.h"

namespace moeinfer_native {
namespace {

bool cpu_supports(const std::string& variant) {
  if (variant == "generic") return true;
  if (variant == "avx2") {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  return false;
}

const Kern* pick(const std::string& variant) {
  TORCH_CHECK(variant == "generic" || variant == "avx2", "moeinfer_native: unknown variant '", variant,
              "'; valid: generic, avx2");
  TORCH_CHECK(cpu_supports(variant), "moeinfer_native: this CPU cannot run variant '", variant, "'");
  return variant == "avx2" ? kern_avx2() : kern_generic();
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// Row dot product of a bf16 or fp32 weight row with an fp32 vector.
inline float dot_row(const Kern* k, const at::Tensor& w, const void* base, int64_t row, int64_t n,
                     const float* x) {
  if (w.scalar_type() == at::kBFloat16)
    return k->dot_bf16(static_cast<const uint16_t*>(base) + row * n, x, n);
  return k->dot_f32(static_cast<const float*>(base) + row * n, x, n);
}

void check_weights(const at::Tensor& w, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), "moeinfer_native: ", what, " must be a contiguous CPU tensor");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat, "moeinfer_native: ", what,
              " must be bfloat16 or float32, got ", w.scalar_type());
}

void check_vec(const at::Tensor& x, int64_t n, const char* what) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 1 && x.size(0) == n,
              "moeinfer_native: ", what, " must be a contiguous float32 vector of ", n, " elements, got ", x.sizes());
}

// experts [K] (row of each routed expert, < 0 = skip) and weights [K] read to the host, rows checked < E.
void routed(const at::Tensor& experts, const at::Tensor& weights, int64_t E, std::vector<int64_t>& ex,
            std::vector<float>& wk) {
  const int64_t K = experts.numel();
  ex.resize(K);
  wk.resize(K);
  auto ea = experts.to(at::kLong).contiguous();
  auto wa = weights.to(at::kFloat).contiguous();
  for (int64_t k = 0; k < K; ++k) {
    ex[k] = ea.data_ptr<int64_t>()[k];
    wk[k] = wa.data_ptr<float>()[k];
    TORCH_CHECK(ex[k] < E, "moeinfer_native: expert row ", ex[k], " out of range (", E, " experts)");
  }
}

// Bytes of a row of `cols` codes as moeinfer.formats.quant.packing stores them, and its groups.
int64_t packed_bytes(int64_t cols, int64_t bits) { return bits == 8 ? cols : (cols + 7) / 8 * 4; }
int64_t num_groups(int64_t cols, int64_t group_size) { return (cols + group_size - 1) / group_size; }

// x [D] f32, experts [K] int64 (row in gate_up/down, < 0 = skip), weights [K] f32,
// gate_up [E, 2I, D], down [E, D, I] (bf16 or f32) -> out [D] f32.
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                      const at::Tensor& gate_up, const at::Tensor& down, const std::string& variant) {
  const Kern* kern = pick(variant);
  check_weights(gate_up, "gate_up");
  check_weights(down, "down");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type(), "moeinfer_native: gate_up and down dtypes differ");
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2, D = gate_up.size(2);
  TORCH_CHECK(down.size(0) == E && down.size(1) == D && down.size(2) == I, "moeinfer_native: down shape ",
              down.sizes(), " does not match gate_up ", gate_up.sizes());
  check_vec(x, D, "x");
  const int64_t K = experts.numel();
  std::vector<int64_t> ex;
  std::vector<float> wk;
  routed(experts, weights, E, ex, wk);
  at::Tensor h = at::zeros({K, I}, x.options());
  at::Tensor out = at::empty({D}, x.options());
  const float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const void* gu = gate_up.data_ptr();
  const void* dn = down.data_ptr();
  // 1. gate_up rows
  at::parallel_for(0, K * I, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t k = t / I, i = t % I;
      if (ex[k] < 0) continue;
      const int64_t base = ex[k] * 2 * I;
      hp[t] = silu(dot_row(kern, gate_up, gu, base + i, D, xp)) * dot_row(kern, gate_up, gu, base + I + i, D, xp);
    }
  });
  // 3. down rows, summed over experts with their routing weights
  float* op = out.data_ptr<float>();
  at::parallel_for(0, D, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k)
        if (ex[k] >= 0) acc += wk[k] * dot_row(kern, down, dn, ex[k] * D + r, I, hp + k * I);
      op[r] = acc;
    }
  });
  return out;
}

// x [N? no: D] f32, w [O, D] bf16/f32 -> y [O] f32 (a dense linear at batch 1).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::string& variant) {
  const Kern* kern = pick(variant);
  check_weights(w, "weight");
  TORCH_CHECK(w.dim() == 2, "moeinfer_native: gemv weight must be 2-D, got ", w.sizes());
  const int64_t O = w.size(0), D = w.size(1);
  check_vec(x, D, "x");
  at::Tensor y = at::empty({O}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const void* wp = w.data_ptr();
  at::parallel_for(0, O, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) yp[r] = dot_row(kern, w, wp, r, D, xp);
  });
  return y;
}

// Activation side of a quantized row product: group sums, and the nibble order for 4-bit codes.
struct QVec {
  const float* x;
  std::vector<float> sum, perm;
  QVec(const float* x_, int64_t cols, int64_t gs, int bits) : x(x_) {
    const int64_t G = (cols + gs - 1) / gs;
    sum.assign(G, 0.f);
    for (int64_t j = 0; j < cols; ++j) sum[j / gs] += x[j];
    if (bits == 4) {
      perm.assign(cols, 0.f);
      for (int64_t r = 0; r + 16 <= cols; r += 16)
        for (int l = 0; l < 8; ++l) {
          perm[r + l] = x[r + 2 * l];
          perm[r + 8 + l] = x[r + 2 * l + 1];
        }
    }
  }
};

struct QMat {
  const uint8_t* q;
  const float* s;
  const float* z;
  int64_t rows, P, G;
};

QMat qmat(const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, int64_t rows, int64_t P, int64_t G,
          const char* what) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 3 && q.size(1) == rows &&
                  q.size(2) == P,
              "moeinfer_native: ", what, " codes must be contiguous uint8 [E, ", rows, ", ", P, "], got ", q.sizes());
  for (const at::Tensor* t : {&s, &z})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == q.size(0) &&
                    t->size(1) == rows && t->size(2) == G,
                "moeinfer_native: ", what, " scales/zeros must be contiguous float32 [E, ", rows, ", ", G, "], got ",
                t->sizes());
  return {q.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<float>(), rows, P, G};
}

// The same vector quantized to int8 blocks (kern.h, Q8Act): built once, read by every row.
struct Q8Vec {
  std::vector<int8_t> q, q4;
  std::vector<float> d, gsum;
  Q8Vec(const float* x, int64_t cols, int64_t gs, int bits) {
    const int64_t nb = (cols + QBLOCK - 1) / QBLOCK, G = (cols + gs - 1) / gs;
    q.resize(nb * QBLOCK);
    d.resize(nb);
    quantize_q8(x, cols, q.data(), d.data());
    gsum.assign(G, 0.f);
    for (int64_t b = 0; b < nb; ++b) {
      int32_t bs = 0;
      for (int64_t j = b * QBLOCK; j < (b + 1) * QBLOCK; ++j) bs += q[j];
      gsum[b * QBLOCK / gs] += d[b] * float(bs);
    }
    if (bits == 4) {
      q4.resize(q.size());
      for (int64_t c = 0; c < nb * QBLOCK; c += QBLOCK)
        for (int l = 0; l < QBLOCK / 2; ++l) {
          q4[c + l] = q[c + 2 * l];
          q4[c + QBLOCK / 2 + l] = q[c + 2 * l + 1];
        }
    }
  }
  Q8Act act() const { return {q.data(), q4.empty() ? q.data() : q4.data(), d.data(), gsum.data()}; }
};

// Activation side of a row product in either form: fp32 (QVec) or int8 blocks (Q8Vec).
struct AnyVec {
  bool q8;
  QVec f;
  Q8Vec i;
  AnyVec(const float* x, int64_t cols, int64_t gs, int bits, bool q8_)
      : q8(q8_), f(x, q8_ ? 0 : cols, gs, bits), i(x, q8_ ? cols : 0, gs, bits) {}
};

inline float qdot(const Kern* k, const QMat& m, int64_t row, const AnyVec& v, int64_t cols, int64_t gs, int bits) {
  const uint8_t* q = m.q + row * m.P;
  const float* s = m.s + row * m.G;
  const float* z = m.z + row * m.G;
  if (v.q8) return bits == 8 ? k->qrow8_q8(q, s, z, v.i.act(), cols, gs) : k->qrow4_q8(q, s, z, v.i.act(), cols, gs);
  if (bits == 8) return k->qrow8(q, s, z, v.f.x, v.f.sum.data(), cols, gs);
  return k->qrow4(q, s, z, v.f.x, v.f.perm.data(), v.f.sum.data(), cols, gs);
}

// "f32" or "q8" (int8 activations; group sizes that are multiples of QBLOCK) -> whether q8.
bool use_q8(const std::string& activations, int64_t group_size) {
  TORCH_CHECK(activations == "f32" || activations == "q8", "moeinfer_native: unknown activations '", activations,
              "'; valid: f32, q8");
  TORCH_CHECK(activations == "f32" || group_size % QBLOCK == 0, "moeinfer_native: int8 activations need a group size ",
              "that is a multiple of ", QBLOCK, ", got ", group_size);
  return activations == "q8";
}

// Quantized experts of one bit width (moeinfer.formats.quantized_experts storage), batch-1 decode.
at::Tensor moe_decode_q(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                        const at::Tensor& q_gu, const at::Tensor& s_gu, const at::Tensor& z_gu,
                        const at::Tensor& q_dn, const at::Tensor& s_dn, const at::Tensor& z_dn, int64_t bits,
                        int64_t group_size, int64_t D, int64_t I, const std::string& variant,
                        const std::string& activations) {
  const Kern* kern = pick(variant);
  TORCH_CHECK(bits == 8 || bits == 4, "moeinfer_native: quantized experts need 8 or 4 bits, got ", bits);
  TORCH_CHECK(group_size >= 1, "moeinfer_native: group_size must be >= 1");
  const bool q8 = use_q8(activations, group_size);
  check_vec(x, D, "x");
  const QMat gu = qmat(q_gu, s_gu, z_gu, 2 * I, packed_bytes(D, bits), num_groups(D, group_size), "gate_up");
  const QMat dn = qmat(q_dn, s_dn, z_dn, D, packed_bytes(I, bits), num_groups(I, group_size), "down");
  const int64_t E = q_gu.size(0), K = experts.numel();
  TORCH_CHECK(q_dn.size(0) == E, "moeinfer_native: gate_up and down hold different expert counts");
  std::vector<int64_t> ex;
  std::vector<float> wk;
  routed(experts, weights, E, ex, wk);
  const AnyVec xv(x.data_ptr<float>(), D, group_size, int(bits), q8);
  at::Tensor h = at::zeros({K, I}, x.options());
  float* hp = h.data_ptr<float>();
  // 1. gate_up rows
  at::parallel_for(0, K * I, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t k = t / I, i = t % I;
      if (ex[k] < 0) continue;
      const int64_t base = ex[k] * 2 * I;
      hp[t] = silu(qdot(kern, gu, base + i, xv, D, group_size, int(bits))) *
              qdot(kern, gu, base + I + i, xv, D, group_size, int(bits));
    }
  });
  // 2. the activation side of each expert's down rows
  std::vector<AnyVec> hv;
  hv.reserve(K);
  for (int64_t k = 0; k < K; ++k) hv.emplace_back(hp + k * I, I, group_size, int(bits), q8);
  // 3. down rows, expert by expert (each thread streams contiguous rows of one expert's matrix), then
  //    summed over experts in routing order
  at::Tensor yk = at::zeros({K, D}, x.options());
  float* yp = yk.data_ptr<float>();
  at::parallel_for(0, K * D, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t k = t / D, r = t % D;
      if (ex[k] >= 0) yp[t] = qdot(kern, dn, ex[k] * D + r, hv[k], I, group_size, int(bits));
    }
  });
  at::Tensor out = at::empty({D}, x.options());
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < D; ++r) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k)
      if (ex[k] >= 0) acc += wk[k] * yp[k * D + r];
    op[r] = acc;
  }
  return out;
}

// x [cols] f32, one packed matrix q [R, P] u8, s/z [R, G] f32 -> y [R] f32: the row kernels of
// moe_decode_q on their own (a quantized linear at batch 1), with either form of activations.
at::Tensor gemv_q(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, int64_t bits,
                  int64_t group_size, const std::string& variant, const std::string& activations) {
  const Kern* kern = pick(variant);
  TORCH_CHECK(bits == 8 || bits == 4, "moeinfer_native: gemv_q needs 8 or 4 bits, got ", bits);
  TORCH_CHECK(group_size >= 1, "moeinfer_native: group_size must be >= 1");
  const bool q8 = use_q8(activations, group_size);
  TORCH_CHECK(x.dim() == 1, "moeinfer_native: gemv_q x must be a vector, got ", x.sizes());
  const int64_t cols = x.size(0), R = q.dim() == 2 ? q.size(0) : -1;
  check_vec(x, cols, "x");
  const int64_t P = packed_bytes(cols, bits), G = num_groups(cols, group_size);
  const QMat m = qmat(q.unsqueeze(0), s.unsqueeze(0), z.unsqueeze(0), R, P, G, "gemv_q");
  const AnyVec xv(x.data_ptr<float>(), cols, group_size, int(bits), q8);
  at::Tensor y = at::empty({R}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) yp[r] = qdot(kern, m, r, xv, cols, group_size, int(bits));
  });
  return y;
}

// x [n] f32 -> (q [ceil(n / 32) * 32] int8, zero-padded; d [ceil(n / 32)] f32): the activation
// quantization every int8-activation row product uses (kern.h quantize_q8).
std::tuple<at::Tensor, at::Tensor> quantize_q8_op(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1, "moeinfer_native: quantize_q8 x must be a vector, got ", x.sizes());
  check_vec(x, x.size(0), "x");
  const int64_t nb = (x.size(0) + QBLOCK - 1) / QBLOCK;
  at::Tensor q = at::empty({nb * QBLOCK}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({nb}, x.options());
  quantize_q8(x.data_ptr<float>(), x.size(0), q.data_ptr<int8_t>(), d.data_ptr<float>());
  return {q, d};
}

// Dequantize rows of packed codes into `out` [R, cols] f32 (a reused buffer: the prefill path's tile),
// as moeinfer.formats.quant.groupwise.dequantize computes them: w = u * s + (-z * s).
void dequant_into(const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, int64_t bits, int64_t group_size,
                  at::Tensor& out) {
  TORCH_CHECK(bits == 8 || bits == 4, "moeinfer_native: dequant needs 8 or 4 bits, got ", bits);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2,
              "moeinfer_native: dequant output must be a contiguous float32 matrix");
  const int64_t R = out.size(0), cols = out.size(1);
  const int64_t P = packed_bytes(cols, bits), G = num_groups(cols, group_size);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.numel() == R * P,
              "moeinfer_native: dequant codes must be contiguous uint8 with ", R, "x", P, " elements");
  TORCH_CHECK(s.scalar_type() == at::kFloat && z.scalar_type() == at::kFloat && s.is_contiguous() &&
                  z.is_contiguous() && s.numel() == R * G && z.numel() == R * G,
              "moeinfer_native: dequant scales/zeros must be contiguous float32 with ", R, "x", G, " elements");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const uint8_t* qr = qp + r * P;
      float* o = op + r * cols;
      for (int64_t g = 0, c = 0; c < cols; ++g, c += group_size) {
        const int64_t end = c + group_size < cols ? c + group_size : cols;
        const float sc = sp[r * G + g], off = -zp[r * G + g] * sc;
        if (bits == 8) {
          for (int64_t j = c; j < end; ++j) o[j] = float(qr[j]) * sc + off;
        } else {
          int64_t j = c;
          if (j % 2 == 0)  // whole bytes: low nibble to column j, high to j + 1
            for (; j + 2 <= end; j += 2) {
              const uint8_t byte = qr[j >> 1];
              o[j] = float(byte & 0xF) * sc + off;
              o[j + 1] = float(byte >> 4) * sc + off;
            }
          for (; j < end; ++j) o[j] = float((qr[j >> 1] >> ((j & 1) * 4)) & 0xF) * sc + off;
        }
      }
    }
  });
}

bool supports(const std::string& variant) { return cpu_supports(variant); }

}  // namespace
}  // namespace moeinfer_native

TORCH_LIBRARY(moeinfer_native, m) {
  m.def("supports(str variant) -> bool", &moeinfer_native::supports);
  m.def("moe_decode(Tensor x, Tensor experts, Tensor weights, Tensor gate_up, Tensor down, str variant) -> Tensor",
        &moeinfer_native::moe_decode);
  m.def("gemv(Tensor x, Tensor w, str variant) -> Tensor", &moeinfer_native::gemv);
  m.def("moe_decode_q(Tensor x, Tensor experts, Tensor weights, Tensor q_gu, Tensor s_gu, Tensor z_gu, "
        "Tensor q_dn, Tensor s_dn, Tensor z_dn, int bits, int group_size, int hidden, int inner, str variant, str activations=\"f32\") -> Tensor",
        &moeinfer_native::moe_decode_q);
  m.def("gemv_q(Tensor x, Tensor q, Tensor s, Tensor z, int bits, int group_size, str variant, "
        "str activations) -> Tensor", &moeinfer_native::gemv_q);
  m.def("quantize_q8(Tensor x) -> (Tensor, Tensor)", &moeinfer_native::quantize_q8_op);
  m.def("dequant_into(Tensor q, Tensor s, Tensor z, int bits, int group_size, Tensor(a!) out) -> ()",
        &moeinfer_native::dequant_into);
}
