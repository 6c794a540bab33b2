// fastattn::quantize_per_token_int8 and int8_scaled_mm (W8A8) for CUDA tensors: kernels, launch
// and the CUDA registrations.
//
// quantize_per_token_int8: one CTA of 256 threads per row (grid-stride over rows): a block max of
// |x| (float32), then inv = 127 / amax by IEEE division (__fdiv_rn), xq = clamp(rint(x * inv),
// -127, 127) with __fmul_rn (no contraction) and __float2int_rn (round half to even), 0 where
// amax == 0; x_scale = amax / 127 (__fdiv_rn). The row is read twice (the second time mostly
// from L1 / L2). Matches fastattn/reference.py quantize_per_token_int8 bit for bit.
//
// int8_scaled_mm: tensor cores, mma.sync m16n8k32 .s8.s8.s32 (exact int32 accumulation).
// CTA tile BM x 128 (N) x 64 (K bytes), 8 warps in 2 (M) x 4 (N), a warp 16 MI x 32 (MI m16
// tiles, 4 n8 tiles); BM = 128 (MI = 4) for M > 32, else 32 (MI = 1). Two shared-memory stages
// filled by cp.async (16-byte chunks, zero-filled past M / N / K) when K % 16 == 0 and both bases
// are 16-byte aligned, else by byte loads. Both operands are k-contiguous rows, loaded as
// ldmatrix b16 fragments (2 int8 per b16). Epilogue: float(acc) * x_scale[m] * w_scale[n] +
// bias[n] in float32, one rounding to out_dtype. The int32 sum is exact while K * 128 * 128 <
// 2^31 (K <= 131071). Small M (fewer output tiles than 2 CTAs an SM) splits K over gridDim.z
// (>= 8 k tiles a split); the int32 partials go to a (splits, M, N) workspace and int8_mm_reduce
// sums them (exact, so order-independent) and applies the same epilogue.
#include "quant_common.cuh"

namespace fastattn::cuda::quant {
namespace {

// ---- quantize_per_token_int8 -------------------------------------------------------------------

constexpr int kQThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kQThreads) quantize_rows(const T* __restrict__ x, int8_t* __restrict__ xq,
                                                          float* __restrict__ x_scale, int64_t M, int64_t K) {
  __shared__ float red[33];
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const T* xr = x + row * K;
    float amax = 0.f;
    for (int64_t k = threadIdx.x; k < K; k += kQThreads) amax = fmaxf(amax, fabsf(to_f(xr[k])));
    amax = block_reduce(amax, MaxOp{}, 0.f, red);
    const float inv = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
    int8_t* qr = xq + row * K;
    for (int64_t k = threadIdx.x; k < K; k += kQThreads) {
      const int v = __float2int_rn(__fmul_rn(to_f(xr[k]), inv));
      qr[k] = static_cast<int8_t>(min(max(v, -127), 127));
    }
    if (threadIdx.x == 0) x_scale[row] = __fdiv_rn(amax, 127.f);
    __syncthreads();  // red is reused by the next row's reduction
  }
}

// ---- int8_scaled_mm ----------------------------------------------------------------------------

constexpr int kMmThreads = 256;
constexpr int kMmBN = 128, kMmBK = 64;  // K tile in bytes
constexpr int kMmLd = kMmBK + 16;       // smem row pitch in bytes (80: conflict-free ldmatrix)
constexpr int kMmLd16 = kMmLd / 2;      // the same in b16 units

struct MmArgs {
  const int8_t* x;        // (M, K)
  const float* x_scale;   // (M,)
  const int8_t* w;        // (N, K)
  const float* w_scale;   // (N,)
  const void* bias;       // (N,) OUT or null
  void* out;              // (M, N) OUT
  int64_t M, N, K;
  int64_t tiles_per_split;  // split-K: CTA z covers k tiles [z tps, (z + 1) tps)
  int32_t* ws;              // (splits, M, N) int32 partial sums, or null (no split)
};

// rows row0.. (ROWS of them) x bytes k0..k0+63 of a (rows, K) int8 matrix -> s (pitch kMmLd).
template <int ROWS, bool ALIGNED>
__device__ __forceinline__ void load_s8_tile(int8_t* s, const int8_t* g, int64_t rows, int64_t K,
                                             int64_t row0, int64_t k0) {
  if constexpr (ALIGNED) {  // K % 16 == 0: a 16-byte chunk is wholly inside or outside K
    constexpr int kChunks = ROWS * (kMmBK / 16);  // 128 (ROWS = 32) or 512
#pragma unroll
    for (int it = 0; it < (kChunks + kMmThreads - 1) / kMmThreads; ++it) {
      const int c = it * kMmThreads + static_cast<int>(threadIdx.x);
      if (kChunks % kMmThreads != 0 && c >= kChunks) break;
      const int r = c / (kMmBK / 16), col = (c % (kMmBK / 16)) * 16;
      const bool valid = row0 + r < rows && k0 + col < K;
      const int8_t* src = valid ? g + (row0 + r) * K + k0 + col : g;
      cp_async16_zfill(s + r * kMmLd + col, src, valid);
    }
  } else {
    static_assert(ROWS * kMmBK % kMmThreads == 0, "tile shape");
#pragma unroll 4
    for (int it = 0; it < ROWS * kMmBK / kMmThreads; ++it) {
      const int c = it * kMmThreads + static_cast<int>(threadIdx.x);
      const int r = c / kMmBK, col = c % kMmBK;
      int8_t v = 0;
      if (row0 + r < rows && k0 + col < K) v = g[(row0 + r) * K + k0 + col];
      s[r * kMmLd + col] = v;
    }
  }
}

template <int MI>
struct MmSmem {
  static constexpr int kBM = 2 * 16 * MI;
  int8_t a[2][kBM * kMmLd];
  int8_t b[2][kMmBN * kMmLd];
};

// MI = 4: at most 128 registers, so two CTAs (16 warps) fit an SM.
template <typename OUT, int MI, bool ALIGNED>
__global__ void __launch_bounds__(kMmThreads, MI == 4 ? 2 : 1) int8_mm(MmArgs a) {
  constexpr int kBM = MmSmem<MI>::kBM;
  __shared__ __align__(16) MmSmem<MI> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / 4, wn = warp % 4;  // warp tile rows 16 MI wm.., columns 32 wn..
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMmBN;
  const int64_t kt_begin = static_cast<int64_t>(blockIdx.z) * a.tiles_per_split;
  const int64_t kt_end = attn::min64(attn::ceil_div(a.K, kMmBK), kt_begin + a.tiles_per_split);

  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM; m0 < a.M;
       m0 += static_cast<int64_t>(gridDim.y) * kBM) {
    int acc[MI][4][4];
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
      }
    }
    __syncthreads();  // the previous row block's last reads of stage 0 are done
    load_s8_tile<kBM, ALIGNED>(sm.a[0], a.x, a.M, a.K, m0, kt_begin * kMmBK);
    load_s8_tile<kMmBN, ALIGNED>(sm.b[0], a.w, a.N, a.K, n0, kt_begin * kMmBK);
    attn::cp_async_commit();
    attn::cp_async_wait_all();
    __syncthreads();

    for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
      const int s = static_cast<int>((kt - kt_begin) & 1);
      if (kt + 1 < kt_end) {  // prefetch into stage s ^ 1 (last read in iteration kt - 1)
        load_s8_tile<kBM, ALIGNED>(sm.a[s ^ 1], a.x, a.M, a.K, m0, (kt + 1) * kMmBK);
        load_s8_tile<kMmBN, ALIGNED>(sm.b[s ^ 1], a.w, a.N, a.K, n0, (kt + 1) * kMmBK);
        attn::cp_async_commit();
      }
      const uint16_t* sa = reinterpret_cast<const uint16_t*>(sm.a[s]);
      const uint16_t* sb = reinterpret_cast<const uint16_t*>(sm.b[s]);
#pragma unroll
      for (int kk = 0; kk < kMmBK / 32; ++kk) {  // 32 bytes = 16 b16 columns a step
        uint32_t af[MI][4], bf[2][4];
#pragma unroll
        for (int i = 0; i < MI; ++i)
          attn::ldsm_x4(af[i], attn::a_addr<kMmLd16>(sa, wm * 16 * MI + i * 16, kk * 16, lane));
#pragma unroll
        for (int p = 0; p < 2; ++p)
          attn::ldsm_x4(bf[p], attn::bn_addr<kMmLd16>(sb, wn * 32 + p * 16, kk * 16, lane));
#pragma unroll
        for (int i = 0; i < MI; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_s8(acc[i][j], af[i], bf[j / 2][2 * (j % 2)], bf[j / 2][2 * (j % 2) + 1]);
        }
      }
      attn::cp_async_wait_all();
      __syncthreads();
    }

    // Epilogue: float(acc) * x_scale[m] * w_scale[n] + bias[n] -> OUT.
    OUT* __restrict__ out = static_cast<OUT*>(a.out);
    const OUT* __restrict__ bias = static_cast<const OUT*>(a.bias);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t n = n0 + wn * 32 + j * 8 + 2 * tig + e;
        if (n >= a.N) continue;
        const float wsc = a.w_scale[n];
        const float add = bias != nullptr ? to_f(bias[n]) : 0.f;
#pragma unroll
        for (int i = 0; i < MI; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t m = m0 + wm * 16 * MI + i * 16 + gid + 8 * h;
            if (m >= a.M) continue;
            if (a.ws != nullptr) {
              a.ws[(static_cast<int64_t>(blockIdx.z) * a.M + m) * a.N + n] = acc[i][j][e + 2 * h];
            } else {
              const float v = static_cast<float>(acc[i][j][e + 2 * h]) * a.x_scale[m] * wsc + add;
              out[m * a.N + n] = from_f<OUT>(v);
            }
          }
        }
      }
    }
  }
}

// Split-K epilogue: acc = sum_z ws[z, m, n] (exact int32), then the same float epilogue.
template <typename OUT>
__global__ void __launch_bounds__(256) int8_mm_reduce(MmArgs a, int splits) {
  const int64_t total = a.M * a.N;
  OUT* __restrict__ out = static_cast<OUT*>(a.out);
  const OUT* __restrict__ bias = static_cast<const OUT*>(a.bias);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * 256) {
    int acc = 0;
    for (int z = 0; z < splits; ++z) acc += a.ws[z * total + i];
    const int64_t m = i / a.N, n = i % a.N;
    const float add = bias != nullptr ? to_f(bias[n]) : 0.f;
    out[i] = from_f<OUT>(static_cast<float>(acc) * a.x_scale[m] * a.w_scale[n] + add);
  }
}

template <typename OUT, int MI>
void launch_mm(MmArgs a, const at::Tensor& like, bool aligned, cudaStream_t stream) {
  constexpr int kBM = MmSmem<MI>::kBM;
  const int64_t gx = attn::ceil_div(a.N, kMmBN), gy = std::min<int64_t>(attn::ceil_div(a.M, kBM), 65535);
  TORCH_CHECK(gx <= 0x7fffffff, "fastattn: N too large for the CUDA GEMM");
  // Split K when the output tiles leave SMs idle (small M): 2 CTAs an SM, >= 8 k tiles a split.
  const int64_t k_tiles = attn::ceil_div(a.K, kMmBK);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = 1;
  if (gx * gy < 2 * sms) {
    splits = std::min<int64_t>({attn::ceil_div(2 * sms, gx * gy), std::max<int64_t>(1, k_tiles / 8), 16});
  }
  a.tiles_per_split = attn::ceil_div(k_tiles, splits);
  splits = attn::ceil_div(k_tiles, a.tiles_per_split);  // no empty split
  at::Tensor ws;
  a.ws = nullptr;
  if (splits > 1) {
    ws = at::empty({splits, a.M, a.N}, like.options().dtype(at::kInt));
    a.ws = ws.data_ptr<int32_t>();
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
  if (aligned) {
    int8_mm<OUT, MI, true><<<grid, kMmThreads, 0, stream>>>(a);
  } else {
    int8_mm<OUT, MI, false><<<grid, kMmThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t blocks = std::min<int64_t>(attn::ceil_div(a.M * a.N, 256), 8 * sms);
    int8_mm_reduce<OUT><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(a, static_cast<int>(splits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  QuantizeRows r = prepare_quantize_per_token_int8(x);
  if (r.M == 0) return {r.xq, r.x_scale};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(r.M, 0x7fffffff));
  dispatch_activation(r.x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    quantize_rows<T><<<grid, kQThreads, 0, stream>>>(static_cast<const T*>(r.x.data_ptr()),
                                                      static_cast<int8_t*>(r.xq.data_ptr()),
                                                      r.x_scale.data_ptr<float>(), r.M, r.K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {r.xq, r.x_scale};
}

at::Tensor int8_scaled_mm_cuda(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& weight,
                               const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                               at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(xq.device());
  QuantLinear q = prepare_int8_scaled_mm(xq, x_scale, weight, w_scale, bias, out_dtype);
  if (q.M == 0 || q.N == 0) return q.out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const MmArgs a{static_cast<const int8_t*>(q.x.data_ptr()), q.x_scale.data_ptr<float>(),
                 static_cast<const int8_t*>(q.weight.data_ptr()), q.scale.data_ptr<float>(),
                 ptr_or_null(q.bias), q.out.data_ptr(), q.M, q.N, q.K, 0, nullptr};
  const bool aligned = q.K % 16 == 0 && aligned_to(a.x, 16) && aligned_to(a.w, 16);
  dispatch_activation(out_dtype, [&](auto t) {
    using OUT = decltype(t);
    if (q.M <= 32) launch_mm<OUT, 1>(a, q.x, aligned, stream);
    else launch_mm<OUT, 4>(a, q.x, aligned, stream);
  });
  return q.out;
}

}  // namespace
}  // namespace fastattn::cuda::quant

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("quantize_per_token_int8", &fastattn::cuda::quant::quantize_per_token_int8_cuda);
  m.impl("int8_scaled_mm", &fastattn::cuda::quant::int8_scaled_mm_cuda);
}
