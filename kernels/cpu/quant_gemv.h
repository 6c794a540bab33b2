// Building blocks of the CPU weight-only quantized linears (kernels/cpu/quant_weight_only.h),
// compiled once per ISA: weight-row loaders that dequantize in registers, and the dot-product
// micro-kernel that multiplies MR rows of float32 x with NR weight rows along K (GEMV path;
// the GEMM path, quant_gemm.h, packs the loaders' output into panels).
//
// Loaders: load(n, k, v, count) fills v[0 .. kStep) with the float32 weights of row n for the
// kStep * kV positions from k (lanes past `count` are 0; only Int8Row sees count < kV,
// at the K tail). Nothing is stored: the int8 / int4 bytes are widened and converted in
// registers.
//   Int8Row   w[n, k] as float (the per-channel scale is applied to the dot product after).
//   Int4Row   (q - zero[g]) * scale[g], exact to one float32 rounding like a float32
//             dequantize (avx512: looked up with vpermps in the 16 values of the group, built
//             once per group and row; dot_block walks int4 rows group by group). The byte order is natural (low nibble = even k), so a block of kV
//             bytes holds 2 kV values whose low nibbles are the even k and high nibbles the odd
//             k: the kernels read x "deinterleaved" per block of 2 kV (first the kV even
//             positions, then the kV odd ones; deinterleave_block), so v[0] = low nibbles
//             pairs with x's evens and v[1] = high nibbles with x's odds. G is a multiple of
//             2 kV (32 >= 2 kV on every ISA), so a block never straddles two groups.
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "vec_io.h"

// Loaders are always inlined into the micro-kernels; each micro-kernel instance is its own
// function (inlining several into one caller made GCC stop inlining at::vec's constructors), and
// its loops over the register tile are unrolled by force (FASTATTN_UNROLL): left as loops, the
// vector accumulators live on the stack.
#ifndef FASTATTN_ALWAYS_INLINE
#if defined(__GNUC__) || defined(__clang__)
#define FASTATTN_ALWAYS_INLINE inline __attribute__((always_inline))
#define FASTATTN_NOINLINE __attribute__((noinline))
#if defined(__clang__)
#define FASTATTN_UNROLL _Pragma("unroll")
#else
#define FASTATTN_UNROLL _Pragma("GCC unroll 16")
#endif
#else
#define FASTATTN_UNROLL
#define FASTATTN_ALWAYS_INLINE inline
#define FASTATTN_NOINLINE
#endif
#endif

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

static_assert(32 % (2 * kV) == 0, "an int4 block of 2 kV values must fit in the smallest group");

struct Int8Row {
  static constexpr int kStep = 1;
  const int8_t* w;  // (N, K)
  int64_t K;
  FASTATTN_ALWAYS_INLINE void load(int64_t n, int64_t k, Vec* v, int64_t count) const {
    const int8_t* p = w + n * K + k;
#if defined(CPU_CAPABILITY_AVX512)
    const __m128i b = count == kV ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                  : _mm_maskz_loadu_epi8((__mmask16)((1u << count) - 1), p);
    v[0] = Vec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
#elif defined(CPU_CAPABILITY_AVX2)
    if (count == kV) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      v[0] = Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
      return;
    }
    alignas(64) float t[kV] = {};
    for (int64_t i = 0; i < count; ++i) t[i] = static_cast<float>(p[i]);
    v[0] = Vec::loadu(t);
#else
    alignas(64) float t[kV] = {};
    for (int64_t i = 0; i < count; ++i) t[i] = static_cast<float>(p[i]);
    v[0] = Vec::loadu(t);
#endif
  }
};

// Int4Row's per-(row, group) constants: on avx512 the 16 possible weights (v - zero) * scale,
// v = 0..15, in one vector, looked up with vpermps (exactly the same values as computing
// (q - zero) * scale per element); elsewhere the scale and zero point broadcast.
struct Int4Table {
#if defined(CPU_CAPABILITY_AVX512)
  Vec lut;
#else
  Vec s, z;
#endif
};

struct Int4Row {
  static constexpr int kStep = 2;
  const uint8_t* packed;  // (N, K / 2)
  const float* scale;     // (N, K / G)
  const uint8_t* zero;    // (N, K / G)
  int64_t half_k, groups, G;  // K / 2, K / G, G
  int group_shift;            // log2(G): no integer division in the hot loop
  Int4Row(const uint8_t* p, const float* s, const uint8_t* z, int64_t K, int64_t G_)
      : packed(p), scale(s), zero(z), half_k(K / 2), groups(K / G_), G(G_), group_shift(0) {
    while ((int64_t{1} << group_shift) < G) ++group_shift;
  }
  // The constants of the group holding position k of row n.
  FASTATTN_ALWAYS_INLINE Int4Table table(int64_t n, int64_t k) const {
    const int64_t g = n * groups + (k >> group_shift);
    const Vec s(scale[g]), z(static_cast<float>(zero[g]));
#if defined(CPU_CAPABILITY_AVX512)
    const Vec v(_mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    return {(v - z) * s};  // v - z is exact (small integers): one rounding, in the multiply
#else
    return {s, z};
#endif
  }
  // Weights of row n at positions [k, k + 2 kV) (one block, inside the group of t).
  FASTATTN_ALWAYS_INLINE void load(const Int4Table& t, int64_t n, int64_t k, Vec* v) const {
    const uint8_t* p = packed + n * half_k + (k >> 1);
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v[0] = Vec(_mm512_permutexvar_ps(b, t.lut));  // vpermps reads index bits 0-3: low nibble
    v[1] = Vec(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t.lut));
#else
#if defined(CPU_CAPABILITY_AVX2)
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const Vec lo(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF))));
    const Vec hi(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)));
#else
    alignas(64) float tl[kV], th[kV];
    for (int i = 0; i < kV; ++i) {
      tl[i] = static_cast<float>(p[i] & 0xF);
      th[i] = static_cast<float>(p[i] >> 4);
    }
    const Vec lo = Vec::loadu(tl), hi = Vec::loadu(th);
#endif
    v[0] = (lo - t.z) * t.s;  // q - z is exact (small integers): one rounding, in the multiply
    v[1] = (hi - t.z) * t.s;
#endif
  }
  FASTATTN_ALWAYS_INLINE void load(int64_t n, int64_t k, Vec* v, int64_t /*count*/) const {
    load(table(n, k), n, k, v);
  }
};

// x (K floats) -> xd (K floats) deinterleaved per block of 2 kV: xd[b + i] = x[b + 2i],
// xd[b + kV + i] = x[b + 2i + 1]. K % (2 kV) == 0.
template <typename T>
inline void deinterleave_row(const T* x, float* xd, int64_t K) {
  for (int64_t b = 0; b < K; b += 2 * kV) {
    for (int i = 0; i < kV; ++i) {
      xd[b + i] = static_cast<float>(x[b + 2 * i]);
      xd[b + kV + i] = static_cast<float>(x[b + 2 * i + 1]);
    }
  }
}

// The sum over k runs in chunks of kGemvChunk positions whose vector partial sums are added into
// running sums kept in memory (in registers they would spill: MR x NR accumulators already fill
// the register file), so rounding grows with kGemvChunk / kV + K / kGemvChunk, not K / kV (with
// 8-lane vectors and K = 4096 the plain chain was 2.9x torch's error). A multiple of every
// group size, so an int4 group never straddles two chunks.
constexpr int64_t kGemvChunk = 256;

// res[i * NR + j] = sum_k x[i][k] * W[n0 + j][k] for i < MR, j < NR, in float32: one vector
// accumulator per (i, j), lanes summed at the end. x: MR rows of K floats, row stride K.
template <int MR, int NR, class L>
FASTATTN_NOINLINE void dot_block(const float* x, int64_t K, const L& w, int64_t n0, float* res) {
  constexpr int S = L::kStep;
  const int64_t step = S * kV, full = K - K % step;
  Vec acc[MR][NR];
  alignas(64) float total[MR][NR][kV] = {};
  auto flush = [&] {
    FASTATTN_UNROLL
    for (int i = 0; i < MR; ++i)
      FASTATTN_UNROLL
      for (int j = 0; j < NR; ++j) {
        (Vec::loadu(total[i][j]) + acc[i][j]).store(total[i][j]);
        acc[i][j] = Vec(0.f);
      }
  };
  FASTATTN_UNROLL
  for (int i = 0; i < MR; ++i)
    FASTATTN_UNROLL
    for (int j = 0; j < NR; ++j) acc[i][j] = Vec(0.f);
  for (int64_t c0 = 0; c0 < full; c0 += kGemvChunk) {
    const int64_t c1 = std::min(full, c0 + kGemvChunk);
    if constexpr (std::is_same_v<L, Int4Row>) {  // group constants once per group, not per block
      for (int64_t g0 = c0; g0 < c1; g0 += w.G) {
        Int4Table t[NR];
        FASTATTN_UNROLL
        for (int j = 0; j < NR; ++j) t[j] = w.table(n0 + j, g0);
        for (int64_t k = g0; k < g0 + w.G; k += step) {
          Vec xv[MR][S];
          FASTATTN_UNROLL
          for (int i = 0; i < MR; ++i)
            FASTATTN_UNROLL
            for (int s = 0; s < S; ++s) xv[i][s] = Vec::loadu(x + i * K + k + s * kV);
          FASTATTN_UNROLL
          for (int j = 0; j < NR; ++j) {
            Vec wv[S];
            w.load(t[j], n0 + j, k, wv);
            FASTATTN_UNROLL
            for (int i = 0; i < MR; ++i)
              FASTATTN_UNROLL
              for (int s = 0; s < S; ++s) acc[i][j] = at::vec::fmadd(xv[i][s], wv[s], acc[i][j]);
          }
        }
      }
    } else {
      for (int64_t k = c0; k < c1; k += step) {
        Vec xv[MR][S];
        FASTATTN_UNROLL
        for (int i = 0; i < MR; ++i)
          FASTATTN_UNROLL
          for (int s = 0; s < S; ++s) xv[i][s] = Vec::loadu(x + i * K + k + s * kV);
        FASTATTN_UNROLL
        for (int j = 0; j < NR; ++j) {
          Vec wv[S];
          w.load(n0 + j, k, wv, kV);
          FASTATTN_UNROLL
          for (int i = 0; i < MR; ++i)
            FASTATTN_UNROLL
            for (int s = 0; s < S; ++s) acc[i][j] = at::vec::fmadd(xv[i][s], wv[s], acc[i][j]);
        }
      }
    }
    flush();
  }
  if constexpr (S == 1) {
    if (full < K) {  // the K tail (int8 only: int4 K is a multiple of the group size)
      const int64_t r = K - full;
      Vec xv[MR];
      FASTATTN_UNROLL
      for (int i = 0; i < MR; ++i) xv[i] = Vec::loadu(x + i * K + full, r);
      FASTATTN_UNROLL
      for (int j = 0; j < NR; ++j) {
        Vec wv[1];
        w.load(n0 + j, full, wv, r);
        FASTATTN_UNROLL
        for (int i = 0; i < MR; ++i) acc[i][j] = at::vec::fmadd(xv[i], wv[0], acc[i][j]);
      }
      flush();
    }
  }
  FASTATTN_UNROLL
  for (int i = 0; i < MR; ++i)
    FASTATTN_UNROLL
    for (int j = 0; j < NR; ++j) res[i * NR + j] = reduce_sum(Vec::loadu(total[i][j]));
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
