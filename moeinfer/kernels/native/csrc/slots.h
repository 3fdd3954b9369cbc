// Shared by the few-token MoE ops (moe_rows.cpp, ops.cpp's moe_prefill_q): the last step of an expert
// stage computed slot by slot, out[n] = sum_k w[n, k] * y[slot(n, k)], in k order (deterministic, no atomics).
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>

namespace moeinfer_native {

// y [S, D] per-slot outputs; slot [N * K] the slot of (n, k) (< 0: none, the expert is not held here);
// w [N * K] routing weights; out [N, D] is added to.
inline void combine_slots(const float* y, const int64_t* slot, const float* w, int64_t N, int64_t K, int64_t D,
                          float* out) {
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = slot[n * K + k];
        if (s < 0) continue;
        const float wk = w[n * K + k];
        const float* ys = y + s * D;
        float* o = out + n * D;
        for (int64_t d = 0; d < D; ++d) o[d] += wk * ys[d];
      }
  });
}

}  // namespace moeinfer_native
