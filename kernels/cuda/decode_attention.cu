// fastattn::decode_attention on CUDA: split-K ("flash-decoding") attention of Lq new tokens per
// sequence over a paged or contiguous KV cache. Contract: DecodeArgs in fastattn/attention_args.h
// (host preparation: fastattn/decode_host.h); tensor-core helpers: attention_common.cuh.
//
// decode_split_kernel: grid (B * Hkv * row tiles, num_splits), 4 warps. A CTA owns one kv head
// of one sequence, a tile of 16 of its R = Lq * (Hq / Hkv) query rows (row r = gq * Lq + i: query
// head hk * G + gq, token i) and split s's keys [s * split_len, (s + 1) * split_len), clipped to
// the keys any of the rows can see (seqlen, window). It streams that range in tiles of 64 keys
// through a STAGES-deep cp.async pipeline (16-byte copies of K / V rows gathered page by page
// through block_table), each warp taking 16 keys of a tile:
//   S (16 rows x 16 keys) = Q K^T (mma m16n8k16), z = s' + alibi in log2 units (-inf: invisible),
//   per-warp online softmax (m, l), O += P V (mma, V via ldmatrix .trans).
// The 4 warps' (m, l, O) are combined in shared memory in a fixed order. num_splits == 1: the
// CTA writes out (B, Lq, Hq, Ev) and lse (B, Hq, Lq); else its normalised partial and its
// log-sum-exp (-inf, partial 0 when it saw no key) go to the workspace and decode_reduce_kernel
// combines the splits (fixed order: deterministic). Rows with no visible key: out 0, lse +inf.
// float16 / bfloat16, E == Ev in {64, 128, 256} (others: the Triton backend).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention_common.cuh"
#include "fastattn/decode_host.h"

namespace fastattn::cuda::attn {
namespace {

template <int E>
struct DecCfg {
  static constexpr int BN = 16 * kWarps;                         // keys per tile, 16 per warp
  static constexpr int STAGES = E <= 64 ? 4 : (E <= 128 ? 3 : 2);  // tiles in flight
  static constexpr int LD = E + 8;                               // smem row pitch (elements)
  static constexpr bool kQRegs = E <= 64;  // Q fragments in registers, else ldmatrix per tile
  static constexpr int OLD = E + 4;        // pitch of the float combine buffer
  template <typename T>
  static constexpr size_t stage_bytes() { return static_cast<size_t>(2 * BN) * LD * sizeof(T); }
  template <typename T>
  static constexpr size_t smem_bytes() {  // Q (16, LD); STAGES x (K, V) (BN, LD)
    return static_cast<size_t>(16) * LD * sizeof(T) + STAGES * stage_bytes<T>();
  }
  // The combine buffer (m, l: kWarps x 16 floats each; O: kWarps x 16 x OLD floats) reuses the
  // stage buffers once the key loop is done.
  static constexpr size_t combine_bytes() { return (2 * kWarps * 16 + kWarps * 16 * OLD) * 4; }
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Keys [t0, t0 + BN) of sequence b into sK / sV (rows of E elements, pitch LD), zeros for keys
// >= t_end. CTA-wide, cp.async (land after the matching wait + __syncthreads()).
template <int E, typename T>
__device__ __forceinline__ void load_kv_tile(T* sK, T* sV, const DecodeArgs& a, const T* kbase,
                                             const T* vbase, const int32_t* bt_row, int64_t b,
                                             int64_t t0, int64_t t_end) {
  using C = DecCfg<E>;
  constexpr int CPR = E / 8;  // 16-byte chunks a row
  static_assert((C::BN * CPR) % kThreads == 0, "tile shape");
  const int ps = static_cast<int>(a.page_size);
#pragma unroll 1
  for (int c = static_cast<int>(threadIdx.x); c < C::BN * CPR; c += kThreads) {
    const int r = c / CPR, col = (c % CPR) * 8;
    const int64_t t = t0 + r;
    T* dk = sK + r * C::LD + col;
    T* dv = sV + r * C::LD + col;
    if (t < t_end) {
      const int tt = static_cast<int>(t), pi = tt / ps, slot = tt - pi * ps;
      const int64_t page = bt_row != nullptr ? static_cast<int64_t>(bt_row[pi]) : b;
      cp_async16(dk, kbase + page * a.k_sp + slot * a.k_ss + col);
      cp_async16(dv, vbase + page * a.v_sp + slot * a.v_ss + col);
    } else {
      *reinterpret_cast<uint4*>(dk) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(dv) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <typename T, int E>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(const DecodeArgs a, int n_rt) {
  using C = DecCfg<E>;
  constexpr int BN = C::BN, LD = C::LD, STAGES = C::STAGES, KQ = E / 16, OT = E / 8, OLD = C::OLD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (16, LD)
  T* sKV = sQ + 16 * LD;                    // STAGES x [K (BN, LD), V (BN, LD)]

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t rt = blockIdx.x % n_rt, bk = blockIdx.x / n_rt, b = bk / a.Hkv, hk = bk % a.Hkv;
  const int64_t split = blockIdx.y, G = a.Hq / a.Hkv, R = a.Lq * G;
  const int64_t n = a.seqlens[b];  // tokens in the cache, the Lq queries' included

  // This CTA's keys: the split's, clipped to what rows at positions n - Lq .. n - 1 can see.
  int64_t k0 = split * a.split_len, k1 = min64(k0 + a.split_len, n);
  if (a.window_left >= 0 && n - a.Lq - a.window_left > k0) k0 = n - a.Lq - a.window_left;
  if (a.window_right >= 0 && n + a.window_right < k1) k1 = n + a.window_right;
  const int64_t ntiles = k1 > k0 ? ceil_div(k1 - k0, BN) : 0;

  // Q rows of the tile (zeros past R), plain loads: any strides.
  const T* qb = static_cast<const T*>(a.q) + b * a.q_sb;
  for (int x = static_cast<int>(threadIdx.x); x < 16 * E; x += kThreads) {
    const int r = x / E, c = x % E;
    const int64_t rr = rt * 16 + r;
    T val = from_float<T>(0.f);
    if (rr < R) val = qb[(rr % a.Lq) * a.q_sl + (hk * G + rr / a.Lq) * a.q_sh + c];
    sQ[r * LD + c] = val;
  }

  // This thread's rows gid, gid + 8: visible keys [lo, hi) and ALiBi slope (log2 units).
  int64_t lo[2], hi[2], pos[2];
  float slope2[2];
  const float scale_log2 = a.scale * kLog2e;
  const float cap2 = a.softcap > 0.f ? a.softcap * kLog2e : 0.f;
  const float cap_in = a.softcap > 0.f ? a.scale / a.softcap : 0.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t rr = rt * 16 + gid + 8 * r, i = rr % a.Lq, h = hk * G + rr / a.Lq;
    pos[r] = n - a.Lq + i;
    lo[r] = a.window_left >= 0 ? pos[r] - a.window_left : 0;
    hi[r] = a.window_right >= 0 ? pos[r] + a.window_right + 1 : n;
    lo[r] = lo[r] > k0 ? lo[r] : k0;
    hi[r] = hi[r] < k1 ? hi[r] : k1;
    if (rr >= R) lo[r] = hi[r] = 0;  // padding row: sees nothing
    slope2[r] = (a.alibi != nullptr && rr < R) ? a.alibi[b * a.alibi_sb + h] * kLog2e : 0.f;
  }

  const T* kbase = static_cast<const T*>(a.k) + hk * a.k_sh;
  const T* vbase = static_cast<const T*>(a.v) + hk * a.v_sh;
  const int32_t* bt_row = a.block_table != nullptr ? a.block_table + b * a.bt_sb : nullptr;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) {
      T* sK = sKV + s * 2 * BN * LD;
      load_kv_tile<E>(sK, sK + BN * LD, a, kbase, vbase, bt_row, b, k0 + s * BN, k1);
    }
    cp_async_commit();
  }

  uint32_t qf[C::kQRegs ? KQ : 1][4];
  float o[OT][4];
  zero_acc(o);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  for (int64_t j = 0; j < ntiles; ++j) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile j (and Q) landed; every warp is done with tile j - 1's stage
    {
      const int64_t jn = j + STAGES - 1;
      if (jn < ntiles) {
        T* sK = sKV + static_cast<int>(jn % STAGES) * 2 * BN * LD;
        load_kv_tile<E>(sK, sK + BN * LD, a, kbase, vbase, bt_row, b, k0 + jn * BN, k1);
      }
      cp_async_commit();
    }
    const T* tK = sKV + static_cast<int>(j % STAGES) * 2 * BN * LD;
    const T* tV = tK + BN * LD;
    if constexpr (C::kQRegs) {
      if (j == 0) {
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) ldsm_x4(qf[kk], a_addr<LD>(sQ, 0, kk * 16, lane));
      }
    }

    // S = Q K^T: 16 rows x this warp's 16 keys.
    float s[2][4];
    zero_acc(s);
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
      uint32_t af[4], bf[4];
      if constexpr (C::kQRegs) {
#pragma unroll
        for (int r = 0; r < 4; ++r) af[r] = qf[kk][r];
      } else {
        ldsm_x4(af, a_addr<LD>(sQ, 0, kk * 16, lane));
      }
      ldsm_x4(bf, bn_addr<LD>(tK, warp * 16, kk * 16, lane));
      mma<T>(s[0], af, bf[0], bf[1]);
      mma<T>(s[1], af, bf[2], bf[3]);
    }

    // z (log2 units), online softmax on rows gid, gid + 8.
    const int64_t key0 = k0 + j * BN + warp * 16;
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t t = key0 + nt * 8 + tig * 2 + (e & 1);
        float z = -INFINITY;
        if (t >= lo[r] && t < hi[r]) {
          z = cap2 != 0.f ? cap2 * tanhf(s[nt][e] * cap_in) : s[nt][e] * scale_log2;
          const int64_t dist = pos[r] - t;
          z -= slope2[r] * static_cast<float>(dist < 0 ? -dist : dist);
        }
        s[nt][e] = z;
        mx[r] = fmaxf(mx[r], z);
      }
    }
    float m_use[2], alpha[2], rsum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      m_use[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // no key yet: 2^(-inf - 0) = 0, not NaN
      alpha[r] = exp2f(m_run[r] - m_use[r]);
      m_run[r] = mx[r];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - m_use[e >> 1]);
        rsum[e >> 1] += p;
        s[nt][e] = p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rsum[r];  // per-thread partial
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[ot][e] *= alpha[e >> 1];
    }

    // O += P V: P (16 x 16 keys) as the A operand, V rows warp * 16 .. via ldmatrix .trans.
    uint32_t pa[4];
    acc_to_a<T>(pa, s, 0);
#pragma unroll
    for (int np = 0; np < E / 16; ++np) {
      uint32_t bf[4];
      ldsm_x4_trans(bf, bk_addr<LD>(tV, warp * 16, np * 16, lane));
      mma<T>(o[2 * np], pa, bf[0], bf[1]);
      mma<T>(o[2 * np + 1], pa, bf[2], bf[3]);
    }
  }

  // Combine the warps (fixed order) in shared memory, over the stage buffers.
  cp_async_wait_all();
  __syncthreads();  // every warp is done with the stages (and Q landed when ntiles == 0)
  float* cm = reinterpret_cast<float*>(sKV);  // (kWarps, 16) row maxima (log2 units)
  float* cl = cm + kWarps * 16;               // (kWarps, 16) row sums
  float* co = cl + kWarps * 16;               // (kWarps, 16, OLD) partial outputs
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    if (tig == 0) {
      cm[warp * 16 + gid + 8 * r] = m_run[r];
      cl[warp * 16 + gid + 8 * r] = l_run[r];
    }
  }
  __syncthreads();
  // Row totals: M = max_w m_w, L = sum_w l_w 2^(m_w - M) (l_w = 0 where m_w = -inf).
  auto row_total = [&](int row, float& M, float& Lsum) {
    M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, cm[w * 16 + row]);
    Lsum = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float mw = cm[w * 16 + row];
        if (mw != -INFINITY) Lsum += cl[w * 16 + row] * exp2f(mw - M);
      }
    }
  };
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = gid + 8 * r;
    float M, Lsum;
    row_total(row, M, Lsum);
    const float f = (Lsum > 0.f && m_run[r] != -INFINITY) ? exp2f(m_run[r] - M) / Lsum : 0.f;
    float* dst = co + (warp * 16 + row) * OLD;
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
      *reinterpret_cast<float2*>(dst + ot * 8 + tig * 2) = make_float2(o[ot][2 * r] * f, o[ot][2 * r + 1] * f);
    }
  }
  __syncthreads();

  const int64_t ns = a.num_splits;
  for (int x = static_cast<int>(threadIdx.x); x < 16 * E; x += kThreads) {
    const int r = x / E, c = x % E;
    const int64_t rr = rt * 16 + r;
    if (rr >= R) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += co[(w * 16 + r) * OLD + c];
    const int64_t i = rr % a.Lq, h = hk * G + rr / a.Lq, row = (b * a.Hq + h) * a.Lq + i;
    if (ns == 1) {
      static_cast<T*>(a.out)[((b * a.Lq + i) * a.Hq + h) * E + c] = from_float<T>(v);
    } else {
      a.ws_out[(row * ns + split) * E + c] = v;
    }
  }
  if (threadIdx.x < 16) {
    const int r = static_cast<int>(threadIdx.x);
    const int64_t rr = rt * 16 + r;
    if (rr < R) {
      float M, Lsum;
      row_total(r, M, Lsum);
      const int64_t i = rr % a.Lq, h = hk * G + rr / a.Lq, row = (b * a.Hq + h) * a.Lq + i;
      const float lse = Lsum > 0.f ? (M + log2f(Lsum)) * kLn2 : (ns == 1 ? INFINITY : -INFINITY);
      if (ns == 1) {
        a.lse[row] = lse;
      } else {
        a.ws_lse[row * ns + split] = lse;
      }
    }
  }
}

// One warp per output row (b, h, i) = row of (B, Hq, Lq): lse = log sum_s exp(lse_s),
// out = sum_s exp(lse_s - lse) out_s in split order; every lse_s = -inf: lse +inf, out 0.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_reduce_kernel(const DecodeArgs a, int64_t rows) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t ns = a.num_splits, Ev = a.Ev;
  const float* wl = a.ws_lse + row * ns;
  const float* wo = a.ws_out + row * ns * Ev;
  float M = -INFINITY;
  for (int64_t s = lane; s < ns; s += 32) M = fmaxf(M, wl[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
  float sum = 0.f;
  if (M != -INFINITY) {
    for (int64_t s = lane; s < ns; s += 32) sum += expf(wl[s] - M);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const bool empty = M == -INFINITY || !(sum > 0.f);
  const float lse = empty ? INFINITY : M + logf(sum);
  const int64_t b = row / (a.Hq * a.Lq), h = (row / a.Lq) % a.Hq, i = row % a.Lq;
  T* out = static_cast<T*>(a.out) + ((b * a.Lq + i) * a.Hq + h) * Ev;
  for (int64_t c = lane; c < Ev; c += 32) {
    float v = 0.f;
    if (!empty) {
      for (int64_t s = 0; s < ns; ++s) {
        const float w = wl[s];
        if (w != -INFINITY) v += expf(w - lse) * wo[s * Ev + c];
      }
    }
    out[c] = from_float<T>(v);
  }
  if (lane == 0) a.lse[row] = lse;
}

template <typename T, int E>
void launch_decode(const DecodeArgs& a, cudaStream_t stream) {
  using C = DecCfg<E>;
  static_assert(C::combine_bytes() <= C::STAGES * C::template stage_bytes<T>(), "combine buffer");
  const int64_t R = a.Lq * (a.Hq / a.Hkv), n_rt = ceil_div(R, 16);
  const int64_t ctas = a.B * a.Hkv * n_rt;
  TORCH_CHECK(ctas <= INT32_MAX, "fastattn.decode_attention: B * Hkv * row tiles = ", ctas,
              " exceeds the CUDA grid limit");
  const size_t smem = C::template smem_bytes<T>();
  const auto kernel = decode_split_kernel<T, E>;
  set_smem(kernel, smem, "decode_attention");
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(a.num_splits));
  kernel<<<grid, kThreads, smem, stream>>>(a, static_cast<int>(n_rt));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.num_splits > 1) {
    const int64_t rows = a.B * a.Hq * a.Lq;
    const auto blocks = static_cast<unsigned>(ceil_div(rows, kWarps));
    decode_reduce_kernel<T><<<blocks, kThreads, 0, stream>>>(a, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// t itself when 16-byte copies of its rows are legal (see aligned16), else a contiguous copy.
bool rows_aligned16(const at::Tensor& t) {
  if (reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0 && t.numel() > 0) return false;
  for (int d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& alibi_slopes, double scale, int64_t window_left,
    int64_t window_right, double softcap, int64_t max_seqlen, int64_t num_splits) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  DecodeInputs in = prepare_decode(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                                   scale, window_left, window_right, softcap, max_seqlen,
                                   num_splits, 2 * static_cast<int64_t>(prop->multiProcessorCount),
                                   /*min_split=*/256);
  DecodeArgs& a = in.a;
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16,
              "fastattn.decode_attention: the CUDA kernel takes float16/bfloat16, got ", dt,
              " (float32 runs on the Triton backend: backend='triton')");
  TORCH_CHECK(a.E == a.Ev && (a.E == 64 || a.E == 128 || a.E == 256),
              "fastattn.decode_attention: the CUDA kernel takes head dims E == Ev in {64, 128, "
              "256}, got E = ", a.E, ", Ev = ", a.Ev,
              " (other head dims run on the Triton backend: backend='triton')");
  if (!rows_aligned16(in.k)) {  // the kernel's 16-byte copies need aligned rows: copy (slow)
    in.k = in.k.contiguous();
    if (!rows_aligned16(in.k)) in.k = in.k.clone();
    a.k = in.k.data_ptr();
    a.k_sp = in.k.stride(0), a.k_ss = in.k.stride(1), a.k_sh = in.k.stride(2);
  }
  if (!rows_aligned16(in.v)) {
    in.v = in.v.contiguous();
    if (!rows_aligned16(in.v)) in.v = in.v.clone();
    a.v = in.v.data_ptr();
    a.v_sp = in.v.stride(0), a.v_ss = in.v.stride(1), a.v_sh = in.v.stride(2);
  }
  if (a.B * a.Hq * a.Lq == 0) return {in.out, in.lse};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto with_dim = [&](auto t) {
    using T = decltype(t);
    switch (a.E) {
      case 64: return launch_decode<T, 64>(a, stream);
      case 128: return launch_decode<T, 128>(a, stream);
      default: return launch_decode<T, 256>(a, stream);
    }
  };
  if (dt == at::kHalf) {
    with_dim(__half{});
  } else {
    with_dim(__nv_bfloat16{});
  }
  return {in.out, in.lse};
}

}  // namespace
}  // namespace fastattn::cuda::attn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("decode_attention", &fastattn::cuda::attn::decode_attention_cuda);
}
