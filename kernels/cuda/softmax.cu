// fastattn::softmax / softmax_backward for CUDA tensors.
//
// One thread block per row (grid-strided over rows), float32 math for every storage type.
//  * rows of N <= 16384: the row lives in registers (ITEMS values per thread, 4 or 16), so x is
//    read once and out written once: 2 * N * sizeof(T) bytes (+ the mask) per row;
//  * longer rows: an online softmax (running max and rescaled sum in one read), then a second
//    read that writes the output: 3 * N * sizeof(T) bytes per row.
// Column c of a row is handled by thread c % blockDim.x, so a warp's loads are contiguous.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "fastattn/alloc.h"
#include "fastattn/cuda_reduce.cuh"
#include "fastattn/softmax_host.h"

namespace fastattn::cuda {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxRegisterRow = 16 * kMaxThreads;  // longest row kept in registers

struct NoMask {};

// Logit of column `col`: scale * x + mask, or -inf where masked. `mask` is the row's mask.
template <typename T, typename M>
__device__ __forceinline__ float logit(const T* __restrict__ x, const M* __restrict__ mask,
                                       int64_t col, float scale) {
  float z = static_cast<float>(x[col]) * scale;
  if constexpr (std::is_same_v<M, bool>) {
    z = mask[col] ? z : -INFINITY;
  } else if constexpr (!std::is_same_v<M, NoMask>) {
    z += static_cast<float>(mask[col]);
  }
  return z;
}

template <typename M>
__device__ __forceinline__ const M* row_mask(const void* mask, const SoftmaxGeometry& g, int64_t row) {
  if constexpr (std::is_same_v<M, NoMask>) {
    return nullptr;
  } else {
    return static_cast<const M*>(mask) + mask_row_offset(g, row);
  }
}

template <typename T, typename M, int ITEMS>
__global__ void softmax_fwd_registers(const T* __restrict__ x, const void* __restrict__ mask,
                                      T* __restrict__ out, SoftmaxGeometry g, float scale,
                                      bool causal) {
  __shared__ float red[33];
  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    const T* xr = x + row * g.N;
    T* yr = out + row * g.N;
    const M* mr = row_mask<M>(mask, g, row);
    const int64_t len = causal_row_length(g, row, causal);
    float z[ITEMS];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      z[i] = col < len ? logit<T, M>(xr, mr, col, scale) : -INFINITY;
      mx = fmaxf(mx, z[i]);
    }
    mx = block_reduce(mx, MaxOp{}, -INFINITY, red);
    if (mx == -INFINITY) {  // fully masked row: 0 (uniform across the block)
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t col = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
        if (col < g.N) yr[col] = T(0.f);
      }
      continue;
    }
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      z[i] = expf(z[i] - mx);  // exp(-inf) = 0 for masked and padding columns
      sum += z[i];
    }
    sum = block_reduce(sum, SumOp{}, 0.f, red);
    const float inv = 1.f / sum;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (col < g.N) yr[col] = T(z[i] * inv);
    }
  }
}

// Folds logit z into the running (max m, sum l of exp(. - m)).
__device__ __forceinline__ void online_update(float z, float& m, float& l) {
  if (z == -INFINITY) return;
  if (z > m) {
    l = l * expf(m - z) + 1.f;
    m = z;
  } else {
    l += expf(z - m);
  }
}

template <typename T, typename M>
__global__ void softmax_fwd_online(const T* __restrict__ x, const void* __restrict__ mask,
                                   T* __restrict__ out, SoftmaxGeometry g, float scale,
                                   bool causal) {
  __shared__ float red[33];
  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    const T* xr = x + row * g.N;
    T* yr = out + row * g.N;
    const M* mr = row_mask<M>(mask, g, row);
    const int64_t len = causal_row_length(g, row, causal);
    float m = -INFINITY, l = 0.f;
    for (int64_t col = threadIdx.x; col < len; col += blockDim.x) {
      online_update(logit<T, M>(xr, mr, col, scale), m, l);
    }
    const float row_max = block_reduce(m, MaxOp{}, -INFINITY, red);
    if (row_max == -INFINITY) {
      for (int64_t col = threadIdx.x; col < g.N; col += blockDim.x) yr[col] = T(0.f);
      continue;
    }
    l = m == -INFINITY ? 0.f : l * expf(m - row_max);
    const float inv = 1.f / block_reduce(l, SumOp{}, 0.f, red);
    for (int64_t col = threadIdx.x; col < g.N; col += blockDim.x) {
      const float p = col < len ? expf(logit<T, M>(xr, mr, col, scale) - row_max) * inv : 0.f;
      yr[col] = T(p);
    }
  }
}

template <typename T, int ITEMS>
__global__ void softmax_bwd_registers(const T* __restrict__ dy, const T* __restrict__ y,
                                      T* __restrict__ dx, int64_t rows, int64_t N, float scale) {
  __shared__ float red[33];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * N;
    float yv[ITEMS], gv[ITEMS];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      yv[i] = col < N ? static_cast<float>(y[base + col]) : 0.f;
      gv[i] = col < N ? static_cast<float>(dy[base + col]) : 0.f;
      dot += yv[i] * gv[i];
    }
    dot = block_reduce(dot, SumOp{}, 0.f, red);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (col < N) dx[base + col] = T(scale * yv[i] * (gv[i] - dot));
    }
  }
}

template <typename T>
__global__ void softmax_bwd_loop(const T* __restrict__ dy, const T* __restrict__ y,
                                 T* __restrict__ dx, int64_t rows, int64_t N, float scale) {
  __shared__ float red[33];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * N;
    float dot = 0.f;
    for (int64_t col = threadIdx.x; col < N; col += blockDim.x) {
      dot += static_cast<float>(y[base + col]) * static_cast<float>(dy[base + col]);
    }
    dot = block_reduce(dot, SumOp{}, 0.f, red);
    for (int64_t col = threadIdx.x; col < N; col += blockDim.x) {
      const float yv = static_cast<float>(y[base + col]);
      dx[base + col] = T(scale * yv * (static_cast<float>(dy[base + col]) - dot));
    }
  }
}

// Launch shape for a row of N: the items per thread (4, 16, or 0 for the looping kernels)
// and the threads per block (a multiple of 32, at most 1024).
struct RowLaunch {
  int items;
  int threads;
};

RowLaunch row_launch(int64_t N) {
  auto round_warp = [](int64_t t) { return static_cast<int>(std::max<int64_t>(32, (t + 31) / 32 * 32)); };
  if (N <= 4 * kMaxThreads) return {4, round_warp((N + 3) / 4)};
  if (N <= kMaxRegisterRow) return {16, round_warp((N + 15) / 16)};
  return {0, kMaxThreads};
}

unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>(rows, std::numeric_limits<int>::max()));
}

template <typename T, typename M>
void launch_forward(const SoftmaxInputs& in, at::Tensor& out, float scale, bool causal,
                    cudaStream_t stream) {
  const SoftmaxGeometry& g = in.geom;
  const T* x = static_cast<const T*>(in.x.data_ptr());
  const void* mask = in.mask.defined() ? in.mask.data_ptr() : nullptr;
  T* y = static_cast<T*>(out.data_ptr());
  const RowLaunch l = row_launch(g.N);
  const unsigned grid = grid_for(g.rows);
  if (l.items == 4) {
    softmax_fwd_registers<T, M, 4><<<grid, l.threads, 0, stream>>>(x, mask, y, g, scale, causal);
  } else if (l.items == 16) {
    softmax_fwd_registers<T, M, 16><<<grid, l.threads, 0, stream>>>(x, mask, y, g, scale, causal);
  } else {
    softmax_fwd_online<T, M><<<grid, l.threads, 0, stream>>>(x, mask, y, g, scale, causal);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void forward_typed(const SoftmaxInputs& in, at::Tensor& out, float scale, bool causal,
                   cudaStream_t stream) {
  switch (in.mask_kind) {
    case MaskKind::None: return launch_forward<T, NoMask>(in, out, scale, causal, stream);
    case MaskKind::Bool: return launch_forward<T, bool>(in, out, scale, causal, stream);
    case MaskKind::Same: return launch_forward<T, T>(in, out, scale, causal, stream);
    case MaskKind::Float: return launch_forward<T, float>(in, out, scale, causal, stream);
  }
}

template <typename T>
void backward_typed(const at::Tensor& dy, const at::Tensor& y, at::Tensor& dx, float scale,
                    cudaStream_t stream) {
  const int64_t N = y.size(-1);
  const int64_t rows = y.numel() / N;
  const T* g = static_cast<const T*>(dy.data_ptr());
  const T* p = static_cast<const T*>(y.data_ptr());
  T* d = static_cast<T*>(dx.data_ptr());
  const RowLaunch l = row_launch(N);
  const unsigned grid = grid_for(rows);
  if (l.items == 4) {
    softmax_bwd_registers<T, 4><<<grid, l.threads, 0, stream>>>(g, p, d, rows, N, scale);
  } else if (l.items == 16) {
    softmax_bwd_registers<T, 16><<<grid, l.threads, 0, stream>>>(g, p, d, rows, N, scale);
  } else {
    softmax_bwd_loop<T><<<grid, l.threads, 0, stream>>>(g, p, d, rows, N, scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Fn>
void dispatch_float(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, "fastattn: unsupported dtype ", t);
  }
}

at::Tensor softmax_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                        bool causal) {
  const c10::cuda::CUDAGuard guard(x.device());
  SoftmaxInputs in = prepare_softmax(x, mask, scale);
  at::Tensor out = new_output(in.x.sizes(), in.x.options());
  if (in.geom.rows == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(in.x.scalar_type(), [&](auto tag) {
    forward_typed<decltype(tag)>(in, out, static_cast<float>(scale), causal, stream);
  });
  return out;
}

at::Tensor softmax_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, double scale) {
  check_softmax_backward(grad_out, out);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor y = out.contiguous();
  at::Tensor dx = new_output(y.sizes(), y.options());
  if (y.numel() == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(y.scalar_type(), [&](auto tag) {
    backward_typed<decltype(tag)>(dy, y, dx, static_cast<float>(scale), stream);
  });
  return dx;
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("softmax", &fastattn::cuda::softmax_cuda);
  m.impl("softmax_backward", &fastattn::cuda::softmax_backward_cuda);
}
