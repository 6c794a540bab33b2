// What the CUDA LayerNorm/RMSNorm kernels share (kernels/cuda/norm_forward.cu and
// norm_backward.cu): constants, device helpers, launch-size helpers and the dtype dispatch.
// fastattn::layer_norm / rms_norm and their backward ops for CUDA tensors:
//
// float32 math for every storage type T (x, residual, out, grads) and parameter type W (weight,
// bias: float32 or T). Column c of a row belongs to thread (c / VEC) % lanes, so a warp's
// accesses are contiguous and a thread owns the same columns in every row. VEC = 16 bytes /
// sizeof(T) when N * sizeof(T) % 16 == 0 and every base pointer is 16-byte aligned, else 1;
// W is read in pieces of at most 16 bytes (8 float weights of a bf16 pack: 2 accesses). With a
// residual, s = T(x + residual) is written to residual_out and normalized (+2 N sizeof(T) bytes
// a row on every path). The variance is a second pass over s - mean, never E[s^2] - mean^2.
// 1/N comes from the host: a float division in a kernel is a call, and its register saves spill.
// Forward paths by row length N (rows held in registers as T, converted on each pass):
//  * N <= 256: one warp per row (4 rows per block), 8 values a lane, shuffle reductions only;
//  * 16-byte rows, 2048 < N <= 16384: one block per row, 32 values a thread (<= 512 threads);
//  * other N <= 8192: one block per row, 8 values a thread (<= 1024 threads);
//    the register paths move 2 N sizeof(T) bytes a row: x read once, out written once (weight
//    and bias come from L1/L2);
//  * longer rows: a block of 512 threads per row (at most max(2, L2 share / row bytes) blocks
//    an SM, walking the rows), 2 packs a thread a step; it walks the row three times (sum,
//    squared deviations, output; rms two), passes 2 and 3 re-reading s (x or residual_out),
//    mostly from L2: 2 N sizeof(T) bytes of DRAM traffic a row while rows stay in L2, at most
//    4 (rms 3) N sizeof(T).
// Backward: dx = rstd (g - mean(g) - xhat mean(g xhat)) (+ grad_residual_out), g = dy w; rms
// drops the mean(g) term. grad_weight = sum_rows dy xhat and grad_bias = sum_rows dy use a
// deterministic two-stage reduction, no atomics: stage 1 splits the rows into P contiguous
// ranges (P from the SM count and the kernel's occupancy, fewer when ranges would get < 4 rows)
// and writes the fp32 column sums of each range to a (P, N) buffer per parameter; stage 2
// (norm_param_grad, 32 columns x 8 lanes a block) sums the P partials of a column in a fixed
// order (lane j: p = j, j + 8, ...; then lanes 0..7 in order) and writes W.
//  * N <= 256 (a warp per range, 8 values a lane) and N <= 8192 (a block per range, <= 512
//    threads, 8 values a thread up to 4096 columns, then 16; unaligned rows past 4096: loop):
//    one fused kernel, x, dy (and grad_residual_out) read once into registers, dx written, the
//    range's partials accumulated in registers (the thread owns its columns in every row):
//    3 N sizeof(T) bytes a row (4 with grad_residual_out) + 8 P N bytes a sum for stage 2;
//  * longer rows: norm_bwd_dx_loop (a block per row, placed as the forward loop's, x and dy read
//    twice, the second read mostly from L2) and norm_bwd_partial_cols (tiles of 256 x VEC
//    columns x row ranges, x and dy read once more).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

#include "fastattn/alloc.h"
#include "fastattn/cuda_reduce.cuh"
#include "fastattn/cuda_vec.cuh"
#include "fastattn/norm_host.h"


namespace fastattn::cuda {
namespace {

constexpr int kWarpRowsPerBlock = 4;
constexpr int kWarpBlock = 32 * kWarpRowsPerBlock;
constexpr int64_t kWarpRowMax = 32 * 8;          // one warp, 8 values a lane
constexpr int64_t kFwdBlock8Max = 1024 * 8;      // one block, <= 1024 threads x 8 values
constexpr int64_t kFwdBlock32Min = 2048;         // 16-byte rows longer than this: 32 values
constexpr int64_t kFwdBlock32Max = 512 * 32;     // one block, <= 512 threads x 32 values
constexpr int kBwdThreads = 512;                 // backward register kernels: <= 512 threads
constexpr int64_t kBwdBlock8Max = kBwdThreads * 8;
constexpr int64_t kBwdBlock16Max = kBwdThreads * 16;
constexpr int kLoopThreads = 512;
constexpr int kLoopUnroll = 2;                   // packs a thread loads per step on the loop paths
constexpr int kColThreads = 256;                 // norm_bwd_partial_cols
constexpr int kSumCols = 32, kSumLanes = 8;      // norm_param_grad block: 32 columns x 8 lanes

// Largest block each register kernel is launched with (its __launch_bounds__).
constexpr int fwd_threads(bool warp_row, int values) {
  return warp_row ? kWarpBlock : (values <= 8 ? 1024 : 512);
}
constexpr int bwd_threads(bool warp_row) { return warp_row ? kWarpBlock : kBwdThreads; }

// Weight (1 when absent) or bias (0 when absent) of VEC columns.
template <int VEC, typename W>
__device__ __forceinline__ void load_param(const W* p, int64_t col, float fill, float (&out)[VEC]) {
  if (p != nullptr) {
    load_floats<VEC>(p + col, out);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = fill;
  }
}

// Sum over the threads that share a row: a warp, or the whole block (smem: 33 floats).
template <bool WARP_ROW>
__device__ __forceinline__ float row_sum(float v, float* smem) {
  if constexpr (WARP_ROW) {
    return warp_reduce(v, SumOp{});
  } else {
    return block_reduce(v, SumOp{}, 0.f, smem);
  }
}

// Two sums at once (smem: 33 float2; consecutive calls may reuse it, as block_reduce's).
template <bool WARP_ROW>
__device__ __forceinline__ float2 row_sum2(float a, float b, float2* smem) {
  a = warp_reduce(a, SumOp{});
  b = warp_reduce(b, SumOp{});
  if constexpr (WARP_ROW) {
    return make_float2(a, b);
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) smem[warp] = make_float2(a, b);
    __syncthreads();
    if (warp == 0) {
      float2 w = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : make_float2(0.f, 0.f);
      w.x = warp_reduce(w.x, SumOp{});
      w.y = warp_reduce(w.y, SumOp{});
      if (lane == 0) smem[32] = w;
    }
    __syncthreads();
    return smem[32];
  }
}

// The threads sharing a row (a warp or the block): count and this thread's rank.
template <bool WARP_ROW>
__device__ __forceinline__ int row_lanes() { return WARP_ROW ? 32 : static_cast<int>(blockDim.x); }
template <bool WARP_ROW>
__device__ __forceinline__ int row_rank() { return WARP_ROW ? (threadIdx.x & 31) : threadIdx.x; }

// ---- launch selection ------------------------------------------------------------------------

inline int round_warp(int64_t t) { return static_cast<int>(std::max<int64_t>(32, (t + 31) / 32 * 32)); }
inline unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::min<int64_t>(blocks, std::numeric_limits<int>::max()));
}
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename K>
int blocks_per_sm(K kernel, int threads) {
  int occ = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, 0));
  return std::max(occ, 1);
}

// Grid of a loop kernel: blocks walk the rows, at most as many at once per SM as keep the rows
// being re-read (row_bytes each) in the SM's share of L2, but at least 2 (occupancy allowing).
template <typename K>
unsigned loop_grid(K kernel, int64_t rows, int64_t row_bytes) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t l2_rows = prop->l2CacheSize / (static_cast<int64_t>(prop->multiProcessorCount) * row_bytes);
  const int64_t per_sm = std::min<int64_t>(std::max<int64_t>(l2_rows, 2), blocks_per_sm(kernel, kLoopThreads));
  return grid_size(std::min(rows, per_sm * prop->multiProcessorCount));
}

// rows split into `groups` contiguous ranges of rows_per_group (the last may be shorter): as
// many as fit on the GPU at once (max_groups), fewer when that would leave < 4 rows a range,
// but at least min(rows, min_groups). Fixed for a given device and shape: deterministic sums.
struct Split {
  int64_t groups, rows_per_group;
};
inline Split split_rows(int64_t rows, int64_t max_groups, int64_t min_groups) {
  int64_t g = std::min(max_groups, std::max(std::min(rows, min_groups), ceil_div(rows, 4)));
  g = std::max<int64_t>(g, 1);
  const int64_t per = ceil_div(rows, g);
  return {ceil_div(rows, per), per};
}

// 16-byte accesses when N * sizeof(T) % 16 == 0 and every (non-null) base pointer is aligned.
template <typename T>
bool aligned16(int64_t N, std::initializer_list<const void*> ptrs) {
  if (N % (16 / static_cast<int64_t>(sizeof(T))) != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Calls fn(T{}, W{}) for storage dtype t and parameter dtype param (float32 or t).
template <typename Fn>
void dispatch_norm(at::ScalarType t, at::ScalarType param, Fn&& fn) {
  const bool fp32_param = param == at::kFloat;
  switch (t) {
    case at::kFloat: return fn(float{}, float{});
    case at::kHalf: return fp32_param ? fn(c10::Half{}, float{}) : fn(c10::Half{}, c10::Half{});
    case at::kBFloat16:
      return fp32_param ? fn(c10::BFloat16{}, float{}) : fn(c10::BFloat16{}, c10::BFloat16{});
    default: TORCH_CHECK(false, "fastattn: unsupported norm dtype ", t);
  }
}


}  // namespace
}  // namespace fastattn::cuda
