// fastattn::sdpa forward on CUDA (FlashAttention-2 on tensor cores): the kernel and its launch.
// Layouts, helpers and the host checks: kernels/cuda/attention_common.cuh; the operator:
// kernels/cuda/attention.cu.
//
// One CTA (4 warps) per (block of BM = 64 queries, b * Hq + h) over the largest sequence
// (varlen: sequence b's blocks past its L_b exit at once); warp w owns queries m0 + 16 w ..
// m0 + 16 w + 15 (sequence-local; tensor rows row_q + i). The CTA walks only the key blocks
// that meet its rows' window [i0 + d - left, i_last + d + right] (causal: right = 0); per block,
// in each warp:
//   S (16 x BN)  = Q K^T                 mma, Q as A fragments (registers for E <= 64, else
//                                         ldmatrix from shared memory each block), K via ldmatrix
//   z = s + alibi + mask, in log2 units  (s = scale S, or softcap tanh(scale S / softcap);
//                                         -inf: masked, outside the window, j >= S_b)
// ALiBi / softcap run in the MODS instantiation only, so the plain kernel keeps its registers.
//   m_new = max(m, rowmax z); alpha = 2^(m - m_new); p = 2^(z - m_new)
//   l = alpha l + rowsum p (before dropout); O = alpha O + (p * keep) V   (V: ldmatrix .trans)
// Row max / sum: each thread holds 2 rows (gid, gid + 8) of the tile; the 4 threads of a quad
// share a row (shuffles over lanes ^1, ^2). At the end out = O / l / (1 - dropout_p) and
// lse = (m + log2 l) ln 2; a row with no unmasked key (l == 0) gets out = 0, lse = +inf.
// Shared memory: Q (BM x E), K and V (BN x E each), rows padded to E + 8 elements. Copies are
// cp.async and overlap compute: V_j is fetched during S = Q K_j^T, K_{j+1} during O += P V_j.
// The output goes through shared memory (Q's tile) for 16-byte coalesced stores.
#include "attention_scores.cuh"

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
  // The MODS (ALiBi / softcap) kernels: one CTA less per SM at E <= 64 (the softcap's tanhf and
  // the ALiBi distances do not fit 128 registers without spills).
  static constexpr int min_blocks(bool mods) { return mods && E <= 64 ? 3 : kMinBlocks; }
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
template <typename T, int E, bool MODS>
__global__ void __launch_bounds__(kThreads, FwdCfg<E>::min_blocks(MODS))
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
  const int64_t b = blockIdx.x / g.Hq, h = blockIdx.x % g.Hq, hk = h / (g.Hq / g.Hkv);
  const bool dropout = g.dropout_p > 0.f;
  const float rkeep = 1.f / (1.f - g.dropout_p);

  for (int64_t mb = blockIdx.y; mb < n_mblocks; mb += gridDim.y) {
    const int64_t m0 = (n_mblocks - 1 - mb) * BM;  // last query blocks first: longest under causal
    // Sequence b (re-read per query block and again for the stores: registers are tight, and
    // what is derived from it is dead during the key loop).
    const SeqI sq = seq_of(g, b);  // tensor batch tb, first rows, lengths L_b / S_b, diagonal
    if (m0 >= sq.L) continue;      // past this sequence (varlen): no rows
    const T* q = static_cast<const T*>(a.q) + sq.tb * g.q_sb + h * g.q_sh + sq.row_q * g.q_sl;  // (L_b, E)
    const T* k = static_cast<const T*>(a.k) + sq.tb * g.k_sb + hk * g.k_sh + sq.row_k * g.k_ss;  // (S_b, E)
    const T* v = static_cast<const T*>(a.v) + sq.tb * g.v_sb + hk * g.v_sh + sq.row_k * g.v_ss;  // (S_b, E)
    const ScoreCtx sc = make_score_ctx<T>(g, a.mask, b, h, sq);
    const int64_t row_w = m0 + warp * 16;          // this warp's first query
    int64_t n_lo, n_hi;                            // keys any row of the block can see
    keys_for_rows(m0, min64(m0 + BM, sq.L) - 1, sq.S, sc.diag, sc.wl, sc.wr, n_lo, n_hi);
    const int64_t jb = n_lo / BN, je = n_hi > n_lo ? ceil_div(n_hi, BN) : jb;  // key blocks

    const RowBounds rb = row_bounds<false>(sc, static_cast<int>(row_w), lane);  // visible keys per row
    load_tile<BM, E, LD>(sQ, q, g.q_sl, m0, sq.L);
    if (je > jb) load_tile<BN, E, LD>(sK, k, g.k_ss, jb * BN, sq.S);
    cp_async_commit();

    uint32_t qf[C::kQRegs ? KQ : 1][4];
    float o[OT][4];
    zero_acc(o);
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    for (int64_t j = jb; j < je; ++j) {
      const int64_t n0 = j * BN;
      cp_async_wait_all();
      __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j-1}
      load_tile<BN, E, LD>(sV, v, g.v_ss, n0, sq.S);
      cp_async_commit();
      if constexpr (C::kQRegs) {
        if (j == jb) {
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
      const bool full = tile_full<MODS>(sc, rb, static_cast<int>(n0), BN);
      scores_log2<T, false, MODS>(s, sc, rb, static_cast<int>(row_w), static_cast<int>(n0), full, lane);
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
        apply_bits(s, dropout_bits<false, NT>(g, b, h, static_cast<int>(row_w), static_cast<int>(n0), lane), 1.f);
      }

      cp_async_wait_all();
      __syncthreads();  // V_j landed; every warp is done with K_j
      if (j + 1 < je) {
        load_tile<BN, E, LD>(sK, k, g.k_ss, n0 + BN, sq.S);
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
    const SeqI so = seq_of(g, b);
    const int64_t bh = static_cast<int64_t>(so.tb) * g.Hq + h;  // flat (tensor batch, head)
    T* out = static_cast<T*>(a.out) + (bh * g.Lt + so.row_q) * E;  // (L_b, E) rows of (Lt, E)
    float* lse = a.lse + bh * g.Lt + so.row_q;                      // (L_b,)
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
        if (i < so.L) lse[i] = l_run[r] > 0.f ? (m_run[r] + log2f(l_run[r])) * kLn2 : INFINITY;
      }
    }
    cp_async_wait_all();
    __syncthreads();  // every warp is done with sQ / sV (and Q's copies landed when no key block)
    acc_to_smem<T, LD>(sQ, o, warp * 16, 0, 1.f, lane);
    __syncthreads();
    store_tile<BM, E, LD>(out, E, sQ, m0, so.L);
    __syncthreads();  // sQ is refilled by the next query block
  }
}

template <typename T, int E, bool MODS>
void launch_forward(const AttnForwardArgs& a, cudaStream_t stream) {
  using C = FwdCfg<E>;
  const int64_t n_mblocks = ceil_div(a.g.L, C::BM);
  const size_t smem = C::template smem_bytes<T>();
  const auto kernel = attn_fwd_kernel<T, E, MODS>;
  set_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(a.g.B * a.g.Hq), grid_y(n_mblocks));
  kernel<<<grid, kThreads, smem, stream>>>(a, n_mblocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void attention_forward_cuda(const AttnForwardArgs& a, cudaStream_t stream) {
  if (a.g.B * a.g.Hq == 0 || a.g.L == 0) return;
  const bool mods = a.g.alibi != nullptr || a.g.softcap > 0.f;  // the MODS instantiation
  dispatch_attention(a.dtype, a.g.E, [&](auto t, auto e) {
    if (mods) {
      launch_forward<decltype(t), decltype(e)::value, true>(a, stream);
    } else {
      launch_forward<decltype(t), decltype(e)::value, false>(a, stream);
    }
  });
}

}  // namespace fastattn::cuda::attn
