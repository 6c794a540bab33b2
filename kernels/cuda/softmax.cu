// fastattn::softmax / softmax_backward for CUDA tensors.
//
// float32 math for every storage type. Column c of a row belongs to thread (c / VEC) % lanes,
// so a warp's loads are contiguous; VEC = 16 bytes / sizeof(T) when the row starts and N allow
// 16-byte accesses, else 1. Paths by row length N:
//  * N <= 256: one warp per row, 4 rows per block, warp-shuffle reductions only;
//  * N <= 16384: one block per row (8 values a thread up to 8192, then 32), the row held in
//    registers: x read once, out written once, 2 * N * sizeof(T) bytes per row (+ the mask);
//  * longer rows: online softmax (running max and rescaled sum in one read), then a second
//    read that writes: 3 * N * sizeof(T) bytes per row.
// The backward kernels hold y and dy in registers up to 8192 columns, else read them twice.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastattn/alloc.h"
#include "fastattn/cuda_reduce.cuh"
#include "fastattn/softmax_host.h"

namespace fastattn::cuda {
namespace {

constexpr int kWarpRowsPerBlock = 4;
constexpr int64_t kWarpRowMax = 32 * 8;   // rows this short: one warp each, 8 values a lane
constexpr int64_t kBlock8RowMax = 1024 * 8;  // one block, up to 1024 threads x 8 values
constexpr int64_t kRegisterRowMax = 512 * 32;  // one block, up to 512 threads x 32 values
constexpr int kLoopThreads = 512;

// Largest block a register kernel is launched with, given `values` per thread. It is the
// kernel's __launch_bounds__, so ptxas budgets registers for it (65536 / threads: 64 at 1024,
// 128 at 512); `make resources` checks that no kernel spills under that budget.
constexpr int max_threads(bool warp_row, int values) {
  return warp_row ? 32 * kWarpRowsPerBlock : (values <= 8 ? 1024 : 512);
}

struct NoMask {};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Logit of column `col` given its input value: scale * x + mask, or -inf where masked.
template <typename M>
__device__ __forceinline__ float logit(float xv, const M* __restrict__ mask, int64_t col,
                                       float scale) {
  float z = xv * scale;
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

// Reduction over the threads that share a row: a warp, or the whole block.
template <bool WARP_ROW, typename Op>
__device__ __forceinline__ float row_reduce(float v, Op op, float identity, float* smem) {
  if constexpr (WARP_ROW) {
    return warp_reduce(v, op);
  } else {
    return block_reduce(v, op, identity, smem);
  }
}

// Which rows this thread's group walks, and the group's size and this thread's rank in it.
template <bool WARP_ROW>
struct RowWalk {
  int64_t first, step;
  int lanes, rank;
  __device__ RowWalk() {
    if constexpr (WARP_ROW) {
      const int per_block = blockDim.x / 32;
      first = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / 32;
      step = static_cast<int64_t>(gridDim.x) * per_block;
      lanes = 32;
      rank = threadIdx.x & 31;
    } else {
      first = blockIdx.x;
      step = gridDim.x;
      lanes = blockDim.x;
      rank = threadIdx.x;
    }
  }
};

template <typename T, typename M, int VEC, int ITEMS, bool WARP_ROW>
__global__ void __launch_bounds__(max_threads(WARP_ROW, VEC * ITEMS), 1) softmax_fwd_registers(const T* __restrict__ x, const void* __restrict__ mask,
                                      T* __restrict__ out, SoftmaxGeometry g, float scale,
                                      bool causal) {
  using P = Pack<T, VEC>;
  __shared__ float red[33];
  const RowWalk<WARP_ROW> w;
  for (int64_t row = w.first; row < g.rows; row += w.step) {
    const T* xr = x + row * g.N;
    T* yr = out + row * g.N;
    const M* mr = row_mask<M>(mask, g, row);
    const int64_t len = causal_row_length(g, row, causal);
    float z[ITEMS][VEC];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (w.rank + static_cast<int64_t>(i) * w.lanes) * VEC;
      P p;
      if (col < len) p = *reinterpret_cast<const P*>(xr + col);  // col < N => col + VEC <= N
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        z[i][v] = col + v < len ? logit<M>(static_cast<float>(p.v[v]), mr, col + v, scale) : -INFINITY;
        mx = fmaxf(mx, z[i][v]);
      }
    }
    mx = row_reduce<WARP_ROW>(mx, MaxOp{}, -INFINITY, red);
    // A fully masked row (mx = -inf) is all 0: exp(-inf - 0) = 0 and inv below stays finite.
    const float shift = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        z[i][v] = expf(z[i][v] - shift);  // masked and padding columns: exp(-inf) = 0
        sum += z[i][v];
      }
    }
    sum = row_reduce<WARP_ROW>(sum, SumOp{}, 0.f, red);
    const float inv = sum == 0.f ? 0.f : 1.f / sum;  // NaN inputs stay NaN
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (w.rank + static_cast<int64_t>(i) * w.lanes) * VEC;
      if (col < g.N) {
        P o;
#pragma unroll
        for (int v = 0; v < VEC; ++v) o.v[v] = T(z[i][v] * inv);
        *reinterpret_cast<P*>(yr + col) = o;
      }
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

template <typename T, typename M, int VEC>
__global__ void __launch_bounds__(kLoopThreads) softmax_fwd_online(const T* __restrict__ x, const void* __restrict__ mask,
                                   T* __restrict__ out, SoftmaxGeometry g, float scale,
                                   bool causal) {
  using P = Pack<T, VEC>;
  __shared__ float red[33];
  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    const T* xr = x + row * g.N;
    T* yr = out + row * g.N;
    const M* mr = row_mask<M>(mask, g, row);
    const int64_t len = causal_row_length(g, row, causal);
    float m = -INFINITY, l = 0.f;
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < len; col += blockDim.x * VEC) {
      const P p = *reinterpret_cast<const P*>(xr + col);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        if (col + v < len) online_update(logit<M>(static_cast<float>(p.v[v]), mr, col + v, scale), m, l);
      }
    }
    const float row_max = block_reduce(m, MaxOp{}, -INFINITY, red);
    const float shift = row_max == -INFINITY ? 0.f : row_max;
    l = m == -INFINITY ? 0.f : l * expf(m - shift);
    const float total = block_reduce(l, SumOp{}, 0.f, red);
    const float inv = total == 0.f ? 0.f : 1.f / total;  // fully masked row: all 0
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < g.N; col += blockDim.x * VEC) {
      P p;
      if (col < len) p = *reinterpret_cast<const P*>(xr + col);
      P o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float z = col + v < len ? logit<M>(static_cast<float>(p.v[v]), mr, col + v, scale) : -INFINITY;
        o.v[v] = T(expf(z - shift) * inv);
      }
      *reinterpret_cast<P*>(yr + col) = o;
    }
  }
}

template <typename T, int VEC, int ITEMS, bool WARP_ROW>
__global__ void __launch_bounds__(max_threads(WARP_ROW, VEC * ITEMS)) softmax_bwd_registers(const T* __restrict__ dy, const T* __restrict__ y,
                                      T* __restrict__ dx, int64_t rows, int64_t N, float scale) {
  using P = Pack<T, VEC>;
  __shared__ float red[33];
  const RowWalk<WARP_ROW> w;
  for (int64_t row = w.first; row < rows; row += w.step) {
    const int64_t base = row * N;
    float yv[ITEMS][VEC], gv[ITEMS][VEC];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (w.rank + static_cast<int64_t>(i) * w.lanes) * VEC;
      P py, pg;
      const bool in = col < N;
      if (in) {
        py = *reinterpret_cast<const P*>(y + base + col);
        pg = *reinterpret_cast<const P*>(dy + base + col);
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        yv[i][v] = in ? static_cast<float>(py.v[v]) : 0.f;
        gv[i][v] = in ? static_cast<float>(pg.v[v]) : 0.f;
        dot += yv[i][v] * gv[i][v];
      }
    }
    dot = row_reduce<WARP_ROW>(dot, SumOp{}, 0.f, red);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (w.rank + static_cast<int64_t>(i) * w.lanes) * VEC;
      if (col < N) {
        P o;
#pragma unroll
        for (int v = 0; v < VEC; ++v) o.v[v] = T(scale * yv[i][v] * (gv[i][v] - dot));
        *reinterpret_cast<P*>(dx + base + col) = o;
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kLoopThreads) softmax_bwd_loop(const T* __restrict__ dy, const T* __restrict__ y,
                                 T* __restrict__ dx, int64_t rows, int64_t N, float scale) {
  using P = Pack<T, VEC>;
  __shared__ float red[33];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * N;
    float dot = 0.f;
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < N; col += blockDim.x * VEC) {
      const P py = *reinterpret_cast<const P*>(y + base + col);
      const P pg = *reinterpret_cast<const P*>(dy + base + col);
#pragma unroll
      for (int v = 0; v < VEC; ++v) dot += static_cast<float>(py.v[v]) * static_cast<float>(pg.v[v]);
    }
    dot = block_reduce(dot, SumOp{}, 0.f, red);
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < N; col += blockDim.x * VEC) {
      const P py = *reinterpret_cast<const P*>(y + base + col);
      const P pg = *reinterpret_cast<const P*>(dy + base + col);
      P o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        o.v[v] = T(scale * static_cast<float>(py.v[v]) * (static_cast<float>(pg.v[v]) - dot));
      }
      *reinterpret_cast<P*>(dx + base + col) = o;
    }
  }
}

// ---- launch selection ------------------------------------------------------------------------

enum class Path { WarpRows, Block8, Block32, Loop };

struct Launch {
  Path path;
  unsigned grid;
  int threads;
};

Launch choose_launch(int64_t rows, int64_t N) {
  auto round_warp = [](int64_t t) { return static_cast<int>(std::max<int64_t>(32, (t + 31) / 32 * 32)); };
  auto grid = [](int64_t blocks) {
    return static_cast<unsigned>(std::min<int64_t>(blocks, std::numeric_limits<int>::max()));
  };
  if (N <= kWarpRowMax) {
    return {Path::WarpRows, grid((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock), 32 * kWarpRowsPerBlock};
  }
  if (N <= kBlock8RowMax) return {Path::Block8, grid(rows), round_warp((N + 7) / 8)};
  if (N <= kRegisterRowMax) return {Path::Block32, grid(rows), round_warp((N + 31) / 32)};
  return {Path::Loop, grid(rows), kLoopThreads};
}

// 16-byte accesses when every row starts 16-byte aligned.
template <typename T>
bool can_vectorize(int64_t N, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (N % kVec != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename T, typename M, int VEC>
void launch_forward(const T* x, const void* mask, T* y, const SoftmaxGeometry& g, float scale,
                    bool causal, cudaStream_t stream) {
  Launch l = choose_launch(g.rows, g.N);
  // 32 scalar (unaligned) loads a thread spill on sm_80: such rows take the online kernel.
  if (VEC == 1 && l.path == Path::Block32) l = {Path::Loop, l.grid, kLoopThreads};
  switch (l.path) {
    case Path::WarpRows:
      softmax_fwd_registers<T, M, VEC, 8 / VEC, true><<<l.grid, l.threads, 0, stream>>>(x, mask, y, g, scale, causal);
      break;
    case Path::Block8:
      softmax_fwd_registers<T, M, VEC, 8 / VEC, false><<<l.grid, l.threads, 0, stream>>>(x, mask, y, g, scale, causal);
      break;
    case Path::Block32:
      if constexpr (VEC > 1) {
        softmax_fwd_registers<T, M, VEC, 32 / VEC, false><<<l.grid, l.threads, 0, stream>>>(x, mask, y, g, scale, causal);
      }
      break;
    case Path::Loop:
      softmax_fwd_online<T, M, VEC><<<l.grid, l.threads, 0, stream>>>(x, mask, y, g, scale, causal);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename M>
void forward_masked(const SoftmaxInputs& in, at::Tensor& out, float scale, bool causal,
                    cudaStream_t stream) {
  const T* x = static_cast<const T*>(in.x.data_ptr());
  const void* mask = in.mask.defined() ? in.mask.data_ptr() : nullptr;
  T* y = static_cast<T*>(out.data_ptr());
  if (can_vectorize<T>(in.geom.N, {x, y})) {
    launch_forward<T, M, 16 / sizeof(T)>(x, mask, y, in.geom, scale, causal, stream);
  } else {
    launch_forward<T, M, 1>(x, mask, y, in.geom, scale, causal, stream);
  }
}

template <typename T>
void forward_typed(const SoftmaxInputs& in, at::Tensor& out, float scale, bool causal,
                   cudaStream_t stream) {
  switch (in.mask_kind) {
    case MaskKind::None: return forward_masked<T, NoMask>(in, out, scale, causal, stream);
    case MaskKind::Bool: return forward_masked<T, bool>(in, out, scale, causal, stream);
    case MaskKind::Same: return forward_masked<T, T>(in, out, scale, causal, stream);
    case MaskKind::Float: return forward_masked<T, float>(in, out, scale, causal, stream);
  }
}

template <typename T, int VEC>
void launch_backward(const T* dy, const T* y, T* dx, int64_t rows, int64_t N, float scale,
                     cudaStream_t stream) {
  // Holding both y and dy for rows past 8192 would need 64 values a thread: those rows take
  // the two-read loop (3 reads + 1 write of a row instead of 2 + 1).
  Launch l = choose_launch(rows, N);
  if (l.path == Path::Block32) l = {Path::Loop, l.grid, kLoopThreads};
  switch (l.path) {
    case Path::WarpRows:
      softmax_bwd_registers<T, VEC, 8 / VEC, true><<<l.grid, l.threads, 0, stream>>>(dy, y, dx, rows, N, scale);
      break;
    case Path::Block8:
      softmax_bwd_registers<T, VEC, 8 / VEC, false><<<l.grid, l.threads, 0, stream>>>(dy, y, dx, rows, N, scale);
      break;
    case Path::Block32:  // not taken (see above)
    case Path::Loop:
      softmax_bwd_loop<T, VEC><<<l.grid, l.threads, 0, stream>>>(dy, y, dx, rows, N, scale);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& out, at::Tensor& grad_in,
                    float scale, cudaStream_t stream) {
  const int64_t N = out.size(-1);
  const int64_t rows = out.numel() / N;
  const T* dy = static_cast<const T*>(grad_out.data_ptr());
  const T* y = static_cast<const T*>(out.data_ptr());
  T* dx = static_cast<T*>(grad_in.data_ptr());
  if (can_vectorize<T>(N, {dy, y, dx})) {
    launch_backward<T, 16 / sizeof(T)>(dy, y, dx, rows, N, scale, stream);
  } else {
    launch_backward<T, 1>(dy, y, dx, rows, N, scale, stream);
  }
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
