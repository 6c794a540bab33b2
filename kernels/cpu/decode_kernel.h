// CPU decode attention (fastattn::decode_attention, contract: DecodeArgs in
// fastattn/attention_args.h), compiled once per ISA (see fastattn/cpu_isa.h).
//
// Work item: one (sequence b, kv head hk, split s), dealt to the threads dynamically. Its rows
// are the Lq query tokens of the kv head's Hq / Hkv query heads (R = group * Lq rows, row
// r = hh * Lq + i), all against the split's keys, so every K/V element is read once per
// (b, kv head). The keys stream in chunks of up to kChunk, gathered page by page
// (block_table): scores s (R x chunk, keys along the lanes) by dot_scores (attention_gemm.h),
// the score modifiers and an online softmax per row in float32, then o += P . V page by page.
// num_splits == 1 writes out / lse directly; otherwise each task writes its normalised partial
// output and log-sum-exp to the workspace and decode_reduce combines the splits in order.
#pragma once
#include "attention_forward.h"
#include "fastattn/attention_args.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

// Prefetches the n elements of one cache row.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  for (int64_t e = 0; e < n; e += 64 / static_cast<int64_t>(sizeof(T))) prefetch(row + e);
}

// Keys per softmax chunk: the score rows (R x kChunk floats) and a chunk of V stay in L2.
constexpr int64_t kChunk = 256;

// The split-K reduction (num_splits > 1): one task per (b, h, i) row, splits in order.
template <typename T>
void decode_reduce(const DecodeArgs& a) {
  const int64_t ns = a.num_splits, Ev = a.Ev, rows = a.B * a.Hq * a.Lq;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // r = (b * Hq + h) * Lq + i
      const int64_t b = r / (a.Hq * a.Lq), h = (r / a.Lq) % a.Hq, i = r % a.Lq;
      const float* ls = a.ws_lse + r * ns;
      const float* os = a.ws_out + r * ns * Ev;
      float m = kNegInf;
      for (int64_t s = 0; s < ns; ++s) m = std::max(m, ls[s]);
      T* out = static_cast<T*>(a.out) + ((b * a.Lq + i) * a.Hq + h) * Ev;
      float sum = 0.f;
      if (m != kNegInf) {
        for (int64_t s = 0; s < ns; ++s) sum += std::exp(ls[s] - m);
      }
      const float lse = m == kNegInf ? kPosInf : m + std::log(sum);
      a.lse[(b * a.Hq + h) * a.Lq + i] = lse;
      for (int64_t e = 0; e < Ev; e += kV) {
        const int64_t n = std::min<int64_t>(kV, Ev - e);
        Vec acc(0.f);
        if (m != kNegInf) {
          for (int64_t s = 0; s < ns; ++s) {
            if (ls[s] == kNegInf) continue;
            acc = at::vec::fmadd(Vec(std::exp(ls[s] - lse)), Vec::loadu(os + s * Ev + e, n), acc);
          }
        }
        store_f32(out + e, acc, n);
      }
    }
  });
}

template <typename T>
void decode_typed(const DecodeArgs& a) {
  const int64_t group = a.Hq / a.Hkv, Lq = a.Lq, R = group * Lq;
  const int64_t E = a.E, Ev = a.Ev, Evp = round_up(Ev, kV), ns = a.num_splits;
  const int64_t lds = kChunk + kV;  // score row stride (a page segment may spill one vector)
  if (R == 0 || a.B == 0) return;
  struct Scratch {
    std::unique_ptr<float[]> qf, kb, vb, st, o, m, l;
  };
  auto init = [&] {
    return Scratch{scratch(R * E), scratch(kV * E), scratch(kChunk * Evp), scratch(R * lds),
                   scratch(R * Evp), scratch(R), scratch(R)};
  };
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);

  auto task = [&](Scratch& w, int64_t t) {
    const int64_t b = t / (a.Hkv * ns), hk = (t / ns) % a.Hkv, sp = t % ns;
    const int64_t n = a.seqlens[b];
    // keys [k_begin, k_end) of this split that some row sees: row i sits at n - Lq + i, so
    // the last row sees up to n - 1 and the first row's window starts at n - Lq - left
    const int64_t lo = a.window_left >= 0 ? std::max<int64_t>(0, n - Lq - a.window_left) : 0;
    const int64_t k_begin = std::max(lo, sp * a.split_len);
    const int64_t k_end = std::min(n, (sp + 1) * a.split_len);
    float *qf = w.qf.get(), *st = w.st.get(), *o = w.o.get(), *mrow = w.m.get(),
          *lrow = w.l.get();
    for (int64_t r = 0; r < R; ++r) {  // queries as float32 rows
      const int64_t h = hk * group + r / Lq, i = r % Lq;
      pack_rows(static_cast<const T*>(a.q) + b * a.q_sb + i * a.q_sl + h * a.q_sh, 0, 1, E,
                qf + r * E, E);
    }
    std::fill(mrow, mrow + R, kNegInf);
    std::fill(lrow, lrow + R, 0.f);
    std::fill(o, o + R * Evp, 0.f);
    // the page (and slot) of key position p
    const int32_t* bt = a.block_table ? a.block_table + b * a.bt_sb : nullptr;
    auto page_of = [&](int64_t p) -> int64_t { return bt ? bt[p / a.page_size] : b; };

    for (int64_t c0 = k_begin; c0 < k_end; c0 += kChunk) {
      const int64_t bn = std::min(kChunk, k_end - c0), nvj = ceil_div(bn, kV);
      // scores, kV keys at a time (within a page): st[r * lds + (p - c0)] = q_r . k_p
      for (int64_t p = c0; p < c0 + bn;) {
        const int64_t slot = p % a.page_size;
        const int64_t len = std::min({c0 + bn - p, a.page_size - slot, int64_t{kV}});
        // The cache rows sit a head-stride apart (often one 4 KiB page per key), out of the
        // hardware prefetcher's reach: prefetch K two steps ahead and this step's V (read by
        // the P . V product after the chunk's softmax; a chunk of V fits in L2).
        for (int64_t x = p + 2 * kV; x < std::min(p + 3 * kV, k_end); ++x) {
          prefetch_row(kc + page_of(x) * a.k_sp + (x % a.page_size) * a.k_ss + hk * a.k_sh, E);
        }
        for (int64_t x = p; x < p + len; ++x) {
          prefetch_row(vc + page_of(x) * a.v_sp + (x % a.page_size) * a.v_ss + hk * a.v_sh, Ev);
        }
        const T* kp = kc + page_of(p) * a.k_sp + slot * a.k_ss + hk * a.k_sh;
        if constexpr (std::is_same_v<T, float>) {
          dot_scores(qf, E, R, kp, a.k_ss, len, E, st + (p - c0), lds);
        } else {  // converted once, not once per row
          pack_rows(kp, a.k_ss, len, E, w.kb.get(), E);
          dot_scores(qf, E, R, w.kb.get(), E, len, E, st + (p - c0), lds);
        }
        p += len;
      }
      // modifiers, window and the online softmax, row by row (keys along the lanes)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * group + r / Lq, pos = n - Lq + r % Lq;
        const ScoreMods md{a.scale, a.softcap, a.softcap > 0.f ? 1.f / a.softcap : 0.f,
                           a.alibi ? -a.alibi[b * a.alibi_sb + h] : 0.f, a.softcap > 0.f,
                           a.alibi != nullptr, 0, a.window_left, a.window_right, 0, 0};
        // visible keys [rlo, rhi) of the chunk
        const int64_t rlo = (a.window_left >= 0 ? pos - a.window_left : c0) - c0;
        const int64_t rhi =
            std::min(a.window_right >= 0 ? pos + a.window_right + 1 : c0 + bn, c0 + bn) - c0;
        float* row = st + r * lds;
        Vec vmax(kNegInf);
        for (int64_t jj = 0; jj < nvj * kV; jj += kV) {
          Vec z = capped_score(md, Vec::loadu(row + jj));
          if (md.alibi) z = z + alibi_bias(md, pos - c0 - jj, -1.f);
          z = set_first(keep_first(z, Vec(kNegInf), rhi - jj), Vec(kNegInf), rlo - jj);
          z.store(row + jj);
          vmax = vec_max(vmax, z);
        }
        const float m_old = mrow[r];
        const float m_new = std::max(
            m_old, at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return vec_max(x, y); },
                                                  vmax));
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        const float al = m_old == kNegInf ? 0.f : std::exp(m_old - m_use);
        const Vec vm(m_use);
        Vec sum(0.f);
        for (int64_t jj = 0; jj < nvj * kV; jj += kV) {
          const Vec p = fast_exp(Vec::loadu(row + jj) - vm);
          sum = sum + p;
          p.store(row + jj);
        }
        mrow[r] = m_new;
        lrow[r] = lrow[r] * al + reduce_sum(sum);
        if (al != 1.f) scale_row(o + r * Evp, Evp, al);
      }
      // o += P . V, page segment by page segment
      for (int64_t p = c0; p < c0 + bn;) {
        const int64_t slot = p % a.page_size;
        const int64_t len = std::min(c0 + bn - p, a.page_size - slot);
        const T* vp = vc + page_of(p) * a.v_sp + slot * a.v_ss + hk * a.v_sh;
        int64_t ldv;
        const float* vf = rows_f32(vp, a.v_ss, len, Ev, Evp, w.vb.get(), &ldv);
        tile_gemm(R, Evp / kV, len, st + (p - c0), lds, 1, vf, ldv, o, Evp, true);
        p += len;
      }
    }

    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * group + r / Lq, i = r % Lq;
      const float l = lrow[r];
      const Vec vl(l > 0.f ? l : kPosInf);  // o / inf = 0 for a row without visible keys
      float* orow = o + r * Evp;
      const int64_t wr = (b * a.Hq + h) * Lq + i;  // (b, h, i) row of lse and the workspace
      if (ns == 1) {
        T* out = static_cast<T*>(a.out) + ((b * Lq + i) * a.Hq + h) * Ev;
        for (int64_t e = 0; e < Ev; e += kV) {
          store_f32(out + e, Vec::loadu(orow + e) / vl, std::min<int64_t>(kV, Ev - e));
        }
        a.lse[wr] = l > 0.f ? mrow[r] + std::log(l) : kPosInf;
      } else {
        float* out = a.ws_out + (wr * ns + sp) * Ev;
        for (int64_t e = 0; e < Ev; e += kV) {
          store_f32(out + e, Vec::loadu(orow + e) / vl, std::min<int64_t>(kV, Ev - e));
        }
        a.ws_lse[wr * ns + sp] = l > 0.f ? mrow[r] + std::log(l) : kNegInf;
      }
    }
  };
  run_tasks(a.B * a.Hkv * ns, init, task);
  if (ns > 1) decode_reduce<T>(a);
}

}  // namespace

void decode_attention(const DecodeArgs& a) {
  switch (a.dtype) {
    case AttnDType::Float: return decode_typed<float>(a);
    case AttnDType::Half: return decode_typed<c10::Half>(a);
    case AttnDType::BFloat16: return decode_typed<c10::BFloat16>(a);
  }
}

}  // namespace fastattn::cpu::FASTATTN_ISA
