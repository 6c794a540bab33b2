// CPU attention backward (FlashAttention-2 algebra on the CPU), compiled once per ISA: p is
// recomputed from lse, nothing (L, S) is stored unless grad_mask is wanted.
//   0  D_i = sum_e dO_ie O_ie                    (float32, B*Hq*L values)
// then, split mode (passes a and b, parallel over blocks):
//   a  one work item per block of keys of one (batch, kv head): for every query head of the
//      group and every block of queries, in order,
//        s = Q_blk . Kt (bm x bn, keys along the lanes), dP = dO_blk . Vt
//        p = exp(scale * s + mask - lse_i), dS = p * (dP * Z - D_i)   (Z: dropout factors)
//        dV_blk += (p * Z)^T dO_blk,  dK_blk += dS^T Q_blk
//      then grad_k = scale * dK_blk, grad_v = dV_blk, written once (deterministic, no atomics)
//   b  one work item per block of queries of one (batch, head), over the key blocks in order:
//        st = K_blk . qt (bn x bm, queries along the lanes), dPt = V_blk . dOt,
//        dS as above, dQ += dS . K_blk; grad_q = scale * dQ; grad_mask = dS (every element,
//        0 where masked and in the causally skipped blocks)
// or fused mode (enough (batch, kv head) pairs for the threads): pass a per (batch, kv head)
// over its key blocks in order, with dQ += dS . K_blk accumulated in float32 for the whole group
// and grad_mask written from pass a's dS rows: 5 products per score tile instead of 7.
// With grad_mask, pass 0 is pass b's kRowSum variant instead: D_i and P_i = sum_j p_ij from the
// very p and dP that form dS, and every pass uses p / P_i (sum_j dS_ij then cancels to rounding).
// Scores are recomputed bit-identical to the forward's (same sums, same order; dot_scores for
// L <= kV), so p = exp(z - lse) is consistent with lse. Blocks wholly outside the window (causal:
// above the diagonal) are skipped in every pass.
#pragma once
#include "attention_forward.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

// Pass 0: D (B*Hq*L) = rowsum(dO * O), summed in the order the micro-kernel sums dP = dO . v
// (one fused multiply-add per e, in order): when one key dominates a row (O ~ v_j), dP_ij - D_i
// then cancels to the rounding of O instead of to the rounding of two different sums.
template <typename T>
void attention_row_dot(const AttnBackwardArgs& a, float* D) {
  const int64_t rows = a.g.Bt * a.g.Hq * a.g.Lt, Ev = a.g.Ev;
  const T* dO = static_cast<const T*>(a.grad_out);
  const T* O = static_cast<const T*>(a.out);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(Ev, 1)),
                   [&](int64_t begin, int64_t end) {
                     if (a.g.L <= kV) {  // summed as dot_scores sums dP (see its comment)
                       for (int64_t r = begin; r < end; ++r) {
                         Vec acc(0.f);
                         for (int64_t e = 0; e < Ev; e += kV) {
                           const int64_t n = std::min<int64_t>(kV, Ev - e);
                           acc = at::vec::fmadd(load_f32(dO + r * Ev + e, n),
                                                load_f32(O + r * Ev + e, n), acc);
                         }
                         D[r] = tree_sum(acc);
                       }
                       return;
                     }
                     Vec x[kV], y[kV];
                     for (int64_t r0 = begin; r0 < end; r0 += kV) {  // kV rows side by side
                       const int64_t n = std::min<int64_t>(kV, end - r0);
                       Vec acc(0.f);
                       for (int64_t e0 = 0; e0 < Ev; e0 += kV) {
                         const int64_t ne = std::min<int64_t>(kV, Ev - e0);
                         for (int64_t r = 0; r < kV; ++r) {
                           x[r] = r < n ? load_f32(dO + (r0 + r) * Ev + e0, ne) : Vec(0.f);
                           y[r] = r < n ? load_f32(O + (r0 + r) * Ev + e0, ne) : Vec(0.f);
                         }
                         transpose_block(x);  // x[e] lane r: dO[r0 + r][e0 + e]
                         transpose_block(y);
                         for (int64_t e = 0; e < ne; ++e) acc = at::vec::fmadd(x[e], y[e], acc);
                       }
                       acc.store(D + r0, n);
                     }
                   });
}

// Keys per block of pass a: its score tiles have the keys along the vectors, so a multiple of
// kNV vectors (64 on AVX-512: 35.1 ms against 35.7 at 128 and 34.7 at 96 with a 2-vector tail
// chunk in two of the five products; B=1, H=8, L=S=1024, E=64, 1 thread).
constexpr int64_t kBwdKeys = 64;

// Pass a (the work of one key block of one (batch, kv head)): grad_k and grad_v of the block;
// with dq (fused mode) also dQ += dS . K_blk into dq (group*L x Ep float32, the group's query
// heads in order) and grad_mask (dS rows, zeros for the causally skipped rows).
template <typename T, typename M>
struct KvPass {
  static constexpr bool kMask = !std::is_same_v<M, std::nullptr_t>;
  const AttnBackwardArgs& a;
  const float* D;
  const float* R;  // null, or per row 1 / sum_j p_ij (see pass b's kRowSum)
  int64_t E, Ev, Ep, Evp, L, S, BN, group;
  Dropout drop;

  KvPass(const AttnBackwardArgs& args, const float* d, const float* r)
      : a(args), D(d), R(r), E(args.g.E), Ev(args.g.Ev), Ep(round_up(E, kV)), Evp(round_up(Ev, kV)),
        L(args.g.L), S(args.g.S), BN(kBwdKeys),
        group(args.g.Hkv > 0 ? args.g.Hq / args.g.Hkv : 0), drop(make_dropout(args.g)) {}

  struct Scratch {
    std::unique_ptr<float[]> kt, vt, kb, qb, dob, s, dp, dk, dv;
  };
  Scratch scratch_for(bool fused) const {
    return Scratch{scratch(E * BN), scratch(Ev * BN), scratch(fused ? BN * Ep : 0),
                   scratch(kBM * Ep), scratch(kBM * Evp), scratch(kBM * BN),
                   scratch(kBM * BN), scratch(BN * Ep), scratch(BN * Evp)};
  }

  void run(Scratch& w, int64_t b, int64_t hk, int64_t kb, float* dq) const {
    const AttnGeometry& g = a.g;
    const AttnSeq sq = attn_seq(g, b);
    const Vec vscale(g.scale), ninf(kNegInf), zero(0.f);
    const int64_t j0 = kb * BN;
    if (j0 >= sq.S) return;  // past this sequence's keys (fused mode: its dQ stays 0)
    const int64_t bn = std::min(BN, sq.S - j0), nvj = ceil_div(bn, kV);
    const int64_t Lb = sq.L, bhk_t = sq.tb * g.Hkv + hk;  // (tb, hk) of grad_k / grad_v
    const T* k = static_cast<const T*>(a.k) + sq.tb * g.k_sb + hk * g.k_sh + (sq.row_k + j0) * g.k_ss;
    const T* v = static_cast<const T*>(a.v) + sq.tb * g.v_sb + hk * g.v_sh + (sq.row_k + j0) * g.v_ss;
    float *kt = w.kt.get(), *vt = w.vt.get(), *s = w.s.get(), *dp = w.dp.get();
    float *dk = w.dk.get(), *dv = w.dv.get();
    if (L > kV) pack_transposed(k, g.k_ss, bn, E, kt, BN, nvj * kV);  // kt: E x BN
    if (L > kV) pack_transposed(v, g.v_ss, bn, Ev, vt, BN, nvj * kV);  // vt: Ev x BN
    int64_t ldk = 0;
    const float* kf = dq ? rows_f32(k, g.k_ss, bn, E, Ep, w.kb.get(), &ldk) : nullptr;
    std::fill(dk, dk + BN * Ep, 0.f);
    std::fill(dv, dv + BN * Evp, 0.f);
    const uint64_t St = static_cast<uint64_t>(g.St);

    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      const ScoreMods md = score_mods(g, sq, b, h);
      // the queries that see some key of the block (window / causal)
      const int64_t i_begin = query_lo(md, j0), i_end = query_hi(md, j0 + bn - 1);
      const bool mods = md.softcap || md.alibi;
      const int64_t row_t = (sq.tb * g.Hq + h) * g.Lt + sq.row_q;  // tensor row of query 0
      const T* qh = static_cast<const T*>(a.q) + sq.tb * g.q_sb + h * g.q_sh + sq.row_q * g.q_sl;
      const T* doh = static_cast<const T*>(a.grad_out) + row_t * Ev;
      const float* lse = a.lse + row_t;
      const float* Dh = D + row_t;
      const float* Rh = R ? R + row_t : nullptr;
      float* gm = dq && a.grad_mask ? a.grad_mask + (b * g.Hq + h) * L * S + j0 : nullptr;
      float* dqh = dq ? dq + (h - hk * group) * L * Ep : nullptr;
      const M* mask = nullptr;
      if constexpr (kMask) mask = static_cast<const M*>(a.mask) + b * g.m_sb + h * g.m_sh + j0;
      if (gm) {
        for (int64_t i = 0; i < Lb; ++i) {
          if (i < i_begin || i >= i_end) std::fill(gm + i * S, gm + i * S + bn, 0.f);
        }
      }
      for (int64_t i0 = i_begin; i0 < i_end; i0 += kBM) {
        const int64_t bm = std::min(kBM, i_end - i0);
        int64_t ldq, lddo;
        const float* qf = rows_f32(qh + i0 * g.q_sl, g.q_sl, bm, E, Ep, w.qb.get(), &ldq);
        const float* dof = rows_f32(doh + i0 * Ev, Ev, bm, Ev, Evp, w.dob.get(), &lddo);
        if (L <= kV) {  // s = Q_blk . K_blk^T as the forward summed it (see attention_forward.h)
          dot_scores(qf, ldq, bm, k, g.k_ss, bn, E, s, BN);
        } else {
          tile_gemm(bm, nvj, E, qf, ldq, 1, kt, BN, s, BN, false, kKC);  // s = Q_blk . Kt
        }
        if (L <= kV) {  // dP = dO_blk . V_blk^T summed as attention_row_dot sums D
          dot_scores(dof, lddo, bm, v, g.v_ss, bn, Ev, dp, BN);
        } else {
          tile_gemm(bm, nvj, Ev, dof, lddo, 1, vt, BN, dp, BN, false);  // dP = dO_blk . Vt
        }
        for (int64_t i = 0; i < bm; ++i) {
          const int64_t qi = i0 + i;
          // keys [lo, hi) of the block are visible to query qi (the rest: padding or window)
          const int64_t lo = key_lo(md, qi) - j0, hi = std::min(key_hi(md, qi) - j0, bn);
          const Vec lse_i(lse[qi]), D_i(Dh[qi]), r_i(Rh ? Rh[qi] : 1.f);
          const uint64_t idx0 = static_cast<uint64_t>(row_t + qi) * St + sq.row_k + j0;
          float* srow = s + i * BN;
          float* dprow = dp + i * BN;
          float* gmrow = gm ? gm + qi * S : nullptr;
          for (int64_t vj = 0; vj < nvj; ++vj) {
            const int64_t jj = vj * kV;
            if (jj >= hi || jj + kV <= lo) {
              zero.store(srow + jj);
              zero.store(dprow + jj);
              if (gmrow) zero.store(gmrow + jj, std::min<int64_t>(kV, bn - jj));
              continue;
            }
            Vec z, th;
            if (mods) {
              const Vec sc = capped_score(md, Vec::loadu(srow + jj), &th);
              z = md.alibi ? sc + alibi_bias(md, qi + md.d - j0 - jj, -1.f) : sc;
            } else {
              z = Vec::loadu(srow + jj) * vscale;
            }
            if constexpr (kMask) {
              z = z + mask_vec(mask + qi * g.m_sl + jj, std::min<int64_t>(kV, bn - jj));
            }
            z = set_first(keep_first(z, ninf, hi - jj), ninf, lo - jj);
            Vec p = fast_exp(z - lse_i);
            if (Rh) p = p * r_i;
            Vec pz = p, dpz = Vec::loadu(dprow + jj);
            if (drop.on) {
              const Vec f = dropout_factors(drop, idx0 + jj, 1);
              pz = p * f;
              dpz = dpz * f;
            }
            pz.store(srow + jj);
            Vec ds = p * (dpz - D_i);
            if (gmrow) ds.store(gmrow + jj, std::min<int64_t>(kV, bn - jj));
            if (md.softcap) ds = ds * softcap_grad(th);  // grad w.r.t. scale * q.k
            ds.store(dprow + jj);
          }
        }
        tile_gemm(bn, Evp / kV, bm, s, 1, BN, dof, lddo, dv, Evp, true);  // dV += (pZ)^T dO
        tile_gemm(bn, Ep / kV, bm, dp, 1, BN, qf, ldq, dk, Ep, true);     // dK += dS^T Q
        if (dqh) tile_gemm(bm, Ep / kV, bn, dp, BN, 1, kf, ldk, dqh + i0 * Ep, Ep, true);
      }
    }
    T* gk = static_cast<T*>(a.grad_k) + (bhk_t * g.St + sq.row_k + j0) * E;
    T* gv = static_cast<T*>(a.grad_v) + (bhk_t * g.St + sq.row_k + j0) * Ev;
    for (int64_t j = 0; j < bn; ++j) {
      for (int64_t e = 0; e < E; e += kV) {
        store_f32(gk + j * E + e, Vec::loadu(dk + j * Ep + e) * vscale,
                  std::min<int64_t>(kV, E - e));
      }
      for (int64_t e = 0; e < Ev; e += kV) {
        store_f32(gv + j * Ev + e, Vec::loadu(dv + j * Evp + e), std::min<int64_t>(kV, Ev - e));
      }
    }
  }
};

// Split mode, pass a: one task per key block of one (batch, kv head).
template <typename T, typename M>
void attention_backward_kv(const AttnBackwardArgs& a, const float* D, const float* R) {
  const KvPass<T, M> pass(a, D, R);
  const int64_t nkb = ceil_div(a.g.S, pass.BN), BHk = a.g.B * a.g.Hkv;
  // Task order: the first key blocks (the costliest under a causal mask) first.
  run_tasks(nkb * BHk, [&] { return pass.scratch_for(false); },
            [&](auto& w, int64_t t) {
              const int64_t bhk = t % BHk;
              pass.run(w, bhk / a.g.Hkv, bhk % a.g.Hkv, t / BHk, nullptr);
            });
}

// Fused mode: one task per (batch, kv head) walks its key blocks in order and accumulates the
// group's dQ in float32 (5 products per score tile instead of 7 in split mode).
template <typename T, typename M>
void attention_backward_fused(const AttnBackwardArgs& a, const float* D, const float* R) {
  const KvPass<T, M> pass(a, D, R);
  const AttnGeometry& g = a.g;
  const int64_t nkb = ceil_div(g.S, pass.BN), BHk = g.B * g.Hkv, Ep = pass.Ep, E = g.E;
  const int64_t dq_size = pass.group * g.L * Ep;
  struct Scratch {
    typename KvPass<T, M>::Scratch kv;
    std::unique_ptr<float[]> dq;
  };
  run_tasks(BHk, [&] { return Scratch{pass.scratch_for(true), scratch(dq_size)}; },
            [&](Scratch& w, int64_t bhk) {
              const int64_t b = bhk / g.Hkv, hk = bhk % g.Hkv;
              float* dq = w.dq.get();
              std::fill(dq, dq + dq_size, 0.f);
              for (int64_t kb = 0; kb < nkb; ++kb) pass.run(w.kv, b, hk, kb, dq);
              // grad_q of the group's heads, rows [row_q, row_q + L_b) of each
              const AttnSeq sq = attn_seq(g, b);
              const Vec vscale(g.scale);
              for (int64_t hh = 0; hh < pass.group; ++hh) {
                const int64_t h = hk * pass.group + hh;
                T* gq = static_cast<T*>(a.grad_q) + ((sq.tb * g.Hq + h) * g.Lt + sq.row_q) * E;
                const float* dqh = dq + hh * g.L * Ep;
                for (int64_t r = 0; r < sq.L; ++r) {
                  for (int64_t e = 0; e < E; e += kV) {
                    store_f32(gq + r * E + e, Vec::loadu(dqh + r * Ep + e) * vscale,
                              std::min<int64_t>(kV, E - e));
                  }
                }
              }
            });
}

// Pass b: grad_q and grad_mask. kRowSum: instead, for grad_mask (dS itself an output), the row
// sums P_i = sum_j p_ij and D_i = sum_j p_ij Z_ij dP_ij from the very p and dP that form dS,
// stored as R_i = 1 / P_i and D_i / P_i: every pass then uses p / P_i, normalized to the
// rounding of these sums (not of lse), so that sum_j dS_ij cancels to rounding (the gradient of
// a mask broadcast along the keys is such a sum, and its exact value is often 0).
template <typename T, typename M, bool kRowSum>
void attention_backward_q(const AttnBackwardArgs& a, float* D, float* R) {
  constexpr bool kMask = !std::is_same_v<M, std::nullptr_t>;
  const AttnGeometry& g = a.g;
  const int64_t E = g.E, Ev = g.Ev, Ep = round_up(E, kV);
  const int64_t L = g.L, S = g.S, BN = key_block(E, Ev);
  const int64_t nqb = ceil_div(L, kBM), BH = g.B * g.Hq;
  if (BH * nqb == 0) return;
  const int64_t group = g.Hq / g.Hkv;
  const Dropout drop = make_dropout(g);
  const Vec vscale(g.scale), ninf(kNegInf);

  struct Scratch {
    std::unique_ptr<float[]> qt, dot, kb, vb, st, dpt, mt, dq, lse, d, r, qr, dor, tmp;
  };
  auto init = [&] {
    return Scratch{scratch(E * kBM), scratch(Ev * kBM),  scratch(BN * Ep),
                   scratch(BN * Ev), scratch(BN * kBM),  scratch(BN * kBM),
                   scratch(kMask ? BN * kBM : 0),        scratch(kBM * Ep),
                   scratch(kBM),     scratch(kBM),  scratch(kBM),
                   scratch(L <= kV ? kV * E : 0), scratch(L <= kV ? kV * Ev : 0),
                   scratch(L <= kV ? kV * BN : 0)};
  };

  auto task = [&](Scratch& w, int64_t t) {
    const int64_t qb = nqb - 1 - t / BH, bh = t % BH, b = bh / g.Hq, h = bh % g.Hq;
    const AttnSeq sq = attn_seq(g, b);
    const int64_t hk = h / group, i0 = qb * kBM;
    if (i0 >= sq.L) return;  // varlen: past this sequence's queries
    const int64_t bm = std::min(kBM, sq.L - i0), nvi = ceil_div(bm, kV);
    const ScoreMods md = score_mods(g, sq, b, h);
    const bool mods = md.softcap || md.alibi;
    const int64_t row_t = (sq.tb * g.Hq + h) * g.Lt + sq.row_q + i0;  // tensor row of query i0
    const T* q = static_cast<const T*>(a.q) + sq.tb * g.q_sb + h * g.q_sh + (sq.row_q + i0) * g.q_sl;
    const T* dO = static_cast<const T*>(a.grad_out) + row_t * Ev;
    const T* k = static_cast<const T*>(a.k) + sq.tb * g.k_sb + hk * g.k_sh + sq.row_k * g.k_ss;
    const T* v = static_cast<const T*>(a.v) + sq.tb * g.v_sb + hk * g.v_sh + sq.row_k * g.v_ss;
    const M* mask = nullptr;
    if constexpr (kMask) {
      mask = static_cast<const M*>(a.mask) + b * g.m_sb + h * g.m_sh + i0 * g.m_sl;
    }
    float *qt = w.qt.get(), *dot = w.dot.get(), *st = w.st.get(), *dpt = w.dpt.get();
    float *mt = w.mt.get(), *dq = w.dq.get(), *lsev = w.lse.get(), *dv = w.d.get();
    float* rv = w.r.get();  // kRowSum: accumulates P; else 1 / P (or 1)
    // short sequences: the query and dO rows as float32, for dot_scores
    int64_t ldqr = 0, lddor = 0;
    const float* qr = L <= kV ? rows_f32(q, g.q_sl, bm, E, E, w.qr.get(), &ldqr) : nullptr;
    const float* dor = L <= kV ? rows_f32(dO, Ev, bm, Ev, Ev, w.dor.get(), &lddor) : nullptr;
    pack_transposed(q, g.q_sl, bm, E, qt, kBM, nvi * kV);    // qt:  E x kBM
    pack_transposed(dO, Ev, bm, Ev, dot, kBM, nvi * kV);     // dOt: Ev x kBM
    // padding lanes: lse +inf gives p = 0 there
    for (int64_t i = 0; i < kBM; ++i) {
      lsev[i] = i < bm ? a.lse[row_t + i] : kPosInf;
      dv[i] = i < bm && !kRowSum ? D[row_t + i] : 0.f;  // kRowSum: accumulates D
      rv[i] = kRowSum ? 0.f : (R && i < bm ? R[row_t + i] : 1.f);
    }
    std::fill(dq, dq + kBM * Ep, 0.f);
    // grad_mask (dense batches only): (b, h, i0) row of (B, Hq, L, S)
    float* gm = a.grad_mask && !kRowSum ? a.grad_mask + (bh * L + i0) * S : nullptr;
    const uint64_t St = static_cast<uint64_t>(g.St), col0 = static_cast<uint64_t>(sq.row_k);

    const int64_t j_begin = key_lo(md, i0), j_end = key_hi(md, i0 + bm - 1);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += BN) {
      const int64_t bn = std::min(BN, j_end - j0);
      int64_t ldk, ldv;
      const float* kf = rows_f32(k + j0 * g.k_ss, g.k_ss, bn, E, Ep, w.kb.get(), &ldk);
      const float* vf = rows_f32(v + j0 * g.v_ss, g.v_ss, bn, Ev, Ev, w.vb.get(), &ldv);
      if (L <= kV) {  // scores and dP as pass a sums them (dot_scores), transposed
        float* tmp = w.tmp.get();
        dot_scores(qr, ldqr, bm, k + j0 * g.k_ss, g.k_ss, bn, E, tmp, BN);
        pack_transposed(tmp, BN, bm, bn, st, kBM, nvi * kV);
        dot_scores(dor, lddor, bm, v + j0 * g.v_ss, g.v_ss, bn, Ev, tmp, BN);
        pack_transposed(tmp, BN, bm, bn, dpt, kBM, nvi * kV);
      } else {
        tile_gemm(bn, nvi, E, kf, ldk, 1, qt, kBM, st, kBM, false, kKC);  // st  = K_blk . qt
        tile_gemm(bn, nvi, Ev, vf, ldv, 1, dot, kBM, dpt, kBM, false);    // dPt = V_blk . dOt
      }
      if constexpr (kMask) pack_mask_transposed(mask + j0, g.m_sl, bm, bn, mt, kBM);
      const bool partial = window_cuts(md, i0, i0 + bm, j0, j0 + bn);
      for (int64_t j = 0; j < bn; ++j) {
        for (int64_t vi = 0; vi < nvi; ++vi) {
          const int64_t off = j * kBM + vi * kV;
          Vec z, th;
          if (mods) {
            const Vec sc = capped_score(md, Vec::loadu(st + off), &th);
            z = md.alibi ? sc + alibi_bias(md, i0 + vi * kV + md.d - j0 - j, 1.f) : sc;
          } else {
            z = Vec::loadu(st + off) * vscale;
          }
          if constexpr (kMask) z = z + Vec::loadu(mt + off);
          if (partial) z = window_q_lanes(md, z, i0 + vi * kV, j0 + j);
          Vec p = fast_exp(z - Vec::loadu(lsev + vi * kV));
          Vec dpz = Vec::loadu(dpt + off);
          const uint64_t idx = (row_t + vi * kV) * St + col0 + j0 + j;
          if constexpr (kRowSum) {
            (Vec::loadu(rv + vi * kV) + p).store(rv + vi * kV);
            if (drop.on) p = p * dropout_factors(drop, idx, St);
            at::vec::fmadd(p, dpz, Vec::loadu(dv + vi * kV)).store(dv + vi * kV);
            continue;
          }
          if (R) p = p * Vec::loadu(rv + vi * kV);
          if (drop.on) dpz = dpz * dropout_factors(drop, idx, St);
          (p * (dpz - Vec::loadu(dv + vi * kV))).store(dpt + off);
          if (md.softcap) th.store(st + off);  // tanh, for dQ's softcap_grad
        }
      }
      if (gm) {  // grad_mask rows i, keys [j0, j0 + bn): dS transposed back
        for (int64_t i = 0; i < bm; ++i) {
          float* row = gm + i * S + j0;
          for (int64_t j = 0; j < bn; ++j) row[j] = dpt[j * kBM + i];
        }
      }
      if (!kRowSum) {
        if (md.softcap) {  // dQ takes dS * d(capped)/d(scale q.k)
          for (int64_t off = 0; off < bn * kBM; off += kV) {
            (Vec::loadu(dpt + off) * softcap_grad(Vec::loadu(st + off))).store(dpt + off);
          }
        }
        tile_gemm(bm, Ep / kV, bn, dpt, 1, kBM, kf, ldk, dq, Ep, true);  // dQ += dS . K
      }
    }
    if constexpr (kRowSum) {
      for (int64_t i = 0; i < bm; ++i) {
        const float P = rv[i];  // 0: no unmasked key (then D is 0 too)
        R[row_t + i] = P > 0.f ? 1.f / P : 0.f;
        D[row_t + i] = P > 0.f ? dv[i] / P : 0.f;
      }
      return;
    }
    if (gm) {  // keys outside [j_begin, j_end): dS = 0
      for (int64_t i = 0; i < bm; ++i) {
        std::fill(gm + i * S, gm + i * S + std::min(j_begin, S), 0.f);
        std::fill(gm + i * S + std::max(j_end, j_begin), gm + (i + 1) * S, 0.f);
      }
    }
    T* gq = static_cast<T*>(a.grad_q) + row_t * E;
    for (int64_t i = 0; i < bm; ++i) {
      for (int64_t e = 0; e < E; e += kV) {
        store_f32(gq + i * E + e, Vec::loadu(dq + i * Ep + e) * vscale,
                  std::min<int64_t>(kV, E - e));
      }
    }
  };
  run_tasks(BH * nqb, init, task);
}

// Fused mode when its (batch, kv head) tasks keep the threads at least 3/4 busy and the dQ
// accumulators stay small; else split mode (parallel over blocks).
inline bool use_fused_backward(const AttnGeometry& g) {
  const int64_t tasks = g.B * g.Hkv, threads = std::max<int64_t>(1, at::get_num_threads());
  if (tasks == 0 || g.S == 0) return false;
  const int64_t rounds = ceil_div(tasks, threads);
  const int64_t dq_bytes = std::min(tasks, threads) * (g.Hq / g.Hkv) * g.L * round_up(g.E, kV) * 4;
  return 4 * tasks >= 3 * rounds * threads && dq_bytes <= (int64_t{256} << 20);
}

template <typename T, typename M>
void attention_backward_typed(const AttnBackwardArgs& a) {
  const AttnGeometry& g = a.g;
  std::unique_ptr<float[]> D = scratch(g.Bt * g.Hq * g.Lt), R;
  if (a.grad_mask) {  // dS itself is an output: D and R summed from p and dP (see pass b)
    R = scratch(g.Bt * g.Hq * g.Lt);
    attention_backward_q<T, M, true>(a, D.get(), R.get());
  } else {
    attention_row_dot<T>(a, D.get());
  }
  if (use_fused_backward(g)) {
    attention_backward_fused<T, M>(a, D.get(), R.get());
    return;
  }
  attention_backward_kv<T, M>(a, D.get(), R.get());
  attention_backward_q<T, M, false>(a, D.get(), R.get());
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
