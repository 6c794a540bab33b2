// Warp and block reductions for CUDA kernels (blockDim.x a multiple of 32, at most 1024).
#pragma once
#include <cuda_runtime.h>

namespace fastattn::cuda {

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Every thread of the block gets the reduction of `v` over the block. `smem` holds 33 floats;
// consecutive calls may reuse it (slots 0..31 and 32 are written in different phases).
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float identity, float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < nwarps ? smem[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) smem[32] = w;
  }
  __syncthreads();
  return smem[32];
}

}  // namespace fastattn::cuda
