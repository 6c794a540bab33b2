// fastattn::sdpa forward on CUDA (FlashAttention-2 on tensor cores): the kernel and its launch.
// Layouts, helpers and the host checks: kernels/cuda/attention_common.cuh; the operator:
// kernels/cuda/attention.cu.
//
// One CTA (4 warps) per (block of BM = 64 queries, b * Hq + h); warp w owns queries
// m0 + 16 w .. m0 + 16 w + 15. The CTA walks key blocks of BN keys (under is_causal only those
// up to its last query); per block, in each warp:
//   S (16 x BN)  = Q K^T                 mma, Q as A fragments (registers for E <= 64, else
//                                         ldmatrix from shared memory each block), K via ldmatrix
//   z = S scale log2(e) + mask log2(e)   (-inf: masked, causal j > i, j >= S)
//   m_new = max(m, rowmax z); alpha = 2^(m - m_new); p = 2^(z - m_new)
//   l = alpha l + rowsum p (before dropout); O = alpha O + (p * keep) V   (V: ldmatrix .trans)
// Row max / sum: each thread holds 2 rows (gid, gid + 8) of the tile; the 4 threads of a quad
// share a row (shuffles over lanes ^1, ^2). At the end out = O / l / (1 - dropout_p) and
// lse = (m + log2 l) ln 2; a row with no unmasked key (l == 0) gets out = 0, lse = +inf.
// Shared memory: Q (BM x E), K and V (BN x E each), rows padded to E + 8 elements. Copies are
// cp.async and overlap compute: V_j is fetched during S = Q K_j^T, K_{j+1} during O += P V_j.
// The output goes through shared memory (Q's tile) for 16-byte coalesced stores.
#include "attention_common.cuh"

namespace fastattn::cuda::attn {
namespace {

// Per head dim: tiles, where Q's fragments live, and the CTAs an SM should hold (the register
// budget ptxas gets: 65536 / (128 * kMinBlocks), at most 255; none of them spills, see
// `nvcc -Xptxas -v`).
template <int E>
struct FwdCfg {
  static constexpr int BM = 16 * kWarps;         // queries per CTA, 16 per warp
  static constexpr int BN = E <= 128 ? 64 : 32;  // keys per block
  static constexpr bool kQRegs = E <= 64;        // Q fragments in registers, else ldmatrix per block
  static constexpr int kMinBlocks = E <= 64 ? 4 : (E == 128 ? 3 : 1);
  static constexpr int LD = E + 8;               // shared-memory row pitch (elements)
  static constexpr int NT = BN / 8;              // score n-tiles per warp
  static constexpr int OT = E / 8;               // output n-tiles per warp
  static constexpr int KQ = E / 16;              // k-steps over E
  template <typename T>
  static constexpr size_t smem_bytes() {
    return static_cast<size_t>(BM + 2 * BN) * LD * sizeof(T);
  }
};

// Grid: (B * Hq, min(query blocks, 65535)); a CTA walks query blocks y, y + gridDim.y, ...
template <typename T, int E>
__global__ void __launch_bounds__(kThreads, FwdCfg<E>::kMinBlocks)
    attn_fwd_kernel(const AttnForwardArgs a, int64_t n_mblocks) {
  using C = FwdCfg<E>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD, NT = C::NT, OT = C::OT, KQ = C::KQ;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (BM, LD); the output tile at the end
  T* sK = sQ + BM * LD;                     // (BN, LD)
  T* sV = sK + BN * LD;                     // (BN, LD)

  const AttnGeometry& g = a.g;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t bh = blockIdx.x, b = bh / g.Hq, h = bh % g.Hq, hk = h / (g.Hq / g.Hkv);
  const T* q = static_cast<const T*>(a.q) + b * g.q_sb + h * g.q_sh;   // (L, E), row stride q_sl
  const T* k = static_cast<const T*>(a.k) + b * g.k_sb + hk * g.k_sh;  // (S, E), row stride k_ss
  const T* v = static_cast<const T*>(a.v) + b * g.v_sb + hk * g.v_sh;  // (S, E), row stride v_ss
  T* out = static_cast<T*>(a.out) + bh * g.L * E;                      // (L, E) contiguous
  float* lse = a.lse + bh * g.L;                                       // (L,)
  const ScoreCtx sc = make_score_ctx<T>(g, a.mask, b, h);
  const bool has_mask = g.mask_kind != AttnMaskKind::None;
  const bool dropout = g.dropout_p > 0.f;
  const float rkeep = 1.f / (1.f - g.dropout_p);

  for (int64_t mb = blockIdx.y; mb < n_mblocks; mb += gridDim.y) {
    const int64_t m0 = (n_mblocks - 1 - mb) * BM;  // last query blocks first: longest under causal
    const int64_t row_w = m0 + warp * 16;          // this warp's first query
    const int64_t n_end = g.is_causal ? min64(g.S, m0 + BM) : g.S;
    const int64_t nb = ceil_div(n_end, BN);

    load_tile<BM, E, LD>(sQ, q, g.q_sl, m0, g.L);
    if (nb > 0) load_tile<BN, E, LD>(sK, k, g.k_ss, 0, g.S);
    cp_async_commit();

    uint32_t qf[C::kQRegs ? KQ : 1][4];
    float o[OT][4];
    zero_acc(o);
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    for (int64_t j = 0; j < nb; ++j) {
      const int64_t n0 = j * BN;
      cp_async_wait_all();
      __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
      load_tile<BN, E, LD>(sV, v, g.v_ss, n0, g.S);
      cp_async_commit();
      if constexpr (C::kQRegs) {
        if (j == 0) {
#pragma unroll
          for (int kk = 0; kk < KQ; ++kk) ldsm_x4(qf[kk], a_addr<LD>(sQ, warp * 16, kk * 16, lane));
        }
      }

      // S = Q K_j^T (16 x BN per warp), float32.
      float s[NT][4];
      zero_acc(s);
#pragma unroll
      for (int kk = 0; kk < KQ; ++kk) {
        uint32_t af[4];
        if constexpr (C::kQRegs) {
#pragma unroll
          for (int r = 0; r < 4; ++r) af[r] = qf[kk][r];
        } else {
          ldsm_x4(af, a_addr<LD>(sQ, warp * 16, kk * 16, lane));
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t bf[4];
          ldsm_x4(bf, bn_addr<LD>(sK, np * 16, kk * 16, lane));
          mma<T>(s[2 * np], af, bf[0], bf[1]);
          mma<T>(s[2 * np + 1], af, bf[2], bf[3]);
        }
      }

      // Online softmax (log2 units) on this warp's rows.
      const bool full = !has_mask && n0 + BN <= g.S && !(g.is_causal && n0 + BN - 1 > row_w);
      scores_log2<T, false>(s, sc, row_w, n0, full, lane);
      float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
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
      for (int nt = 0; nt < NT; ++nt) {
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
      if (dropout) {  // p * keep; 1 / (1 - dropout_p) is applied to O at the end
        apply_bits(s, dropout_bits<false, NT>(g, bh, row_w, n0, lane), 1.f);
      }

      cp_async_wait_all();
      __syncthreads();  // V_j landed; every warp is done with K_j
      if (j + 1 < nb) {
        load_tile<BN, E, LD>(sK, k, g.k_ss, n0 + BN, g.S);
        cp_async_commit();
      }

      // O += P V_j: P from the score accumulators (as T), V via ldmatrix .trans.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t pa[4];
        acc_to_a<T>(pa, s, kk);
#pragma unroll
        for (int np = 0; np < E / 16; ++np) {
          uint32_t bf[4];
          ldsm_x4_trans(bf, bk_addr<LD>(sV, kk * 16, np * 16, lane));
          mma<T>(o[2 * np], pa, bf[0], bf[1]);
          mma<T>(o[2 * np + 1], pa, bf[2], bf[3]);
        }
      }
    }

    // out = O / l (/ (1 - dropout_p)); lse = (m + log2 l) ln 2; l == 0: out 0, lse +inf.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
      inv[r] = l_run[r] > 0.f ? rkeep / l_run[r] : 0.f;
    }
#pragma unroll
    for (int ot = 0; ot < OT; ++ot) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[ot][e] *= inv[e >> 1];
    }
    if (tig == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = row_w + gid + 8 * r;
        if (i < g.L) lse[i] = l_run[r] > 0.f ? (m_run[r] + log2f(l_run[r])) * kLn2 : INFINITY;
      }
    }
    cp_async_wait_all();
    __syncthreads();  // every warp is done with sQ / sV (and Q's copies landed when nb == 0)
    acc_to_smem<T, LD>(sQ, o, warp * 16, 0, 1.f, lane);
    __syncthreads();
    store_tile<BM, E, LD>(out, E, sQ, m0, g.L);
    __syncthreads();  // sQ is refilled by the next query block
  }
}

template <typename T, int E>
void launch_forward(const AttnForwardArgs& a, cudaStream_t stream) {
  using C = FwdCfg<E>;
  const int64_t n_mblocks = ceil_div(a.g.L, C::BM);
  const size_t smem = C::template smem_bytes<T>();
  const auto kernel = attn_fwd_kernel<T, E>;
  set_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(a.g.B * a.g.Hq), grid_y(n_mblocks));
  kernel<<<grid, kThreads, smem, stream>>>(a, n_mblocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void attention_forward_cuda(const AttnForwardArgs& a, cudaStream_t stream) {
  if (a.g.B * a.g.Hq == 0 || a.g.L == 0) return;
  dispatch_attention(a.dtype, a.g.E, [&](auto t, auto e) {
    launch_forward<decltype(t), decltype(e)::value>(a, stream);
  });
}

}  // namespace fastattn::cuda::attn
