// Per-ISA entry points of the CPU LayerNorm/RMSNorm kernels (kernels/cpu/norm_kernel.h).
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu_dtype.h"
#include "fastattn/norm_args.h"

namespace fastattn::cpu {

// Rows per group of the backward's weight/bias-gradient reduction: each group sums its rows'
// terms into its own float32 partial row, then the partials are added in group order, so the
// result does not depend on the thread count or scheduling.
inline int64_t norm_grad_groups(int64_t rows) {
  constexpr int64_t kMaxGroups = 64, kMinRowsPerGroup = 8;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxGroups, rows / kMinRowsPerGroup));
}

// x: storage type of x/residual/out (and of the gradients); w: of weight and bias.
#define FASTATTN_DECLARE_NORM(isa)                                                   \
  namespace isa {                                                                    \
  void norm_forward(const NormForwardArgs& a, DType x, DType w);                     \
  /* partial: norm_grad_groups(rows) x N float32 per wanted parameter gradient */    \
  void norm_backward(const NormBackwardArgs& a, DType x, DType w, float* partial_w,  \
                     float* partial_b);                                               \
  }
FASTATTN_DECLARE_NORM(avx512)
FASTATTN_DECLARE_NORM(avx2)
FASTATTN_DECLARE_NORM(generic)
#undef FASTATTN_DECLARE_NORM

}  // namespace fastattn::cpu
