// Portable variant: plain loops (8 partial sums so the compiler can vectorise without -ffast-math).
#include "kern.h"

namespace moeinfer_native {
namespace {

float dot_f32(const float* w, const float* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += w[j + l] * x[j + l];
  float s = 0.f;
  for (; j < n; ++j) s += w[j] * x[j];
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

float dot_bf16(const uint16_t* w, const float* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += bf16_to_f32(w[j + l]) * x[j + l];
  float s = 0.f;
  for (; j < n; ++j) s += bf16_to_f32(w[j]) * x[j];
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

float qrow8(const uint8_t* q, const float* s, const float* z, const float* x, const float* xsum,
            int64_t cols, int64_t gs) {
  float y = 0.f;
  for (int64_t g = 0, c = 0; c < cols; ++g, c += gs) {
    int64_t end = c + gs < cols ? c + gs : cols;
    y += s[g] * (tail_u8(q, x, c, end) - zero_at(z, g, 128.f) * xsum[g]);
  }
  return y;
}

float qrow4(const uint8_t* q, const float* s, const float* z, const float* x, const float* /*xperm*/,
            const float* xsum, int64_t cols, int64_t gs) {
  float y = 0.f;
  for (int64_t g = 0, c = 0; c < cols; ++g, c += gs) {
    int64_t end = c + gs < cols ? c + gs : cols;
    y += s[g] * (tail_u4(q, x, c, end) - zero_at(z, g, 8.f) * xsum[g]);
  }
  return y;
}

// int8 activations: the integer dot of each block of 32 (exact in int32), scaled by the block's d_b.
float qrow8_q8(const uint8_t* q, Scales s, const float* z, const Q8Act& x, int64_t cols, int64_t gs) {
  float y = 0.f;
  for (int64_t g = 0, c = 0; c < cols; ++g, c += gs) {
    const int64_t end = c + gs < cols ? c + gs : cols;
    float acc = 0.f;
    for (int64_t b = c; b < end; b += QBLOCK)
      acc += x.d[b / QBLOCK] * float(itail_u8(q, x.q, b, b + QBLOCK < end ? b + QBLOCK : end, 0));
    y += s.at(g) * (acc - zero_at(z, g, 128.f) * x.gsum[g]);
  }
  return y;
}

// A whole block of 4-bit codes: 16 bytes, low nibbles against the even columns of the nibble-ordered
// activations, high nibbles against the odd ones (a loop the compiler vectorises).
inline int32_t block_u4(const uint8_t* q, const int8_t* xq4) {
  int32_t acc = 0;
  for (int l = 0; l < QBLOCK / 2; ++l)
    acc += int32_t(q[l] & 0xF) * int32_t(xq4[l]) + int32_t(q[l] >> 4) * int32_t(xq4[QBLOCK / 2 + l]);
  return acc;
}

float qrow4_q8(const uint8_t* q, Scales s, const float* z, const Q8Act& x, int64_t cols, int64_t gs) {
  float y = 0.f;
  for (int64_t g = 0, c = 0; c < cols; ++g, c += gs) {
    const int64_t end = c + gs < cols ? c + gs : cols;
    float acc = 0.f;
    for (int64_t b = c; b < end; b += QBLOCK)
      acc += x.d[b / QBLOCK] * float(b + QBLOCK <= end ? block_u4(q + b / 2, x.q4 + b) : itail_u4(q, x.q, b, end));
    y += s.at(g) * (acc - zero_at(z, g, 8.f) * x.gsum[g]);
  }
  return y;
}

// The GEMM as row products (kern.h), activation rows taken in cache-sized chunks so a weight row is
// read from memory once per chunk: the same sums as the row kernels, in the same order.
void gemm_q8(int bits, const QRows& w, int64_t r0, int64_t r1, const Q8Rows& x, int64_t cols, int64_t gs, float* y,
             int64_t ldy) {
  const auto row = bits == 8 ? qrow8_q8 : qrow4_q8;
  const int64_t tc = token_chunk(cols);
  for (int64_t j0 = 0; j0 < x.n; j0 += tc) {
    const int64_t j1 = j0 + tc < x.n ? j0 + tc : x.n;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = j0; j < j1; ++j) y[j * ldy + r] = row(w.q + r * w.P, {w.s + r * w.G, nullptr}, row_of(w.z, r, w.G), x.row(j), cols, gs);
  }
}

// Four rows: the one-row kernels in turn (the portable variant has no reads in flight to gain).
void dot4_f32(const float* const* w, const float* x, int64_t n, float* out) {
  for (int i = 0; i < 4; ++i) out[i] = dot_f32(w[i], x, n);
}

void dot4_bf16(const uint16_t* const* w, const float* x, int64_t n, float* out) {
  for (int i = 0; i < 4; ++i) out[i] = dot_bf16(w[i], x, n);
}

void qrow8_q8_x4(const uint8_t* const* q, const Scales* s, const float* const* z, const Q8Act& x, int64_t cols,
                 int64_t gs, float* out) {
  for (int i = 0; i < 4; ++i) out[i] = qrow8_q8(q[i], s[i], z[i], x, cols, gs);
}

void qrow4_q8_x4(const uint8_t* const* q, const Scales* s, const float* const* z, const Q8Act& x, int64_t cols,
                 int64_t gs, float* out) {
  for (int i = 0; i < 4; ++i) out[i] = qrow4_q8(q[i], s[i], z[i], x, cols, gs);
}

void half_to_f32(const uint16_t* h, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(h[i]);
}

void quantize_act(const float* x, int64_t n, int8_t* q, float* d) { quantize_q8(x, n, q, d); }

const Kern table{"generic", dot_f32,  dot_bf16,  qrow8,       qrow4,       qrow8_q8,   qrow4_q8,
                 gemm_q8,   dot4_f32, dot4_bf16, qrow8_q8_x4, qrow4_q8_x4, half_to_f32, nullptr,
                 quantize_act};

}  // namespace

const Kern* kern_generic() { return &table; }

}  // namespace moeinfer_native
