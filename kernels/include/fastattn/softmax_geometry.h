// Plain-data description of a softmax launch, usable from host code, CPU kernels and CUDA
// device code alike (no ATen types).
#pragma once
#include <cstdint>

namespace fastattn {

// How the mask is stored: none, bool (true = keep), additive in x's dtype, additive float32.
enum class MaskKind : int { None = 0, Bool = 1, Same = 2, Float = 3 };

// x is viewed as (B, H, M, N) contiguous, rows = B * H * M; the softmax runs over N. M is the
// size of dim -2 (it drives the causal mask), H of dim -3; B collects the leading dims.
// The mask is viewed as (B, H, M, N) with these element strides for the first three dims
// and stride 1 for the last.
struct SoftmaxGeometry {
  int64_t rows;
  int64_t N;
  int64_t M;
  int64_t H;
  int64_t mask_stride_b;
  int64_t mask_stride_h;
  int64_t mask_stride_m;
};

// Offset of row `row`'s first mask element.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t mask_row_offset(const SoftmaxGeometry& g, int64_t row) {
  const int64_t m = row % g.M;
  const int64_t bh = row / g.M;
  return (bh / g.H) * g.mask_stride_b + (bh % g.H) * g.mask_stride_h + m * g.mask_stride_m;
}

// Number of leading columns of row `row` that the causal mask keeps (all N without it).
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t causal_row_length(const SoftmaxGeometry& g, int64_t row, bool causal) {
  if (!causal) return g.N;
  const int64_t keep = row % g.M + 1;
  return keep < g.N ? keep : g.N;
}

}  // namespace fastattn
