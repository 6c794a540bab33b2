// fastattn::sdpa_backward on CUDA (FlashAttention-2 algebra on tensor cores): the kernels and their
// launch. Layouts, helpers and host checks: kernels/cuda/attention_common.cuh; the operator:
// kernels/cuda/attention.cu.
//
// p is recomputed from lse (p = 2^(z log2 e - lse log2 e): 0 where z = -inf or lse = +inf, never
// NaN); Z = keep / (1 - dropout_p) (1 without dropout), regenerated from the same Philox spec.
// Three kernels, no atomics (every output element written once, in a fixed order):
//  1. attn_bwd_delta: D_i = sum_e dO_ie O_ie (float32, (B, Hq, L) scratch).
//  2. attn_bwd_dkdv: one CTA per (block of BN keys, b * Hkv + hkv). It walks the group's Hq / Hkv
//     query heads and, per head, the query blocks of BM rows (under is_causal only those with a
//     query >= the block's first key), in a fixed order. Warp w owns 16 keys (and, for E = 256,
//     half of dK / dV's columns: the two warps sharing keys both compute S^T and dP^T):
//       S^T  = K Q^T,  P^T = 2^(z - lse)            (16 x BM; keys are the rows)
//       dP^T = V dO^T, dS^T = P^T (dP^T Z - D)
//       dV  += (P^T Z) dO,  dK += dS^T Q            (float32 registers; dK scaled at the end)
//     Q / dO / lse / D of the next step are fetched (cp.async) while the current one computes.
//  3. attn_bwd_dq: one CTA per (block of 64 queries, b * Hq + h), warp w owns 16 queries; walks
//     the key blocks (causal: up to the diagonal): S = Q K^T, dP = dO V^T,
//     dS = P (dP Z - D), dQ += dS K (scaled at the end). It also writes grad_mask = dS (float32)
//     when asked, including the zeros of key blocks a causal row never reaches.
// grad_out and out are contiguous (B, Hq, L, E); grad_q / grad_k / grad_v are fresh contiguous
// outputs; all tile rows are padded to E + 8 elements in shared memory.
#include "attention_common.cuh"

namespace fastattn::cuda::attn {
namespace {

// Tiles per head dim. None of the instantiations spills (`nvcc -Xptxas -v`).
template <int E>
struct BwdCfg {
  static constexpr int LD = E + 8;  // shared-memory row pitch (elements)
  // dK / dV kernel
  static constexpr int WN = E <= 128 ? 1 : 2;        // warps splitting dK / dV's columns
  static constexpr int KV_BN = 16 * kWarps / WN;     // keys per CTA
  static constexpr int KV_BM = E <= 64 ? 64 : (E <= 128 ? 32 : 16);  // queries per step
  static constexpr int EW = E / WN;                  // dK / dV columns per warp
  static constexpr int KV_MIN_BLOCKS = E <= 64 ? 2 : 1;
  template <typename T>
  static constexpr size_t kv_smem() {  // K, V; Q, dO (2 stages); lse, D ride in Q's row padding
    return static_cast<size_t>(2 * KV_BN + 4 * KV_BM) * LD * sizeof(T);
  }
  // dQ kernel
  static constexpr int Q_BM = 16 * kWarps;           // queries per CTA
  static constexpr int Q_BN = E <= 64 ? 64 : 32;     // keys per step
  static constexpr int Q_STAGES = E <= 128 ? 2 : 1;  // K / V buffers
  static constexpr int Q_MIN_BLOCKS = E <= 64 ? 3 : (E <= 128 ? 2 : 1);
  template <typename T>
  static constexpr size_t q_smem() {  // Q, dO; K, V (Q_STAGES each)
    return static_cast<size_t>(2 * Q_BM + 2 * Q_STAGES * Q_BN) * LD * sizeof(T);
  }
};

constexpr int kDeltaThreads = 256;
// Threads sharing a row in attn_bwd_delta: E / 8 16-byte chunks (4, 8, 12, 16 or 32), rounded up
// to a power of two.
constexpr int delta_tpr(int E) { return E / 8 >= 32 ? 32 : (E / 8 > 8 ? 16 : E / 8); }

// D[row] = sum_e dO[row, e] O[row, e] for rows (B Hq L) of E contiguous elements. TPR threads
// share a row (16 bytes each per step); grid-stride over row groups.
template <typename T, int E>
__global__ void __launch_bounds__(kDeltaThreads)
    attn_bwd_delta_kernel(const T* __restrict__ dO, const T* __restrict__ O, float* __restrict__ D,
                          int64_t rows) {
  constexpr int CH = E / 8;  // 16-byte chunks a row
  constexpr int TPR = delta_tpr(E), RPB = kDeltaThreads / TPR;
  const int sub = static_cast<int>(threadIdx.x) % TPR;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + static_cast<int>(threadIdx.x) / TPR;
    float acc = 0.f;
    if (row < rows) {
      for (int c = sub; c < CH; c += TPR) {
        const uint4 x = *reinterpret_cast<const uint4*>(dO + row * E + c * 8);
        const uint4 y = *reinterpret_cast<const uint4*>(O + row * E + c * 8);
        const T* xp = reinterpret_cast<const T*>(&x);
        const T* yp = reinterpret_cast<const T*>(&y);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(to_float<T>(xp[e]), to_float<T>(yp[e]), acc);
      }
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (row < rows && sub == 0) D[row] = acc;
  }
}

// Grid: (B * Hkv, min(key blocks, 65535)); a CTA walks key blocks y, y + gridDim.y, ...
template <typename T, int E>
__global__ void __launch_bounds__(kThreads, BwdCfg<E>::KV_MIN_BLOCKS)
    attn_bwd_dkdv_kernel(const AttnBackwardArgs a, const float* __restrict__ delta, int64_t n_nblocks) {
  using C = BwdCfg<E>;
  constexpr int BN = C::KV_BN, BM = C::KV_BM, LD = C::LD, WN = C::WN, EW = C::EW;
  constexpr int ST = BM / 8;  // n-tiles of S^T / dP^T (queries) per warp
  constexpr int DT = EW / 8;  // n-tiles of dK / dV per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);              // (BN, LD); dK at the end
  T* sV = sK + BN * LD;                                 // (BN, LD); dV at the end
  T* sQ = sV + BN * LD;                                 // 2 x (BM, LD)
  T* sdO = sQ + 2 * BM * LD;                            // 2 x (BM, LD)
  // lse (log2 units) and D of query row r of a stage live in that Q row's padding (elements
  // E .. E + 7, never touched by the tile copies or ldmatrix): floats 0 and 1 at row_aux(.., r).
  auto row_aux = [&](int st, int r) { return reinterpret_cast<float*>(sQ + (st * BM + r) * LD + E); };

  const AttnGeometry& g = a.g;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int tig = lane & 3;
  const int kr0 = (warp / WN) * 16;  // this warp's keys in the block
  const int c0 = (warp % WN) * EW;   // this warp's dK / dV columns
  const int64_t bk = blockIdx.x, b = bk / g.Hkv, hk = bk % g.Hkv, G = g.Hq / g.Hkv;
  const T* k = static_cast<const T*>(a.k) + b * g.k_sb + hk * g.k_sh;  // (S, E), row stride k_ss
  const T* v = static_cast<const T*>(a.v) + b * g.v_sb + hk * g.v_sh;  // (S, E), row stride v_ss
  const T* q = static_cast<const T*>(a.q) + b * g.q_sb;                // + h q_sh: (L, E)
  const T* dO = static_cast<const T*>(a.grad_out);                     // (B, Hq, L, E)
  T* dk = static_cast<T*>(a.grad_k) + bk * g.S * E;                    // (S, E) contiguous
  T* dv = static_cast<T*>(a.grad_v) + bk * g.S * E;
  const bool has_mask = g.mask_kind != AttnMaskKind::None;
  const bool dropout = g.dropout_p > 0.f;
  const float rkeep = 1.f / (1.f - g.dropout_p);
  const int64_t n_mq = ceil_div(g.L, BM);

  for (int64_t nbk = blockIdx.y; nbk < n_nblocks; nbk += gridDim.y) {
    const int64_t n0 = nbk * BN;
    const int64_t key_w = n0 + kr0;                       // this warp's first key
    const int64_t m_first = g.is_causal ? n0 / BM : 0;    // earlier queries see no key here
    const int64_t nm = n_mq > m_first ? n_mq - m_first : 0;
    const int64_t total = G * nm;                         // steps: (head, query block)

    // Steps run over (head, query block) = (hk G .. hk G + G - 1) x (m_first .. n_mq - 1), query
    // blocks fastest; (h_next, mb_next) is the next step to fetch, (h_cur, mb_cur) the one computed.
    int64_t h_next = hk * G, mb_next = m_first, h_cur = h_next, mb_cur = mb_next;
    auto advance = [&](int64_t& hh, int64_t& mbb) {
      if (++mbb == n_mq) {
        mbb = m_first;
        ++hh;
      }
    };
    // Fetches step (h, mb) into stage st.
    auto issue = [&](int64_t h, int64_t mb, int st) {
      const int64_t m0 = mb * BM, bh = b * g.Hq + h;
      load_tile<BM, E, LD>(sQ + st * BM * LD, q + h * g.q_sh, g.q_sl, m0, g.L);
      load_tile<BM, E, LD>(sdO + st * BM * LD, dO + bh * g.L * E, E, m0, g.L);
      if (threadIdx.x < BM) {
        const int64_t i = m0 + threadIdx.x;
        float* aux = row_aux(st, static_cast<int>(threadIdx.x));
        aux[0] = i < g.L ? a.lse[bh * g.L + i] * kLog2e : INFINITY;
        aux[1] = i < g.L ? delta[bh * g.L + i] : 0.f;
      }
    };

    load_tile<BN, E, LD>(sK, k, g.k_ss, n0, g.S);
    load_tile<BN, E, LD>(sV, v, g.v_ss, n0, g.S);
    if (total > 0) {
      issue(h_next, mb_next, 0);
      advance(h_next, mb_next);
    }
    cp_async_commit();

    float dk_acc[DT][4], dv_acc[DT][4];
    zero_acc(dk_acc);
    zero_acc(dv_acc);

    for (int64_t it = 0; it < total; ++it) {
      cp_async_wait_all();
      __syncthreads();  // step it landed; every warp is done with step it - 1's stage
      if (it + 1 < total) {
        issue(h_next, mb_next, static_cast<int>((it + 1) & 1));
        advance(h_next, mb_next);
        cp_async_commit();
      }
      const int st = static_cast<int>(it & 1);
      const int64_t h = h_cur, m0 = mb_cur * BM;
      advance(h_cur, mb_cur);
      const T* tQ = sQ + st * BM * LD;
      const T* tdO = sdO + st * BM * LD;

      // S^T = K Q^T and dP^T = V dO^T (16 keys x BM queries per warp).
      float s[ST][4], dp[ST][4];
      zero_acc(s);
      zero_acc(dp);
#pragma unroll
      for (int kk = 0; kk < E / 16; ++kk) {
        uint32_t ka[4], va[4];
        ldsm_x4(ka, a_addr<LD>(sK, kr0, kk * 16, lane));
        ldsm_x4(va, a_addr<LD>(sV, kr0, kk * 16, lane));
#pragma unroll
        for (int np = 0; np < ST / 2; ++np) {
          uint32_t qb[4], ob[4];
          ldsm_x4(qb, bn_addr<LD>(tQ, np * 16, kk * 16, lane));
          ldsm_x4(ob, bn_addr<LD>(tdO, np * 16, kk * 16, lane));
          mma<T>(s[2 * np], ka, qb[0], qb[1]);
          mma<T>(s[2 * np + 1], ka, qb[2], qb[3]);
          mma<T>(dp[2 * np], va, ob[0], ob[1]);
          mma<T>(dp[2 * np + 1], va, ob[2], ob[3]);
        }
      }

      // s <- P^T Z (for dV), dp <- dS^T = P^T (dP^T Z - D) (for dK).
      const ScoreCtx sc = make_score_ctx<T>(g, a.mask, b, h);
      const bool full = !has_mask && key_w + 16 <= g.S && !(g.is_causal && key_w + 15 > m0);
      scores_log2<T, true>(s, sc, key_w, m0, full, lane);
      const uint32_t bits = dropout ? dropout_bits<true, ST>(g, b * g.Hq + h, key_w, m0, lane) : ~0u;
#pragma unroll
      for (int nt = 0; nt < ST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float* aux = row_aux(st, nt * 8 + tig * 2 + (e & 1));  // lse, D of this query
          const float p = exp2f(s[nt][e] - aux[0]);
          const float z = ((bits >> (nt * 4 + e)) & 1u) ? rkeep : 0.f;
          dp[nt][e] = p * (dp[nt][e] * z - aux[1]);
          s[nt][e] = p * z;
        }
      }

      // dV += (P^T Z) dO and dK += dS^T Q (dO / Q as B operands [query][column]: ldmatrix .trans).
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        uint32_t pa[4], da[4];
        acc_to_a<T>(pa, s, kk);
        acc_to_a<T>(da, dp, kk);
#pragma unroll
        for (int np = 0; np < EW / 16; ++np) {
          uint32_t ob[4], qb[4];
          ldsm_x4_trans(ob, bk_addr<LD>(tdO, kk * 16, c0 + np * 16, lane));
          ldsm_x4_trans(qb, bk_addr<LD>(tQ, kk * 16, c0 + np * 16, lane));
          mma<T>(dv_acc[2 * np], pa, ob[0], ob[1]);
          mma<T>(dv_acc[2 * np + 1], pa, ob[2], ob[3]);
          mma<T>(dk_acc[2 * np], da, qb[0], qb[1]);
          mma<T>(dk_acc[2 * np + 1], da, qb[2], qb[3]);
        }
      }
    }

    cp_async_wait_all();
    __syncthreads();  // every warp is done with sK / sV (and K / V landed when total == 0)
    acc_to_smem<T, LD>(sK, dk_acc, kr0, c0, g.scale, lane);
    acc_to_smem<T, LD>(sV, dv_acc, kr0, c0, 1.f, lane);
    __syncthreads();
    store_tile<BN, E, LD>(dk, E, sK, n0, g.S);
    store_tile<BN, E, LD>(dv, E, sV, n0, g.S);
    __syncthreads();  // sK / sV are refilled by the next key block
  }
}

// Grid: (B * Hq, min(query blocks, 65535)); a CTA walks query blocks y, y + gridDim.y, ...
template <typename T, int E>
__global__ void __launch_bounds__(kThreads, BwdCfg<E>::Q_MIN_BLOCKS)
    attn_bwd_dq_kernel(const AttnBackwardArgs a, const float* __restrict__ delta, int64_t n_mblocks) {
  using C = BwdCfg<E>;
  constexpr int BM = C::Q_BM, BN = C::Q_BN, LD = C::LD, STAGES = C::Q_STAGES;
  constexpr int NT = BN / 8;  // n-tiles of S / dP (keys) per warp
  constexpr int OT = E / 8;   // n-tiles of dQ per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (BM, LD); dQ at the end
  T* sdO = sQ + BM * LD;                    // (BM, LD)
  T* sK = sdO + BM * LD;                    // STAGES x (BN, LD)
  T* sV = sK + STAGES * BN * LD;            // STAGES x (BN, LD)

  const AttnGeometry& g = a.g;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t bh = blockIdx.x, b = bh / g.Hq, h = bh % g.Hq, hk = h / (g.Hq / g.Hkv);
  const T* q = static_cast<const T*>(a.q) + b * g.q_sb + h * g.q_sh;   // (L, E), row stride q_sl
  const T* k = static_cast<const T*>(a.k) + b * g.k_sb + hk * g.k_sh;  // (S, E), row stride k_ss
  const T* v = static_cast<const T*>(a.v) + b * g.v_sb + hk * g.v_sh;  // (S, E), row stride v_ss
  const T* dO = static_cast<const T*>(a.grad_out) + bh * g.L * E;      // (L, E) contiguous
  T* dq_out = static_cast<T*>(a.grad_q) + bh * g.L * E;                // (L, E) contiguous
  float* gm = a.grad_mask != nullptr ? a.grad_mask + bh * g.L * g.S : nullptr;  // (L, S)
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
    load_tile<BM, E, LD>(sdO, dO, E, m0, g.L);
    if (nb > 0) {
      load_tile<BN, E, LD>(sK, k, g.k_ss, 0, g.S);
      load_tile<BN, E, LD>(sV, v, g.v_ss, 0, g.S);
    }
    cp_async_commit();
    float lse2[2], dr[2];  // this thread's rows: lse (log2 units; +inf past L) and D
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = row_w + gid + 8 * r;
      lse2[r] = i < g.L ? a.lse[bh * g.L + i] * kLog2e : INFINITY;
      dr[r] = i < g.L ? delta[bh * g.L + i] : 0.f;
    }
    float dq[OT][4];
    zero_acc(dq);

    for (int64_t j = 0; j < nb; ++j) {
      const int64_t n0 = j * BN;
      cp_async_wait_all();
      __syncthreads();  // K_j / V_j (and Q, dO) landed; every warp is done with block j - 1
      if (STAGES == 2 && j + 1 < nb) {
        const int st = static_cast<int>((j + 1) & 1);
        load_tile<BN, E, LD>(sK + st * BN * LD, k, g.k_ss, n0 + BN, g.S);
        load_tile<BN, E, LD>(sV + st * BN * LD, v, g.v_ss, n0 + BN, g.S);
        cp_async_commit();
      }
      const T* tK = sK + (STAGES == 2 ? static_cast<int>(j & 1) : 0) * BN * LD;
      const T* tV = sV + (STAGES == 2 ? static_cast<int>(j & 1) : 0) * BN * LD;

      // S = Q K^T and dP = dO V^T (16 queries x BN keys per warp).
      float s[NT][4], dp[NT][4];
      zero_acc(s);
      zero_acc(dp);
#pragma unroll
      for (int kk = 0; kk < E / 16; ++kk) {
        uint32_t qa[4], oa[4];
        ldsm_x4(qa, a_addr<LD>(sQ, warp * 16, kk * 16, lane));
        ldsm_x4(oa, a_addr<LD>(sdO, warp * 16, kk * 16, lane));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t kb[4], vb[4];
          ldsm_x4(kb, bn_addr<LD>(tK, np * 16, kk * 16, lane));
          ldsm_x4(vb, bn_addr<LD>(tV, np * 16, kk * 16, lane));
          mma<T>(s[2 * np], qa, kb[0], kb[1]);
          mma<T>(s[2 * np + 1], qa, kb[2], kb[3]);
          mma<T>(dp[2 * np], oa, vb[0], vb[1]);
          mma<T>(dp[2 * np + 1], oa, vb[2], vb[3]);
        }
      }

      // s <- dS = P (dP Z - D); grad_mask = dS.
      const bool full = !has_mask && n0 + BN <= g.S && !(g.is_causal && n0 + BN - 1 > row_w);
      scores_log2<T, false>(s, sc, row_w, n0, full, lane);
      const uint32_t bits = dropout ? dropout_bits<false, NT>(g, bh, row_w, n0, lane) : ~0u;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = exp2f(s[nt][e] - lse2[e >> 1]);
          const float z = ((bits >> (nt * 4 + e)) & 1u) ? rkeep : 0.f;
          s[nt][e] = p * (dp[nt][e] * z - dr[e >> 1]);
        }
      }
      if (gm != nullptr) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t i = row_w + gid + 8 * (e >> 1), jj = n0 + nt * 8 + tig * 2 + (e & 1);
            if (i < g.L && jj < g.S) gm[i * g.S + jj] = s[nt][e];
          }
        }
      }

      // dQ += dS K (K as B operand [key][column]: ldmatrix .trans).
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t da[4];
        acc_to_a<T>(da, s, kk);
#pragma unroll
        for (int np = 0; np < E / 16; ++np) {
          uint32_t kb[4];
          ldsm_x4_trans(kb, bk_addr<LD>(tK, kk * 16, np * 16, lane));
          mma<T>(dq[2 * np], da, kb[0], kb[1]);
          mma<T>(dq[2 * np + 1], da, kb[2], kb[3]);
        }
      }
      if (STAGES == 1 && j + 1 < nb) {
        __syncthreads();  // every warp is done with K_j / V_j
        load_tile<BN, E, LD>(sK, k, g.k_ss, n0 + BN, g.S);
        load_tile<BN, E, LD>(sV, v, g.v_ss, n0 + BN, g.S);
        cp_async_commit();
      }
    }

    // grad_mask of the keys this (causal) block never visits: 0.
    if (gm != nullptr && nb * BN < g.S) {
      const int64_t j0 = nb * BN, rows = min64(BM, g.L - m0);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t jj = j0 + threadIdx.x; jj < g.S; jj += kThreads) gm[(m0 + r) * g.S + jj] = 0.f;
      }
    }
    cp_async_wait_all();
    __syncthreads();  // every warp is done with sQ (and Q's copies landed when nb == 0)
    acc_to_smem<T, LD>(sQ, dq, warp * 16, 0, g.scale, lane);
    __syncthreads();
    store_tile<BM, E, LD>(dq_out, E, sQ, m0, g.L);
    __syncthreads();  // sQ is refilled by the next query block
  }
}

template <typename T, int E>
void launch_backward(const AttnBackwardArgs& a, float* delta, cudaStream_t stream) {
  using C = BwdCfg<E>;
  const AttnGeometry& g = a.g;
  const int64_t rows = g.B * g.Hq * g.L;
  if (rows > 0) {
    constexpr int RPB = kDeltaThreads / delta_tpr(E);
    const auto blocks = static_cast<unsigned>(min64(ceil_div(rows, RPB), INT32_MAX));
    attn_bwd_delta_kernel<T, E><<<blocks, kDeltaThreads, 0, stream>>>(
        static_cast<const T*>(a.grad_out), static_cast<const T*>(a.out), delta, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (g.B * g.Hkv > 0 && g.S > 0) {
    const int64_t n_nblocks = ceil_div(g.S, C::KV_BN);
    const size_t smem = C::template kv_smem<T>();
    const auto kernel = attn_bwd_dkdv_kernel<T, E>;
    set_smem(kernel, smem);
    const dim3 grid(static_cast<unsigned>(g.B * g.Hkv), grid_y(n_nblocks));
    kernel<<<grid, kThreads, smem, stream>>>(a, delta, n_nblocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (rows > 0) {
    const int64_t n_mblocks = ceil_div(g.L, C::Q_BM);
    const size_t smem = C::template q_smem<T>();
    const auto kernel = attn_bwd_dq_kernel<T, E>;
    set_smem(kernel, smem);
    const dim3 grid(static_cast<unsigned>(g.B * g.Hq), grid_y(n_mblocks));
    kernel<<<grid, kThreads, smem, stream>>>(a, delta, n_mblocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void attention_backward_cuda(const AttnBackwardArgs& a, float* delta, cudaStream_t stream) {
  dispatch_attention(a.dtype, a.g.E, [&](auto t, auto e) {
    launch_backward<decltype(t), decltype(e)::value>(a, delta, stream);
  });
}

}  // namespace fastattn::cuda::attn
