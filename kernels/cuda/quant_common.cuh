// What the CUDA quantized-linear kernels share (kernels/cuda/quant_weight_only.cu, quant_gemm.cu,
// quant_w8a8.cu): the activation dtype dispatch, float conversions, exact int8 / int4 -> float
// dequantization by magic-number bit tricks, the s8 tensor-core product and host helpers. The
// f16 / bf16 mma, ldmatrix and cp.async wrappers come from attention_common.cuh.
//
// Ops (contract: kernels/registration.cpp, host checks: fastattn/quant_host.h):
//  * int8_weight_linear / int4_weight_linear: M <= kGemvRows (any dtype) and float32 x of any M
//    run the GEMV kernel (quant_weight_only.cu); float16 / bfloat16 x with M > kGemvRows run the
//    tensor-core GEMM (quant_gemm.cu). Both dequantize the weight in registers, never to memory.
//  * quantize_per_token_int8 and int8_scaled_mm (W8A8): quant_w8a8.cu.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "attention_common.cuh"
#include "fastattn/cuda_reduce.cuh"
#include "fastattn/quant_host.h"

namespace fastattn::cuda::quant {

// Rows of x up to which the weight-only ops use the GEMV kernel (for float16 / bfloat16 x).
constexpr int64_t kGemvRows = 8;

// ---- element types ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// ---- exact dequantization (no int -> float conversion instruction) ----------------------------
// 0x4B000000 is 2^23 as a float: with u in [0, 255] in the low mantissa bits the float is exactly
// 2^23 + u, so (2^23 + u) - (2^23 + z) == u - z exactly.

constexpr float kMagic = 8388608.f;  // 2^23

// Byte b (0..3) of word as a float 2^23 + byte.
__device__ __forceinline__ float magic_byte(uint32_t word, int b) {
  return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7540u | static_cast<uint32_t>(b)));
}

// Signed int8 bytes: flip the sign bits first (u = q + 128), then subtract 2^23 + 128.
constexpr float kMagicS8 = kMagic + 128.f;
__device__ __forceinline__ uint32_t s8_bias(uint32_t word) { return word ^ 0x80808080u; }

// Nibble i (0..7) of word as a float 2^23 + nibble.
__device__ __forceinline__ float magic_nibble(uint32_t word, int i) {
  return __uint_as_float(0x4B000000u | ((word >> (4 * i)) & 0xFu));
}

// ---- s8 tensor-core product --------------------------------------------------------------------
// mma.m16n8k32 .s8: A (16 x 32) 4 x .b32 of 4 bytes: a0 = A[gid][4tig..+3], a1 = A[gid+8][4tig..],
// a2 = A[gid][4tig+16..], a3 = A[gid+8][4tig+16..]; B (32 x 8): b0 = B[4tig..+3][gid], b1 =
// B[4tig+16..+19][gid]; C: c0, c1 = C[gid][2tig, 2tig+1], c2, c3 = C[gid+8][..]. In bytes this is
// the .b16 ldmatrix layout of attention_common.cuh with 2 int8 per b16 element, so the same
// a_addr / bn_addr helpers (pitch and columns in b16 units) load it.
__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// cp.async of 16 bytes, or zeros (src-size 0) when !valid; gmem must be a valid address anyway.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(attn::smem_u32(smem)),
               "l"(gmem), "r"(n)
               : "memory");
}

// ---- host helpers --------------------------------------------------------------------------------

inline bool aligned_to(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// f(T{}) with T the device type of an activation dtype (float32 / float16 / bfloat16).
template <typename F>
void dispatch_activation(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "fastattn: unsupported activation dtype ", t);
  }
}

}  // namespace fastattn::cuda::quant

namespace fastattn::cuda::quant {

// Kernel arguments of the weight-only ops (device pointers of the prepared, contiguous tensors).
struct WoArgs {
  const void* x;          // (M, K) T
  const uint8_t* w;       // int8 (N, K) or packed int4 (N, K / 2), as bytes
  const float* scale;     // (N,) int8, (N, K / G) int4
  const uint8_t* zero;    // (N, K / G) int4, else null
  const void* bias;       // (N,) T or null
  void* out;              // (M, N) T
  int64_t M, N, K;
  int group_size;         // G (int4), 0 (int8)
};

inline WoArgs wo_args(const QuantLinear& q) {
  return WoArgs{q.x.data_ptr(), static_cast<const uint8_t*>(q.weight.data_ptr()),
                q.scale.data_ptr<float>(),
                q.zero.defined() ? static_cast<const uint8_t*>(q.zero.data_ptr()) : nullptr,
                ptr_or_null(q.bias), q.out.data_ptr(), q.M, q.N, q.K,
                static_cast<int>(q.group_size)};
}

// The tensor-core GEMM for float16 / bfloat16 x (kernels/cuda/quant_gemm.cu).
void launch_wo_gemm(const QuantLinear& q, bool int4, cudaStream_t stream);

}  // namespace fastattn::cuda::quant
