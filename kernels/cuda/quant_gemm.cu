// The tensor-core GEMM of fastattn::int8_weight_linear / int4_weight_linear for float16 /
// bfloat16 x with M > kGemvRows (launched from kernels/cuda/quant_weight_only.cu).
//
// CTA tile 64 (M) x 64 (N) x 32 (K), 4 warps in 2 x 2, a warp 32 x 32 (2 x 4 mma.m16n8k16 tiles),
// float32 accumulators. Two shared-memory stages: while the warps multiply stage s, x's next tile
// is copied into stage s ^ 1 by cp.async (rows 16-byte aligned: K % 8 == 0 and an aligned base;
// else plain loads) and the weight's next tile is loaded into registers, dequantized to T
// (int8 q and int4 q - z are exact in float16 and bfloat16) and stored n-major (row n, k
// contiguous) into stage s ^ 1, so B fragments come by ldmatrix (no .trans). Scales stay in
// float32: int8 scale[n] multiplies the accumulator in the epilogue; int4 accumulates each group
// (G % 32 == 0, so a k tile lies in one group) into a second accumulator that is added times
// scale[n, g] when the group ends. Tails: x rows >= M, weight rows >= N and columns >= K load as
// zeros; the epilogue writes only rows < M, columns < N. Small M (fewer output tiles than 2 CTAs
// an SM) splits K over gridDim.z (each split >= 8 k tiles and whole groups); the fp32 partials go
// to a (splits, M, N) workspace that split_reduce sums in a fixed order (deterministic) with the
// bias.
#include "quant_common.cuh"

namespace fastattn::cuda::quant {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 32;
constexpr int kLd = kBK + 8;  // smem row pitch in elements (80 bytes: conflict-free ldmatrix)
constexpr int kThreads = 128;

template <typename T>
struct GemmSmem {
  T a[2][kBM * kLd];  // x tile, row m, k contiguous
  T b[2][kBN * kLd];  // dequantized weight tile, row n, k contiguous
};

// x[m0.., k0..] -> sa (cp.async when ALIGNED_X, zeros outside [0, M) x [0, K)).
template <typename T, bool ALIGNED_X>
__device__ __forceinline__ void load_x_tile(T* sa, const T* x, int64_t M, int64_t K, int64_t m0,
                                            int64_t k0) {
  if constexpr (ALIGNED_X) {
    // 64 rows x 4 chunks of 8 elements; K % 8 == 0 so a chunk is wholly inside or outside K.
#pragma unroll
    for (int it = 0; it < kBM * (kBK / 8) / kThreads; ++it) {
      const int c = it * kThreads + static_cast<int>(threadIdx.x);
      const int r = c / (kBK / 8), col = (c % (kBK / 8)) * 8;
      const bool valid = m0 + r < M && k0 + col < K;
      const T* src = valid ? x + (m0 + r) * K + k0 + col : x;
      cp_async16_zfill(sa + r * kLd + col, src, valid);
    }
  } else {
#pragma unroll 4
    for (int it = 0; it < kBM * kBK / kThreads; ++it) {
      const int c = it * kThreads + static_cast<int>(threadIdx.x);
      const int r = c / kBK, col = c % kBK;
      T v = from_f<T>(0.f);
      if (m0 + r < M && k0 + col < K) v = x[(m0 + r) * K + k0 + col];
      sa[r * kLd + col] = v;
    }
  }
}

// Thread t owns weight row n0 + t / 2 of the tile and half (t % 2) of its k range: int8 16
// bytes (16 weights), int4 8 bytes (16 weights). Raw bytes in registers (zeros outside N / K).
template <bool INT4, bool ALIGNED_W>
__device__ __forceinline__ void load_w_regs(uint32_t (&wr)[4], float& zb, const WoArgs& a, int64_t n0,
                                            int64_t k0) {
  const int r = threadIdx.x / 2, h = threadIdx.x % 2;
  const int64_t n = n0 + r;
#pragma unroll
  for (int j = 0; j < 4; ++j) wr[j] = 0u;
  zb = kMagic;
  if (n >= a.N) return;
  if constexpr (INT4) {
    const int64_t row_bytes = a.K / 2;
    const uint8_t* src = a.w + n * row_bytes + k0 / 2 + 8 * h;  // K % 32 == 0: always inside
    if constexpr (ALIGNED_W) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
      wr[0] = v.x;
      wr[1] = v.y;
    } else {
#pragma unroll
      for (int b = 0; b < 8; ++b) wr[b / 4] |= static_cast<uint32_t>(__ldg(src + b)) << (8 * (b % 4));
    }
    zb = kMagic + static_cast<float>(__ldg(a.zero + n * (a.K / a.group_size) + k0 / a.group_size));
  } else {
    const int64_t kk = k0 + 16 * h;
    const uint8_t* src = a.w + n * a.K + kk;
    if constexpr (ALIGNED_W) {  // K % 16 == 0: the 16 bytes are wholly inside or outside K
      if (kk < a.K) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
        wr[0] = v.x;
        wr[1] = v.y;
        wr[2] = v.z;
        wr[3] = v.w;
      }
    } else {
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        if (kk + b < a.K) wr[b / 4] |= static_cast<uint32_t>(__ldg(src + b)) << (8 * (b % 4));
      }
    }
  }
}

// The 16 weights of load_w_regs as T (int8 q, int4 q - z) into sb row t / 2, columns 16 (t % 2)..
// Out-of-range int8 bytes are 0 (q = 0); out-of-range int4 rows have zb = 2^23 and q = 0.
template <typename T, bool INT4>
__device__ __forceinline__ void store_w_tile(T* sb, const uint32_t (&wr)[4], float zb) {
  const int r = threadIdx.x / 2, h = threadIdx.x % 2;
  uint32_t p[8];  // 16 T values, 2 per word, lower k in the low half
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float lo, hi;
    if constexpr (INT4) {
      lo = magic_nibble(wr[i / 4], 2 * (i % 4)) - zb;
      hi = magic_nibble(wr[i / 4], 2 * (i % 4) + 1) - zb;
    } else {
      const uint32_t w = s8_bias(wr[i / 2]);
      lo = magic_byte(w, 2 * (i % 2)) - kMagicS8;
      hi = magic_byte(w, 2 * (i % 2) + 1) - kMagicS8;
    }
    p[i] = attn::pack2<T>(lo, hi);
  }
  uint4* dst = reinterpret_cast<uint4*>(sb + r * kLd + 16 * h);  // 16-byte aligned (80 r + 32 h)
  dst[0] = make_uint4(p[0], p[1], p[2], p[3]);
  dst[1] = make_uint4(p[4], p[5], p[6], p[7]);
}

// Split-K: CTA z covers k tiles [z tps, min(k_tiles, (z + 1) tps)) (tps a multiple of G / 32,
// so a split starts and ends on a group boundary) and, when ws is set, writes its fp32 partial
// (times scale[n] for int8, no bias) to ws[z, m, n]; split_reduce sums the partials in z order.
struct SplitK {
  int64_t tiles_per_split;
  float* ws;  // (splits, M, N) or null (no split: the epilogue writes out)
};

template <typename T, bool INT4, bool ALIGNED_X, bool ALIGNED_W>
__global__ void __launch_bounds__(kThreads) wo_gemm(WoArgs a, SplitK sk) {
  __shared__ __align__(16) GemmSmem<T> sm;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / 2, wn = warp % 2;  // warp tile rows 32 wm.., columns 32 wn..
  const int gid = lane >> 2, tig = lane & 3;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t kt_begin = static_cast<int64_t>(blockIdx.z) * sk.tiles_per_split;
  const int64_t kt_end = attn::min64(attn::ceil_div(a.K, kBK), kt_begin + sk.tiles_per_split);
  const int64_t groups = INT4 ? a.K / a.group_size : 1;

  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM; m0 < a.M;
       m0 += static_cast<int64_t>(gridDim.y) * kBM) {
    float acc[2][4][4];
    float part[2][4][4];  // int4: the current group's sum (unused for int8)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = part[i][j][e] = 0.f;
      }
    }
    uint32_t wr[4];
    float zb;
    __syncthreads();  // the previous row block's last reads of stage 0 are done
    load_x_tile<T, ALIGNED_X>(sm.a[0], x, a.M, a.K, m0, kt_begin * kBK);
    attn::cp_async_commit();
    load_w_regs<INT4, ALIGNED_W>(wr, zb, a, n0, kt_begin * kBK);
    store_w_tile<T, INT4>(sm.b[0], wr, zb);
    attn::cp_async_wait_all();
    __syncthreads();

    for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
      const int s = static_cast<int>((kt - kt_begin) & 1);
      const bool more = kt + 1 < kt_end;
      if (more) {  // prefetch tile kt + 1 into stage s ^ 1 (last read in iteration kt - 1)
        load_x_tile<T, ALIGNED_X>(sm.a[s ^ 1], x, a.M, a.K, m0, (kt + 1) * kBK);
        attn::cp_async_commit();
        load_w_regs<INT4, ALIGNED_W>(wr, zb, a, n0, (kt + 1) * kBK);
      }
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        uint32_t af[2][4], bf[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          attn::ldsm_x4(af[i], attn::a_addr<kLd>(sm.a[s], wm * 32 + i * 16, kk * 16, lane));
#pragma unroll
        for (int p = 0; p < 2; ++p)
          attn::ldsm_x4(bf[p], attn::bn_addr<kLd>(sm.b[s], wn * 32 + p * 16, kk * 16, lane));
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t b0 = bf[j / 2][2 * (j % 2)], b1 = bf[j / 2][2 * (j % 2) + 1];
            if constexpr (INT4) {
              attn::mma<T>(part[i][j], af[i], b0, b1);
            } else {
              attn::mma<T>(acc[i][j], af[i], b0, b1);
            }
          }
        }
      }
      if constexpr (INT4) {
        const int64_t k0 = kt * kBK;
        if ((k0 + kBK) % a.group_size == 0) {  // the group of k0 ends with this tile
          const int64_t g = k0 / a.group_size;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int64_t n = n0 + wn * 32 + j * 8 + 2 * tig + e;
              const float sc = n < a.N ? __ldg(a.scale + n * groups + g) : 0.f;
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                acc[i][j][e] = fmaf(sc, part[i][j][e], acc[i][j][e]);
                acc[i][j][e + 2] = fmaf(sc, part[i][j][e + 2], acc[i][j][e + 2]);
                part[i][j][e] = part[i][j][e + 2] = 0.f;
              }
            }
          }
        }
      }
      if (more) store_w_tile<T, INT4>(sm.b[s ^ 1], wr, zb);
      attn::cp_async_wait_all();
      __syncthreads();
    }

    // Epilogue: out[m, n] = acc * (int8: scale[n]) + bias[n], rounded once to T.
    T* __restrict__ out = static_cast<T*>(a.out);
    const T* __restrict__ bias = static_cast<const T*>(a.bias);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t n = n0 + wn * 32 + j * 8 + 2 * tig + e;
        if (n >= a.N) continue;
        const float mul = INT4 ? 1.f : a.scale[n];
        const float add = bias != nullptr && sk.ws == nullptr ? to_f(bias[n]) : 0.f;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t m = m0 + wm * 32 + i * 16 + gid + 8 * h;
            if (m >= a.M) continue;
            if (sk.ws != nullptr) {
              sk.ws[(static_cast<int64_t>(blockIdx.z) * a.M + m) * a.N + n] = acc[i][j][e + 2 * h] * mul;
            } else {
              out[m * a.N + n] = from_f<T>(fmaf(acc[i][j][e + 2 * h], mul, add));
            }
          }
        }
      }
    }
  }
}

// out[m, n] = sum_z ws[z, m, n] (z in order: deterministic) + bias[n], rounded once to T.
template <typename T>
__global__ void __launch_bounds__(256) split_reduce(const float* __restrict__ ws, const T* __restrict__ bias,
                                                    T* __restrict__ out, int64_t M, int64_t N, int splits) {
  const int64_t total = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * 256) {
    float v = bias != nullptr ? to_f(bias[i % N]) : 0.f;
    for (int z = 0; z < splits; ++z) v += ws[z * total + i];
    out[i] = from_f<T>(v);
  }
}

template <typename T, bool INT4>
void launch_typed(const WoArgs& a, const QuantLinear& q, bool aligned_x, bool aligned_w,
                  cudaStream_t stream) {
  const int64_t gx = attn::ceil_div(a.N, kBN), gy = std::min<int64_t>(attn::ceil_div(a.M, kBM), 65535);
  TORCH_CHECK(gx <= 0x7fffffff, "fastattn: N too large for the CUDA GEMM");
  // Split K when the output tiles alone leave SMs idle (small M): aim at 2 CTAs an SM, each split
  // at least 8 k tiles (256 columns) and a whole number of groups.
  const int64_t k_tiles = attn::ceil_div(a.K, kBK);
  const int64_t tpg = INT4 ? a.group_size / kBK : 1;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = 1;
  if (gx * gy < 2 * sms) {
    const int64_t max_splits = std::max<int64_t>(1, k_tiles / std::max<int64_t>(8, tpg));
    splits = std::min<int64_t>({attn::ceil_div(2 * sms, gx * gy), max_splits, 16});
  }
  int64_t tps = attn::ceil_div(attn::ceil_div(k_tiles, splits), tpg) * tpg;
  splits = attn::ceil_div(k_tiles, tps);  // no empty split
  at::Tensor ws;
  SplitK sk{tps, nullptr};
  if (splits > 1) {
    ws = at::empty({splits, a.M, a.N}, q.x.options().dtype(at::kFloat));
    sk.ws = ws.data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
  if (aligned_x && aligned_w) {
    wo_gemm<T, INT4, true, true><<<grid, kThreads, 0, stream>>>(a, sk);
  } else if (aligned_x) {
    wo_gemm<T, INT4, true, false><<<grid, kThreads, 0, stream>>>(a, sk);
  } else if (aligned_w) {
    wo_gemm<T, INT4, false, true><<<grid, kThreads, 0, stream>>>(a, sk);
  } else {
    wo_gemm<T, INT4, false, false><<<grid, kThreads, 0, stream>>>(a, sk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t blocks = std::min<int64_t>(attn::ceil_div(a.M * a.N, 256), 8 * sms);
    split_reduce<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        sk.ws, static_cast<const T*>(a.bias), static_cast<T*>(a.out), a.M, a.N, static_cast<int>(splits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_wo_gemm(const QuantLinear& q, bool int4, cudaStream_t stream) {
  const WoArgs a = wo_args(q);
  const bool aligned_x = q.K % 8 == 0 && aligned_to(a.x, 16);
  // int4 rows are K / 2 bytes with K % 32 == 0 (16-byte multiples); 8-byte loads need an
  // 8-byte aligned base. int8 16-byte loads need K % 16 == 0 and a 16-byte aligned base.
  const bool aligned_w = int4 ? aligned_to(a.w, 8) : (q.K % 16 == 0 && aligned_to(a.w, 16));
  if (q.x.scalar_type() == at::kHalf) {
    if (int4) launch_typed<__half, true>(a, q, aligned_x, aligned_w, stream);
    else launch_typed<__half, false>(a, q, aligned_x, aligned_w, stream);
  } else {
    TORCH_CHECK(q.x.scalar_type() == at::kBFloat16, "fastattn: the CUDA quantized GEMM takes "
                "float16 or bfloat16 x, got ", q.x.scalar_type());
    if (int4) launch_typed<__nv_bfloat16, true>(a, q, aligned_x, aligned_w, stream);
    else launch_typed<__nv_bfloat16, false>(a, q, aligned_x, aligned_w, stream);
  }
}

}  // namespace fastattn::cuda::quant
