// Inner loops of the native CPU kernels, one table per instruction set (kern_generic.cpp,
// kern_avx2.cpp, ...). ops.cpp owns threading and the torch-facing ops; these see raw rows.
//
// Quantized rows use moeinfer's group-wise storage (moeinfer/compress/quant): w = (u - z) * s per
// group of `gs` columns (z == nullptr: every zero-point is the midpoint 2^(bits-1), the symmetric
// Q8_0/Q4_0 storage, whose zeros then need not be read: 4 of a Q4_0 block's 24 bytes), codes u packed by moeinfer/compress/quant/packing.py (8-bit: one byte per
// code; 4-bit: byte j holds code 2j in its low nibble and code 2j+1 in its high one). A row's dot
// product with x is computed without materialising w:
//     y = sum_g s_g * (sum_{j in g} u_j x_j - z_g * sum_{j in g} x_j)
// so the codes are widened in registers and the per-group sums of x are computed once per vector.
// For 4-bit codes x is also given "nibble-ordered" per run of 16 columns (xperm: the 8 even columns,
// then the 8 odd ones), so the low and high nibbles of 8 packed bytes meet their activations in order.
//
// Int8 activations (llama.cpp's Q8_0 activation blocks, the technique of its ggml-cpu quants): x is
// quantized once per vector to blocks of QBLOCK = 32 columns, x_j ~ d_b * xq_j with d_b = max|x_b| / 127
// (fp32, not fp16 as in Q8_0) and xq_j = round-half-even(x_j / d_b) in [-127, 127]. Then for groups
// whose size is a multiple of 32 every product is an integer dot over a block:
//     y = sum_g s_g * (sum_{b in g} d_b * (sum_{j in b} u_j xq_j) - z_g * xsum_g)
// with xsum_g = sum_{b in g} d_b * (sum_{j in b} xq_j), the group sums of the *quantized* x, so y is
// exactly the dot product of the dequantized row with the dequantized x (up to fp32 rounding).
//
// Quantized GEMM (prefill; the technique of llamafile's tinyBLAS and llama.cpp's ggml-cpu Q4_0 x Q8_0
// GEMM): many activation rows quantized as above, then a tile of weight rows x activation rows per
// block of 32 columns, each weight block loaded (and unpacked) once per tile and each activation block
// once per weight row of it, integer block products scaled by d_b * s_g into fp32 accumulators; the
// zero-point term from each activation row's group sums, as for one row.
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace moeinfer_native {

constexpr int64_t QBLOCK = 32;

// One vector quantized to int8 blocks (see above). q: cols rounded up to whole blocks, zero-padded;
// q4: the same codes nibble-ordered per block (the 16 even columns, then the 16 odd ones), for
// 4-bit rows; q4p: nibble-ordered per pair of blocks (`pair_order`), for row kernels that unpack two
// blocks of codes at once; d: one scale per block; gsum: xsum_g per weight group.
struct Q8Act {
  const int8_t* q;
  const int8_t* q4;
  const float* d;
  const float* gsum;
  const int8_t* q4p;
};

// N activation rows quantized as Q8Act, each row's arrays at a fixed stride: codes (and nibble-ordered
// codes) nb * QBLOCK apart, scales nb apart, group sums G apart.
struct Q8Rows {
  const int8_t* q;
  const int8_t* q4;
  const float* d;
  const float* gsum;
  int64_t n, nb, G;
  const int8_t* q4p;
  Q8Act row(int64_t j) const {
    return {q + j * nb * QBLOCK, q4 + j * nb * QBLOCK, d + j * nb, gsum + j * G, q4p + j * nb * QBLOCK};
  }
};

// The codes of the `nb` whole blocks of q nibble-ordered per pair of blocks, for 4-bit rows unpacked 32 bytes
// (two blocks) at a time: 32 packed bytes give the low nibbles of blocks 2p and 2p+1 (their even
// columns) in one register and the high nibbles (odd columns) in another, so out holds, per 64
// columns, block 2p's 16 even columns, block 2p+1's 16 even ones, then the odd ones of each. A last
// unpaired block is ordered as q4 (its 16 even columns, then its 16 odd ones).
inline void pair_order(const int8_t* q, int64_t nb, int8_t* out) {
  const int64_t H = QBLOCK / 2;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* qb = q + b * QBLOCK;
    const bool paired = (b | 1) < nb;
    int8_t* even = out + (b & ~int64_t(1)) * QBLOCK + (paired ? (b & 1) * H : 0);
    int8_t* odd = paired ? even + QBLOCK : even + H;
    for (int64_t l = 0; l < H; ++l) even[l] = qb[2 * l], odd[l] = qb[2 * l + 1];
  }
}

// Activation rows interleaved by eight, for the GEMM whose vector lanes are activation rows (gemm_x8;
// the technique of llama.cpp's repacked Q4_0x8 GEMM, with the activations interleaved instead of the
// weights, so the weights keep their storage): rows in groups of 8, the last padded with zero rows;
// per group and block of 32 columns, eight 32-byte vectors, each holding 4 codes of each of the 8
// rows (lane l: row 8g + l). 8-bit weights: vector k = columns 4k..4k+3; 4-bit weights: vector 2k =
// columns 8k, 8k+2, 8k+4, 8k+6 and vector 2k+1 = columns 8k+1, 8k+3, 8k+5, 8k+7, the low and high
// nibbles of packed bytes 4k..4k+3. A weight row's 4 bytes broadcast to all lanes then meet 8 rows at
// once, each lane summing one row's products, so a block costs one int-to-float conversion and one
// scaling per 8 output elements instead of one per element. d: per group and block the 8 rows'
// scales; bsum: per group and block the 8 rows' code sums (sum_j xq_j: 4-bit codes' midpoint 8 is
// subtracted in the integers); gsum: per group and weight group the 8 rows' group sums (for stored
// zero-points). Whole blocks only.
constexpr int64_t X8 = 8;
struct X8Rows {
  const int8_t* a;
  const float* d;
  const int32_t* bsum;
  const float* gsum;
  int64_t n, nb, G;  // n rows in ceil(n / 8) groups
  // the rows of groups [g0, g0 + groups) (row 8 * g0 first)
  X8Rows groups(int64_t g0, int64_t rows) const {
    return {a + g0 * nb * X8 * QBLOCK, d + g0 * nb * X8, bsum + g0 * nb * X8, gsum + g0 * G * X8, rows, nb, G};
  }
};

// Column of vector v's byte t in a block, in the X8Rows order for `bits`-bit weights.
inline int64_t x8_column(int bits, int64_t v, int64_t t) {
  return bits == 8 ? 4 * v + t : 8 * (v >> 1) + (v & 1) + 2 * t;
}

// Groups [g0, g1) of x's n rows (whole blocks) interleaved by eight into `out` (X8Rows with its arrays
// at group 0: a [groups * nb * 256], d and bsum [groups * nb * 8], gsum [groups * G * 8]; padding rows
// zero).
inline void interleave8(const Q8Rows& x, int bits, int64_t g0, int64_t g1, const X8Rows& out) {
  const int64_t nb = x.nb, G = x.G;
  int8_t* a = const_cast<int8_t*>(out.a);
  float *d = const_cast<float*>(out.d), *gsum = const_cast<float*>(out.gsum);
  int32_t* bsum = const_cast<int32_t*>(out.bsum);
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t l = 0; l < X8; ++l) {
      const int64_t row = g * X8 + l;
      const bool real = row < x.n;
      const int8_t* q = x.q + row * nb * QBLOCK;
      for (int64_t b = 0; b < nb; ++b) {
        int8_t* ab = a + ((g * nb + b) * X8) * QBLOCK + l * 4;
        int32_t sum = 0;
        for (int64_t v = 0; v < X8; ++v)
          for (int64_t t = 0; t < 4; ++t) {
            ab[v * QBLOCK + t] = real ? q[b * QBLOCK + x8_column(bits, v, t)] : 0;
            sum += ab[v * QBLOCK + t];
          }
        d[(g * nb + b) * X8 + l] = real ? x.d[row * nb + b] : 0.f;
        bsum[(g * nb + b) * X8 + l] = sum;
      }
      for (int64_t k = 0; k < G; ++k) gsum[(g * G + k) * X8 + l] = real ? x.gsum[row * G + k] : 0.f;
    }
}

// A packed matrix (one expert's, or a linear's): row r's codes at q + r * P, scales/zeros at s/z + r * G.
struct QRows {
  const uint8_t* q;
  const float* s;
  const float* z;
  int64_t P, G;
};

// IEEE fp16 -> fp32 (exact: every half is a float), subnormals, infinities and NaNs included.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: m * 2^-24, normalised by shifting its leading one to bit 10
    uint32_t shift = 0;
    while (!(man & 0x400u)) man <<= 1, ++shift;
    bits = sign | ((113u - shift) << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// A row's group scales: fp32 (f) or IEEE fp16 (h), one of the two set. The symmetric block formats
// store theirs in fp16, as GGUF's Q8_0/Q4_0 do: a Q4_0 row reads 18 bytes a block instead of 20.
struct Scales {
  const float* f;
  const uint16_t* h;
  float at(int64_t g) const { return f ? f[g] : f16_to_f32(h[g]); }
};

// Activation rows a GEMM keeps in cache while it walks its weight rows: about 128 KiB of codes.
inline int64_t token_chunk(int64_t cols) {
  const int64_t t = (int64_t(128) << 10) / (cols > 0 ? cols : 1);
  return t < 8 ? 8 : t;
}

// Zero-point of group g (nullptr: the symmetric midpoint, 8 for 4-bit and 128 for 8-bit codes).
inline float zero_at(const float* z, int64_t g, float mid) { return z ? z[g] : mid; }
// Row `r` of a per-group array `G` wide, or nullptr for nullptr.
inline const float* row_of(const float* z, int64_t r, int64_t G) { return z ? z + r * G : nullptr; }

// The codes, scales and zeros of weight rows [r, r + RM) of `w` for a tile; a partial tile (past r1)
// repeats its last row (computed, not written). Returns the tile's real rows.
template <int RM>
inline int tile_rows(const QRows& w, int64_t r, int64_t r1, const uint8_t** wq, const float** ws, const float** wz) {
  const int rows = int(r + RM <= r1 ? RM : r1 - r);
  for (int i = 0; i < RM; ++i) {
    const int64_t ri = r + (i < rows ? i : rows - 1);
    wq[i] = w.q + ri * w.P, ws[i] = w.s + ri * w.G, wz[i] = row_of(w.z, ri, w.G);
  }
  return rows;
}

// f(q4, zeros), both std::integral_constant<bool, ...>: a kernel templated on 4-bit codes (else 8-bit) and on
// whether the rows have zero-points, its four instantiations chosen at run time.
template <class F>
inline void with_bits_and_zeros(int bits, bool zeros, F f) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (bits == 4)
    zeros ? f(Yes{}, Yes{}) : f(Yes{}, No{});
  else
    zeros ? f(No{}, Yes{}) : f(No{}, No{});
}

struct Kern {
  const char* name;
  float (*dot_f32)(const float* w, const float* x, int64_t n);
  float (*dot_bf16)(const uint16_t* w, const float* x, int64_t n);
  float (*qrow8)(const uint8_t* q, const float* s, const float* z, const float* x, const float* xsum,
                 int64_t cols, int64_t gs);
  float (*qrow4)(const uint8_t* q, const float* s, const float* z, const float* x, const float* xperm,
                 const float* xsum, int64_t cols, int64_t gs);
  // int8-activation rows; gs a multiple of QBLOCK; fp32 or fp16 scales (Scales)
  float (*qrow8_q8)(const uint8_t* q, Scales s, const float* z, const Q8Act& x, int64_t cols, int64_t gs);
  float (*qrow4_q8)(const uint8_t* q, Scales s, const float* z, const Q8Act& x, int64_t cols, int64_t gs);
  // y[j * ldy + r] = row r of w . activation row j, for r in [r0, r1) and every j < x.n; gs a multiple of
  // QBLOCK; bits 4 or 8; fp32 scales (fp16 ones are widened per item by the caller)
  void (*gemm_q8)(int bits, const QRows& w, int64_t r0, int64_t r1, const Q8Rows& x, int64_t cols, int64_t gs,
                  float* y, int64_t ldy);
  // Four rows against one x at once, out[i] = the one-row kernel's result for row i, bit for bit (each
  // row's operations in the same order): four weight streams read together keep more memory reads in
  // flight than one, which a core needs to approach its share of the bandwidth at batch 1.
  void (*dot4_f32)(const float* const* w, const float* x, int64_t n, float* out);
  void (*dot4_bf16)(const uint16_t* const* w, const float* x, int64_t n, float* out);
  // (the four rows' scales all fp32 or all fp16)
  void (*qrow8_q8_x4)(const uint8_t* const* q, const Scales* s, const float* const* z, const Q8Act& x, int64_t cols,
                      int64_t gs, float* out);
  void (*qrow4_q8_x4)(const uint8_t* const* q, const Scales* s, const float* const* z, const Q8Act& x, int64_t cols,
                      int64_t gs, float* out);
  // out[i] = h[i] widened from IEEE fp16 (exact in every variant, as f16_to_f32): fp16 scales for the
  // kernels that take fp32 ones (the GEMM tiles, fp32-activation rows)
  void (*half_to_f32)(const uint16_t* h, float* out, int64_t n);
  // gemm_q8 on interleaved activation rows (X8Rows; whole blocks, fp32 scales): y[j * ldy + r] for r in
  // [r0, r1) and every j < x.n, each element summed in block order whatever the tiles; nullptr in a
  // variant without it (the caller then runs gemm_q8)
  void (*gemm_x8)(int bits, const QRows& w, int64_t r0, int64_t r1, const X8Rows& x, int64_t gs, float* y,
                  int64_t ldy);
  // quantize_q8 (below) bit for bit: the same codes and scales in every variant
  void (*quantize_act)(const float* x, int64_t n, int8_t* q, float* d);
};

const Kern* kern_generic();
const Kern* kern_avx2();
// Optional variants (weak: null where the compiler could not build their file, build.py OPTIONAL; the
// library links without them and reports them not built).
const Kern* kern_avx512() __attribute__((weak));
const Kern* kern_amx() __attribute__((weak));
// Whether Linux lets this process use the AMX tile state (asked for once; kern_amx.cpp).
bool amx_usable() __attribute__((weak));
// The variant named (ops.cpp; an error naming the valid ones, or saying this CPU cannot run it).
const Kern* pick_kern(const char* variant);

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

// Integer tails: sum_{j in [begin, end)} (u_j - off) * xq_j, codes in storage order.
inline int32_t itail_u8(const uint8_t* q, const int8_t* xq, int64_t begin, int64_t end, int32_t off) {
  int32_t acc = 0;
  for (int64_t j = begin; j < end; ++j) acc += (int32_t(q[j]) - off) * int32_t(xq[j]);
  return acc;
}

inline int32_t itail_u4(const uint8_t* q, const int8_t* xq, int64_t begin, int64_t end) {
  int32_t acc = 0;
  for (int64_t j = begin; j < end; ++j) acc += int32_t((q[j >> 1] >> ((j & 1) * 4)) & 0xF) * int32_t(xq[j]);
  return acc;
}

// Quantize x [n] to blocks of QBLOCK (q [nb * QBLOCK], zero-padded; d [nb]), the formula above. Shared by
// every variant, so all of them see the same codes; moeinfer/kernels/q8_reference.py mirrors it.
inline void quantize_q8(const float* x, int64_t n, int8_t* q, float* d) {
  const int64_t nb = (n + QBLOCK - 1) / QBLOCK;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t c = b * QBLOCK, end = c + QBLOCK < n ? c + QBLOCK : n;
    float amax = 0.f;
    bool finite = true;
    for (int64_t j = c; j < end; ++j) {
      const float a = std::fabs(x[j]);
      finite = finite && a <= 3.4028235e38f;  // false for inf and NaN
      amax = a > amax ? a : amax;
    }
    // a block holding inf or NaN gets scale NaN and codes 0, so every product it enters is NaN, as the
    // fp32 path's would be
    const float db = finite ? amax / 127.f : NAN, id = finite && db != 0.f ? 1.f / db : 0.f;
    d[b] = db;
    for (int64_t j = c; j < c + QBLOCK; ++j) {
      float v = j < end && finite ? std::nearbyint(x[j] * id) : 0.f;  // round half to even, as torch.round
      v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
      q[j] = int8_t(v);
    }
  }
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// fp32 -> bf16 with round-to-nearest-even, as torch's .to(torch.bfloat16) (NaN stays a quiet NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

}  // namespace moeinfer_native
