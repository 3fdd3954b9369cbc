// The activation side of the int8-activation kernels (ops.cpp): rows quantized once to int8 blocks
// (Q8Buf: kern.h Q8Act / Q8Rows) and, for the GEMM whose lanes are activation rows, those rows
// interleaved by eight (X8Buf: kern.h X8Rows). Built by the ops, read by every weight row.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "kern.h"

namespace moeinfer_native {

inline int64_t num_groups(int64_t cols, int64_t group_size) { return (cols + group_size - 1) / group_size; }

// Activation rows quantized to int8 blocks (kern.h, Q8Act / Q8Rows), each row with its group sums and,
// for 4-bit weights, its nibble-ordered copy: built once, read by every weight row.
struct Q8Buf {
  std::vector<int8_t> q, q4, q4p;
  std::vector<float> d, gsum;
  int64_t n, cols, gs, nb, G;
  bool nibbles;
  // `nibbles`: for 4-bit weights, also the nibble-ordered copies the row kernels and gemm_q8 read (not
  // the interleaved GEMM, gemm_x8, whose rows are built from q)
  Q8Buf(int64_t n_, int64_t cols_, int64_t gs_, int bits, bool nibbles_ = true)
      : n(n_), cols(cols_), gs(gs_), nb((cols_ + QBLOCK - 1) / QBLOCK), G(num_groups(cols_, gs_)),
        nibbles(bits == 4 && nibbles_) {
    q.resize(n * nb * QBLOCK);
    q4.resize(nibbles ? q.size() : 0);
    q4p.resize(nibbles ? q.size() : 0);
    d.resize(n * nb);
    gsum.resize(n * G);
  }
  // row j from x [cols], by variant k's quantize_act (the same codes in every variant)
  void quantize(const Kern* k, int64_t j, const float* x) {
    int8_t* qj = q.data() + j * nb * QBLOCK;
    float* dj = d.data() + j * nb;
    float* gj = gsum.data() + j * G;
    k->quantize_act(x, cols, qj, dj);
    for (int64_t g = 0; g < G; ++g) gj[g] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t bs = 0;
      for (int64_t c = b * QBLOCK; c < (b + 1) * QBLOCK; ++c) bs += qj[c];
      gj[b * QBLOCK / gs] += dj[b] * float(bs);
    }
    if (nibbles) {
      int8_t* pj = q4.data() + j * nb * QBLOCK;
      for (int64_t c = 0; c < nb * QBLOCK; c += QBLOCK)
        for (int l = 0; l < QBLOCK / 2; ++l) {
          pj[c + l] = qj[c + 2 * l];
          pj[c + QBLOCK / 2 + l] = qj[c + 2 * l + 1];
        }
      pair_order(qj, cols / QBLOCK, q4p.data() + j * nb * QBLOCK);  // a partial block: scalar tails
    }
  }
  // row j = row `from` of `src` (same columns, groups and bits)
  void copy_row(int64_t j, const Q8Buf& src, int64_t from) {
    const int64_t w = nb * QBLOCK;
    std::copy_n(src.q.data() + from * w, w, q.data() + j * w);
    if (nibbles) {
      std::copy_n(src.q4.data() + from * w, w, q4.data() + j * w);
      std::copy_n(src.q4p.data() + from * w, w, q4p.data() + j * w);
    }
    std::copy_n(src.d.data() + from * nb, nb, d.data() + j * nb);
    std::copy_n(src.gsum.data() + from * G, G, gsum.data() + j * G);
  }
  Q8Rows rows(int64_t j0, int64_t count) const {
    const int8_t* p4 = nibbles ? q4.data() : q.data();
    const int8_t* pp = nibbles ? q4p.data() : q.data();
    return {q.data() + j0 * nb * QBLOCK, p4 + j0 * nb * QBLOCK, d.data() + j0 * nb, gsum.data() + j0 * G, count, nb, G,
            pp + j0 * nb * QBLOCK};
  }
  Q8Act act(int64_t j) const { return rows(j, 1).row(0); }
};

// Runs of rows of a Q8Buf interleaved by eight (kern.h X8Rows): run r = rows [start[r], start[r + 1]),
// in whole groups of its own (an expert's slots: its first row is lane 0 of its first group).
struct X8Buf {
  std::vector<int8_t> a;
  std::vector<float> d, gsum;
  std::vector<int32_t> bsum;
  std::vector<int64_t> first;  // per run its first group; first.back() = all groups
  std::vector<int64_t> start;
  int64_t nb, G;
  X8Buf(const Q8Buf& src, std::vector<int64_t> start_, int bits) : start(std::move(start_)), nb(src.nb), G(src.G) {
    const int64_t runs = int64_t(start.size()) - 1;
    first.assign(runs + 1, 0);
    for (int64_t r = 0; r < runs; ++r) first[r + 1] = first[r] + (start[r + 1] - start[r] + X8 - 1) / X8;
    const int64_t groups = first[runs];
    a.resize(groups * nb * X8 * QBLOCK);
    d.resize(groups * nb * X8);
    bsum.resize(groups * nb * X8);
    gsum.resize(groups * G * X8);
    std::vector<int64_t> run_of(groups);
    for (int64_t r = 0; r < runs; ++r)
      for (int64_t g = first[r]; g < first[r + 1]; ++g) run_of[g] = r;
    at::parallel_for(0, groups, 8, [&](int64_t b, int64_t e) {
      for (int64_t g = b; g < e; ++g) {
        const int64_t r = run_of[g];
        interleave8(src.rows(start[r], start[r + 1] - start[r]), bits, g - first[r], g - first[r] + 1, rows(r));
      }
    });
  }
  X8Rows rows(int64_t r) const {
    return X8Rows{a.data(), d.data(), bsum.data(), gsum.data(), 0, nb, G}.groups(first[r], start[r + 1] - start[r]);
  }
};

}  // namespace moeinfer_native
