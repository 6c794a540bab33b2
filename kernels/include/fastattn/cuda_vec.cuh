// Vector (up to 16-byte) loads and stores for CUDA kernels, converting to and from float.
// Callers guarantee alignment: p must be aligned to min(16, VEC * sizeof(X)) bytes.
#pragma once
#include <cuda_runtime.h>

namespace fastattn::cuda {

// VEC elements of T accessed as one load or store (VEC * sizeof(T) <= 16 for one access).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) VecPack {
  T v[VEC];
};

// Elements of X per access when VEC consecutive elements are moved: at most 16 bytes.
template <typename X, int VEC>
constexpr int vec_chunk() {
  return static_cast<int>(16 / sizeof(X)) < VEC ? static_cast<int>(16 / sizeof(X)) : VEC;
}

// out[0..VEC) = float(p[0..VEC)), in accesses of at most 16 bytes (8 floats: 2 accesses).
template <int VEC, typename X>
__device__ __forceinline__ void load_floats(const X* p, float (&out)[VEC]) {
  constexpr int C = vec_chunk<X, VEC>();
#pragma unroll
  for (int k = 0; k < VEC / C; ++k) {
    const VecPack<X, C> q = reinterpret_cast<const VecPack<X, C>*>(p)[k];
#pragma unroll
    for (int j = 0; j < C; ++j) out[k * C + j] = static_cast<float>(q.v[j]);
  }
}

// p[0..VEC) = X(in[0..VEC)), in accesses of at most 16 bytes.
template <int VEC, typename X>
__device__ __forceinline__ void store_floats(X* p, const float (&in)[VEC]) {
  constexpr int C = vec_chunk<X, VEC>();
#pragma unroll
  for (int k = 0; k < VEC / C; ++k) {
    VecPack<X, C> q;
#pragma unroll
    for (int j = 0; j < C; ++j) q.v[j] = X(in[k * C + j]);
    reinterpret_cast<VecPack<X, C>*>(p)[k] = q;
  }
}

}  // namespace fastattn::cuda
