// The products of the CPU attention kernels (attention_forward.h, attention_backward.h),
// compiled once per ISA (see fastattn/cpu_isa.h):
//   tile_gemm             a register-blocked float32 micro-kernel for the small products of a
//                         tile (C (+)= A B, A read by broadcasts through any two strides, B by
//                         vectors)
//   pack_* / rows_f32     storage dtype -> float32 operands (rows, transposes)
//   scores_keys_on_lanes  q . k with the keys along the lanes, for a few query rows
//   dot_scores            the same summed along e (short query sequences)
// Every product operand is float32, so the inner loops are pure FMAs whatever the storage type.
// The score modifiers (mask, dropout, exp): attention_score.h.
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
// query rows: the last rows of a query sequence). Each kV x kV tile of keys is transposed in
// registers, then summed over e as the very chains of fused multiply-adds (and chunks of kKC)
// tile_gemm forms for Q . Kt (the backward's recomputation is bit-identical). k: rows of any
// storage type (row stride ldk), read once and in order (prefetched a chunk ahead). Lanes j in
// [bn, ceil(bn / kV) * kV) of s are 0.
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
        if (last) {
          float* out = s + i * lds + j0;
          (e0 < kKC ? acc : Vec::loadu(out) + acc).store(out);
        }
      }
    }
  }
}

// The lanes of v summed as dot_scores' tree sums them: lane e with lane e + w, w = kV/2, ..., 1.
inline float tree_sum(const Vec& v) {
  alignas(64) float x[kV];
  v.store(x);
  for (int w = kV / 2; w > 0; w /= 2) {
    for (int e = 0; e < w; ++e) x[e] = x[e] + x[e + w];
  }
  return x[0];
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

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
