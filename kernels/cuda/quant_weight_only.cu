// fastattn::int8_weight_linear / int4_weight_linear for CUDA tensors: the GEMV kernel (few rows
// of x, and every float32 x), the host entry points that choose it or the tensor-core GEMM
// (kernels/cuda/quant_gemm.cu), and the CUDA registrations.
//
// GEMV (wo_gemv): a CTA of 8 warps owns 16 output channels (2 a warp) and MT rows of x
// (MT in {1, 2, 4, 8}; float32 x with M > 8 walks blocks of 8 rows, re-reading the weights from L2
// for each: a plain SIMT fallback, not a GEMM). x is staged in shared memory as float32 (32 KiB:
// chunks of 8192 / MT columns, a single chunk for K <= 8192 at M = 1), permuted so that each
// lane's float4 reads are conflict-free. A lane owns 16 weight bytes a step (int8: 16 weights,
// int4: 32 weights; one 16-byte load, 2 steps x 2 channels issued before any is used) when rows
// are 16-byte aligned (int8: K % 16 == 0; int4: always, K % 32 == 0) and the base pointer is,
// else 1 byte a step (int8: 1 weight, int4: 2). Weights are dequantized in registers, exactly:
// int8 q -> float(q) and int4 (q - z) by 2^23 magic-number arithmetic. A piece's products are
// summed in fp32 (part = sum (q - z) x); int4 adds s * part (s, z of the lane's group: a piece
// never straddles a group since G % 32 == 0), int8 adds part and scales by scale[n] once at the
// end. A warp shuffle reduction, bias added in fp32, one rounding to T.
#include "quant_common.cuh"

namespace fastattn::cuda::quant {
namespace {

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kGemvSmemFloats = 8192;  // x staged in shared memory: MT rows x 8192 / MT columns
constexpr int kGemvCpw = 2;       // output channels a warp
constexpr int kGemvChannels = kGemvWarps * kGemvCpw;

// Shared-memory slot of chunk column kl. A step covers 32 E columns, lane l owning columns
// [l E, l E + E); for E >= 4 its e-th column lives at (e / 4) * 128 + 4 l + e % 4, so the lane's
// float4 number j is at 128 j + 4 l (a warp's float4 reads are contiguous).
template <int E>
__device__ __forceinline__ int xs_slot(int kl) {
  if constexpr (E < 4) {
    return kl;
  } else {
    const int step = kl / (32 * E), r = kl % (32 * E), lane = r / E, e = r % E;
    return step * 32 * E + (e / 4) * 128 + lane * 4 + (e % 4);
  }
}

// Weight e (0 <= e < E) of a lane's piece held in words (int8 words already s8_bias'ed):
// int8 q, int4 q - z (the group scale multiplies the piece's sum).
template <bool INT4, int E, int WORDS>
__device__ __forceinline__ float piece_weight(const uint32_t (&wr)[WORDS], int e, float zb) {
  if constexpr (INT4) {
    return magic_nibble(wr[e / 8], e % 8) - zb;
  } else {
    return magic_byte(wr[e / 4], e % 4) - kMagicS8;
  }
}

// The lane's piece of channel n at column k0: raw bytes into wr (int8: sign-flipped for
// magic_byte), its group's 2^23 + zero and scale (int4). Zeros for n >= N (nothing read).
template <bool INT4, int BYTES, int WORDS>
__device__ __forceinline__ void load_piece(uint32_t (&wr)[WORDS], float& zb, float& sc, const WoArgs& a,
                                           int64_t n, int64_t k0, int64_t row_bytes, int64_t groups) {
  zb = kMagic;
  sc = 0.f;
#pragma unroll
  for (int j = 0; j < WORDS; ++j) wr[j] = 0u;
  if (n < a.N) {
    const uint8_t* src = a.w + n * row_bytes + (INT4 ? k0 / 2 : k0);
    if constexpr (BYTES == 16) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
      wr[0] = v.x;
      wr[1] = v.y;
      wr[2] = v.z;
      wr[3] = v.w;
    } else {
      wr[0] = __ldg(src);
    }
    if constexpr (INT4) {
      const int64_t g = n * groups + k0 / a.group_size;
      zb = kMagic + static_cast<float>(__ldg(a.zero + g));
      sc = __ldg(a.scale + g);
    }
  }
  if constexpr (!INT4) {
#pragma unroll
    for (int j = 0; j < WORDS; ++j) wr[j] = s8_bias(wr[j]);
  }
}

// T: x / out / bias type; BYTES: weight bytes a lane loads a step (16 or 1); MT: rows of x a CTA.
// Two CTAs an SM at least (<= 128 registers): left to itself ptxas picked fewer registers and
// spilled a few 64-bit values at MT = 2 / 8.
template <typename T, bool INT4, int BYTES, int MT>
__global__ void __launch_bounds__(kGemvThreads, 2) wo_gemv(WoArgs a) {
  constexpr int E = BYTES * (INT4 ? 2 : 1);           // weights a lane a step
  constexpr int WORDS = BYTES >= 4 ? BYTES / 4 : 1;  // 32-bit words holding them
  constexpr int KC = kGemvSmemFloats / MT;            // chunk columns (8192 / MT)
  constexpr int STEPS = KC / (32 * E);
  // Steps whose loads are issued together (16-byte pieces; the 1-byte fallback goes one step at
  // a time: batched, it spilled on sm_90).
  constexpr int U = (BYTES == 16 && STEPS >= 2) ? 2 : 1;
  static_assert(KC % (32 * E) == 0 && STEPS % U == 0, "chunk");
  __shared__ __align__(16) float xs[MT][KC];  // x[m0 + m, kc + kl] at xs[m][xs_slot(kl)]

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n_base = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * kGemvCpw;
  const int64_t row_bytes = INT4 ? a.K / 2 : a.K;
  const int64_t groups = INT4 ? a.K / a.group_size : 1;

  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT; m0 < a.M;
       m0 += static_cast<int64_t>(gridDim.y) * MT) {
    float acc[MT][kGemvCpw];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int c = 0; c < kGemvCpw; ++c) acc[m][c] = 0.f;
    }
    for (int64_t kc = 0; kc < a.K; kc += KC) {
      // Columns kc .. kc + cols - 1 exist; only those slots are read (a lane reads its piece
      // only when the piece is inside K). Rows m0 + m >= M are read: they hold zeros.
      const int cols = static_cast<int>(std::min<int64_t>(KC, a.K - kc));
      __syncthreads();  // every warp is done with the previous chunk (or row block)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const bool row_ok = m0 + m < a.M;
        const T* xr = x + (row_ok ? (m0 + m) * a.K + kc : 0);
        for (int kl = threadIdx.x; kl < cols; kl += kGemvThreads)
          xs[m][xs_slot<E>(kl)] = row_ok ? to_f(xr[kl]) : 0.f;
      }
      __syncthreads();
#pragma unroll 1
      for (int st = 0; st < STEPS; st += U) {
        if (kc + st * 32 * E >= a.K) break;  // uniform: the step's first column is past K
        // Load phase: the U steps' pieces of every channel (up to 2 x 2 x 16 bytes in flight).
        uint32_t wr[U][kGemvCpw][WORDS];
        float zb[U][kGemvCpw], sc[U][kGemvCpw];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t k0 = kc + (st + u) * 32 * E + lane * E;  // first column of the piece
          ok[u] = k0 < a.K;  // K % E == 0: a piece is wholly inside [0, K) or wholly past it
#pragma unroll
          for (int c = 0; c < kGemvCpw; ++c)
            load_piece<INT4, BYTES>(wr[u][c], zb[u][c], sc[u][c], a, ok[u] ? n_base + c : a.N, k0,
                                    row_bytes, groups);
        }
        // Compute phase.
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!ok[u]) continue;
          const int base = (st + u) * 32 * E;
          float part[MT][kGemvCpw];  // the piece's sum of q x (int8) or (q - z) x (int4)
#pragma unroll
          for (int m = 0; m < MT; ++m) {
#pragma unroll
            for (int c = 0; c < kGemvCpw; ++c) part[m][c] = 0.f;
          }
          if constexpr (E >= 4) {
#pragma unroll
            for (int j = 0; j < E / 4; ++j) {
              float4 xv[MT];
#pragma unroll
              for (int m = 0; m < MT; ++m)
                xv[m] = *reinterpret_cast<const float4*>(&xs[m][base + j * 128 + lane * 4]);
#pragma unroll
              for (int c = 0; c < kGemvCpw; ++c) {
                const float w0 = piece_weight<INT4, E>(wr[u][c], 4 * j + 0, zb[u][c]);
                const float w1 = piece_weight<INT4, E>(wr[u][c], 4 * j + 1, zb[u][c]);
                const float w2 = piece_weight<INT4, E>(wr[u][c], 4 * j + 2, zb[u][c]);
                const float w3 = piece_weight<INT4, E>(wr[u][c], 4 * j + 3, zb[u][c]);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                  float t = part[m][c];
                  t = fmaf(w0, xv[m].x, t);
                  t = fmaf(w1, xv[m].y, t);
                  t = fmaf(w2, xv[m].z, t);
                  part[m][c] = fmaf(w3, xv[m].w, t);
                }
              }
            }
          } else {
#pragma unroll
            for (int e = 0; e < E; ++e) {
              float xv[MT];
#pragma unroll
              for (int m = 0; m < MT; ++m) xv[m] = xs[m][base + lane * E + e];
#pragma unroll
              for (int c = 0; c < kGemvCpw; ++c) {
                const float w = piece_weight<INT4, E>(wr[u][c], e, zb[u][c]);
#pragma unroll
                for (int m = 0; m < MT; ++m) part[m][c] = fmaf(w, xv[m], part[m][c]);
              }
            }
          }
#pragma unroll
          for (int m = 0; m < MT; ++m) {
#pragma unroll
            for (int c = 0; c < kGemvCpw; ++c) {
              if constexpr (INT4) {
                acc[m][c] = fmaf(sc[u][c], part[m][c], acc[m][c]);
              } else {
                acc[m][c] += part[m][c];
              }
            }
          }
        }
      }
    }
    // Epilogue: reduce over the warp; lane 0 writes (only rows < M and channels < N).
    T* __restrict__ out = static_cast<T*>(a.out);
    const T* __restrict__ bias = static_cast<const T*>(a.bias);
#pragma unroll
    for (int c = 0; c < kGemvCpw; ++c) {
      const int64_t n = n_base + c;
      float mul = 1.f, add = 0.f;
      if (lane == 0 && n < a.N) {
        if constexpr (!INT4) mul = a.scale[n];
        if (bias != nullptr) add = to_f(bias[n]);
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float v = warp_reduce(acc[m][c], SumOp{});
        if (lane == 0 && n < a.N && m0 + m < a.M) out[(m0 + m) * a.N + n] = from_f<T>(fmaf(v, mul, add));
      }
    }
  }
}

template <typename T, bool INT4, int BYTES>
void launch_gemv_rows(const WoArgs& a, cudaStream_t stream) {
  const int64_t mt = a.M <= 1 ? 1 : a.M <= 2 ? 2 : a.M <= 4 ? 4 : 8;
  const dim3 grid(static_cast<unsigned>(attn::ceil_div(a.N, kGemvChannels)),
                  static_cast<unsigned>(std::min<int64_t>(attn::ceil_div(a.M, mt), 65535)));
  TORCH_CHECK(grid.x <= 0x7fffffffu, "fastattn: N too large for the CUDA GEMV kernel");
  switch (mt) {
    case 1: wo_gemv<T, INT4, BYTES, 1><<<grid, kGemvThreads, 0, stream>>>(a); break;
    case 2: wo_gemv<T, INT4, BYTES, 2><<<grid, kGemvThreads, 0, stream>>>(a); break;
    case 4: wo_gemv<T, INT4, BYTES, 4><<<grid, kGemvThreads, 0, stream>>>(a); break;
    default: wo_gemv<T, INT4, BYTES, 8><<<grid, kGemvThreads, 0, stream>>>(a); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_weight_only(const QuantLinear& q, bool int4) {
  if (q.M == 0 || q.N == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType dt = q.x.scalar_type();
  if (dt != at::kFloat && q.M > kGemvRows) {
    launch_wo_gemm(q, int4, stream);
    return;
  }
  const WoArgs a = wo_args(q);
  // 16-byte weight pieces need 16-byte aligned rows: row pitch (int8 K, int4 K / 2) and base.
  const bool vec = aligned_to(a.w, 16) && (int4 ? (q.K / 2) % 16 == 0 : q.K % 16 == 0);
  dispatch_activation(dt, [&](auto t) {
    using T = decltype(t);
    if (int4) {
      if (vec) launch_gemv_rows<T, true, 16>(a, stream);
      else launch_gemv_rows<T, true, 1>(a, stream);
    } else {
      if (vec) launch_gemv_rows<T, false, 16>(a, stream);
      else launch_gemv_rows<T, false, 1>(a, stream);
    }
  });
}

at::Tensor int8_weight_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  QuantLinear q = prepare_int8_weight_linear(x, weight, scale, bias);
  run_weight_only(q, false);
  return q.out;
}

at::Tensor int4_weight_linear_cuda(const at::Tensor& x, const at::Tensor& packed,
                                   const at::Tensor& scale, const at::Tensor& zero,
                                   int64_t group_size, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  QuantLinear q = prepare_int4_weight_linear(x, packed, scale, zero, group_size, bias);
  run_weight_only(q, true);
  return q.out;
}

}  // namespace
}  // namespace fastattn::cuda::quant

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("int8_weight_linear", &fastattn::cuda::quant::int8_weight_linear_cuda);
  m.impl("int4_weight_linear", &fastattn::cuda::quant::int4_weight_linear_cuda);
}
