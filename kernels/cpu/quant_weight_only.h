// The CPU weight-only quantized linears (int8 per channel, int4 group-wise), compiled once per
// ISA: y (M, N) = x (M, K) @ dequant(W) (N, K)^T [* scale] + bias, in float32.
//
// x is read as float32 rows xf (M, K): x itself for float32 int8, else a copy made once per call
// (for int4 deinterleaved per block of 2 kV, see quant_gemv.h). Two regimes:
//   GEMV / small M (M <= kSmallM): threads split the output channels into blocks of
//     kGemvRows; each weight row is streamed once per kMR rows of x and dequantized in registers
//     (dot_block with an Int8Row / Int4Row loader), x stays in L1/L2.
//   GEMM (M > kSmallM): threads take panels of kPanelN output channels (and chunks of M when
//     there are too few panels for the threads); a task dequantizes its panel once into a
//     per-thread float32 scratch panel and runs the outer-product micro-kernel of quant_gemm.h
//     over its rows of x. Only this scratch panel is ever float: the full dequantized weight is
//     never stored.
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>

#include "quant_cpu.h"
#include "quant_gemm.h"
#include "quant_gemv.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

constexpr int kNR = 4;                   // weight rows per micro-kernel
constexpr int kMR = kV >= 16 ? 4 : 2;    // x rows per micro-kernel (register budget)
constexpr int64_t kSmallM = 4;           // up to here: dequantize in registers, no panel
constexpr int64_t kGemvRows = 16;        // output channels per GEMV task

template <int NR, class L>
inline void dot_rows(int64_t mr, const float* x, int64_t K, const L& w, int64_t n0, float* res) {
  if constexpr (kMR >= 4) {
    if (mr == 4) return dot_block<4, NR>(x, K, w, n0, res);
    if (mr == 3) return dot_block<3, NR>(x, K, w, n0, res);
  }
  if (mr == 2) return dot_block<2, NR>(x, K, w, n0, res);
  return dot_block<1, NR>(x, K, w, n0, res);
}

// out[m, n] for m in [m, m + mr), n in [n, n + nr) from res (row stride ldres), times the
// per-channel scale (int8; null for int4), plus bias, rounded to T.
template <typename T>
inline void store_outputs(const QuantLinearArgs& a, const float* res, int64_t ldres, int64_t m,
                          int64_t mr, int64_t n, int64_t nr, const float* chan_scale) {
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t i = 0; i < mr; ++i) {
    for (int64_t j = 0; j < nr; ++j) {
      float y = res[i * ldres + j];
      if (chan_scale) y *= chan_scale[n + j];
      if (bias) y += static_cast<float>(bias[n + j]);
      out[(m + i) * a.N + n + j] = static_cast<T>(y);
    }
  }
}

// GEMV: output rows [m0, m1) x channels [n0, n1) with weights from loader w; each group of kNR
// weight rows is dequantized for every kMR rows of x while it is in L1.
template <typename T, class L>
void gemv_block(const QuantLinearArgs& a, const float* xf, const L& w, int64_t m0, int64_t m1,
                int64_t n0, int64_t n1, const float* chan_scale) {
  const int64_t K = a.K;
  float res[kMR * kNR], one[kMR];
  auto tile = [&](int64_t m, int64_t n) {
    const int64_t mr = std::min<int64_t>(kMR, m1 - m), nr = std::min<int64_t>(kNR, n1 - n);
    if (nr == kNR) {
      dot_rows<kNR>(mr, xf + m * K, K, w, n, res);
    } else {
      for (int64_t j = 0; j < nr; ++j) {
        dot_rows<1>(mr, xf + m * K, K, w, n + j, one);
        for (int64_t i = 0; i < mr; ++i) res[i * kNR + j] = one[i];
      }
    }
    store_outputs<T>(a, res, kNR, m, mr, n, nr, chan_scale);
  };
  for (int64_t n = n0; n < n1; n += kNR)
    for (int64_t m = m0; m < m1; m += kMR) tile(m, n);
}

template <typename T, class L>
void weight_only_linear(const QuantLinearArgs& a, const float* xf, const L& w,
                        const float* chan_scale) {
  const int64_t M = a.M, N = a.N, K = a.K;
  if (M <= kSmallM) {
    const int64_t tasks = (N + kGemvRows - 1) / kGemvRows;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      gemv_block<T>(a, xf, w, 0, M, begin * kGemvRows, std::min(N, end * kGemvRows),
                    chan_scale);
    });
    return;
  }
  const int64_t nblk = (N + kPanelN - 1) / kPanelN;
  const int64_t threads = at::get_num_threads();
  int64_t mchunks = 1;
  if (nblk < 2 * threads) {  // too few panels: split x's rows too
    mchunks = std::max<int64_t>(
        1, std::min<int64_t>((M + 31) / 32, (4 * threads + nblk - 1) / nblk));
  }
  const int64_t mrows = ((M + mchunks - 1) / mchunks + kGemmMR - 1) / kGemmMR * kGemmMR;
  mchunks = (M + mrows - 1) / mrows;
  at::parallel_for(0, nblk * mchunks, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> panel(new float[K * kPanelN]);  // (K, kPanelN) per-thread scratch
    alignas(64) float c[kGemmMR * kPanelN];
    int64_t filled = -1;                                       // the panel in `panel`
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / mchunks, mc = t % mchunks;
      const int64_t n0 = nb * kPanelN, nc = std::min(kPanelN, N - n0);
      const int64_t m0 = mc * mrows, m1 = std::min(M, m0 + mrows);
      if (filled != nb) {
        fill_panel(w, n0, nc, K, panel.get());
        filled = nb;
      }
      for (int64_t m = m0; m < m1; m += kGemmMR) {
        const int64_t mr = std::min<int64_t>(kGemmMR, m1 - m);
        panel_rows<kGemmMR>(mr, xf + m * K, K, panel.get(), c);
        store_outputs<T>(a, c, kPanelN, m, mr, n0, nc, chan_scale);
      }
    }
  });
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
