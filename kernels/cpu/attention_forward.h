// CPU attention forward (FlashAttention-2 on the CPU), compiled once per ISA: no (L, S) buffer,
// O(block) scratch per thread.
//
// Work item: one block of kBM queries of one (batch, head), dealt to the threads dynamically.
// Its queries are packed transposed once, qt (E x kBM, float32), so a score tile is a product
// with the queries along the vector lanes: st (bn x kBM) = K_blk (bn x E) . qt. Then per query
// lane, vectorized across queries:
//   z = scale * s + mask (or -inf: masked, causal j > i)        (st, in place)
//   m_new = max(m, max_j z); alpha = exp(m - m_new); p = exp(z - m_new)
//   l = alpha * l + sum_j p; o = alpha * o + (p * dropout) V_blk  (o: kBM x Ev float32)
// A block of at most kV queries (decoding, the last rows of a sequence) puts the keys along the
// lanes instead and runs the same online softmax along each row. Keys stream in blocks; under
// a window (causal) key blocks outside the block's visible range are never visited. At the end out = o / l
// and lse = m + log(l); a row without any unmasked key (l == 0) gets out = 0 and lse = +inf.
#pragma once
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>

#include "attention_score.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

// Queries per work item: kNQ vectors (4 of AVX-512, 8 of AVX2).
constexpr int64_t kBM = 64;
constexpr int kNQ = static_cast<int>(kBM / kV);

// Keys per block: the float32 key/value block and the score tile within about 72 KiB (L2
// resident next to the packed queries; measured on AVX-512, 1 thread, L = S = 1024: E = 64 best
// at 96 keys (15.1 ms against 15.7 at 128), E = 128 at 64, E = 16 flat from 64 to 128).
inline int64_t key_block(int64_t E, int64_t Ev) {
  const int64_t per_key = 4 * (E + Ev + kBM);
  return std::clamp<int64_t>(round_up(72 * 1024 / per_key, 16), 48, 128);
}

// row[0, n) *= a (n: a multiple of kV).
inline void scale_row(float* row, int64_t n, float a) {
  const Vec va(a);
  for (int64_t e = 0; e < n; e += kV) (Vec::loadu(row + e) * va).store(row + e);
}

// Runs fn(task) for task in [0, n) on at::parallel_for's threads, each thread taking the next
// task when it finishes one (causal blocks differ in cost). init() makes a thread's scratch.
template <typename Init, typename Fn>
void run_tasks(int64_t n, const Init& init, const Fn& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    auto state = init();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(state, t);
  });
}

template <typename T, typename M>
void attention_forward_typed(const AttnForwardArgs& a) {
  constexpr bool kMask = !std::is_same_v<M, std::nullptr_t>;
  const AttnGeometry& g = a.g;
  const int64_t E = g.E, Ev = g.Ev, Evp = round_up(Ev, kV), L = g.L, S = g.S;
  const int64_t BN = key_block(E, Ev);
  // keys per block of the keys-on-lanes path (few queries: the key and value blocks are
  // streams; long blocks keep each one running, 7.7 ms against 10.1 ms at 64 keys for
  // B=4, H=16, L=1, S=2048, E=128, 1 thread)
  const int64_t BNr = std::min<int64_t>(1024, round_up(std::max<int64_t>(S, 1), kV));
  const int64_t nqb = ceil_div(L, kBM), BH = g.B * g.Hq;
  if (BH * nqb == 0) return;
  const int64_t group = g.Hq / g.Hkv;
  const Dropout drop = make_dropout(g);
  const Vec vscale(g.scale), ninf(kNegInf), zero(0.f);

  struct Scratch {
    std::unique_ptr<float[]> qt, kb, vb, st, mt, o, m, l, alpha;
  };
  auto init = [&] {
    const bool rows = L <= kV || (L % kBM != 0 && L % kBM <= kV);  // keys-on-lanes path runs
    const bool pack_v = !std::is_same_v<T, float> || Ev % kV != 0;
    return Scratch{scratch(E * kBM), scratch(BN * E),
                   scratch((pack_v ? std::max(BN, rows ? BNr : 0) : BN) * Evp),
                   scratch(std::max(BN * kBM, rows ? kV * BNr : 0)),
                   scratch(kMask ? BN * kBM : 0), scratch(kBM * Evp), scratch(kBM),
                   scratch(kBM), scratch(kBM)};
  };

  // Task order: the last query blocks (the costliest under a causal mask) first.
  auto task = [&](Scratch& w, int64_t t) {
    const int64_t qb = nqb - 1 - t / BH, bh = t % BH, b = bh / g.Hq, h = bh % g.Hq;
    const AttnSeq sq = attn_seq(g, b);
    const int64_t hk = h / group, i0 = qb * kBM;
    if (i0 >= sq.L) return;  // varlen: past this sequence's queries
    const int64_t bm = std::min(kBM, sq.L - i0);
    const ScoreMods md = score_mods(g, sq, b, h);
    const T* q = static_cast<const T*>(a.q) + sq.tb * g.q_sb + h * g.q_sh + (sq.row_q + i0) * g.q_sl;
    const T* k = static_cast<const T*>(a.k) + sq.tb * g.k_sb + hk * g.k_sh + sq.row_k * g.k_ss;
    const T* v = static_cast<const T*>(a.v) + sq.tb * g.v_sb + hk * g.v_sh + sq.row_k * g.v_ss;
    const M* mask = nullptr;
    if constexpr (kMask) {
      mask = static_cast<const M*>(a.mask) + b * g.m_sb + h * g.m_sh + i0 * g.m_sl;
    }
    float *qt = w.qt.get(), *st = w.st.get(), *mt = w.mt.get(), *o = w.o.get();
    float *mrow = w.m.get(), *lrow = w.l.get(), *alpha = w.alpha.get();

    std::fill(mrow, mrow + kBM, kNegInf);
    std::fill(lrow, lrow + kBM, 0.f);
    std::fill(o, o + kBM * Evp, 0.f);
    // tensor row of query i0 in (Bt * Hq * Lt); dropout index (row_t + i) * St + row_k + j
    const int64_t row_t = (sq.tb * g.Hq + h) * g.Lt + sq.row_q + i0;
    const uint64_t St = static_cast<uint64_t>(g.St), col0 = static_cast<uint64_t>(sq.row_k);
    // the keys any query of the block sees (window / causal: blocks outside are skipped)
    const int64_t j_begin = key_lo(md, i0), j_end = key_hi(md, i0 + bm - 1);
    const bool mods = md.softcap || md.alibi;

    if (bm <= kV) {
      // A block of at most one vector of queries (decoding, short L): queries along the lanes
      // would leave most lanes idle, so here the keys go along the lanes (s: bm x BNr) and the
      // softmax runs along each row. (The backward recomputes bit-identical scores, so that
      // p = exp(z - lse) stays consistent with lse even where |z| is large: for L <= kV both
      // use dot_scores, else both sum each q . k as tile_gemm's chains of multiply-adds.)
      int64_t ldq;
      const float* qf = rows_f32(q, g.q_sl, bm, E, E, qt, &ldq);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += BNr) {
        const int64_t bn = std::min(BNr, j_end - j0), nvj = ceil_div(bn, kV);
        int64_t ldv;
        const float* vf = rows_f32(v + j0 * g.v_ss, g.v_ss, bn, Ev, Evp, w.vb.get(), &ldv);
        if (L <= kV) {  // a short sequence: accurate dot products (the backward's too)
          dot_scores(qf, ldq, bm, k + j0 * g.k_ss, g.k_ss, bn, E, st, BNr);
        } else {  // the last rows of a longer one: the chains the backward forms
          scores_keys_on_lanes(qf, ldq, bm, k + j0 * g.k_ss, g.k_ss, bn, E, st, BNr);
        }
        for (int64_t i = 0; i < bm; ++i) {
          float* row = st + i * BNr;
          // keys [lo, hi) of the block are visible to query i0 + i (the rest: padding, window)
          const int64_t lo = key_lo(md, i0 + i) - j0;
          const int64_t hi = std::min(key_hi(md, i0 + i) - j0, bn);
          Vec vmax(kNegInf);
          for (int64_t jj = 0; jj < nvj * kV; jj += kV) {
            Vec z;
            if (mods) {
              z = capped_score(md, Vec::loadu(row + jj));
              if (md.alibi) z = z + alibi_bias(md, i0 + i + md.d - j0 - jj, -1.f);
            } else {
              z = Vec::loadu(row + jj) * vscale;
            }
            if constexpr (kMask) {
              if (jj < bn) {
                z = z + mask_vec(mask + i * g.m_sl + j0 + jj, std::min<int64_t>(kV, bn - jj));
              }
            }
            z = set_first(keep_first(z, ninf, hi - jj), ninf, lo - jj);
            z.store(row + jj);
            vmax = vec_max(vmax, z);
          }
          const float m_old = mrow[i];
          const float m_new = std::max(
              m_old, at::vec::vec_reduce_all<float>(
                         [](Vec& x, Vec& y) { return vec_max(x, y); }, vmax));
          const float m_use = m_new == kNegInf ? 0.f : m_new;
          const float al = m_old == kNegInf ? 0.f : std::exp(m_old - m_use);
          const Vec vm(m_use);
          Vec sum(0.f);
          for (int64_t jj = 0; jj < nvj * kV; jj += kV) {
            Vec p = fast_exp(Vec::loadu(row + jj) - vm);
            sum = sum + p;
            if (drop.on) p = p * dropout_factors(drop, (row_t + i) * St + col0 + j0 + jj, 1);
            p.store(row + jj);
          }
          mrow[i] = m_new;
          lrow[i] = lrow[i] * al + reduce_sum(sum);
          if (al != 1.f) scale_row(o + i * Evp, Evp, al);
        }
        tile_gemm(bm, Evp / kV, bn, st, BNr, 1, vf, ldv, o, Evp, true);  // o += P . V_blk
      }
    } else {
      const int64_t nvi = ceil_div(bm, kV);  // query vectors of the block
      pack_transposed(q, g.q_sl, bm, E, qt, kBM, nvi * kV);  // qt: E x kBM (zero padded)
      for (int64_t j0 = j_begin; j0 < j_end; j0 += BN) {
        const int64_t bn = std::min(BN, j_end - j0);
        int64_t ldk, ldv;
        const float* kf = rows_f32(k + j0 * g.k_ss, g.k_ss, bn, E, E, w.kb.get(), &ldk);
        const float* vf = rows_f32(v + j0 * g.v_ss, g.v_ss, bn, Ev, Evp, w.vb.get(), &ldv);
        // st (bn x kBM) = K_blk . qt
        tile_gemm(bn, nvi, E, kf, ldk, 1, qt, kBM, st, kBM, false, kKC);
        if constexpr (kMask) pack_mask_transposed(mask + j0, g.m_sl, bm, bn, mt, kBM);
        // the window (causal) masks some (query, key) pair of this tile
        const bool partial = window_cuts(md, i0, i0 + bm, j0, j0 + bn);

        // Full blocks: the loops over the query vectors have a compile-time count and unroll into
        // registers; a last partial block (or L < kBM) runs them to its own count. kMods: softcap
        // or ALiBi on (compile-time, so the plain path is unchanged).
        auto softmax_block = [&](auto full, auto with_mods) {
          constexpr bool kMods = decltype(with_mods)::value;
          const int nq = decltype(full)::value ? kNQ : static_cast<int>(nvi);
          // pass 1: the block max of z per query. Keys outer, query vectors inner: kNQ
          // independent max chains (one chain of kV-wide maxima would be latency bound). Without
          // mask, modifiers or window cut and with scale > 0, max z = scale * max s and z is
          // formed in pass 2 (fold); otherwise z is formed here, in place.
          const bool fold = !kMods && !kMask && !partial && g.scale > 0.f;
          Vec bmax[kNQ];
          for (int vi = 0; vi < nq; ++vi) bmax[vi] = ninf;
          if (fold) {
            for (int64_t j = 0; j < bn; ++j) {
              const float* row = st + j * kBM;
#pragma GCC unroll 8
              for (int vi = 0; vi < nq; ++vi) {
                bmax[vi] = vec_max(bmax[vi], Vec::loadu(row + vi * kV));
              }
            }
            for (int vi = 0; vi < nq; ++vi) bmax[vi] = bmax[vi] * vscale;
          } else {
            for (int64_t j = 0; j < bn; ++j) {
              float* row = st + j * kBM;
#pragma GCC unroll 8
              for (int vi = 0; vi < nq; ++vi) {
                Vec z;
                if constexpr (kMods) {
                  z = capped_score(md, Vec::loadu(row + vi * kV));
                  if (md.alibi) z = z + alibi_bias(md, i0 + vi * kV + md.d - j0 - j, 1.f);
                } else {
                  z = Vec::loadu(row + vi * kV) * vscale;
                }
                if constexpr (kMask) z = z + Vec::loadu(mt + j * kBM + vi * kV);
                if (partial) z = window_q_lanes(md, z, i0 + vi * kV, j0 + j);
                z.store(row + vi * kV);
                bmax[vi] = vec_max(bmax[vi], z);
              }
            }
          }
          // online softmax update; rows with nothing unmasked yet keep m = -inf and subtract 0
          // (exp(-inf) = 0)
          Vec m_use[kNQ], sum[kNQ], neg_m[kNQ];
#pragma GCC unroll 8
          for (int vi = 0; vi < nq; ++vi) {
            const Vec m_old = Vec::loadu(mrow + vi * kV);
            const Vec m_new = vec_max(m_old, bmax[vi]);
            m_use[vi] = Vec::blendv(m_new, zero, m_new == ninf);
            fast_exp(m_old - m_use[vi]).store(alpha + vi * kV);
            m_new.store(mrow + vi * kV);
            neg_m[vi] = zero - m_use[vi];
            sum[vi] = zero;
          }
          // pass 2: p = exp(z - m) (times the dropout factors) in place, and its sum per query
          const Vec zscale = fold ? vscale : Vec(1.f);
          auto exp_pass = [&](auto with_dropout) {
            for (int64_t j = 0; j < bn; ++j) {
              float* row = st + j * kBM;
#pragma GCC unroll 8
              for (int vi = 0; vi < nq; ++vi) {
                // z rounded on its own (as the backward forms it), then z - m
                Vec p = fast_exp(Vec::loadu(row + vi * kV) * zscale + neg_m[vi]);
                sum[vi] = sum[vi] + p;
                if constexpr (decltype(with_dropout)::value) {
                  p = p * dropout_factors(drop, (row_t + vi * kV) * St + col0 + j0 + j, St);
                }
                p.store(row + vi * kV);
              }
            }
          };
          if (drop.on) {
            exp_pass(std::true_type{});
          } else {
            exp_pass(std::false_type{});
          }
#pragma GCC unroll 8
          for (int vi = 0; vi < nq; ++vi) {
            const Vec l = Vec::loadu(lrow + vi * kV);
            at::vec::fmadd(l, Vec::loadu(alpha + vi * kV), sum[vi]).store(lrow + vi * kV);
          }
        };
        if (mods) {
          if (nvi == kNQ) {
            softmax_block(std::true_type{}, std::true_type{});
          } else {
            softmax_block(std::false_type{}, std::true_type{});
          }
        } else if (nvi == kNQ) {
          softmax_block(std::true_type{}, std::false_type{});
        } else {
          softmax_block(std::false_type{}, std::false_type{});
        }
        // o = alpha * o + P . V_blk   (P (bm x bn) is st transposed: element (i, j) at st[j*kBM+i])
        for (int64_t i = 0; i < bm; ++i) {
          if (alpha[i] == 1.f) continue;
          scale_row(o + i * Evp, Evp, alpha[i]);
        }
        tile_gemm(bm, Evp / kV, bn, st, 1, kBM, vf, ldv, o, Evp, true);
      }
    }

    // out = o / l (a division: rounded once), lse = m + log(l); l == 0: out 0, lse +inf
    T* out = static_cast<T*>(a.out) + row_t * Ev;
    float* lse = a.lse + row_t;
    for (int64_t i = 0; i < bm; ++i) {
      const float l = lrow[i];
      const Vec vl(l > 0.f ? l : kPosInf);  // o / inf = 0 for a row without unmasked keys
      for (int64_t e = 0; e < Ev; e += kV) {
        const int64_t n = std::min<int64_t>(kV, Ev - e);
        store_f32(out + i * Ev + e, Vec::loadu(o + i * Evp + e) / vl, n);
      }
      lse[i] = l > 0.f ? mrow[i] + std::log(l) : kPosInf;
    }
  };
  run_tasks(BH * nqb, init, task);
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
