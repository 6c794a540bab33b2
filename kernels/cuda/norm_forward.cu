// fastattn::layer_norm / rms_norm for CUDA tensors: the forward kernels and their launch
// (design and paths: kernels/cuda/norm_common.cuh).
#include "norm_common.cuh"

namespace fastattn::cuda {
namespace {

// s is held as T (exact: x itself, or T(x + residual)) and converted to float on each pass.
template <typename T, typename W, int VEC, int ITEMS, bool WARP_ROW>
__global__ void __launch_bounds__(fwd_threads(WARP_ROW, VEC * ITEMS))
    norm_fwd_registers(NormForwardArgs a, float inv_n) {
  using P = VecPack<T, VEC>;
  __shared__ float red[33];
  const W* __restrict__ wt = static_cast<const W*>(a.weight);
  const W* __restrict__ bs = static_cast<const W*>(a.bias);
  const bool has_res = a.residual != nullptr;
  const int N = static_cast<int>(a.N);  // <= kFwdBlock32Max
  const int lanes = row_lanes<WARP_ROW>(), rank = row_rank<WARP_ROW>();
  const int per_block = WARP_ROW ? kWarpRowsPerBlock : 1;
  const int64_t step = static_cast<int64_t>(gridDim.x) * per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * per_block + (WARP_ROW ? threadIdx.x / 32 : 0);
       row < a.rows; row += step) {
    const int64_t base = row * a.N;
    const T* __restrict__ xr = static_cast<const T*>(a.x) + base;
    P s[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (rank + i * lanes) * VEC;
      if (col < N) s[i] = *reinterpret_cast<const P*>(xr + col);  // col < N => col + VEC <= N
    }
    if (has_res) {
      const T* __restrict__ rr = static_cast<const T*>(a.residual) + base;
      T* __restrict__ ror = static_cast<T*>(a.residual_out) + base;
      P r[ITEMS];
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int col = (rank + i * lanes) * VEC;
        if (col < N) r[i] = *reinterpret_cast<const P*>(rr + col);
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int col = (rank + i * lanes) * VEC;
        if (col < N) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) s[i].v[v] = T(static_cast<float>(s[i].v[v]) + static_cast<float>(r[i].v[v]));
          *reinterpret_cast<P*>(ror + col) = s[i];
        }
      }
    }
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if ((rank + i * lanes) * VEC < N) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) sum += static_cast<float>(s[i].v[v]);
      }
    }
    float mean = 0.f;
    if (!a.rms) mean = row_sum<WARP_ROW>(sum, red) * inv_n;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if ((rank + i * lanes) * VEC < N) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float d = static_cast<float>(s[i].v[v]) - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(row_sum<WARP_ROW>(sq, red) * inv_n + a.eps);
    if (rank == 0) {
      if (a.mean != nullptr) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    T* __restrict__ outr = static_cast<T*>(a.out) + base;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (rank + i * lanes) * VEC;
      if (col < N) {
        float wv[VEC], bv[VEC];
        load_param<VEC>(wt, col, 1.f, wv);
        load_param<VEC>(bs, col, 0.f, bv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) wv[v] = (static_cast<float>(s[i].v[v]) - mean) * rstd * wv[v] + bv[v];
        store_floats<VEC>(outr + col, wv);
      }
    }
  }
}

// Rows too long for registers: a block walks its rows (grid-stride), kLoopUnroll packs a
// thread a step, all loaded before any is used. No __restrict__: passes 2 and 3 re-read s from
// residual_out, which this thread wrote (the same columns) in pass 1.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kLoopThreads) norm_fwd_loop(NormForwardArgs a, float inv_n) {
  using P = VecPack<T, VEC>;
  constexpr int U = kLoopUnroll;
  __shared__ float red[33];
  const T* res = static_cast<const T*>(a.residual);
  T* res_out = static_cast<T*>(a.residual_out);
  const T* src = res != nullptr ? res_out : static_cast<const T*>(a.x);  // s, passes 2 and 3
  const int64_t N = a.N;
  constexpr int64_t stride = int64_t{kLoopThreads} * VEC;  // launched with kLoopThreads
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t base = row * N;
    float s1 = 0.f, s2 = 0.f;  // sums of s and of s^2 (a select per element costs registers)
#pragma unroll 1
    for (int64_t c = first; c < N; c += U * stride) {
      P p[U], q[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c + u * stride < N) {
          p[u] = *reinterpret_cast<const P*>(static_cast<const T*>(a.x) + base + c + u * stride);
          if (res != nullptr) q[u] = *reinterpret_cast<const P*>(res + base + c + u * stride);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c + u * stride < N) {
          if (res != nullptr) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) p[u].v[v] = T(static_cast<float>(p[u].v[v]) + static_cast<float>(q[u].v[v]));
            *reinterpret_cast<P*>(res_out + base + c + u * stride) = p[u];
          }
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const float sv = static_cast<float>(p[u].v[v]);
            s1 += sv;
            s2 += sv * sv;
          }
        }
      }
    }
    const float m1 = block_reduce(a.rms ? s2 : s1, SumOp{}, 0.f, red) * inv_n;
    float mean = 0.f, var = m1;
    if (!a.rms) {
      mean = m1;
      float sq = 0.f;
#pragma unroll 1
      for (int64_t c = first; c < N; c += U * stride) {
        P p[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (c + u * stride < N) p[u] = *reinterpret_cast<const P*>(src + base + c + u * stride);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (c + u * stride < N) {
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const float d = static_cast<float>(p[u].v[v]) - mean;
              sq += d * d;
            }
          }
        }
      }
      var = block_reduce(sq, SumOp{}, 0.f, red) * inv_n;
    }
    const float rstd = rsqrtf(var + a.eps);
    if (threadIdx.x == 0) {
      if (a.mean != nullptr) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
#pragma unroll 1
    for (int64_t c = first; c < N; c += U * stride) {
      P p[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c + u * stride < N) p[u] = *reinterpret_cast<const P*>(src + base + c + u * stride);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c + u * stride;
        if (col < N) {
          float wv[VEC], bv[VEC];
          load_param<VEC>(static_cast<const W*>(a.weight), col, 1.f, wv);
          load_param<VEC>(static_cast<const W*>(a.bias), col, 0.f, bv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) wv[v] = (static_cast<float>(p[u].v[v]) - mean) * rstd * wv[v] + bv[v];
          store_floats<VEC>(static_cast<T*>(a.out) + base + col, wv);
        }
      }
    }
  }
}

template <typename T, typename W, int VEC>
void launch_forward(const NormForwardArgs& a, cudaStream_t stream) {
  const int64_t rows = a.rows, N = a.N;
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(N));
  if (N <= kWarpRowMax) {
    norm_fwd_registers<T, W, VEC, 8 / VEC, true>
        <<<grid_size(ceil_div(rows, kWarpRowsPerBlock)), kWarpBlock, 0, stream>>>(a, inv_n);
  } else if (VEC > 1 && N > kFwdBlock32Min && N <= kFwdBlock32Max) {
    // 32 values a thread: more bytes in flight per register than 8 (32 scalar values would
    // not fit: unaligned rows take the 8-value kernel up to 8192 columns, then the loop).
    if constexpr (VEC > 1) {
      norm_fwd_registers<T, W, VEC, 32 / VEC, false>
          <<<grid_size(rows), round_warp(ceil_div(N, 32)), 0, stream>>>(a, inv_n);
    }
  } else if (N <= kFwdBlock8Max) {
    norm_fwd_registers<T, W, VEC, 8 / VEC, false>
        <<<grid_size(rows), round_warp(ceil_div(N, 8)), 0, stream>>>(a, inv_n);
  } else {
    const auto kernel = norm_fwd_loop<T, W, VEC>;
    kernel<<<loop_grid(kernel, rows, N * static_cast<int64_t>(sizeof(T))), kLoopThreads, 0, stream>>>(a, inv_n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


void run_forward(const NormForward& f) {
  const NormForwardArgs& a = f.args;
  if (a.rows == 0 || a.N == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_norm(f.x.scalar_type(), f.param_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    if (aligned16<T>(a.N, {a.x, a.residual, a.weight, a.bias, a.out, a.residual_out})) {
      launch_forward<T, W, 16 / sizeof(T)>(a, stream);
    } else {
      launch_forward<T, W, 1>(a, stream);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  NormForward f = prepare_norm_forward("fastattn::layer_norm", false, x, residual, weight, bias, eps);
  run_forward(f);
  return {f.out, f.residual_out, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x,
                                                             const std::optional<at::Tensor>& residual,
                                                             const std::optional<at::Tensor>& weight,
                                                             double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  NormForward f = prepare_norm_forward("fastattn::rms_norm", true, x, residual, weight, std::nullopt, eps);
  run_forward(f);
  return {f.out, f.residual_out, f.rstd};
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("layer_norm", &fastattn::cuda::layer_norm_cuda);
  m.impl("rms_norm", &fastattn::cuda::rms_norm_cuda);
}
