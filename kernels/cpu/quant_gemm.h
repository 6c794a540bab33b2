// The GEMM path (M > kSmallM) of the CPU weight-only quantized linears, compiled once per ISA.
//
// Output channels go in panels of kPanelN = 2 kV (32 on avx512, 16 on avx2). A task dequantizes
// one panel of weights with the same loaders as the GEMV path (quant_gemv.h) into a per-thread
// float32 scratch panel, transposed: panel[k][c] = W[n0 + c][k] (K x kPanelN floats, 512 KiB at
// K = 4096, in L2; never the whole weight), then runs an outer-product micro-kernel over its
// rows of x: per k, two panel vectors times kGemmMR broadcast x[m][k] into kGemmMR x 2 vector
// accumulators (no horizontal sums). The sum over k runs in chunks of kKChunk whose partial sums
// are added into the float32 result, so rounding grows with kKChunk + K / kKChunk, not K.
// x is float32 rows xf (M, K), in the loader's k order (deinterleaved for int4).
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <algorithm>
#include <cstdint>

#include "quant_gemv.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

constexpr int kPanelVecs = 2;
constexpr int64_t kPanelN = kPanelVecs * kV;   // output channels per panel
constexpr int kGemmMR = kV >= 16 ? 8 : 4;      // rows of x per micro-kernel
constexpr int64_t kKChunk = 32;

// panel (K, kPanelN) <- channels [n0, n0 + nc) of the weight, dequantized; columns from nc on
// are 0. Per block of kFillK positions: the loaders fill rows (kPanelN x kFillK, in L1), then
// at::vec's transpose writes them as panel rows.
constexpr int64_t kFillK = 32;  // a multiple of every loader's kStep * kV
template <class L>
void fill_panel(const L& w, int64_t n0, int64_t nc, int64_t K, float* panel) {
  constexpr int S = L::kStep;
  static_assert(kFillK % (S * kV) == 0);
  alignas(64) float rows[kPanelN * kFillK];
  for (int64_t c = nc; c < kPanelN; ++c)
    for (int64_t i = 0; i < kFillK; ++i) rows[c * kFillK + i] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kFillK) {
    const int64_t kn = std::min(kFillK, K - k0);
    for (int64_t c = 0; c < nc; ++c) {
      for (int64_t k = 0; k < kn; k += S * kV) {
        const int64_t count = std::min<int64_t>(kV, kn - k);  // < kV only at an int8 K tail
        Vec v[S];
        w.load(n0 + c, k0 + k, v, count);
        for (int s = 0; s < S; ++s) v[s].store(rows + c * kFillK + k + s * kV);  // tail lanes 0
      }
    }
    at::vec::transpose_mxn<float>(rows, kFillK, panel + k0 * kPanelN, kPanelN,
                                  static_cast<int>(kPanelN), static_cast<int>(kn));
  }
}

// c[i * kPanelN + j] = sum_k x[i * K + k] * panel[k * kPanelN + j] for i < MR.
template <int MR>
FASTATTN_NOINLINE void panel_block(const float* x, int64_t K, const float* panel, float* c) {
  for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
    const int64_t k1 = std::min(K, k0 + kKChunk);
    Vec acc[MR][kPanelVecs];
    FASTATTN_UNROLL
    for (int i = 0; i < MR; ++i)
      FASTATTN_UNROLL
      for (int v = 0; v < kPanelVecs; ++v) acc[i][v] = Vec(0.f);
    for (int64_t k = k0; k < k1; ++k) {
      const float* b = panel + k * kPanelN;
      Vec bv[kPanelVecs];
      FASTATTN_UNROLL
      for (int v = 0; v < kPanelVecs; ++v) bv[v] = Vec::loadu(b + v * kV);
      FASTATTN_UNROLL
      for (int i = 0; i < MR; ++i) {
        const Vec xa(x[i * K + k]);
        FASTATTN_UNROLL
        for (int v = 0; v < kPanelVecs; ++v) acc[i][v] = at::vec::fmadd(xa, bv[v], acc[i][v]);
      }
    }
    // the chunk's partial sums into c (in memory: keeping running sums in registers too spills)
    FASTATTN_UNROLL
    for (int i = 0; i < MR; ++i) {
      FASTATTN_UNROLL
      for (int v = 0; v < kPanelVecs; ++v) {
        float* ci = c + i * kPanelN + v * kV;
        (k0 == 0 ? acc[i][v] : Vec::loadu(ci) + acc[i][v]).store(ci);
      }
    }
  }
}

template <int MR>
inline void panel_rows(int64_t mr, const float* x, int64_t K, const float* panel, float* c) {
  if constexpr (MR > 1) {
    if (mr < MR) return panel_rows<MR - 1>(mr, x, K, panel, c);
  }
  panel_block<MR>(x, K, panel, c);
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
