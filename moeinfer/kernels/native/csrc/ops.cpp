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
// group scales/zeros); nothing the size of a weight matrix is allocated. The same decode in parts, for an
// offload cache's slots (the cached experts in one call, then each load as it lands): `moe_decode_rows` /
// `moe_decode_q_rows` write each routed expert's output row, `combine_rows` sums them as the one-call
// decodes sum theirs, bit for bit; a quantized stack's experts may lie apart (QMat).
//
// Many rows on packed codes (prefill, and a quantized linear at any batch): `gemm_q` quantizes the
// activation rows once to int8 blocks and runs the tiled integer GEMM of kern.h; `moe_prefill_q` runs a
// whole quantized-experts prefill on it in one call (dispatch, two GEMMs per routed expert, combine).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "acts.h"
#include "kern.h"
#include "slots.h"

namespace moeinfer_native {
namespace {

// Whether this library holds `variant` (the optional ones are left out where the compiler rejects their
// flags: kern.h).
bool built(const std::string& variant) {
  if (variant == "avx512") return kern_avx512 != nullptr;
  if (variant == "amx") return kern_amx != nullptr && amx_usable != nullptr;
  return variant == "generic" || variant == "avx2";
}

bool cpu_supports(const std::string& variant) {
  if (!built(variant)) return false;
  if (variant == "generic") return true;
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (variant == "avx2") return avx2;
  // GCC's checks of AVX-512 features include the OS saving the vector state (XCR0)
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  if (variant == "avx512") return avx512;
  if (variant == "amx") {
    // CPUID.(7,0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8, then the OS's permission; asked once, since every op
    // checks its variant and CPUID traps to the hypervisor in a VM (17.5 us a call on this project's Xeon VM)
    static const bool amx = [] {
      unsigned a = 0, b = 0, c = 0, d = 0;
      return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 25 & 1) && amx_usable();
    }();
    return avx512 && amx;
  }
  return false;
}

const Kern* pick(const std::string& variant) {
  TORCH_CHECK(variant == "generic" || variant == "avx2" || variant == "avx512" || variant == "amx",
              "moeinfer_native: unknown variant '", variant, "'; valid: generic, avx2, avx512, amx");
  TORCH_CHECK(built(variant), "moeinfer_native: variant '", variant,
              "' is not in this build (the compiler rejected its flags when the library was built)");
  TORCH_CHECK(cpu_supports(variant), "moeinfer_native: this CPU cannot run variant '", variant, "'");
  if (variant == "amx") return kern_amx();
  return variant == "avx512" ? kern_avx512() : variant == "avx2" ? kern_avx2() : kern_generic();
}

}  // namespace

const Kern* pick_kern(const char* variant) { return pick(variant); }

namespace {

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// Row dot product of a bf16 or fp32 weight row with an fp32 vector.
inline float dot_row(const Kern* k, const at::Tensor& w, const void* base, int64_t row, int64_t n,
                     const float* x) {
  if (w.scalar_type() == at::kBFloat16)
    return k->dot_bf16(static_cast<const uint16_t*>(base) + row * n, x, n);
  return k->dot_f32(static_cast<const float*>(base) + row * n, x, n);
}

// Rows `rows[0..3]` of `w` (bf16 or f32, rows of n) against x at once: the one-row results, bit for bit.
inline void dot_rows4(const Kern* k, const at::Tensor& w, const void* base, const int64_t* rows, int64_t n,
                      const float* x, float* out) {
  if (w.scalar_type() == at::kBFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(base);
    const uint16_t* wr[4] = {p + rows[0] * n, p + rows[1] * n, p + rows[2] * n, p + rows[3] * n};
    k->dot4_bf16(wr, x, n, out);
  } else {
    const float* p = static_cast<const float*>(base);
    const float* wr[4] = {p + rows[0] * n, p + rows[1] * n, p + rows[2] * n, p + rows[3] * n};
    k->dot4_f32(wr, x, n, out);
  }
}

// Items [b, e) of one thread's share in N interleaved runs: items b + i, b + q + i, ..., b + (N-1)q + i
// together through `many` (q = (e - b) / N), the rest one by one through `one`. At batch 1 a core reads
// several distant weight streams at once faster than one (more reads in flight: on this project's
// 2-core EPYC one stream reads ~7 GB/s a core, four ~10), and the four-row kernels give every row the
// one-row kernel's bits, so no result depends on how rows are grouped or how many threads run.
template <int N, class One, class Many>
inline void in_runs(int64_t b, int64_t e, One one, Many many) {
  const int64_t q = (e - b) / N;
  for (int64_t i = 0; i < q; ++i) {
    int64_t t[N];
    for (int j = 0; j < N; ++j) t[j] = b + j * q + i;
    many(t);
  }
  for (int64_t t = b + N * q; t < e; ++t) one(t);
}

// Rows [r0, r0 + n) of `w` (bf16 or f32, rows of `cols`) against x into y[0, n), four interleaved runs at
// once (in_runs), each row the one-row kernel's bits.
inline void dot_rows_into(const Kern* k, const at::Tensor& w, const void* base, int64_t r0, int64_t n, int64_t cols,
                          const float* x, float* y) {
  in_runs<4>(0, n, [&](int64_t i) { y[i] = dot_row(k, w, base, r0 + i, cols, x); }, [&](const int64_t* i) {
    const int64_t rows[4] = {r0 + i[0], r0 + i[1], r0 + i[2], r0 + i[3]};
    float y4[4];
    dot_rows4(k, w, base, rows, cols, x, y4);
    for (int j = 0; j < 4; ++j) y[i[j]] = y4[j];
  });
}

// Step 1 of a batch-1 expert decode: h[k * I + i] = silu(gate_k[i] . x) * (up_k[i] . x) for the K routed
// experts (ex[k] < 0: not held here, h left as it is), gate_k[i] and up_k[i] rows ex[k] * 2I + i and
// ex[k] * 2I + I + i of the stack. `one(row)` is a row's product; `four(rows, g)` four rows' at once,
// each bit-equal to `one`. The threads' shares of the K experts' 2I rows go expert by expert, each as
// four runs of contiguous rows (in_runs), as a GEMV reads one matrix; the products are paired into h
// after. (Pairing gate and up rows as they were read, two runs of (gate, up) pairs, read ~20% slower:
// bf16 OLMoE-1B-7B experts on the 2-core EPYC, docs/kernels.md.)
template <class One, class Four>
inline void gate_up_rows(const std::vector<int64_t>& ex, int64_t K, int64_t I, float* hp, One one, Four four) {
  std::vector<float> g(K * 2 * I);
  float* gp = g.data();
  at::parallel_for(0, K * 2 * I, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e;) {  // the share's rows expert by expert
      const int64_t k = t / (2 * I), end = std::min(e, (k + 1) * 2 * I);
      if (ex[k] >= 0) {
        const int64_t base = (ex[k] - k) * 2 * I;  // item u is row base + u of the stack
        in_runs<4>(t, end, [&](int64_t u) { gp[u] = one(base + u); }, [&](const int64_t* u) {
          const int64_t rows[4] = {base + u[0], base + u[1], base + u[2], base + u[3]};
          float y4[4];
          four(rows, y4);
          for (int j = 0; j < 4; ++j) gp[u[j]] = y4[j];
        });
      }
      t = end;
    }
  });
  at::parallel_for(0, K * I, 256, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t k = t / I, i = t % I;
      if (ex[k] >= 0) hp[t] = silu(gp[k * 2 * I + i]) * gp[k * 2 * I + I + i];
    }
  });
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

// One activation row [..., D] (any leading dims of size 1, contiguous; float32 or bfloat16) as float32:
// `x` itself, or a bf16 row widened into `buf` (no tensor allocated).
const float* one_row_f32(const at::Tensor& x, int64_t D, std::vector<float>& buf, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "moeinfer_native: ", what, " must be a float32 or bfloat16 CPU tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == D && x.numel() == D && x.is_contiguous(), "moeinfer_native: ", what,
              " must be one contiguous row of ", D, " elements, got ", x.sizes());
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  buf.resize(D);
  for (int64_t j = 0; j < D; ++j) buf[j] = bf16_to_f32(xp[j]);
  return buf.data();
}

// An empty tensor shaped like the row `x` with its last dim `n`, in x's dtype; its data as float32 when
// that is its dtype, else `buf` (n floats) for `store_row` to round into it.
float* out_row(const at::Tensor& x, int64_t n, at::Tensor& out, std::vector<float>& buf) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  out = at::empty(shape, x.options());
  if (x.scalar_type() == at::kFloat) return out.data_ptr<float>();
  buf.resize(n);
  return buf.data();
}

// The float32 results in `buf` rounded into a bf16 `out` (nothing to do for a float32 one).
void store_row(at::Tensor& out, const std::vector<float>& buf) {
  if (out.scalar_type() == at::kFloat) return;
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (size_t r = 0; r < buf.size(); ++r) op[r] = f32_to_bf16(buf[r]);
}

// Experts' output rows combined: out[r] = sum_k w_k * y[k, r] over the experts held (ex[k] >= 0), in
// routing order; every decode op ends with it, and `combine_rows` runs it alone, so an expert stage
// computed in parts (an offload cache's hits, then each load as it lands) gives the one call's bits.
void combine_into(const std::vector<int64_t>& ex, const std::vector<float>& wk, const float* yp, int64_t D, float* op) {
  const int64_t K = int64_t(ex.size());
  for (int64_t r = 0; r < D; ++r) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k)
      if (ex[k] >= 0) acc += wk[k] * yp[k * D + r];
    op[r] = acc;
  }
}

// rows [K, D]: a contiguous float32 buffer the per-expert outputs of a decode op go to.
float* rows_buffer(const at::Tensor& rows, int64_t K, int64_t D) {
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.is_contiguous() && rows.dim() == 2 && rows.size(0) == K &&
                  rows.size(1) == D,
              "moeinfer_native: rows must be a contiguous float32 [", K, ", ", D, "] buffer, got ", rows.scalar_type(),
              " ", rows.sizes());
  return rows.data_ptr<float>();
}

// The experts a decode call holds (ex[k] >= 0): their stack rows and their positions k. The work is split
// over these alone, so a call holding one of its K experts (an offload cache's load, computed as it lands)
// still keeps every thread busy: split over all K, the threads whose share fell on skipped experts idled
// (the Mixtral-8x7B shape's all-miss bf16 decode ran at half speed).
struct Held {
  std::vector<int64_t> ex, pos;
  explicit Held(const std::vector<int64_t>& all) {
    for (int64_t k = 0; k < int64_t(all.size()); ++k)
      if (all[k] >= 0) ex.push_back(all[k]), pos.push_back(k);
  }
};

// Steps 1 and 3 of the float decode (module comment) without the sum over experts: expert k's output
// into yp[k * D, (k + 1) * D) for the experts held (ex[k] >= 0; other rows untouched).
void decode_rows(const Kern* kern, const at::Tensor& gate_up, const at::Tensor& down, const std::vector<int64_t>& all,
                 const float* xp, int64_t D, int64_t I, float* yp) {
  const Held held(all);
  const std::vector<int64_t>& ex = held.ex;
  const int64_t K = int64_t(ex.size());
  std::vector<float> h(K * I, 0.f);
  float* hp = h.data();
  const void* gu = gate_up.data_ptr();
  const void* dn = down.data_ptr();
  // 1. gate_up rows
  gate_up_rows(ex, K, I, hp, [&](int64_t row) { return dot_row(kern, gate_up, gu, row, D, xp); },
               [&](const int64_t* rows, float* g) { dot_rows4(kern, gate_up, gu, rows, D, xp, g); });
  // 3. down rows expert by expert (each thread streams contiguous rows of one expert's matrix, in four
  //    runs; summed over experts after, combine_into): row by row the sum of a row-by-row loop, bit for
  //    bit, while a thread reads 4 weight streams instead of one row of each of K distant matrices in turn
  //    (with step 1 in runs too: bf16 OLMoE-1B-7B experts, 8 of 64, on the 2-core EPYC read 13.8 ->
  //    18.8-20.1 GB/s, best of 15; docs/kernels.md)
  at::parallel_for(0, K * D, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e;) {  // the share's rows expert by expert
      const int64_t k = t / D, end = std::min(e, (k + 1) * D);
      dot_rows_into(kern, down, dn, ex[k] * D + t - k * D, end - t, I, hp + k * I, yp + held.pos[k] * D + t - k * D);
      t = end;
    }
  });
}

// gate_up [E, 2I, D], down [E, D, I] checked as one stack of float experts; (E, I, D).
std::tuple<int64_t, int64_t, int64_t> float_stack(const at::Tensor& gate_up, const at::Tensor& down) {
  check_weights(gate_up, "gate_up");
  check_weights(down, "down");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type(), "moeinfer_native: gate_up and down dtypes differ");
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2, D = gate_up.size(2);
  TORCH_CHECK(down.size(0) == E && down.size(1) == D && down.size(2) == I, "moeinfer_native: down shape ",
              down.sizes(), " does not match gate_up ", gate_up.sizes());
  return {E, I, D};
}

// x [..., D] one row, f32 or bf16, experts [K] int64 (any shape of K rows in gate_up/down, < 0 = skip),
// weights [K] f32, gate_up [E, 2I, D], down [E, D, I] (bf16 or f32) -> out [..., D] in x's dtype (a bf16 x
// widened once, the result rounded once, as x.float() before and out.to(bf16) after); no tensor but out
// is allocated.
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                      const at::Tensor& gate_up, const at::Tensor& down, const std::string& variant) {
  const Kern* kern = pick(variant);
  const auto [E, I, D] = float_stack(gate_up, down);
  std::vector<float> xbuf, obuf;
  const float* xp = one_row_f32(x, D, xbuf, "x");
  std::vector<int64_t> ex;
  std::vector<float> wk;
  routed(experts, weights, E, ex, wk);
  std::vector<float> yk(ex.size() * D, 0.f);
  decode_rows(kern, gate_up, down, ex, xp, D, I, yk.data());
  at::Tensor out;
  combine_into(ex, wk, yk.data(), D, out_row(x, D, out, obuf));
  store_row(out, obuf);
  return out;
}

// moe_decode without the sum over experts: expert k's output row into rows[k] (float32 [K, D]) for the
// experts held (experts[k] >= 0; other rows left as they are).
void moe_decode_rows(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& gate_up, const at::Tensor& down,
                     const std::string& variant, const at::Tensor& rows) {
  const Kern* kern = pick(variant);
  const auto [E, I, D] = float_stack(gate_up, down);
  std::vector<float> xbuf;
  const float* xp = one_row_f32(x, D, xbuf, "x");
  std::vector<int64_t> ex;
  std::vector<float> wk;
  routed(experts, at::ones({experts.numel()}), E, ex, wk);
  decode_rows(kern, gate_up, down, ex, xp, D, I, rows_buffer(rows, int64_t(ex.size()), D));
}

// x [..., D] one row (its dtype and shape: the output's), experts [K] (< 0: skipped), weights [K], rows
// [K, D] float32 -> out [..., D] in x's dtype: the last step of every decode op, alone (combine_into).
at::Tensor combine_rows(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                        const at::Tensor& rows) {
  const int64_t D = x.size(-1);
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.numel() == D,
              "moeinfer_native: combine_rows x must be one float32 or bfloat16 CPU row, got ", x.scalar_type(), " ",
              x.sizes());
  std::vector<int64_t> ex;
  std::vector<float> wk;
  routed(experts, weights, std::numeric_limits<int64_t>::max(), ex, wk);
  const float* yp = rows_buffer(rows, int64_t(ex.size()), D);
  std::vector<float> obuf;
  at::Tensor out;
  combine_into(ex, wk, yp, D, out_row(x, D, out, obuf));
  store_row(out, obuf);
  return out;
}

// x [..., D] one row, f32 or bf16, w [O, D] bf16/f32 -> y [..., O] in x's dtype (a dense linear at batch
// 1): a bf16 x is widened once and y rounded once at the end, as x.float() before and y.to(bf16) after the
// product; no tensor but y is allocated.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::string& variant) {
  const Kern* kern = pick(variant);
  check_weights(w, "weight");
  TORCH_CHECK(w.dim() == 2, "moeinfer_native: gemv weight must be 2-D, got ", w.sizes());
  const int64_t O = w.size(0), D = w.size(1);
  std::vector<float> xbuf, ybuf;
  const float* xp = one_row_f32(x, D, xbuf, "gemv x");
  at::Tensor out;
  float* yp = out_row(x, O, out, ybuf);
  const void* wp = w.data_ptr();
  at::parallel_for(0, O, 16, [&](int64_t b, int64_t e) { dot_rows_into(kern, w, wp, b, e - b, D, xp, yp + b); });
  store_row(out, ybuf);
  return out;
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

// A stack of packed matrices (moeinfer.formats.quantized_experts; one matrix for a linear). Scales are
// fp32 (s) or IEEE fp16 (sh; the other nullptr): the symmetric block formats may store d in fp16, as
// GGUF's Q8_0/Q4_0 do, which reads 2 bytes a group instead of 4 (a Q4_0 row of 2048 columns: 1152
// bytes instead of 1280). The int8-activation row kernels (decode) read fp16 scales in place (kern.h
// Scales); the GEMM tiles and the fp32-activation rows get them widened into a small per-thread
// buffer (gemm_item, row_scales). fp16 widens exactly, so a result is the one fp32 scales of the same
// values give, bit for bit.
//
// A stack's experts may lie any distance apart as long as each expert's rows are contiguous (eq, es, ez:
// elements from one expert's codes, scales, zeros to the next'): an offload cache's slots are byte blobs
// holding an expert's three parts back to back (moeinfer/offload/packed.py), and their parts, seen across
// the slots, are such stacks, so one call runs the experts of several slots.
struct QMat {
  const uint8_t* q;
  const float* s;
  const uint16_t* sh;
  const float* z;
  int64_t rows, P, G;
  int64_t eq, es, ez;
  // Elements from the part's start to row `row` of the stack (expert row / rows), rows `width` elements
  // wide, experts `estride` apart (rows * width: a contiguous stack, one product).
  int64_t at(int64_t row, int64_t width, int64_t estride) const {
    return estride == rows * width ? row * width : row / rows * estride + row % rows * width;
  }
  const uint8_t* qrow(int64_t row) const { return q + at(row, P, eq); }
  const float* srow(int64_t row) const { return s ? s + at(row, G, es) : nullptr; }
  const uint16_t* shrow(int64_t row) const { return sh ? sh + at(row, G, es) : nullptr; }
  const float* zrow(int64_t row) const { return z ? z + at(row, G, ez) : nullptr; }
};

// Zeros None: the symmetric storage's midpoints (kern.h), not read.
using Zeros = std::optional<at::Tensor>;

// [E, rows, cols] with each expert's rows contiguous (the experts may lie apart: QMat).
bool expert_rows_contiguous(const at::Tensor& t, int64_t E, int64_t rows, int64_t cols) {
  return t.dim() == 3 && t.size(0) == E && t.size(1) == rows && t.size(2) == cols && (cols <= 1 || t.stride(2) == 1) &&
         (rows <= 1 || t.stride(1) == cols) && t.stride(0) >= 0;
}

QMat qmat(const at::Tensor& q, const at::Tensor& s, const Zeros& z, int64_t rows, int64_t P, int64_t G,
          const char* what) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 3 && expert_rows_contiguous(q, q.size(0), rows, P),
              "moeinfer_native: ", what, " codes must be uint8 [E, ", rows, ", ", P, "] with each expert's rows ",
              "contiguous, got ", q.sizes(), " strides ", q.strides());
  const int64_t E = q.size(0);
  const bool half = s.scalar_type() == at::kHalf;
  TORCH_CHECK((s.scalar_type() == at::kFloat || half) && expert_rows_contiguous(s, E, rows, G), "moeinfer_native: ",
              what, " scales must be float32 or float16 [E, ", rows, ", ", G, "] with each expert's rows contiguous, got ",
              s.scalar_type(), " ", s.sizes(), " strides ", s.strides());
  if (z.has_value())
    TORCH_CHECK(z->scalar_type() == at::kFloat && expert_rows_contiguous(*z, E, rows, G), "moeinfer_native: ", what,
                " zeros must be float32 [E, ", rows, ", ", G, "] with each expert's rows contiguous, got ",
                z->scalar_type(), " ", z->sizes(), " strides ", z->strides());
  return {q.data_ptr<uint8_t>(), half ? nullptr : s.data_ptr<float>(),
          half ? reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()) : nullptr,
          z.has_value() ? z->data_ptr<float>() : nullptr, rows, P, G, q.stride(0), s.stride(0),
          z.has_value() ? z->stride(0) : 0};
}

// This thread's scratch of at least n floats (fp16 scales widened for the kernels).
inline float* scale_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Row `row` of m's scales as fp32: the stored row, or its fp16 row widened into `buf` (m.G floats).
inline const float* row_scales_f32(const Kern* k, const QMat& m, int64_t row, float* buf) {
  if (!m.sh) return m.srow(row);
  k->half_to_f32(m.shrow(row), buf, m.G);
  return buf;
}

// Activation side of a row product in either form: fp32 (QVec) or int8 blocks (Q8Buf, one row).
struct AnyVec {
  bool q8;
  QVec f;
  Q8Buf i;
  AnyVec(const Kern* k, const float* x, int64_t cols, int64_t gs, int bits, bool q8_)
      : q8(q8_), f(x, q8_ ? 0 : cols, gs, bits), i(q8_ ? 1 : 0, cols, gs, bits) {
    if (q8) i.quantize(k, 0, x);
  }
};

// Row `row` of m's scales as the int8-activation row kernels take them (fp32 or fp16, in place).
inline Scales row_scales(const QMat& m, int64_t row) {
  return {m.srow(row), m.shrow(row)};
}

inline float qdot(const Kern* k, const QMat& m, int64_t row, const AnyVec& v, int64_t cols, int64_t gs, int bits) {
  const uint8_t* q = m.qrow(row);
  const float* z = m.zrow(row);
  if (v.q8) {
    const Scales s = row_scales(m, row);
    return bits == 8 ? k->qrow8_q8(q, s, z, v.i.act(0), cols, gs) : k->qrow4_q8(q, s, z, v.i.act(0), cols, gs);
  }
  const float* s = row_scales_f32(k, m, row, m.sh ? scale_scratch(m.G) : nullptr);
  if (bits == 8) return k->qrow8(q, s, z, v.f.x, v.f.sum.data(), cols, gs);
  return k->qrow4(q, s, z, v.f.x, v.f.perm.data(), v.f.sum.data(), cols, gs);
}

// Rows `rows[0..3]` of `m` against v at once (int8 activations: the four-row kernels; fp32 ones: qdot in
// turn): the one-row results, bit for bit.
inline void qdot4(const Kern* k, const QMat& m, const int64_t* rows, const AnyVec& v, int64_t cols, int64_t gs,
                  int bits, float* out) {
  if (!v.q8) {
    for (int j = 0; j < 4; ++j) out[j] = qdot(k, m, rows[j], v, cols, gs, bits);
    return;
  }
  const uint8_t* q[4];
  Scales s[4];
  const float* z[4];
  for (int j = 0; j < 4; ++j) q[j] = m.qrow(rows[j]), s[j] = row_scales(m, rows[j]), z[j] = m.zrow(rows[j]);
  (bits == 8 ? k->qrow8_q8_x4 : k->qrow4_q8_x4)(q, s, z, v.i.act(0), cols, gs, out);
}

// Rows [r0, r0 + n) of `m` against v into y[0, n), four interleaved runs at once (in_runs).
inline void qdot_rows(const Kern* k, const QMat& m, int64_t r0, int64_t n, const AnyVec& v, int64_t cols, int64_t gs,
                      int bits, float* y) {
  in_runs<4>(0, n, [&](int64_t i) { y[i] = qdot(k, m, r0 + i, v, cols, gs, bits); }, [&](const int64_t* i) {
    const int64_t rows[4] = {r0 + i[0], r0 + i[1], r0 + i[2], r0 + i[3]};
    float y4[4];
    qdot4(k, m, rows, v, cols, gs, bits, y4);
    for (int j = 0; j < 4; ++j) y[i[j]] = y4[j];
  });
}

// "f32" or "q8" (int8 activations; group sizes that are multiples of QBLOCK) -> whether q8.
bool use_q8(const std::string& activations, int64_t group_size) {
  TORCH_CHECK(activations == "f32" || activations == "q8", "moeinfer_native: unknown activations '", activations,
              "'; valid: f32, q8");
  TORCH_CHECK(activations == "f32" || group_size % QBLOCK == 0, "moeinfer_native: int8 activations need a group size ",
              "that is a multiple of ", QBLOCK, ", got ", group_size);
  return activations == "q8";
}

// Quantized experts of one bit width (moeinfer.formats.quantized_experts storage), batch-1 decode without
// the sum over experts: expert k's output into yp[k * D, (k + 1) * D) for the experts held (ex[k] >= 0;
// other rows untouched). Each expert's row is the same bits whichever other experts the call holds.
void decode_q_rows(const Kern* kern, const at::Tensor& x, const std::vector<int64_t>& all, const QMat& gu,
                   const QMat& dn, int64_t bits, int64_t group_size, int64_t D, int64_t I, bool q8, float* yp) {
  const Held held(all);  // the work split over the experts held
  const std::vector<int64_t>& ex = held.ex;
  const int64_t K = int64_t(ex.size());
  const AnyVec xv(kern, x.data_ptr<float>(), D, group_size, int(bits), q8);
  at::Tensor h = at::zeros({K, I}, x.options());
  float* hp = h.data_ptr<float>();
  // 1. gate_up rows
  gate_up_rows(ex, K, I, hp, [&](int64_t row) { return qdot(kern, gu, row, xv, D, group_size, int(bits)); },
               [&](const int64_t* rows, float* g) { qdot4(kern, gu, rows, xv, D, group_size, int(bits), g); });
  // 2. the activation side of each expert's down rows
  std::vector<AnyVec> hv;
  hv.reserve(K);
  for (int64_t k = 0; k < K; ++k) hv.emplace_back(kern, hp + k * I, I, group_size, int(bits), q8);
  // 3. down rows, expert by expert (each thread streams contiguous rows of one expert's matrix)
  at::parallel_for(0, K * D, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e;) {  // the share's rows expert by expert, each in four runs (one activation row)
      const int64_t k = t / D, end = std::min(e, (k + 1) * D);
      qdot_rows(kern, dn, ex[k] * D + t - k * D, end - t, hv[k], I, group_size, int(bits), yp + held.pos[k] * D + t - k * D);
      t = end;
    }
  });
}

// The arguments of a quantized decode op checked: (kernel, int8 activations, gate_up, down).
std::tuple<const Kern*, bool, QMat, QMat> quantized_stack(const at::Tensor& x, const at::Tensor& q_gu,
                                                          const at::Tensor& s_gu, const Zeros& z_gu,
                                                          const at::Tensor& q_dn, const at::Tensor& s_dn,
                                                          const Zeros& z_dn, int64_t bits, int64_t group_size,
                                                          int64_t D, int64_t I, const std::string& variant,
                                                          const std::string& activations) {
  const Kern* kern = pick(variant);
  TORCH_CHECK(bits == 8 || bits == 4, "moeinfer_native: quantized experts need 8 or 4 bits, got ", bits);
  TORCH_CHECK(group_size >= 1, "moeinfer_native: group_size must be >= 1");
  const bool q8 = use_q8(activations, group_size);
  check_vec(x, D, "x");
  const QMat gu = qmat(q_gu, s_gu, z_gu, 2 * I, packed_bytes(D, bits), num_groups(D, group_size), "gate_up");
  const QMat dn = qmat(q_dn, s_dn, z_dn, D, packed_bytes(I, bits), num_groups(I, group_size), "down");
  TORCH_CHECK(q_dn.size(0) == q_gu.size(0), "moeinfer_native: gate_up and down hold different expert counts");
  return {kern, q8, gu, dn};
}

// Quantized experts of one bit width, batch-1 decode: x [D] f32 -> out [D] f32, summed over the routed
// experts in routing order (combine_into).
at::Tensor moe_decode_q(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                        const at::Tensor& q_gu, const at::Tensor& s_gu, const Zeros& z_gu,
                        const at::Tensor& q_dn, const at::Tensor& s_dn, const Zeros& z_dn, int64_t bits,
                        int64_t group_size, int64_t D, int64_t I, const std::string& variant,
                        const std::string& activations) {
  const auto [kern, q8, gu, dn] =
      quantized_stack(x, q_gu, s_gu, z_gu, q_dn, s_dn, z_dn, bits, group_size, D, I, variant, activations);
  std::vector<int64_t> ex;
  std::vector<float> wk;
  routed(experts, weights, q_gu.size(0), ex, wk);
  std::vector<float> yk(ex.size() * D, 0.f);
  decode_q_rows(kern, x, ex, gu, dn, bits, group_size, D, I, q8, yk.data());
  at::Tensor out = at::empty({D}, x.options());
  combine_into(ex, wk, yk.data(), D, out.data_ptr<float>());
  return out;
}

// moe_decode_q without the sum over experts: expert k's output row into rows[k] (float32 [K, D]) for the
// experts held (experts[k] >= 0; other rows left as they are).
void moe_decode_q_rows(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& q_gu, const at::Tensor& s_gu,
                       const Zeros& z_gu, const at::Tensor& q_dn, const at::Tensor& s_dn, const Zeros& z_dn,
                       int64_t bits, int64_t group_size, int64_t D, int64_t I, const std::string& variant,
                       const std::string& activations, const at::Tensor& rows) {
  const auto [kern, q8, gu, dn] =
      quantized_stack(x, q_gu, s_gu, z_gu, q_dn, s_dn, z_dn, bits, group_size, D, I, variant, activations);
  std::vector<int64_t> ex;
  std::vector<float> wk;
  routed(experts, at::ones({experts.numel()}), q_gu.size(0), ex, wk);
  decode_q_rows(kern, x, ex, gu, dn, bits, group_size, D, I, q8, rows_buffer(rows, int64_t(ex.size()), D));
}

// x [cols] f32, one packed matrix q [R, P] u8, s/z [R, G] f32 -> y [R] f32: the row kernels of
// moe_decode_q on their own (a quantized linear at batch 1), with either form of activations.
at::Tensor gemv_q(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const Zeros& z, int64_t bits,
                  int64_t group_size, const std::string& variant, const std::string& activations) {
  const Kern* kern = pick(variant);
  TORCH_CHECK(bits == 8 || bits == 4, "moeinfer_native: gemv_q needs 8 or 4 bits, got ", bits);
  TORCH_CHECK(group_size >= 1, "moeinfer_native: group_size must be >= 1");
  const bool q8 = use_q8(activations, group_size);
  TORCH_CHECK(x.dim() == 1, "moeinfer_native: gemv_q x must be a vector, got ", x.sizes());
  const int64_t cols = x.size(0), R = q.dim() == 2 ? q.size(0) : -1;
  check_vec(x, cols, "x");
  const int64_t P = packed_bytes(cols, bits), G = num_groups(cols, group_size);
  const QMat m = qmat(q.unsqueeze(0), s.unsqueeze(0), z ? Zeros(z->unsqueeze(0)) : Zeros(), R, P, G, "gemv_q");
  const AnyVec xv(kern, x.data_ptr<float>(), cols, group_size, int(bits), q8);
  at::Tensor y = at::empty({R}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) { qdot_rows(kern, m, b, e - b, xv, cols, group_size, int(bits), yp + b); });
  return y;
}

// Weight rows per work item of a GEMM (parallel_for splits the items over the threads).
constexpr int64_t GEMM_ROWS = 24;  // a multiple of every tile height

// Whether the variant's GEMM on interleaved activation rows (kern.h gemm_x8) takes rows of `cols` columns
// (whole blocks); where it does, every GEMM of the variant runs it, so no result depends on how many
// rows a call holds.
inline bool use_x8(const Kern* k, int64_t cols) { return k->gemm_x8 != nullptr && cols % QBLOCK == 0; }

// Rows [r0, r1) of expert e's matrix of a stack times the activation rows x through the tiled GEMM
// (kern.h gemm_q8, or gemm_x8 on x8 where given; y[j * ldy + r] for r in [r0, r1)); fp16 scales are
// widened for these rows first.
inline void gemm_item(const Kern* k, int bits, const QMat& m, int64_t e, int64_t r0, int64_t r1, const Q8Rows& x,
                      const X8Rows* x8, int64_t cols, int64_t gs, float* y, int64_t ldy) {
  const int64_t first = e * m.rows + r0;
  const float* s = m.srow(first);  // rows [r0, r1) of one expert: contiguous
  if (m.sh) {
    float* buf = scale_scratch((r1 - r0) * m.G);
    k->half_to_f32(m.shrow(first), buf, (r1 - r0) * m.G);
    s = buf;
  }
  const QRows w{m.qrow(first), s, m.zrow(first), m.P, m.G};
  if (x8)
    k->gemm_x8(bits, w, 0, r1 - r0, *x8, gs, y + r0, ldy);
  else
    k->gemm_q8(bits, w, 0, r1 - r0, x, cols, gs, y + r0, ldy);
}

// `x` as a contiguous float32 [N, cols] matrix (a copy only when it is not one already: bf16 rows).
at::Tensor rows_f32(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.device().is_cpu(),
              "moeinfer_native: ", what, " must be a float32 or bfloat16 CPU matrix, got ", x.scalar_type(), " ",
              x.sizes());
  return x.to(at::kFloat).contiguous();
}

// Rows [0, n) of `x` quantized into `buf` (rows of x `ld` floats apart), in parallel.
void quantize_rows(const Kern* k, Q8Buf& buf, const float* x, int64_t ld) {
  at::parallel_for(0, buf.n, 4, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) buf.quantize(k, j, x + j * ld);
  });
}

// x [N, C] f32 or bf16, one packed matrix q [O, P] u8, s/z [O, G] f32, bias [O] f32 or None -> y [N, O] in
// x's dtype: the quantized linear at any N. "q8": the N rows quantized once (Q8Buf; interleaved by
// eight where the variant's gemm_x8 takes them), then the tiled integer GEMM (kern.h) over GEMM_ROWS-row
// items of the weight split across threads (one row: the row
// kernels, as gemv_q); "f32": the fp32-activation row kernels, each weight row against every activation
// row while it is in cache.
at::Tensor gemm_q(const at::Tensor& x_, const at::Tensor& q, const at::Tensor& s, const Zeros& z, int64_t bits,
                  int64_t group_size, const std::string& variant, const std::string& activations,
                  const std::optional<at::Tensor>& bias) {
  const Kern* kern = pick(variant);
  TORCH_CHECK(bits == 8 || bits == 4, "moeinfer_native: gemm_q needs 8 or 4 bits, got ", bits);
  TORCH_CHECK(group_size >= 1, "moeinfer_native: group_size must be >= 1");
  const bool q8 = use_q8(activations, group_size);
  const at::Tensor x = rows_f32(x_, "gemm_q x");
  const int64_t N = x.size(0), cols = x.size(1), O = q.dim() == 2 ? q.size(0) : -1;
  // a layer's parameters are contiguous; anything else is copied here rather than refused
  const at::Tensor qc = q.contiguous(), sc = s.contiguous();
  const Zeros zc = z ? Zeros(z->contiguous().unsqueeze(0)) : Zeros();
  const QMat m = qmat(qc.unsqueeze(0), sc.unsqueeze(0), zc, O, packed_bytes(cols, bits),
                      num_groups(cols, group_size), "gemm_q");
  at::Tensor y = at::empty({N, O}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (q8 && N > 1) {
    const bool interleaved = use_x8(kern, cols);
    Q8Buf xq(N, cols, group_size, int(bits), !interleaved);
    quantize_rows(kern, xq, xp, cols);
    const Q8Rows xr = xq.rows(0, N);
    std::optional<X8Buf> x8;
    if (interleaved) x8.emplace(xq, std::vector<int64_t>{0, N}, int(bits));
    const X8Rows x8r = x8 ? x8->rows(0) : X8Rows{};
    at::parallel_for(0, (O + GEMM_ROWS - 1) / GEMM_ROWS, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b * GEMM_ROWS; r < std::min(e * GEMM_ROWS, O); r += GEMM_ROWS)
        gemm_item(kern, int(bits), m, 0, r, std::min(r + GEMM_ROWS, O), xr, x8 ? &x8r : nullptr, cols, group_size,
                  yp, O);
    });
  } else {  // one row (decode: the row kernels stream the weight at memory speed), or fp32 activations
    std::vector<AnyVec> xv;
    xv.reserve(N);
    for (int64_t j = 0; j < N; ++j) xv.emplace_back(kern, xp + j * cols, cols, group_size, int(bits), q8);
    at::parallel_for(0, O, GEMM_ROWS, [&](int64_t b, int64_t e) {
      if (N == 1) return qdot_rows(kern, m, b, e - b, xv[0], cols, group_size, int(bits), yp + b);
      for (int64_t r = b; r < e; ++r)
        for (int64_t j = 0; j < N; ++j) yp[j * O + r] = qdot(kern, m, r, xv[j], cols, group_size, int(bits));
    });
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == O,
                "moeinfer_native: gemm_q bias must be float32 [", O, "], got ", bias->scalar_type(), " ", bias->sizes());
    y.add_(*bias);
  }
  return x_.scalar_type() == at::kFloat ? y : y.to(x_.scalar_type());
}

// x [..., C] one row, f32 or bf16, one packed matrix q [O, P] u8, s/z [O, G] f32 (z None: midpoints), bias
// [O] f32 or None -> y [..., O] in x's dtype: gemm_q at one row (the same row kernels, activations and
// bias, so the same bits) without its tensor steps around the product (x widened, y rounded in place):
// a quantized linear at batch-1 decode is one call that allocates only y.
at::Tensor linear_q_row(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const Zeros& z, int64_t bits,
                        int64_t group_size, const std::string& variant, const std::string& activations,
                        const std::optional<at::Tensor>& bias) {
  const Kern* kern = pick(variant);
  TORCH_CHECK(bits == 8 || bits == 4, "moeinfer_native: linear_q_row needs 8 or 4 bits, got ", bits);
  TORCH_CHECK(group_size >= 1, "moeinfer_native: group_size must be >= 1");
  const bool q8 = use_q8(activations, group_size);
  TORCH_CHECK(x.dim() >= 1, "moeinfer_native: linear_q_row x must have a feature dimension");
  const int64_t cols = x.size(-1), O = q.dim() == 2 ? q.size(0) : -1;
  std::vector<float> xbuf, ybuf;
  const float* xp = one_row_f32(x, cols, xbuf, "linear_q_row x");
  // the weight checked as gemm_q checks it (one matrix of a stack, `qmat`)
  const at::Tensor qc = q.contiguous(), sc = s.contiguous();
  const Zeros zc = z ? Zeros(z->contiguous().unsqueeze(0)) : Zeros();
  const QMat m = qmat(qc.unsqueeze(0), sc.unsqueeze(0), zc, O, packed_bytes(cols, bits),
                      num_groups(cols, group_size), "linear_q_row");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == O,
                "moeinfer_native: linear_q_row bias must be float32 [", O, "], got ", bias->scalar_type(), " ",
                bias->sizes());
  const AnyVec xv(kern, xp, cols, group_size, int(bits), q8);
  at::Tensor out;
  float* yp = out_row(x, O, out, ybuf);
  at::parallel_for(0, O, GEMM_ROWS,
                   [&](int64_t b, int64_t e) { qdot_rows(kern, m, b, e - b, xv, cols, group_size, int(bits), yp + b); });
  if (bias.has_value()) {
    const at::Tensor bc = bias->contiguous();
    const float* bp = bc.data_ptr<float>();
    for (int64_t r = 0; r < O; ++r) yp[r] += bp[r];
  }
  store_row(out, ybuf);
  return out;
}

// Prefill of quantized experts of one bit width (moeinfer.formats.quantized_experts storage) in one
// call, int8 activations, as llama.cpp's CPU MoE prefill (mul_mat_id): no weight is dequantized.
// x [N, D] f32/bf16, experts [N, K] int64 (row in the stack, < 0 = skip), weights [N, K] -> out [N, D] f32.
// 1. dispatch: the token-slots grouped by expert (counting sort; token order within an expert);
// 2. every token quantized once (Q8Buf), its rows copied to slot order;
// 3. gate_up: every expert's GEMM over its slots, the work split as (expert, GEMM_ROWS weight rows) items;
// 4. per slot: SiLU(gate) * up, quantized to int8 blocks;
// 5. down: the same GEMM items -> y [S, D];
// 6. combine: out[n] = sum_k weights[n, k] * y[slot(n, k)], in routing order.
// Each slot's row of y depends only on its token and its expert's weights and tokens (every token
// quantized alone, each expert's GEMM on its own slots), not on the other experts the call holds: so
// `moe_prefill_q_rows` (steps 1-5, each (n, k)'s row out) over some experts, then over the others, and
// `combine_token_rows` (step 6 alone) give this op's bits (an offload cache's hits, then its loads).
struct PrefillSlots {
  at::Tensor y;               // [S, D] f32: step 5's rows
  std::vector<int64_t> slot;  // [N * K]: the row of y of (n, k), -1 where the expert is not held
  std::vector<float> wk;      // [N * K] routing weights
  int64_t N = 0, K = 0;
};

PrefillSlots prefill_slots(const at::Tensor& x_, const at::Tensor& experts, const at::Tensor& weights,
                           const at::Tensor& q_gu, const at::Tensor& s_gu, const Zeros& z_gu, const at::Tensor& q_dn,
                           const at::Tensor& s_dn, const Zeros& z_dn, int64_t bits, int64_t group_size, int64_t D,
                           int64_t I, const std::string& variant) {
  const Kern* kern = pick(variant);
  TORCH_CHECK(bits == 8 || bits == 4, "moeinfer_native: quantized experts need 8 or 4 bits, got ", bits);
  TORCH_CHECK(group_size >= 1 && group_size % QBLOCK == 0, "moeinfer_native: moe_prefill_q needs a group size that ",
              "is a multiple of ", QBLOCK, ", got ", group_size);
  const at::Tensor x = rows_f32(x_, "x");
  TORCH_CHECK(x.size(1) == D, "moeinfer_native: x has ", x.size(1), " columns, the experts ", D);
  const int64_t N = x.size(0);
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == N && weights.sizes() == experts.sizes(),
              "moeinfer_native: experts and weights must both be [", N, ", K], got ", experts.sizes(), " and ",
              weights.sizes());
  const int64_t K = experts.size(1);
  const QMat gu = qmat(q_gu, s_gu, z_gu, 2 * I, packed_bytes(D, bits), num_groups(D, group_size), "gate_up");
  const QMat dn = qmat(q_dn, s_dn, z_dn, D, packed_bytes(I, bits), num_groups(I, group_size), "down");
  const int64_t E = q_gu.size(0);
  TORCH_CHECK(q_dn.size(0) == E, "moeinfer_native: gate_up and down hold different expert counts");
  PrefillSlots out;
  out.N = N, out.K = K;
  std::vector<int64_t> ex;
  routed(experts.reshape({-1}), weights.reshape({-1}), E, ex, out.wk);
  // 1. dispatch
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t t = 0; t < N * K; ++t)
    if (ex[t] >= 0) ++start[ex[t] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t S = start[E];
  out.slot.assign(N * K, -1);
  out.y = at::empty({S, D}, x.options());
  if (S == 0) return out;
  std::vector<int64_t> token(S), fill(start.begin(), start.end() - 1);
  std::vector<int64_t>& slot = out.slot;
  for (int64_t t = 0; t < N * K; ++t)
    if (ex[t] >= 0) slot[t] = fill[ex[t]]++, token[slot[t]] = t / K;
  // 2. activations in slot order
  Q8Buf xq(N, D, group_size, int(bits), !use_x8(kern, D)), xs(S, D, group_size, int(bits), !use_x8(kern, D));
  quantize_rows(kern, xq, x.data_ptr<float>(), D);
  at::parallel_for(0, S, 16, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) xs.copy_row(j, xq, token[j]);
  });
  // 3. / 5. the GEMM of every routed expert, as (expert, weight rows) items over all threads; where the
  // variant has it, on each expert's slots interleaved by eight (kern.h gemm_x8)
  auto experts_gemm = [&](const QMat& m, const Q8Buf& act, int64_t cols, float* y) {
    std::optional<X8Buf> x8;
    if (use_x8(kern, cols)) x8.emplace(act, start, int(bits));
    // (expert, first row) items, row-block-major: each thread's contiguous share holds part of every
    // routed expert's rows, so the shares' work is equal however unevenly tokens are routed
    std::vector<std::tuple<int64_t, int64_t>> items;
    for (int64_t r = 0; r < m.rows; r += GEMM_ROWS)
      for (int64_t e = 0; e < E; ++e)
        if (start[e + 1] > start[e]) items.emplace_back(e, r);
    at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t it = b; it < end; ++it) {
        const auto [e, r] = items[it];
        const X8Rows xe = x8 ? x8->rows(e) : X8Rows{};
        gemm_item(kern, int(bits), m, e, r, std::min(r + GEMM_ROWS, m.rows), act.rows(start[e], start[e + 1] - start[e]),
                  x8 ? &xe : nullptr, cols, group_size, y + start[e] * m.rows, m.rows);
      }
    });
  };
  at::Tensor gate_up = at::empty({S, 2 * I}, x.options());
  float* gp = gate_up.data_ptr<float>();
  experts_gemm(gu, xs, D, gp);
  // 4. SiLU(gate) * up per slot, quantized
  Q8Buf hs(S, I, group_size, int(bits), !use_x8(kern, I));
  at::parallel_for(0, S, 4, [&](int64_t b, int64_t e) {
    std::vector<float> h(I);
    for (int64_t j = b; j < e; ++j) {
      const float* g = gp + j * 2 * I;
      for (int64_t i = 0; i < I; ++i) h[i] = silu(g[i]) * g[I + i];
      hs.quantize(kern, j, h.data());
    }
  });
  experts_gemm(dn, hs, I, out.y.data_ptr<float>());
  return out;
}

at::Tensor moe_prefill_q(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                         const at::Tensor& q_gu, const at::Tensor& s_gu, const Zeros& z_gu,
                         const at::Tensor& q_dn, const at::Tensor& s_dn, const Zeros& z_dn, int64_t bits,
                         int64_t group_size, int64_t D, int64_t I, const std::string& variant) {
  const PrefillSlots p =
      prefill_slots(x, experts, weights, q_gu, s_gu, z_gu, q_dn, s_dn, z_dn, bits, group_size, D, I, variant);
  at::Tensor out = at::zeros({p.N, D}, x.options().dtype(at::kFloat));
  // 6. combine
  if (p.y.size(0)) combine_slots(p.y.data_ptr<float>(), p.slot.data(), p.wk.data(), p.N, p.K, D, out.data_ptr<float>());
  return out;
}

// rows [N * K, D]: a contiguous float32 buffer the (token, k) outputs of a prefill op go to.
float* token_rows_buffer(const at::Tensor& rows, int64_t NK, int64_t D) {
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.is_contiguous() && rows.dim() == 2 && rows.size(0) == NK &&
                  rows.size(1) == D,
              "moeinfer_native: rows must be a contiguous float32 [", NK, ", ", D, "] buffer (N * K rows), got ",
              rows.scalar_type(), " ", rows.sizes());
  return rows.data_ptr<float>();
}

// moe_prefill_q without step 6: the output of token n's k-th expert into rows[n * K + k] (float32 [N * K, D])
// for the experts held (experts[n, k] >= 0; other rows left as they are).
void moe_prefill_q_rows(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& q_gu, const at::Tensor& s_gu,
                        const Zeros& z_gu, const at::Tensor& q_dn, const at::Tensor& s_dn, const Zeros& z_dn,
                        int64_t bits, int64_t group_size, int64_t D, int64_t I, const std::string& variant,
                        const at::Tensor& rows) {
  float* rp = token_rows_buffer(rows, experts.numel(), D);
  const PrefillSlots p = prefill_slots(x, experts, at::ones(experts.sizes(), x.options().dtype(at::kFloat)), q_gu,
                                       s_gu, z_gu, q_dn, s_dn, z_dn, bits, group_size, D, I, variant);
  if (!p.y.size(0)) return;
  const float* yp = p.y.data_ptr<float>();
  at::parallel_for(0, p.N * p.K, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      if (p.slot[t] >= 0) std::copy(yp + p.slot[t] * D, yp + (p.slot[t] + 1) * D, rp + t * D);
  });
}

// x [N, D] (f32 or bf16), experts [N, K] (< 0: skipped), weights [N, K], rows [N * K, D] float32 -> out [N, D]
// float32: step 6 of moe_prefill_q alone (combine_slots over each (n, k)'s own row).
at::Tensor combine_token_rows(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                              const at::Tensor& rows) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "moeinfer_native: combine_token_rows x must be a CPU [N, D] ",
              "matrix, got ", x.sizes());
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK(experts.dim() == 2 && experts.size(0) == N && weights.sizes() == experts.sizes(),
              "moeinfer_native: experts and weights must both be [", N, ", K], got ", experts.sizes(), " and ",
              weights.sizes());
  const int64_t K = experts.size(1);
  std::vector<int64_t> ex;
  std::vector<float> wk;
  routed(experts.reshape({-1}), weights.reshape({-1}), std::numeric_limits<int64_t>::max(), ex, wk);
  const float* yp = token_rows_buffer(rows, N * K, D);
  std::vector<int64_t> slot(N * K);
  for (int64_t t = 0; t < N * K; ++t) slot[t] = ex[t] >= 0 ? t : -1;
  at::Tensor out = at::zeros({N, D}, x.options().dtype(at::kFloat));
  combine_slots(yp, slot.data(), wk.data(), N, K, D, out.data_ptr<float>());
  return out;
}

// x [n] f32 -> (q [ceil(n / 32) * 32] int8, zero-padded; d [ceil(n / 32)] f32): the activation
// quantization every int8-activation row product uses (kern.h quantize_q8), by `variant`'s quantize_act.
std::tuple<at::Tensor, at::Tensor> quantize_q8_op(const at::Tensor& x, const std::string& variant) {
  const Kern* kern = pick(variant);
  TORCH_CHECK(x.dim() == 1, "moeinfer_native: quantize_q8 x must be a vector, got ", x.sizes());
  check_vec(x, x.size(0), "x");
  const int64_t nb = (x.size(0) + QBLOCK - 1) / QBLOCK;
  at::Tensor q = at::empty({nb * QBLOCK}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({nb}, x.options());
  kern->quantize_act(x.data_ptr<float>(), x.size(0), q.data_ptr<int8_t>(), d.data_ptr<float>());
  return {q, d};
}

// Dequantize rows of packed codes into `out` [R, cols] f32 (a reused buffer: the prefill path's tile),
// as moeinfer.formats.quant.groupwise.dequantize computes them: w = u * s + (-z * s).
void dequant_into(const at::Tensor& q, const at::Tensor& s_, const at::Tensor& z, int64_t bits, int64_t group_size,
                  at::Tensor& out) {
  // fp16 scales (the block formats') widened once for the whole tile
  const at::Tensor s = s_.scalar_type() == at::kHalf ? s_.to(at::kFloat) : s_;
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
bool has_variant(const std::string& variant) { return built(variant); }

}  // namespace
}  // namespace moeinfer_native

TORCH_LIBRARY(moeinfer_native, m) {
  m.def("supports(str variant) -> bool", &moeinfer_native::supports);
  m.def("built(str variant) -> bool", &moeinfer_native::has_variant);
  m.def("moe_decode(Tensor x, Tensor experts, Tensor weights, Tensor gate_up, Tensor down, str variant) -> Tensor",
        &moeinfer_native::moe_decode);
  m.def("moe_decode_rows(Tensor x, Tensor experts, Tensor gate_up, Tensor down, str variant, Tensor(a!) rows) -> ()",
        &moeinfer_native::moe_decode_rows);
  m.def("combine_rows(Tensor x, Tensor experts, Tensor weights, Tensor rows) -> Tensor", &moeinfer_native::combine_rows);
  m.def("gemv(Tensor x, Tensor w, str variant) -> Tensor", &moeinfer_native::gemv);
  m.def("moe_decode_q(Tensor x, Tensor experts, Tensor weights, Tensor q_gu, Tensor s_gu, Tensor? z_gu, "
        "Tensor q_dn, Tensor s_dn, Tensor? z_dn, int bits, int group_size, int hidden, int inner, str variant, str activations=\"f32\") -> Tensor",
        &moeinfer_native::moe_decode_q);
  m.def("moe_decode_q_rows(Tensor x, Tensor experts, Tensor q_gu, Tensor s_gu, Tensor? z_gu, Tensor q_dn, "
        "Tensor s_dn, Tensor? z_dn, int bits, int group_size, int hidden, int inner, str variant, str activations, "
        "Tensor(a!) rows) -> ()",
        &moeinfer_native::moe_decode_q_rows);
  m.def("gemv_q(Tensor x, Tensor q, Tensor s, Tensor? z, int bits, int group_size, str variant, "
        "str activations) -> Tensor", &moeinfer_native::gemv_q);
  m.def("gemm_q(Tensor x, Tensor q, Tensor s, Tensor? z, int bits, int group_size, str variant, str activations, "
        "Tensor? bias=None) -> Tensor", &moeinfer_native::gemm_q);
  m.def("linear_q_row(Tensor x, Tensor q, Tensor s, Tensor? z, int bits, int group_size, str variant, "
        "str activations, Tensor? bias=None) -> Tensor", &moeinfer_native::linear_q_row);
  m.def("moe_prefill_q(Tensor x, Tensor experts, Tensor weights, Tensor q_gu, Tensor s_gu, Tensor? z_gu, "
        "Tensor q_dn, Tensor s_dn, Tensor? z_dn, int bits, int group_size, int hidden, int inner, str variant) -> Tensor",
        &moeinfer_native::moe_prefill_q);
  m.def("moe_prefill_q_rows(Tensor x, Tensor experts, Tensor q_gu, Tensor s_gu, Tensor? z_gu, Tensor q_dn, "
        "Tensor s_dn, Tensor? z_dn, int bits, int group_size, int hidden, int inner, str variant, Tensor(a!) rows) -> ()",
        &moeinfer_native::moe_prefill_q_rows);
  m.def("combine_token_rows(Tensor x, Tensor experts, Tensor weights, Tensor rows) -> Tensor",
        &moeinfer_native::combine_token_rows);
  m.def("quantize_q8(Tensor x, str variant=\"generic\") -> (Tensor, Tensor)", &moeinfer_native::quantize_q8_op);
  m.def("dequant_into(Tensor q, Tensor s, Tensor z, int bits, int group_size, Tensor(a!) out) -> ()",
        &moeinfer_native::dequant_into);
}
