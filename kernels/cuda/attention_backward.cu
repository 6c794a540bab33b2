// fastattn::sdpa_backward on CUDA (FlashAttention-2 algebra on tensor cores): the kernels and their
// launch. Layouts, helpers and host checks: kernels/cuda/attention_common.cuh; the operator:
// kernels/cuda/attention.cu.
//
// p is recomputed from lse (p = 2^(z log2 e - lse log2 e): 0 where z = -inf or lse = +inf, never
// NaN); Z = keep / (1 - dropout_p) (1 without dropout), regenerated from the same Philox spec.
// Three kernels, no atomics (every output element written once, in a fixed order):
//  1. attn_bwd_delta: D_i = sum_e dO_ie O_ie (float32, (B, Hq, L) scratch).
//  2. attn_bwd_dkdv: one CTA per (block of BN keys, b * Hkv + hkv). It walks the group's Hq / Hkv
//     query heads and, per head, the query blocks of BM rows that can see one of its keys (the
//     window / causal cut: rows [j0 - d - right, j_last - d + left]), in a fixed order. Warp w owns 16 keys (and, for E = 256,
//     half of dK / dV's columns: the two warps sharing keys both compute S^T and dP^T):
//       S^T  = K Q^T,  P^T = 2^(z - lse)            (16 x BM; keys are the rows)
//       dP^T = V dO^T, dS^T = P^T (dP^T Z - D)
//       dV  += (P^T Z) dO,  dK += dS^T Q            (float32 registers; dK scaled at the end)
//     Q / dO / lse / D of the next step are fetched (cp.async) while the current one computes.
//  3. attn_bwd_dq: one CTA per (block of 64 queries, b * Hq + h), warp w owns 16 queries; walks
//     the key blocks its rows' window meets: S = Q K^T, dP = dO V^T,
//     dS = P (dP Z - D), dQ += dS K (scaled at the end). It also writes grad_mask = dS (float32)
//     when asked, including the zeros of key blocks its rows never reach.
// Varlen (cu_seqlens): grids run over the largest sequence; blocks past sequence b's L_b / S_b
// exit at once; every index is in tensor coordinates (tb, row_q + i, row_k + j). Softcap: the
// gradient w.r.t. scale q.k is dS (1 - tanh^2); ALiBi and softcap live in the
// MODS instantiations only (the plain ones keep their register budget).
// grad_out and out are contiguous (B, Hq, L, E); grad_q / grad_k / grad_v are fresh contiguous
// outputs; all tile rows are padded to E + 8 elements in shared memory.
#include "attention_scores.cuh"

namespace fastattn::cuda::attn {
namespace {

// Tiles per head dim (MODS: the ALiBi / softcap instantiations, which take fewer queries per
// dK / dV step at E = 64 / 128 to stay within 255 registers). None of the instantiations spills
// (`nvcc -Xptxas -v`).
template <int E, bool MODS = false>
struct BwdCfg {
  static constexpr int LD = E + 8;  // shared-memory row pitch (elements)
  // dK / dV kernel
  static constexpr int WN = E <= 128 ? 1 : 2;        // warps splitting dK / dV's columns
  static constexpr int KV_BN = 16 * kWarps / WN;     // keys per CTA
  static constexpr int KV_BM = (E <= 64 ? 64 : (E <= 128 ? 32 : 16)) / (MODS && (E == 64 || E == 128) ? 2 : 1);  // queries per step
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
template <typename T, int E, bool MODS>
__global__ void __launch_bounds__(kThreads, BwdCfg<E, MODS>::KV_MIN_BLOCKS)
    attn_bwd_dkdv_kernel(const AttnBackwardArgs a, const float* __restrict__ delta, int64_t n_nblocks) {
  using C = BwdCfg<E, MODS>;
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
  const int64_t b = blockIdx.x / g.Hkv, hk = blockIdx.x % g.Hkv;
  const int G = static_cast<int>(g.Hq / g.Hkv);
  const bool dropout = g.dropout_p > 0.f;
  const float rkeep = 1.f / (1.f - g.dropout_p);

  for (int64_t nbk = blockIdx.y; nbk < n_nblocks; nbk += gridDim.y) {
    const int64_t n0 = nbk * BN;
    // Sequence b (re-read per key block, per step and for the stores rather than held in
    // registers through the loops: the kernel sits at the register limit).
    const SeqI sq = seq_of(g, b);  // tensor batch tb, first rows, lengths L_b / S_b, diagonal
    if (n0 >= sq.S) continue;      // past this sequence (varlen): no keys
    const int key_w = static_cast<int>(n0) + kr0;  // this warp's first key
    const T* k = static_cast<const T*>(a.k) + sq.tb * g.k_sb + hk * g.k_sh + sq.row_k * g.k_ss;  // (S_b, E)
    const T* v = static_cast<const T*>(a.v) + sq.tb * g.v_sb + hk * g.v_sh + sq.row_k * g.v_ss;  // (S_b, E)
    const T* q = static_cast<const T*>(a.q) + sq.tb * g.q_sb + sq.row_q * g.q_sl;  // + h q_sh: (L_b, E)
    const int64_t r0b = static_cast<int64_t>(sq.tb) * g.Hq * g.Lt + sq.row_q;  // + h Lt: row of lse / D / dO
    const T* dO = static_cast<const T*>(a.grad_out) + r0b * E;                  // + h Lt E: (L_b, E)
    const int Lb = sq.L;
    int m_first, m_end;  // query blocks with a row that sees a key of the block
    {
      int64_t i_lo, i_hi;
      const ScoreCtx sc0 = make_score_ctx<T>(g, a.mask, b, hk * G, sq);
      rows_for_keys(n0, min64(n0 + BN, sq.S) - 1, sq.L, sc0.diag, sc0.wl, sc0.wr, i_lo, i_hi);
      m_first = static_cast<int>(i_lo / BM);
      m_end = i_hi > i_lo ? static_cast<int>(ceil_div(i_hi, BM)) : m_first;
    }
    const int total = G * (m_end - m_first);  // steps: (head, query block)
    const RowBounds rb = row_bounds<true>(make_score_ctx<T>(g, a.mask, b, hk * G, sq), key_w,
                                          lane);  // visible queries per key of this thread

    // Steps run over (head, query block) = (hk G .. hk G + G - 1) x (m_first .. m_end - 1), query
    // blocks fastest; (h_next, mb_next) is the next step to fetch, (h_cur, mb_cur) the one computed.
    int h_next = static_cast<int>(hk) * G, mb_next = m_first, h_cur = h_next, mb_cur = mb_next;
    auto advance = [&](int& hh, int& mbb) {
      if (++mbb == m_end) {
        mbb = m_first;
        ++hh;
      }
    };
    // Fetches step (h, mb) into stage st.
    auto issue = [&](int h, int mb, int st) {
      const int m0 = mb * BM;
      const int64_t r0 = r0b + h * g.Lt;
      load_tile<BM, E, LD>(sQ + st * BM * LD, q + h * g.q_sh, g.q_sl, m0, Lb);
      load_tile<BM, E, LD>(sdO + st * BM * LD, dO + h * g.Lt * E, E, m0, Lb);
      if (threadIdx.x < BM) {
        const int i = m0 + static_cast<int>(threadIdx.x);
        float* aux = row_aux(st, static_cast<int>(threadIdx.x));
        aux[0] = i < Lb ? a.lse[r0 + i] * kLog2e : INFINITY;
        aux[1] = i < Lb ? delta[r0 + i] : 0.f;
      }
    };

    load_tile<BN, E, LD>(sK, k, g.k_ss, n0, sq.S);
    load_tile<BN, E, LD>(sV, v, g.v_ss, n0, sq.S);
    if (total > 0) {
      issue(h_next, mb_next, 0);
      advance(h_next, mb_next);
    }
    cp_async_commit();

    float dk_acc[DT][4], dv_acc[DT][4];
    zero_acc(dk_acc);
    zero_acc(dv_acc);

    for (int it = 0; it < total; ++it) {
      cp_async_wait_all();
      __syncthreads();  // step it landed; every warp is done with step it - 1's stage
      if (it + 1 < total) {
        issue(h_next, mb_next, (it + 1) & 1);
        advance(h_next, mb_next);
        cp_async_commit();
      }
      const int st = it & 1;
      const int h = h_cur, m0 = mb_cur * BM;
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

      // dp <- (dP^T Z - D) (times the softcap factor 1 - tanh^2 of the raw score, while s still
      // holds it), s <- z; then with p = 2^(z - lse): s <- P^T Z (for dV), dp <- dS^T (for dK).
      const ScoreCtx sc = make_score_ctx<T>(g, a.mask, b, h, seq_of(g, b));
      const uint32_t bits = dropout ? dropout_bits<true, ST>(g, b, h, key_w, m0, lane) : ~0u;
#pragma unroll
      for (int nt = 0; nt < ST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float* aux = row_aux(st, nt * 8 + tig * 2 + (e & 1));  // lse, D of this query
          const float z = ((bits >> (nt * 4 + e)) & 1u) ? rkeep : 0.f;
          float d = dp[nt][e] * z - aux[1];
          if constexpr (MODS) {
            if (sc.cap2 != 0.f) {
              const float t = tanhf(s[nt][e] * sc.cap_in);
              d *= 1.f - t * t;
            }
          }
          dp[nt][e] = d;
        }
      }
      const bool full = tile_full<MODS>(sc, rb, m0, BM);
      scores_log2<T, true, MODS>(s, sc, rb, key_w, m0, full, lane);
#pragma unroll
      for (int nt = 0; nt < ST; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float* aux = row_aux(st, nt * 8 + tig * 2 + (e & 1));
          const float p = exp2f(s[nt][e] - aux[0]);
          const float z = ((bits >> (nt * 4 + e)) & 1u) ? rkeep : 0.f;
          dp[nt][e] *= p;
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
    const SeqI so = seq_of(g, b);
    const int64_t bk = static_cast<int64_t>(so.tb) * g.Hkv + hk;  // flat (tensor batch, kv head)
    T* dk = static_cast<T*>(a.grad_k) + (bk * g.St + so.row_k) * E;  // (S_b, E) rows of (St, E)
    T* dv = static_cast<T*>(a.grad_v) + (bk * g.St + so.row_k) * E;
    store_tile<BN, E, LD>(dk, E, sK, n0, so.S);
    store_tile<BN, E, LD>(dv, E, sV, n0, so.S);
    __syncthreads();  // sK / sV are refilled by the next key block
  }
}

// Grid: (B * Hq, min(query blocks, 65535)); a CTA walks query blocks y, y + gridDim.y, ...
template <typename T, int E, bool MODS>
__global__ void __launch_bounds__(kThreads, BwdCfg<E, MODS>::Q_MIN_BLOCKS)
    attn_bwd_dq_kernel(const AttnBackwardArgs a, const float* __restrict__ delta, int64_t n_mblocks) {
  using C = BwdCfg<E, MODS>;
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
  const int64_t b = blockIdx.x / g.Hq, h = blockIdx.x % g.Hq, hk = h / (g.Hq / g.Hkv);
  // grad_mask (B, Hq, L, S), sequence-local (i, j); the host zeroes it first for varlen.
  float* gm = a.grad_mask != nullptr ? a.grad_mask + blockIdx.x * g.L * g.S : nullptr;
  const bool dropout = g.dropout_p > 0.f;
  const float rkeep = 1.f / (1.f - g.dropout_p);

  for (int64_t mb = blockIdx.y; mb < n_mblocks; mb += gridDim.y) {
    const int64_t m0l = (n_mblocks - 1 - mb) * BM;  // last query blocks first: longest under causal
    // Sequence b (re-read per query block, per key block and for the stores rather than held in
    // registers through the loops: the kernel sits at the register limit).
    const SeqI sq = seq_of(g, b);  // tensor batch tb, first rows, lengths L_b / S_b, diagonal
    if (m0l >= sq.L) continue;     // past this sequence (varlen): no rows
    const int m0 = static_cast<int>(m0l), row_w = m0 + warp * 16;  // this warp's first query
    const int64_t bh = static_cast<int64_t>(sq.tb) * g.Hq + h;     // flat (tensor batch, head)
    const int64_t r0 = bh * g.Lt + sq.row_q;                        // tensor row of query 0
    const T* q = static_cast<const T*>(a.q) + sq.tb * g.q_sb + h * g.q_sh + sq.row_q * g.q_sl;  // (L_b, E)
    const T* k = static_cast<const T*>(a.k) + sq.tb * g.k_sb + hk * g.k_sh + sq.row_k * g.k_ss;  // (S_b, E)
    const T* v = static_cast<const T*>(a.v) + sq.tb * g.v_sb + hk * g.v_sh + sq.row_k * g.v_ss;  // (S_b, E)
    const T* dO = static_cast<const T*>(a.grad_out) + r0 * E;                                    // (L_b, E)
    const int Sb = sq.S;
    int jb, je;  // key blocks any row of the block can see
    RowBounds rb;  // visible keys per row of this thread
    {
      const ScoreCtx sc0 = make_score_ctx<T>(g, a.mask, b, h, sq);
      int64_t n_lo, n_hi;
      keys_for_rows(m0, min64(m0 + BM, sq.L) - 1, sq.S, sc0.diag, sc0.wl, sc0.wr, n_lo, n_hi);
      jb = static_cast<int>(n_lo / BN);
      je = n_hi > n_lo ? static_cast<int>(ceil_div(n_hi, BN)) : jb;
      rb = row_bounds<false>(sc0, row_w, lane);
    }

    load_tile<BM, E, LD>(sQ, q, g.q_sl, m0, sq.L);
    load_tile<BM, E, LD>(sdO, dO, E, m0, sq.L);
    if (je > jb) {
      load_tile<BN, E, LD>(sK, k, g.k_ss, jb * BN, Sb);
      load_tile<BN, E, LD>(sV, v, g.v_ss, jb * BN, Sb);
    }
    cp_async_commit();
    float lse2[2], dr[2];  // this thread's rows: lse (log2 units; +inf past L_b) and D
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row_w + gid + 8 * r;
      lse2[r] = i < sq.L ? a.lse[r0 + i] * kLog2e : INFINITY;
      dr[r] = i < sq.L ? delta[r0 + i] : 0.f;
    }
    float dq[OT][4];
    zero_acc(dq);

    for (int j = jb; j < je; ++j) {
      const int n0 = j * BN;
      const int stage = STAGES == 2 ? ((j - jb) & 1) : 0;  // block jb in stage 0
      cp_async_wait_all();
      __syncthreads();  // K_j / V_j (and Q, dO) landed; every warp is done with block j - 1
      if (STAGES == 2 && j + 1 < je) {
        const int st = stage ^ 1;
        load_tile<BN, E, LD>(sK + st * BN * LD, k, g.k_ss, n0 + BN, Sb);
        load_tile<BN, E, LD>(sV + st * BN * LD, v, g.v_ss, n0 + BN, Sb);
        cp_async_commit();
      }
      const T* tK = sK + stage * BN * LD;
      const T* tV = sV + stage * BN * LD;

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

      // s <- dZ = P (dP Z - D); grad_mask = dZ; then (softcap) dZ (1 - tanh^2) for dQ.
      const ScoreCtx sc = make_score_ctx<T>(g, a.mask, b, h, seq_of(g, b));
      const bool full = tile_full<MODS>(sc, rb, n0, BN);
      scores_log2<T, false, MODS>(s, sc, rb, row_w, n0, full, lane);
      const uint32_t bits = dropout ? dropout_bits<false, NT>(g, b, h, row_w, n0, lane) : ~0u;
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
        const SeqI sg = seq_of(g, b);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = row_w + gid + 8 * (e >> 1), jj = n0 + nt * 8 + tig * 2 + (e & 1);
            if (i < sg.L && jj < sg.S) gm[static_cast<int64_t>(i) * g.S + jj] = s[nt][e];
          }
        }
      }
      if constexpr (MODS) {
        if (sc.cap2 != 0.f) {
          // The raw scores are gone (s holds dZ): recompute S = Q K^T into dp (dead by now)
          // rather than keep a second tile of registers alive through the softmax.
          zero_acc(dp);
#pragma unroll
          for (int kk = 0; kk < E / 16; ++kk) {
            uint32_t qa[4];
            ldsm_x4(qa, a_addr<LD>(sQ, warp * 16, kk * 16, lane));
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
              uint32_t kb[4];
              ldsm_x4(kb, bn_addr<LD>(tK, np * 16, kk * 16, lane));
              mma<T>(dp[2 * np], qa, kb[0], kb[1]);
              mma<T>(dp[2 * np + 1], qa, kb[2], kb[3]);
            }
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float t = tanhf(dp[nt][e] * sc.cap_in);
              s[nt][e] *= 1.f - t * t;
            }
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
      if (STAGES == 1 && j + 1 < je) {
        __syncthreads();  // every warp is done with K_j / V_j
        load_tile<BN, E, LD>(sK, k, g.k_ss, n0 + BN, Sb);
        load_tile<BN, E, LD>(sV, v, g.v_ss, n0 + BN, Sb);
        cp_async_commit();
      }
    }

    const SeqI so = seq_of(g, b);
    // grad_mask of the keys this block never visits (before / after its window): 0.
    if (gm != nullptr) {
      const int64_t rows = min64(BM, so.L - m0), a0 = min64(static_cast<int64_t>(jb) * BN, so.S),
                    a1 = static_cast<int64_t>(je) * BN;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t jj = threadIdx.x; jj < a0; jj += kThreads) gm[(m0 + r) * g.S + jj] = 0.f;
        for (int64_t jj = a1 + threadIdx.x; jj < so.S; jj += kThreads) gm[(m0 + r) * g.S + jj] = 0.f;
      }
    }
    cp_async_wait_all();
    __syncthreads();  // every warp is done with sQ (and Q's copies landed when no key block)
    acc_to_smem<T, LD>(sQ, dq, warp * 16, 0, g.scale, lane);
    __syncthreads();
    T* dq_out = static_cast<T*>(a.grad_q) + ((static_cast<int64_t>(so.tb) * g.Hq + h) * g.Lt + so.row_q) * E;
    store_tile<BM, E, LD>(dq_out, E, sQ, m0, so.L);  // (L_b, E) rows of (Lt, E)
    __syncthreads();  // sQ is refilled by the next query block
  }
}

template <typename T, int E, bool MODS>
void launch_backward(const AttnBackwardArgs& a, float* delta, cudaStream_t stream) {
  using C = BwdCfg<E, MODS>;
  const AttnGeometry& g = a.g;
  const int64_t rows = g.Bt * g.Hq * g.Lt;  // of delta / grad_out / out
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
    const auto kernel = attn_bwd_dkdv_kernel<T, E, MODS>;
    set_smem(kernel, smem);
    const dim3 grid(static_cast<unsigned>(g.B * g.Hkv), grid_y(n_nblocks));
    kernel<<<grid, kThreads, smem, stream>>>(a, delta, n_nblocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (rows > 0 && g.B * g.Hq > 0 && g.L > 0) {
    const int64_t n_mblocks = ceil_div(g.L, C::Q_BM);
    const size_t smem = C::template q_smem<T>();
    const auto kernel = attn_bwd_dq_kernel<T, E, MODS>;
    set_smem(kernel, smem);
    const dim3 grid(static_cast<unsigned>(g.B * g.Hq), grid_y(n_mblocks));
    kernel<<<grid, kThreads, smem, stream>>>(a, delta, n_mblocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void attention_backward_cuda(const AttnBackwardArgs& a, float* delta, cudaStream_t stream) {
  const bool mods = a.g.alibi != nullptr || a.g.softcap > 0.f;  // the MODS instantiations
  dispatch_attention(a.dtype, a.g.E, [&](auto t, auto e) {
    if (mods) {
      launch_backward<decltype(t), decltype(e)::value, true>(a, delta, stream);
    } else {
      launch_backward<decltype(t), decltype(e)::value, false>(a, delta, stream);
    }
  });
}

}  // namespace fastattn::cuda::attn
