// Few-token MoE expert stage for bf16/fp32 weights (torch.ops.moeinfer_native.moe_rows; `linear_rows` is
// the same for one dense matrix): prefill and
// small batches on CPUs without a native bf16 matmul, where widening whole experts to fp32 for a GEMM
// moves ~5x the weight bytes (read bf16, write fp32, read fp32) and dominates short prompts.
//
// Each routed expert's weight rows are read once from their stored layout, widened in registers, and
// multiplied with every token row routed to that expert (up to four at a time from L1), as
// llama.cpp's CPU backend multiplies a weight row with a batch of activation rows:
// 1. slots (token, k) counted and sorted by expert (a counting sort; experts < 0 are not held here);
// 2. gate_up: work items (expert, block of 16 weight rows) split over threads; g[slot] = W_gu[e] x[token];
// 3. h[slot] = silu(g[:I]) * g[I:], fp32;
// 4. down: work items (expert, block of 16 rows); y[slot] = W_dn[e] h[slot];
// 5. out[n] = sum_k weights[n, k] * y[slot(n, k)] in k order (deterministic, no atomics);
// `moe_rows_rows` is steps 1-4 with each (n, k)'s row kept (ops.cpp `combine_token_rows` is step 5).
// Inner loops: a generic C++ one and an AVX2+FMA one (GCC's per-function target attribute, so this
// file needs no ISA flags); `variant` picks one as for every other op (avx512: the AVX2 one).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "kern.h"
#include "slots.h"

namespace moeinfer_native {
namespace {

constexpr int MAX_ROWS = 4;      // activation rows per pass over a weight row
constexpr int64_t BLOCK = 16;    // weight rows per work item

// out[r] = w . x[r] for r < R, w one weight row of n elements (bf16 or fp32).
template <bool BF16>
void dots_generic(const void* wv, const float* const* x, int R, int64_t n, float* out) {
  float acc[MAX_ROWS] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t j = 0; j < n; ++j) {
    const float w = BF16 ? bf16_to_f32(static_cast<const uint16_t*>(wv)[j]) : static_cast<const float*>(wv)[j];
    for (int r = 0; r < R; ++r) acc[r] += w * x[r][j];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool BF16>
__attribute__((target("avx2,fma"))) inline __m256 load8(const void* w, int64_t j) {
  if (BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + j));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(w) + j);
}

// Two accumulators per row (16 columns a step) keep R * 2 FMA chains in flight.
template <bool BF16, int R>
__attribute__((target("avx2,fma"))) void dots_avx2_r(const void* w, const float* const* x, int64_t n, float* out) {
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 w0 = load8<BF16>(w, j), w1 = load8<BF16>(w, j + 8);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[r] + j), a[r]);
      b[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[r] + j + 8), b[r]);
    }
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 w0 = load8<BF16>(w, j);
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[r] + j), a[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum8(_mm256_add_ps(a[r], b[r]));
    for (int64_t t = j; t < n; ++t)
      s += (BF16 ? bf16_to_f32(static_cast<const uint16_t*>(w)[t]) : static_cast<const float*>(w)[t]) * x[r][t];
    out[r] = s;
  }
}

template <bool BF16>
void dots_avx2(const void* w, const float* const* x, int R, int64_t n, float* out) {
  switch (R) {
    case 1: return dots_avx2_r<BF16, 1>(w, x, n, out);
    case 2: return dots_avx2_r<BF16, 2>(w, x, n, out);
    case 3: return dots_avx2_r<BF16, 3>(w, x, n, out);
    default: return dots_avx2_r<BF16, 4>(w, x, n, out);
  }
}

using Dots = void (*)(const void*, const float* const*, int, int64_t, float*);

Dots pick_dots(const std::string& variant, bool bf16) {
  // named and runnable here, as for every op (an error saying which, otherwise)
  if (pick_kern(variant.c_str()) != kern_generic()) return bf16 ? dots_avx2<true> : dots_avx2<false>;
  return bf16 ? dots_generic<true> : dots_generic<false>;
}

// Rows out[s] (stride ld_out) = W[e] . in[s] for the slots s of each expert: work items (expert, block
// of BLOCK weight rows) over threads; `first[e]`..`first[e + 1]` are expert e's sorted slots. Items go
// block-major (every expert's first block, then every expert's second, ...), so the threads' contiguous
// shares each hold part of every expert's rows and get equal work however unevenly tokens are routed
// (expert-major, one thread got the first half of the experts and all their slots).
void expert_rows(Dots dots, const uint8_t* wbase, int64_t expert_bytes, int64_t row_bytes, int64_t rows,
                 int64_t cols, const std::vector<int64_t>& experts, const std::vector<int64_t>& first,
                 const float* in, int64_t ld_in, float* out, int64_t ld_out) {
  const int64_t blocks = (rows + BLOCK - 1) / BLOCK, items = int64_t(experts.size()) * blocks;
  at::parallel_for(0, items, 1, [&](int64_t b0, int64_t b1) {
    const float* xs[MAX_ROWS];
    float res[MAX_ROWS];
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t i = item % int64_t(experts.size()), e = experts[i], r0 = (item / int64_t(experts.size())) * BLOCK;
      const int64_t r1 = r0 + BLOCK < rows ? r0 + BLOCK : rows;
      const uint8_t* we = wbase + e * expert_bytes;
      for (int64_t s0 = first[i]; s0 < first[i + 1]; s0 += MAX_ROWS) {
        const int R = int(first[i + 1] - s0 < MAX_ROWS ? first[i + 1] - s0 : MAX_ROWS);
        for (int r = 0; r < R; ++r) xs[r] = in + (s0 + r) * ld_in;
        for (int64_t row = r0; row < r1; ++row) {
          dots(we + row * row_bytes, xs, R, cols, res);
          for (int r = 0; r < R; ++r) out[(s0 + r) * ld_out + row] = res[r];
        }
      }
    }
  });
}

// Steps 1-4 for x [N, D] f32, experts [N, K] int64 (local rows; < 0 = not held here), gate_up [E, 2I, D] and
// down [E, D, I] (bf16 or fp32, same dtype): y [S, D] f32, one row per held (n, k), and slot_of[(n, k)] its
// row (-1: not held). Each row depends only on its token and its expert's weights (every weight row times
// each of the expert's token rows, no sum across experts), so `moe_rows_rows` over some experts, then the
// others, and `combine_token_rows` (ops.cpp: step 5 alone) give `moe_rows`'s bits (an offload cache's hits,
// then its loads).
struct RowsSlots {
  at::Tensor y;
  std::vector<int64_t> slot_of;
};

RowsSlots rows_slots(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& gate_up,
                     const at::Tensor& down, const std::string& variant) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "moeinfer_native: moe_rows x must be a contiguous float32 [N, D] matrix");
  TORCH_CHECK(experts.scalar_type() == at::kLong && experts.dim() == 2 && experts.size(0) == x.size(0),
              "moeinfer_native: moe_rows experts must be int64 [N, K]");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type() &&
                  (gate_up.scalar_type() == at::kBFloat16 || gate_up.scalar_type() == at::kFloat) &&
                  gate_up.is_contiguous() && down.is_contiguous() && gate_up.dim() == 3 && down.dim() == 3,
              "moeinfer_native: moe_rows weights must be contiguous [E, 2I, D] and [E, D, I], both bf16 or fp32");
  const int64_t N = x.size(0), D = x.size(1), K = experts.size(1), E = gate_up.size(0);
  const int64_t I2 = gate_up.size(1), I = I2 / 2;
  TORCH_CHECK(gate_up.size(2) == D && I2 % 2 == 0 && down.size(0) == E && down.size(1) == D && down.size(2) == I,
              "moeinfer_native: moe_rows shapes: x [N, ", D, "], gate_up ", gate_up.sizes(), ", down ", down.sizes());
  const bool bf16 = gate_up.scalar_type() == at::kBFloat16;
  const Dots dots = pick_dots(variant, bf16);
  const int64_t esize = bf16 ? 2 : 4;
  const at::Tensor ec = experts.contiguous();
  const int64_t* ep = ec.data_ptr<int64_t>();

  // 1. counting sort of the slots by expert
  std::vector<int64_t> count(E, 0);
  for (int64_t s = 0; s < N * K; ++s) {
    TORCH_CHECK(ep[s] < E, "moeinfer_native: moe_rows expert ", ep[s], " out of range (", E, " experts)");
    if (ep[s] >= 0) ++count[ep[s]];
  }
  std::vector<int64_t> present, first{0}, start(E, 0);
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) present.push_back(e), start[e] = first.back(), first.push_back(first.back() + count[e]);
  const int64_t S = first.back();
  RowsSlots out;
  out.slot_of.assign(N * K, -1);  // (n, k) -> sorted slot
  at::Tensor xs = at::empty({S, D}, x.options());
  float* xsp = xs.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t s = 0; s < N * K; ++s)
    if (ep[s] >= 0) {
      const int64_t t = start[ep[s]]++;
      out.slot_of[s] = t;
      std::copy(xp + (s / K) * D, xp + (s / K + 1) * D, xsp + t * D);
    }

  // 2-3. gate_up, then silu(gate) * up
  at::Tensor g = at::empty({S, I2}, x.options());
  float* gp = g.data_ptr<float>();
  expert_rows(dots, static_cast<const uint8_t*>(gate_up.data_ptr()), I2 * D * esize, D * esize, I2, D, present,
              first, xsp, D, gp, I2);
  at::Tensor h = at::empty({S, I}, x.options());
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, S, 8, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s)
      for (int64_t i = 0; i < I; ++i) {
        const float gate = gp[s * I2 + i];
        hp[s * I + i] = gate / (1.f + std::exp(-gate)) * gp[s * I2 + I + i];
      }
  });

  // 4. down
  out.y = at::empty({S, D}, x.options());
  expert_rows(dots, static_cast<const uint8_t*>(down.data_ptr()), D * I * esize, I * esize, D, I, present, first,
              hp, I, out.y.data_ptr<float>(), D);
  return out;
}

// x [N, D] f32, experts [N, K] int64 (local rows; < 0 = not held here: contributes nothing), weights [N, K]
// f32, gate_up [E, 2I, D] and down [E, D, I] (bf16 or fp32, same dtype) -> [N, D] f32.
at::Tensor moe_rows(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights,
                    const at::Tensor& gate_up, const at::Tensor& down, const std::string& variant) {
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == experts.sizes(),
              "moeinfer_native: moe_rows weights must be float32 with the shape of experts");
  const RowsSlots r = rows_slots(x, experts, gate_up, down, variant);
  const at::Tensor wc = weights.contiguous();
  // 5. weighted sum per token, k in order
  at::Tensor out = at::zeros({x.size(0), x.size(1)}, x.options());
  combine_slots(r.y.data_ptr<float>(), r.slot_of.data(), wc.data_ptr<float>(), x.size(0), experts.size(1), x.size(1),
                out.data_ptr<float>());
  return out;
}

// moe_rows without step 5: the output of token n's k-th expert into rows[n * K + k] (float32 [N * K, D],
// contiguous) for the experts held (experts[n, k] >= 0; other rows left as they are).
void moe_rows_rows(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& gate_up, const at::Tensor& down,
                   const std::string& variant, const at::Tensor& rows) {
  const int64_t NK = experts.numel(), D = x.dim() == 2 ? x.size(1) : -1;
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.is_contiguous() && rows.dim() == 2 && rows.size(0) == NK &&
                  rows.size(1) == D,
              "moeinfer_native: rows must be a contiguous float32 [", NK, ", ", D, "] buffer (N * K rows), got ",
              rows.scalar_type(), " ", rows.sizes());
  const RowsSlots r = rows_slots(x, experts, gate_up, down, variant);
  const float* yp = r.y.data_ptr<float>();
  float* rp = rows.data_ptr<float>();
  at::parallel_for(0, NK, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      if (r.slot_of[t] >= 0) std::copy(yp + r.slot_of[t] * D, yp + (r.slot_of[t] + 1) * D, rp + t * D);
  });
}

// x [N, C] f32 times w [O, C] (bf16 or fp32) transposed -> [N, O] f32: a dense linear with every weight row read
// once for all N rows (few-token prefill of the dense layers, as the experts above).
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const std::string& variant) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "moeinfer_native: linear_rows x must be a contiguous float32 [N, C] matrix");
  TORCH_CHECK((w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat) && w.dim() == 2 &&
                  w.is_contiguous() && w.size(1) == x.size(1),
              "moeinfer_native: linear_rows weight must be a contiguous bf16/fp32 [O, ", x.size(1), "] matrix, got ",
              w.sizes());
  const int64_t N = x.size(0), C = x.size(1), O = w.size(0);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const Dots dots = pick_dots(variant, bf16);
  at::Tensor y = at::empty({N, O}, x.options());
  const std::vector<int64_t> one{0}, all{0, N};
  if (N && O)
    expert_rows(dots, static_cast<const uint8_t*>(w.data_ptr()), 0, C * (bf16 ? 2 : 4), O, C, one, all,
                x.data_ptr<float>(), C, y.data_ptr<float>(), O);
  return y;
}

}  // namespace
}  // namespace moeinfer_native

TORCH_LIBRARY_FRAGMENT(moeinfer_native, m) {
  m.def("linear_rows(Tensor x, Tensor w, str variant) -> Tensor", &moeinfer_native::linear_rows);
  m.def("moe_rows(Tensor x, Tensor experts, Tensor weights, Tensor gate_up, Tensor down, str variant) -> Tensor",
        &moeinfer_native::moe_rows);
  m.def("moe_rows_rows(Tensor x, Tensor experts, Tensor gate_up, Tensor down, str variant, Tensor(a!) rows) -> ()",
        &moeinfer_native::moe_rows_rows);
}
