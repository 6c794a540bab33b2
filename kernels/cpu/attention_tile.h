// Building blocks of the CPU attention kernels (attention_forward.h, attention_backward.h),
// compiled once per ISA (see fastattn/cpu_isa.h):
//   tile_gemm       a register-blocked float32 micro-kernel for the small products of a tile
//                   (C (+)= A B, A read by broadcasts through any two strides, B by vectors)
//   pack_*          storage dtype -> float32 operands (rows, transposes, the mask block)
//   mask / dropout  the score modifiers of the sdpa contract (kernels/registration.cpp)
// Every product operand is float32, so the inner loops are pure FMAs whatever the storage type.
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "fastattn/attention_args.h"
#include "fastattn/philox.h"
#include "vec_io.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Register tile of the micro-kernel: kMR rows of C by kNV vectors (kMR * kNV accumulators, kNV
// B vectors and one broadcast live in registers: 24 + 4 + 1 of AVX-512's 32, 12 + 2 + 1 of
// AVX2's 16).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMR = 6, kNV = 4;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kMR = 6, kNV = 2;
#else
constexpr int kMR = 4, kNV = 2;
#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// float32 scratch of n elements (n may be 0).
inline std::unique_ptr<float[]> scratch(int64_t n) {
  return std::unique_ptr<float[]>(new float[std::max<int64_t>(n, 1)]);
}

// Software prefetch of the cache line at p into L1 (streams that the hardware prefetcher
// serves too slowly: keys and values read once per query row when decoding).
inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
}

// C[r][c] (+)= sum_k A[r * a_r + k * a_k] * B[k * ldb + c] for r < MR, c < NV * kV.
// With one or two rows (decoding), B is a stream read once: prefetched 8 rows ahead.
template <int MR, int NV>
inline void micro(int64_t K, const float* __restrict A, int64_t a_r, int64_t a_k,
                  const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
                  bool acc) {
  Vec c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = Vec(0.f);
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const float* a = A + k * a_k;
    Vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if constexpr (MR <= 2) prefetch(b + 8 * ldb + v * kV);
      bv[v] = Vec::loadu(b + v * kV);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec av(a[r * a_r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(av, bv[v], c[r][v]);
    }
  }
  // acc: C + (A B), the product summed on its own first (a running sum over many calls
  // then grows its rounding error with the number of calls, not the number of terms)
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* p = C + r * ldc + v * kV;
      (acc ? Vec::loadu(p) + c[r][v] : c[r][v]).store(p);
    }
  }
}

struct GemmArgs {
  int64_t K;
  const float* A;
  int64_t a_r, a_k;
  const float* B;
  int64_t ldb;
  float* C;
  int64_t ldc;
  bool acc;
};

template <int MR, int NV>
inline void micro_rows(int mr, const GemmArgs& g) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_rows<MR - 1, NV>(mr, g);
  }
  micro<MR, NV>(g.K, g.A, g.a_r, g.a_k, g.B, g.ldb, g.C, g.ldc, g.acc);
}

template <int NV>
inline void micro_tile(int nv, int mr, const GemmArgs& g) {
  if constexpr (NV > 1) {
    if (nv < NV) return micro_tile<NV - 1>(nv, mr, g);
  }
  micro_rows<kMR, NV>(mr, g);
}

// C (M x nvec*kV, row stride ldc) (+)= A (M x K: element (m, k) at A[m * a_r + k * a_k]) times
// B (K x nvec*kV, row stride ldb). acc: add to C, else overwrite it. B's columns past the
// valid ones must be finite (packed buffers are zero padded).
// kc: the sum over k runs in chunks of kc terms, each summed on its own and then added to C in
// order (blocked summation: the rounding error grows with kc + K / kc, not K). The products of
// the scores (any path, forward or backward) sum q . k in chunks of kKC; the other products run
// over at most a block (and add each block to C) anyway.
constexpr int64_t kKC = 128;

inline void tile_gemm(int64_t M, int64_t nvec, int64_t K, const float* A, int64_t a_r,
                      int64_t a_k, const float* B, int64_t ldb, float* C, int64_t ldc, bool acc,
                      int64_t kc_max = std::numeric_limits<int64_t>::max()) {
  for (int64_t n0 = 0; n0 < nvec; n0 += kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, nvec - n0));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      int64_t k0 = 0;
      do {  // K == 0 still writes C (zeros) once
        const int64_t kc = std::min(kc_max, K - k0);
        micro_tile<kNV>(nv, mr,
                        GemmArgs{kc, A + m0 * a_r + k0 * a_k, a_r, a_k, B + k0 * ldb + n0 * kV, ldb,
                                 C + m0 * ldc + n0 * kV, ldc, acc || k0 > 0});
        k0 += kc;
      } while (k0 < K);
    }
  }
}

// dst (rows x width_p, row stride width_p) = src (rows x width, row stride ld) as float32,
// columns [width, width_p) zero.
template <typename T>
inline void pack_rows(const T* src, int64_t ld, int64_t rows, int64_t width, float* dst,
                      int64_t width_p) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld;
    float* d = dst + r * width_p;
    for (int64_t w = 0; w < width; w += kV) {
      const int64_t n = std::min<int64_t>(kV, width - w);
      load_f32(s + w, n).store(d + w, n);
    }
    for (int64_t w = width; w < width_p; ++w) d[w] = 0.f;
  }
}

// Row operand of a product as float32: float storage with width == width_p is read in place
// (row stride ld, possibly 0), anything else is packed into buf (row stride width_p).
template <typename T>
inline const float* rows_f32(const T* src, int64_t ld, int64_t rows, int64_t width,
                             int64_t width_p, float* buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<T, float>) {
    if (width == width_p) {
      *ld_out = ld;
      return src;
    }
  }
  pack_rows(src, ld, rows, width, buf, width_p);
  *ld_out = width_p;
  return buf;
}

// In-register transpose of a kV x kV block: t[r] lane c -> t[c] lane r.
inline void transpose_block(Vec* t) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = t[i];
  for (int i = 0; i < 8; ++i) {  // 128-bit lane l: rows 2i, 2i+1 at columns 4l.. interleaved
    u[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    u[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane l: column 4l + c of rows 4i..4i+3
    r[4 * i] = _mm512_shuffle_ps(u[4 * i], u[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(u[4 * i], u[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(u[4 * i + 1], u[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(u[4 * i + 1], u[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // gather lane l of the four row groups: column 4l + c
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    const __m512 w0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
    const __m512 v1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(v0, v1, 0x88);
    t[8 + c] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
    t[4 + c] = _mm512_shuffle_f32x4(w0, w1, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(w0, w1, 0xDD);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = t[i];
  for (int i = 0; i < 4; ++i) {
    u[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    u[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = _mm256_shuffle_ps(u[4 * i], u[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(u[4 * i], u[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(u[4 * i + 1], u[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(u[4 * i + 1], u[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
    t[4 + c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
  }
#else
  alignas(64) float m[kV][kV];
  for (int r = 0; r < kV; ++r) t[r].store(m[r]);
  for (int c = 0; c < kV; ++c) {
    alignas(64) float col[kV];
    for (int r = 0; r < kV; ++r) col[r] = m[r][c];
    t[c] = Vec::loadu(col);
  }
#endif
}

// dst[w * ldd + r] = row r, column w of a rows x width block (r < rows, w < width), where
// load(r, w, n) gives n (<= kV) values of row r from column w as float32 (lanes past n 0).
// The columns r in [rows, cols) of dst are zero; cols must be a multiple of kV.
template <typename Load>
inline void pack_transposed_with(const Load& load, int64_t rows, int64_t width, float* dst,
                                 int64_t ldd, int64_t cols) {
  Vec t[kV];
  for (int64_t r0 = 0; r0 < rows; r0 += kV) {
    const int64_t nr = std::min<int64_t>(kV, rows - r0);
    for (int64_t w0 = 0; w0 < width; w0 += kV) {
      const int64_t nw = std::min<int64_t>(kV, width - w0);
      for (int64_t r = 0; r < kV; ++r) t[r] = r < nr ? load(r0 + r, w0, nw) : Vec(0.f);
      transpose_block(t);
      for (int64_t w = 0; w < nw; ++w) t[w].store(dst + (w0 + w) * ldd + r0);
    }
  }
  const int64_t done = round_up(rows, kV);
  if (done < cols) {
    for (int64_t w = 0; w < width; ++w) {
      std::memset(dst + w * ldd + done, 0, sizeof(float) * (cols - done));
    }
  }
}

// dst[w * ldd + r] = src[r * ld + w] (r < rows, w < width) as float32; the columns
// r in [rows, cols) of dst are zero (cols: a multiple of kV).
template <typename T>
inline void pack_transposed(const T* src, int64_t ld, int64_t rows, int64_t width, float* dst,
                            int64_t ldd, int64_t cols) {
  pack_transposed_with(
      [&](int64_t r, int64_t w, int64_t n) {
        return load_f32(src + r * ld + w, n);
      },
      rows, width, dst, ldd, cols);
}

// s[i * lds + j] = q_i . k_j for i < bm, j < bn, with the keys along the lanes (for a few
// query rows: decoding). Each kV x kV tile of keys is transposed in registers, then summed
// over e as the very chains of fused multiply-adds (and chunks of kKC) tile_gemm forms for
// Q . Kt (the backward's recomputation is bit-identical). k: rows of any storage type (row stride ldk), read once and
// in order (prefetched a chunk ahead). Lanes j in [bn, ceil(bn / kV) * kV) of s are 0.
template <typename T>
inline void scores_keys_on_lanes(const float* q, int64_t ldq, int64_t bm, const T* k,
                                 int64_t ldk, int64_t bn, int64_t E, float* s, int64_t lds) {
  static_assert(kKC % kV == 0, "a chunk of the sum is whole tiles");
  Vec t[kV], part[kV];  // part[i]: query row i's sum over the current chunk of kKC terms
  for (int64_t j0 = 0; j0 < bn; j0 += kV) {
    const int64_t nj = std::min<int64_t>(kV, bn - j0);
    for (int64_t e0 = 0; e0 < std::max<int64_t>(E, 1); e0 += kV) {
      const int64_t ne = std::min<int64_t>(kV, E - e0);
      for (int64_t c = 0; c < kV; ++c) {
        const T* row = k + (j0 + c) * ldk + e0;
        if (j0 + kV + c < bn) prefetch(row + kV * ldk);
        t[c] = c < nj && ne > 0 ? load_f32(row, ne) : Vec(0.f);
      }
      transpose_block(t);  // t[e] lane c: k[j0 + c][e0 + e]
      const bool first = e0 % kKC == 0, last = e0 + kV >= E || (e0 + kV) % kKC == 0;
      for (int64_t i = 0; i < bm; ++i) {
        const float* qi = q + i * ldq + e0;
        Vec acc = first ? Vec(0.f) : part[i];
        for (int64_t e = 0; e < ne; ++e) acc = at::vec::fmadd(Vec(qi[e]), t[e], acc);
        part[i] = acc;
        if (last) (e0 < kKC ? acc : Vec::loadu(s + i * lds + j0) + acc).store(s + i * lds + j0);
      }
    }
  }
}

// s[i * lds + j] = q_i . k_j for i < bm, j < bn, summed along e in kV lanes and then a tree
// (about 2.4x more accurate than one chain of fused multiply-adds for E = 64, as BLAS's
// matrix-vector product is): the scores of short query sequences (L <= kV, decoding), forward
// and backward alike. k: rows of any storage type (row stride ldk), read once, in order
// (prefetched two chunks ahead); kV keys at a time: kV vector accumulators, one transpose, a
// tree of adds. Lanes j in [bn, ceil(bn / kV) * kV) of s are 0.
template <typename T>
inline void dot_scores(const float* q, int64_t ldq, int64_t bm, const T* k, int64_t ldk,
                       int64_t bn, int64_t E, float* s, int64_t lds) {
  Vec acc[kV];
  for (int64_t j0 = 0; j0 < bn; j0 += kV) {
    const int64_t nj = std::min<int64_t>(kV, bn - j0);
    for (int64_t i = 0; i < bm; ++i) {
      for (int c = 0; c < kV; ++c) acc[c] = Vec(0.f);
      for (int64_t e = 0; e < E; e += kV) {
        const int64_t ne = std::min<int64_t>(kV, E - e);
        const Vec qv = Vec::loadu(q + i * ldq + e, ne);
        const T* kp = k + j0 * ldk + e;
        if (nj == kV && ne == kV) {
#pragma GCC unroll 16
          for (int c = 0; c < kV; ++c) {
            if (i == 0 && j0 + 2 * kV + c < bn) prefetch(kp + (c + 2 * kV) * ldk);
            acc[c] = at::vec::fmadd(qv, load_f32(kp + c * ldk), acc[c]);
          }
        } else {
          for (int64_t c = 0; c < nj; ++c) {
            acc[c] = at::vec::fmadd(qv, load_f32(kp + c * ldk, ne), acc[c]);
          }
        }
      }
      transpose_block(acc);  // acc[e] lane c: partial sum e of key j0 + c
      for (int w = kV / 2; w > 0; w /= 2) {
        for (int c = 0; c < w; ++c) acc[c] = acc[c] + acc[c + w];
      }
      acc[0].store(s + i * lds + j0);
    }
  }
}

// The additive value of one mask element: bool True (attend) -> 0, False -> -inf.
template <typename M>
inline float mask_value(M x) {
  if constexpr (std::is_same_v<M, bool>) {
    return x ? 0.f : kNegInf;
  } else {
    return static_cast<float>(x);
  }
}

// 0 where the kV bools at p are true, -inf elsewhere.
inline Vec bool_mask_vec(const bool* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_mask_blend_ps(_mm_test_epi8_mask(bytes, bytes), _mm512_set1_ps(kNegInf),
                              _mm512_setzero_ps());
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256()));
  return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_setzero_ps(), keep);
#else
  alignas(64) float v[kV];
  for (int k = 0; k < kV; ++k) v[k] = p[k] ? 0.f : kNegInf;
  return Vec::loadu(v);
#endif
}

// The additive mask of `count` (<= kV) consecutive keys at p (lanes past count: 0).
template <typename M>
inline Vec mask_vec(const M* p, int64_t count) {
  if constexpr (std::is_same_v<M, bool>) {
    if (count == kV) return bool_mask_vec(p);
    alignas(16) bool tmp[kV];
    for (int64_t k = 0; k < kV; ++k) tmp[k] = k < count ? p[k] : true;
    return bool_mask_vec(tmp);
  } else {
    return load_f32(p, count);
  }
}

// The mask block of queries [0, bm) x keys [0, bn), transposed: mt[j * ldt + i] (float32,
// additive). mask points at (query 0, key 0) of the block; m_sl is its query stride (0 when
// broadcast over queries). Lanes i in [bm, ldt) are 0 (ldt: a multiple of kV).
template <typename M>
inline void pack_mask_transposed(const M* mask, int64_t m_sl, int64_t bm, int64_t bn, float* mt,
                                 int64_t ldt) {
  if (m_sl == 0) {  // one row for every query: broadcast each key's value along its row of mt
    for (int64_t j = 0; j < bn; ++j) {
      const Vec val(mask_value(mask[j]));
      for (int64_t i = 0; i < ldt; i += kV) val.store(mt + j * ldt + i);
    }
    return;
  }
  pack_transposed_with(
      [&](int64_t i, int64_t j, int64_t n) { return mask_vec(mask + i * m_sl + j, n); }, bm, bn,
      mt, ldt, ldt);
}

// Dropout of the sdpa contract (fastattn/philox.h): z_scale = keep ? 1 / (1 - p) : 0.
struct Dropout {
  bool on;
  float p, inv_keep;
  uint64_t seed, offset;
};

inline Dropout make_dropout(const AttnGeometry& g) {
  return Dropout{g.dropout_p > 0.f, g.dropout_p, 1.f / (1.f - g.dropout_p), g.seed, g.offset};
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
using IVec = __m512i;
inline IVec iv_set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline IVec iv_load(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline IVec iv_xor(IVec a, IVec b) { return _mm512_xor_si512(a, b); }
// (hi, lo) 32-bit halves of the 64-bit products a * m, lane by lane
inline IVec iv_mulhilo(IVec a, IVec m, IVec* lo) {
  *lo = _mm512_mullo_epi32(a, m);
  const IVec even = _mm512_srli_epi64(_mm512_mul_epu32(a, m), 32);
  const IVec odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}
inline Vec iv_uniform(IVec x) {  // (x >> 8) * 2^-24
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 8)), _mm512_set1_ps(1.f / 16777216.f));
}
#else
using IVec = __m256i;
inline IVec iv_set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline IVec iv_load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IVec iv_xor(IVec a, IVec b) { return _mm256_xor_si256(a, b); }
inline IVec iv_mulhilo(IVec a, IVec m, IVec* lo) {
  *lo = _mm256_mullo_epi32(a, m);
  const IVec even = _mm256_srli_epi64(_mm256_mul_epu32(a, m), 32);
  const IVec odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  return _mm256_blend_epi32(even, odd, 0xAA);
}
inline Vec iv_uniform(IVec x) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)), _mm256_set1_ps(1.f / 16777216.f));
}
#endif

// The dropout factors of the kV scores with flat indices idx0 + lane * stride: Philox4x32-10
// of fastattn/philox.h evaluated for kV counters at once.
inline Vec dropout_factors(const Dropout& d, uint64_t idx0, uint64_t stride) {
  alignas(64) uint32_t lo[kV], hi[kV];
  for (int k = 0; k < kV; ++k) {
    const uint64_t idx = idx0 + static_cast<uint64_t>(k) * stride;
    lo[k] = static_cast<uint32_t>(idx);
    hi[k] = static_cast<uint32_t>(idx >> 32);
  }
  IVec c0 = iv_load(lo), c1 = iv_load(hi);
  IVec c2 = iv_set1(static_cast<uint32_t>(d.offset)), c3 = iv_set1(static_cast<uint32_t>(d.offset >> 32));
  const IVec m0 = iv_set1(0xD2511F53u), m1 = iv_set1(0xCD9E8D57u);
  uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  for (int round = 0; round < 10; ++round) {
    IVec lo0, lo1;
    const IVec hi0 = iv_mulhilo(c0, m0, &lo0);
    const IVec hi1 = iv_mulhilo(c2, m1, &lo1);
    c0 = iv_xor(iv_xor(hi1, c1), iv_set1(k0));
    c1 = lo1;
    c2 = iv_xor(iv_xor(hi0, c3), iv_set1(k1));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const Vec u = iv_uniform(c0);
  return Vec::blendv(Vec(0.f), Vec(d.inv_keep), u >= Vec(d.p));
}
#else
// The dropout factors of the kV scores with flat indices idx0 + lane * stride.
inline Vec dropout_factors(const Dropout& d, uint64_t idx0, uint64_t stride) {
  alignas(64) float f[kV];
  for (int k = 0; k < kV; ++k) {
    f[k] = dropout_uniform(d.seed, d.offset, idx0 + static_cast<uint64_t>(k) * stride) >= d.p
               ? d.inv_keep
               : 0.f;
  }
  return Vec::loadu(f);
}
#endif

// 2^t, for the softmax's e^x = 2^(x log2(e)) (log2(e) is not folded into the score's scale and
// shift: x = z - m is formed first, so the rounding of t stays relative to |z - m|, not |z|);
// 0 below t = -126 (and for -inf), as at::vec's exp_u20 is 0 below ln(FLT_MIN). t = n + r, |r| <= 1/2 (exact), 2^r by a degree-6
// minimax polynomial, times 2^n: by vscalefps on AVX-512 (11 instructions against exp_u20's
// 19), by the exponent field on AVX2. Max relative error 7e-8 on [-126, 7] beyond the rounding
// of t itself (exp_u20: 3.8e-7). Generic: exp_u20.
constexpr float kLog2e = 1.44269504088896341f;

inline Vec fast_exp2(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
#define FA_PS(op) _mm512_##op##_ps
  using R = __m512;
#else
#define FA_PS(op) _mm256_##op##_ps
  using R = __m256;
#endif
  const R v = t;
#if defined(CPU_CAPABILITY_AVX512)
  const R n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const R n = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  const R r = FA_PS(sub)(v, n);
  // degree-6 minimax polynomial of 2^r on [-1/2, 1/2] (relative error 1.9e-9)
  R p = FA_PS(set1)(1.53458055e-04f);
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(1.33999312e-03f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(9.61848898e-03f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(5.55032878e-02f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(2.40226469e-01f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(6.93147206e-01f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(1.f));
#undef FA_PS
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(live, p, n);
#else
  const __m256 live = _mm256_cmp_ps(v, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
#endif
#else
  return (t * Vec(1.f / kLog2e)).exp_u20();
#endif
}

// e^x (see fast_exp2).
inline Vec fast_exp(const Vec& x) { return fast_exp2(x * Vec(kLog2e)); }

// Lanes [0, count) of v replaced by x (count clamped to [0, kV]).
inline Vec set_first(const Vec& v, const Vec& x, int64_t count) {
  if (count <= 0) return v;
  return Vec::set(v, x, std::min<int64_t>(count, kV));
}

// Lanes [count, kV) of v replaced by x (count clamped to [0, kV]).
inline Vec keep_first(const Vec& v, const Vec& x, int64_t count) {
  if (count >= kV) return v;
  return Vec::set(x, v, std::max<int64_t>(count, 0));
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
