// fastattn::layer_norm_backward / rms_norm_backward for CUDA tensors: the backward kernels,
// the two-stage parameter-gradient reduction and their launch (design: norm_common.cuh).
#include "norm_common.cuh"

namespace fastattn::cuda {
namespace {

// Fused backward for rows held in registers (x, dy and grad_sum as T; w re-read from L1).
// Group gi (a warp, or the block) owns rows [gi * rows_per_group, (gi + 1) * rows_per_group)
// and writes its column partials of sum dy * xhat and sum dy (accumulated in registers) to
// row gi of pw / pb (each (groups, N), null when not wanted).
template <typename T, typename W, int VEC, int ITEMS, bool WARP_ROW>
__global__ void __launch_bounds__(bwd_threads(WARP_ROW))
    norm_bwd_registers(NormBackwardArgs a, float* __restrict__ pw, float* __restrict__ pb,
                       int64_t groups, int64_t rows_per_group, float inv_n) {
  using P = VecPack<T, VEC>;
  __shared__ float2 red[33];
  const W* __restrict__ wt = static_cast<const W*>(a.weight);
  const bool has_gs = a.grad_sum != nullptr;
  const int N = static_cast<int>(a.N);  // <= kBwdBlock16Max
  const int lanes = row_lanes<WARP_ROW>(), rank = row_rank<WARP_ROW>();
  const int64_t gi = WARP_ROW ? static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32
                              : static_cast<int64_t>(blockIdx.x);
  if (gi >= groups) return;  // whole warps (the block path launches exactly `groups` blocks)
  const int64_t row0 = gi * rows_per_group;
  const int64_t row1 = std::min(a.rows, row0 + rows_per_group);
  float dw[ITEMS][VEC], db[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) dw[i][v] = db[i][v] = 0.f;
  }
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t base = row * a.N;
    const float mean = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    P px[ITEMS], pg[ITEMS], ps[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (rank + i * lanes) * VEC;
      if (col < N) {
        px[i] = *reinterpret_cast<const P*>(static_cast<const T*>(a.input) + base + col);
        pg[i] = *reinterpret_cast<const P*>(static_cast<const T*>(a.grad_out) + base + col);
        if (has_gs) ps[i] = *reinterpret_cast<const P*>(static_cast<const T*>(a.grad_sum) + base + col);
      }
    }
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (rank + i * lanes) * VEC;
      if (col < N) {
        float wv[VEC];
        load_param<VEC>(wt, col, 1.f, wv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float d = static_cast<float>(pg[i].v[v]);
          const float xh = (static_cast<float>(px[i].v[v]) - mean) * rstd;
          dw[i][v] += d * xh;
          db[i][v] += d;
          sg += d * wv[v];
          sgx += d * wv[v] * xh;
        }
      }
    }
    const float2 t = row_sum2<WARP_ROW>(sg, sgx, red);
    const float c0 = a.rms ? 0.f : t.x * inv_n, c1 = t.y * inv_n;
    T* __restrict__ dxr = static_cast<T*>(a.grad_input) + base;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int col = (rank + i * lanes) * VEC;
      if (col < N) {
        float wv[VEC];
        load_param<VEC>(wt, col, 1.f, wv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float xh = (static_cast<float>(px[i].v[v]) - mean) * rstd;
          wv[v] = rstd * (static_cast<float>(pg[i].v[v]) * wv[v] - c0 - xh * c1);
          if (has_gs) wv[v] += static_cast<float>(ps[i].v[v]);
        }
        store_floats<VEC>(dxr + col, wv);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int col = (rank + i * lanes) * VEC;
    if (col < N) {
      if (pw != nullptr) store_floats<VEC>(pw + gi * a.N + col, dw[i]);
      if (pb != nullptr) store_floats<VEC>(pb + gi * a.N + col, db[i]);
    }
  }
}

// dx for rows too long for registers: a block walks its rows (grid-stride), reading x and dy
// twice, kLoopUnroll packs of each a thread a step.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kLoopThreads) norm_bwd_dx_loop(NormBackwardArgs a, float inv_n) {
  using P = VecPack<T, VEC>;
  constexpr int U = kLoopUnroll;
  __shared__ float2 red[33];
  const T* __restrict__ dy = static_cast<const T*>(a.grad_out);
  const T* __restrict__ gs = static_cast<const T*>(a.grad_sum);
  const T* __restrict__ x = static_cast<const T*>(a.input);
  const W* __restrict__ wt = static_cast<const W*>(a.weight);
  T* __restrict__ dx = static_cast<T*>(a.grad_input);
  const int64_t N = a.N;
  constexpr int64_t stride = int64_t{kLoopThreads} * VEC;  // launched with kLoopThreads
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t base = row * N;
    const float mean = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    float sg = 0.f, sgx = 0.f;
#pragma unroll 1
    for (int64_t c = first; c < N; c += U * stride) {
      P px[U], pg[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c + u * stride < N) {
          px[u] = *reinterpret_cast<const P*>(x + base + c + u * stride);
          pg[u] = *reinterpret_cast<const P*>(dy + base + c + u * stride);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c + u * stride < N) {
          float wv[VEC];
          load_param<VEC>(wt, c + u * stride, 1.f, wv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const float g = static_cast<float>(pg[u].v[v]) * wv[v];
            sg += g;
            sgx += g * ((static_cast<float>(px[u].v[v]) - mean) * rstd);
          }
        }
      }
    }
    const float2 t = row_sum2<false>(sg, sgx, red);
    const float c0 = a.rms ? 0.f : t.x * inv_n, c1 = t.y * inv_n;
#pragma unroll 1
    for (int64_t c = first; c < N; c += U * stride) {
      P px[U], pg[U], ps[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c + u * stride < N) {
          px[u] = *reinterpret_cast<const P*>(x + base + c + u * stride);
          pg[u] = *reinterpret_cast<const P*>(dy + base + c + u * stride);
          if (gs != nullptr) ps[u] = *reinterpret_cast<const P*>(gs + base + c + u * stride);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c + u * stride;
        if (col < N) {
          float wv[VEC];
          load_param<VEC>(wt, col, 1.f, wv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const float xh = (static_cast<float>(px[u].v[v]) - mean) * rstd;
            wv[v] = rstd * (static_cast<float>(pg[u].v[v]) * wv[v] - c0 - xh * c1);
            if (gs != nullptr) wv[v] += static_cast<float>(ps[u].v[v]);
          }
          store_floats<VEC>(dx + base + col, wv);
        }
      }
    }
  }
}

// Stage 1 for long rows: block (bx, r) sums dy * xhat and dy over the rows of range r for
// its kColThreads * VEC columns; a thread owns VEC columns and walks the rows in order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kColThreads)
    norm_bwd_partial_cols(NormBackwardArgs a, float* __restrict__ pw, float* __restrict__ pb,
                          int64_t rows_per_group) {
  using P = VecPack<T, VEC>;
  const T* __restrict__ dy = static_cast<const T*>(a.grad_out);
  const T* __restrict__ x = static_cast<const T*>(a.input);
  const int64_t N = a.N;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x) * VEC;
  if (col >= N) return;
  const int64_t gi = blockIdx.y;
  const int64_t row1 = std::min(a.rows, (gi + 1) * rows_per_group);
  float dw[VEC], db[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) dw[v] = db[v] = 0.f;
#pragma unroll 4
  for (int64_t row = gi * rows_per_group; row < row1; ++row) {
    const float mean = a.rms ? 0.f : a.mean[row];
    const float rstd = a.rstd[row];
    const P px = *reinterpret_cast<const P*>(x + row * N + col);
    const P pg = *reinterpret_cast<const P*>(dy + row * N + col);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float d = static_cast<float>(pg.v[v]);
      dw[v] += d * (static_cast<float>(px.v[v]) - mean) * rstd;
      db[v] += d;
    }
  }
  if (pw != nullptr) store_floats<VEC>(pw + gi * N + col, dw);
  if (pb != nullptr) store_floats<VEC>(pb + gi * N + col, db);
}

// Stage 2: out[col] = sum over p of partial[p][col], blockIdx.y 0: grad_weight, 1: grad_bias.
// Lane j sums p = j, j + 8, ... in order; lane 0 then adds the 8 lane sums in order.
template <typename W>
__global__ void __launch_bounds__(kSumCols * kSumLanes)
    norm_param_grad(const float* __restrict__ pw, const float* __restrict__ pb, int64_t groups,
                    int64_t N, W* __restrict__ dw, W* __restrict__ db) {
  const float* part = blockIdx.y == 0 ? pw : pb;
  W* out = blockIdx.y == 0 ? dw : db;
  if (out == nullptr) return;  // uniform over the block
  __shared__ float acc[kSumLanes][kSumCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  float s = 0.f;
  if (col < N) {
#pragma unroll 8
    for (int64_t p = threadIdx.y; p < groups; p += kSumLanes) s += part[p * N + col];
  }
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float t = 0.f;
#pragma unroll
    for (int j = 0; j < kSumLanes; ++j) t += acc[j][threadIdx.x];
    out[col] = W(t);
  }
}

template <typename T, typename W, int VEC>
void launch_backward(const NormBackwardArgs& a, const at::TensorOptions& opts, cudaStream_t stream) {
  const int64_t rows = a.rows, N = a.N;
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(N));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int nsum = (a.grad_weight != nullptr) + (a.grad_bias != nullptr);
  at::Tensor partial;  // (nsum, groups, N): freed after the launches (stream-ordered allocator)
  float* pw = nullptr;
  float* pb = nullptr;
  auto alloc = [&](int64_t groups) {
    if (nsum == 0) return;
    partial = at::empty({nsum, groups, N}, opts.dtype(at::kFloat));
    float* p = partial.data_ptr<float>();
    if (a.grad_weight != nullptr) pw = p, p += groups * N;
    if (a.grad_bias != nullptr) pb = p;
  };
  int64_t groups = 0;
  auto registers = [&](auto kernel, int per_block, int threads) {
    const Split sp = split_rows(rows, sms * blocks_per_sm(kernel, threads) * per_block, sms * per_block);
    groups = sp.groups;
    alloc(groups);
    kernel<<<grid_size(ceil_div(groups, per_block)), threads, 0, stream>>>(a, pw, pb, groups, sp.rows_per_group, inv_n);
  };
  if (N <= kWarpRowMax) {
    registers(norm_bwd_registers<T, W, VEC, 8 / VEC, true>, kWarpRowsPerBlock, kWarpBlock);
  } else if (N <= kBwdBlock8Max) {
    registers(norm_bwd_registers<T, W, VEC, 8 / VEC, false>, 1, round_warp(ceil_div(N, 8)));
  } else if (VEC > 1 && N <= kBwdBlock16Max) {  // 16 scalar values a thread would spill
    if constexpr (VEC > 1) registers(norm_bwd_registers<T, W, VEC, 16 / VEC, false>, 1, round_warp(ceil_div(N, 16)));
  } else {
    const auto kernel = norm_bwd_dx_loop<T, W, VEC>;
    kernel<<<loop_grid(kernel, rows, 2 * N * static_cast<int64_t>(sizeof(T))), kLoopThreads, 0, stream>>>(a, inv_n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nsum > 0) {
      const int64_t col_blocks = ceil_div(N, int64_t{kColThreads} * VEC);
      const int64_t fit = sms * blocks_per_sm(norm_bwd_partial_cols<T, VEC>, kColThreads);
      const Split sp = split_rows(rows, std::clamp<int64_t>(fit / col_blocks, 1, 65535), 1);
      groups = sp.groups;
      alloc(groups);
      norm_bwd_partial_cols<T, VEC><<<dim3(grid_size(col_blocks), static_cast<unsigned>(groups)), kColThreads, 0, stream>>>(
          a, pw, pb, sp.rows_per_group);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (nsum > 0) {
    norm_param_grad<W><<<dim3(grid_size(ceil_div(N, kSumCols)), 2), dim3(kSumCols, kSumLanes), 0, stream>>>(
        pw, pb, groups, N, static_cast<W*>(a.grad_weight), static_cast<W*>(a.grad_bias));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void run_backward(NormBackward& b) {
  const NormBackwardArgs& a = b.args;
  if (a.rows == 0 || a.N == 0) {  // sums over no rows
    if (a.grad_weight != nullptr) b.grad_weight.zero_();
    if (a.grad_bias != nullptr) b.grad_bias.zero_();
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_norm(b.input.scalar_type(), b.param_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    if (aligned16<T>(a.N, {a.grad_out, a.grad_sum, a.input, a.weight, a.grad_input})) {
      launch_backward<T, W, 16 / sizeof(T)>(a, b.input.options(), stream);
    } else {
      launch_backward<T, W, 1>(a, b.input.options(), stream);
    }
  });
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool has_bias) {
  const c10::cuda::CUDAGuard guard(input.device());
  NormBackward b = prepare_norm_backward("fastattn::layer_norm_backward", false, grad_out,
                                         grad_residual_out, input, weight, &mean, rstd, has_bias);
  run_backward(b);
  return {b.grad_input, b.grad_weight, b.grad_bias};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out,
                                                          const std::optional<at::Tensor>& grad_residual_out,
                                                          const at::Tensor& input,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(input.device());
  NormBackward b = prepare_norm_backward("fastattn::rms_norm_backward", true, grad_out,
                                         grad_residual_out, input, weight, nullptr, rstd, false);
  run_backward(b);
  return {b.grad_input, b.grad_weight};
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("layer_norm_backward", &fastattn::cuda::layer_norm_backward_cuda);
  m.impl("rms_norm_backward", &fastattn::cuda::rms_norm_backward_cuda);
}
