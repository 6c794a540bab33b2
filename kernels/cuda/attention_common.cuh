// What the CUDA attention kernels share (kernels/cuda/attention_forward.cu, attention_backward.cu,
// attention.cu, decode_attention.cu): tensor-core (mma.sync m16n8k16) and ldmatrix / cp.async
// wrappers, the fragment layouts they rely on, shared-memory tile copies, and host helpers
// (dtype / head-dim dispatch, input alignment, launch limits). Score masking, the modifiers and
// dropout of the sdpa kernels are in attention_scores.cuh.
//
// fastattn::sdpa / sdpa_backward on CUDA: float16 / bfloat16 storage, float32 math and
// accumulation, head dims E == Ev in {32, 64, 96, 128, 256}; FlashAttention-2 algorithms (no
// (L, S) buffer). A CTA has 4 warps; a warp owns 16 rows of every tile product it computes.
// Score modifiers (spec: AttnGeometry in fastattn/attention_args.h): varlen batches (seq_of),
// window / causal cuts with top-left or bottom-right diagonals (col_bounds / RowBounds: per-row
// visible column ranges, tile_full for the fast path, keys_for_rows / rows_for_keys for block
// skipping), and, in the MODS kernel instantiations only, ALiBi and softcap (scaled_log2,
// score_log2). Tensor indices (q/k/v rows, outputs, the dropout index) are tensor coordinates
// (tb, row_q + i, row_k + j); the modifiers use sequence-local i, j. decode_attention.cu uses
// the tensor-core / copy helpers too.
//
// ---- Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", .f16 / .bf16) ----------
// lane = threadIdx.x % 32, gid = lane / 4 (groupID), tig = lane % 4 (threadID_in_group).
//  A (16 x 16, row-major), 4 x .b32, each 2 elements (lower column in the low 16 bits):
//    a0 = A[gid][2tig, 2tig+1]       a1 = A[gid+8][2tig, 2tig+1]
//    a2 = A[gid][2tig+8, 2tig+9]     a3 = A[gid+8][2tig+8, 2tig+9]
//  B (16 x 8, "col": B[k][n]), 2 x .b32:
//    b0 = B[2tig, 2tig+1][gid]       b1 = B[2tig+8, 2tig+9][gid]
//  C / D (16 x 8, float32), 4 floats:
//    c0, c1 = C[gid][2tig, 2tig+1]   c2, c3 = C[gid+8][2tig, 2tig+1]
// So a warp's 16 x (8 NT) accumulator tile acc[NT][4] holds, in acc[nt][e], the element at
// row gid + 8 * (e / 2), column 8 nt + 2 tig + e % 2.
//  * Accumulator -> A operand (P = softmax(S) for O += P V, dS for dQ += dS K, and transposed
//    P^T / dS^T in the dK/dV kernel): the A fragment of k-step kk (columns 16 kk ..) is
//    a0 = pack(acc[2kk][0..1]), a1 = pack(acc[2kk][2..3]), a2 = pack(acc[2kk+1][0..1]),
//    a3 = pack(acc[2kk+1][2..3]) (acc_to_a below).
//  * ldmatrix.m8n8.x4.b16: lanes 8 m .. 8 m + 7 give the row addresses of 8 x 8 matrix m; matrix m
//    lands in register r_m, lane holding row lane / 4, columns 2 (lane % 4) + {0, 1}; with .trans
//    the lane holds the stored elements [2 (lane % 4) + {0, 1}][lane / 4] instead.
//    - A from a row-major tile (rows r0.., cols c0..): lane -> row r0 + lane % 16,
//      col c0 + 8 (lane / 16): r0..r3 = a0..a3                                   (a_addr)
//    - B from a tile stored n-major (smem row = n, col = k; K for S = Q K^T): lane -> row
//      n0 + lane % 8 + 8 (lane / 16), col k0 + 8 ((lane / 8) % 2): {r0, r1} = (b0, b1) of n-tile
//      n0, {r2, r3} of n-tile n0 + 8                                              (bn_addr)
//    - B from a tile stored k-major (smem row = k, col = n; V for O = P V), with .trans: lane ->
//      row k0 + lane % 8 + 8 ((lane / 8) % 2), col n0 + 8 (lane / 16): {r0, r1} of n-tile n0,
//      {r2, r3} of n-tile n0 + 8                                                  (bk_addr)
// Shared-memory tiles have a row pitch of E + 8 elements (16 bytes of padding), so the 8 row
// addresses of one ldmatrix matrix fall in 8 different 16-byte bank groups (no conflicts).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fastattn/attention_args.h"
#include "fastattn/attention_host.h"

namespace fastattn::cuda::attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element types ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Two floats as one .b32 operand register: lo in the low half (the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// d += a b: one m16n8k16 tensor-core product, float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- shared memory: addresses, ldmatrix, cp.async ---------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ldmatrix row addresses (see the layout notes above); LD = the tile's row pitch in elements.
template <int LD, typename T>
__device__ __forceinline__ uint32_t a_addr(const T* tile, int r0, int c0, int lane) {
  return smem_u32(tile + (r0 + (lane & 15)) * LD + c0 + (lane >> 4) * 8);
}
template <int LD, typename T>
__device__ __forceinline__ uint32_t bn_addr(const T* tile, int n0, int k0, int lane) {
  return smem_u32(tile + (n0 + (lane & 7) + (lane >> 4) * 8) * LD + k0 + ((lane >> 3) & 1) * 8);
}
template <int LD, typename T>
__device__ __forceinline__ uint32_t bk_addr(const T* tile, int k0, int n0, int lane) {
  return smem_u32(tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0 + (lane >> 4) * 8);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// smem[r * LD + c] = g[(row0 + r) * ld + c] for r < ROWS, c < COLS (cp.async, 16 bytes a copy;
// the host guarantees 16-byte aligned rows), zeros for rows row0 + r >= nrows. CTA-wide: every
// thread of the CTA calls it; the copies land after cp_async_wait_all() + __syncthreads().
template <int ROWS, int COLS, int LD, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t ld, int64_t row0, int64_t nrows) {
  constexpr int kChunksPerRow = COLS / 8;
  static_assert(COLS % 8 == 0 && (ROWS * kChunksPerRow) % kThreads == 0, "tile shape");
  // Not unrolled: unrolled, the compiler hoists every copy's address out of the caller's loops
  // (~3 registers a copy, up to 16 copies: spills at E = 128 / 256).
#pragma unroll 1
  for (int it = 0; it < ROWS * kChunksPerRow / kThreads; ++it) {
    const int c = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    T* dst = smem + r * LD + col;
    if (row0 + r < nrows) {
      cp_async16(dst, g + (row0 + r) * ld + col);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// g[(row0 + r) * ld + c] = smem[r * LD + c] for r < ROWS with row0 + r < nrows, c < COLS, in
// 16-byte stores (g is a fresh contiguous output: aligned). CTA-wide; call after __syncthreads().
template <int ROWS, int COLS, int LD, typename T>
__device__ __forceinline__ void store_tile(T* g, int64_t ld, const T* smem, int64_t row0, int64_t nrows) {
  constexpr int kChunksPerRow = COLS / 8;
  static_assert(COLS % 8 == 0 && (ROWS * kChunksPerRow) % kThreads == 0, "tile shape");
#pragma unroll 1  // as load_tile: unrolled, its per-thread offsets are hoisted and held in registers
  for (int it = 0; it < ROWS * kChunksPerRow / kThreads; ++it) {
    const int c = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    if (row0 + r < nrows) {
      *reinterpret_cast<uint4*>(g + (row0 + r) * ld + col) =
          *reinterpret_cast<const uint4*>(smem + r * LD + col);
    }
  }
}

// A warp's accumulator tile acc[NT][4] (16 x 8 NT, layout above), times mul, stored as T at
// smem rows row0 + gid (+ 8), columns col0 + 8 nt + 2 tig (+ 1).
template <typename T, int LD, int NT>
__device__ __forceinline__ void acc_to_smem(T* smem, const float (&acc)[NT][4], int row0, int col0,
                                            float mul, int lane) {
  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int col = col0 + nt * 8 + tig * 2;
    *reinterpret_cast<uint32_t*>(smem + (row0 + gid) * LD + col) =
        pack2<T>(acc[nt][0] * mul, acc[nt][1] * mul);
    *reinterpret_cast<uint32_t*>(smem + (row0 + gid + 8) * LD + col) =
        pack2<T>(acc[nt][2] * mul, acc[nt][3] * mul);
  }
}

// The A fragment of k-step kk (accumulator columns 16 kk .. 16 kk + 15) as T.
template <typename T, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[NT][4], int kk) {
  a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  }
}

// ---- host helpers ------------------------------------------------------------------------------


constexpr int64_t kMaxGridY = 65535;

// gridDim.y for `blocks` work items along y (kernels walk the rest: y += gridDim.y).
inline unsigned grid_y(int64_t blocks) { return static_cast<unsigned>(std::min(blocks, kMaxGridY)); }

// Checks that the CUDA kernels serve this call: dtype float16/bfloat16, E == Ev in the set.
inline void check_cuda_attention(const char* op, const AttnInputs& in) {
  const at::ScalarType dt = in.q.scalar_type();
  TORCH_CHECK(dt != at::kFloat, "fastattn.", op,
              ": the CUDA kernels take float16/bfloat16; float32 runs on the Triton backend");
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "fastattn.", op,
              ": the CUDA kernels take float16/bfloat16, got ", dt);
  const int64_t E = in.g.E, Ev = in.g.Ev;
  TORCH_CHECK(E == Ev && (E == 32 || E == 64 || E == 96 || E == 128 || E == 256), "fastattn.", op,
              ": the CUDA kernels take head dims E == Ev in {32, 64, 96, 128, 256}, got E = ", E,
              ", Ev = ", Ev, " (other head dims run on the Triton backend)");
  TORCH_CHECK(in.g.B * std::max(in.g.Hq, in.g.Hkv) <= INT32_MAX, "fastattn.", op,
              ": B * H = ", in.g.B * std::max(in.g.Hq, in.g.Hkv), " exceeds the CUDA grid limit");
}

// t itself when the kernels' 16-byte copies can read it (data pointer 16-byte aligned, the
// strides of dims 0-2 with more than one index multiples of 8 elements), else a contiguous copy.
inline at::Tensor aligned16(const at::Tensor& t) {
  bool ok = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 || t.numel() == 0;
  for (int d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) ok = false;
  }
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Makes q, k, v readable by 16-byte copies (see aligned16) and refreshes their strides in g.
inline void align_inputs(AttnInputs& in) {
  in.q = aligned16(in.q);
  in.k = aligned16(in.k);
  in.v = aligned16(in.v);
  AttnGeometry& g = in.g;
  g.q_sb = in.q.stride(0), g.q_sh = in.q.stride(1), g.q_sl = in.q.stride(2);
  g.k_sb = in.k.stride(0), g.k_sh = in.k.stride(1), g.k_ss = in.k.stride(2);
  g.v_sb = in.v.stride(0), g.v_sh = in.v.stride(1), g.v_ss = in.v.stride(2);
}

// Opts `kernel` into `bytes` of dynamic shared memory (past the 48 KiB default), checking the
// device's per-block limit.
template <typename K>
void set_smem(K kernel, size_t bytes, const char* op = "sdpa") {
  if (bytes <= 48 * 1024) return;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes <= prop->sharedMemPerBlockOptin, "fastattn.", op, ": the CUDA kernel needs ", bytes,
              " bytes of shared memory per block, the device allows ", prop->sharedMemPerBlockOptin,
              " (the Triton backend may serve this case: backend='triton')");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// Calls fn(T{}, std::integral_constant<int, E>{}) for the storage type and head dim (checked by
// check_cuda_attention).
template <typename Fn>
void dispatch_attention(AttnDType dtype, int64_t E, Fn&& fn) {
  auto with_dim = [&](auto t) {
    switch (E) {
      case 32: return fn(t, std::integral_constant<int, 32>{});
      case 64: return fn(t, std::integral_constant<int, 64>{});
      case 96: return fn(t, std::integral_constant<int, 96>{});
      case 128: return fn(t, std::integral_constant<int, 128>{});
      case 256: return fn(t, std::integral_constant<int, 256>{});
      default: TORCH_CHECK(false, "fastattn.sdpa: unsupported CUDA head dim ", E);
    }
  };
  if (dtype == AttnDType::Half) {
    with_dim(__half{});
  } else {
    TORCH_CHECK(dtype == AttnDType::BFloat16, "fastattn.sdpa: the CUDA kernels take float16/bfloat16");
    with_dim(__nv_bfloat16{});
  }
}

// Kernel launchers (attention_forward.cu, attention_backward.cu). Inputs prepared by attention.cu:
// dtype / head dim checked, q/k/v (and grad_out, out) 16-byte readable.
void attention_forward_cuda(const AttnForwardArgs& a, cudaStream_t stream);
// delta: (B, Hq, L) float32 scratch for D = rowsum(grad_out * out).
void attention_backward_cuda(const AttnBackwardArgs& a, float* delta, cudaStream_t stream);

}  // namespace fastattn::cuda::attn
