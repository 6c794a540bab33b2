// The score side of the CUDA sdpa kernels (attention_forward.cu, attention_backward.cu):
// per-sequence geometry (seq_of), the mask / window / causal cuts as visible column ranges
// (col_bounds, RowBounds, tile_full), ALiBi and softcap (scaled_log2, score_log2, scores_log2)
// and the Philox dropout bits. The design notes are at the top of attention_common.cuh.
#pragma once
#include "attention_common.cuh"
#include "fastattn/philox.h"

namespace fastattn::cuda::attn {

// ---- sequences, scores: mask, window, ALiBi, softcap, bounds, dropout -------------------------

// Device twin of attn_seq (fastattn/attention_args.h) in 32-bit ints (registers are tight):
// sequence b's tensor batch, first rows, lengths and diagonal offset (cu_q / cu_k are device
// pointers on CUDA). Sequence-local positions stay < 2^31 (cu_seqlens are int32; dense L, S < 2^31).
struct SeqI {
  int tb, row_q, row_k, L, S, diag;
};
__device__ __forceinline__ SeqI seq_of(const AttnGeometry& g, int64_t b) {
  SeqI s{static_cast<int>(b), 0, 0, static_cast<int>(g.L), static_cast<int>(g.S), 0};
  if (g.cu_q != nullptr) {
    s.tb = 0;
    s.row_q = g.cu_q[b];
    s.row_k = g.cu_k[b];
    s.L = g.cu_q[b + 1] - s.row_q;
    s.S = g.cu_k[b + 1] - s.row_k;
  }
  s.diag = g.bottom_right ? s.S - s.L : 0;
  return s;
}

// A window size as the kernels use it: -1 (unbounded) also for sizes that cut nothing
// (>= L + S), so it fits an int.
__host__ __device__ __forceinline__ int eff_window(int64_t w, int64_t L, int64_t S) {
  return (w < 0 || w >= L + S) ? -1 : static_cast<int>(w);
}

// Key range [lo, hi) that query rows [i0, i1] (sequence-local, inclusive) can see, and query
// range [lo, hi) that can see a key of [j0, j1]; empty when hi <= lo (window / causal cut:
// i + d - wl <= j <= i + d + wr).
__host__ __device__ __forceinline__ void keys_for_rows(int64_t i0, int64_t i1, int64_t S, int64_t diag,
                                                       int64_t wl, int64_t wr, int64_t& lo, int64_t& hi) {
  lo = wl >= 0 ? i0 + diag - wl : 0;
  lo = lo < 0 ? 0 : lo;
  hi = wr >= 0 ? i1 + diag + wr + 1 : S;
  hi = hi > S ? S : hi;
}
__host__ __device__ __forceinline__ void rows_for_keys(int64_t j0, int64_t j1, int64_t L, int64_t diag,
                                                       int64_t wl, int64_t wr, int64_t& lo, int64_t& hi) {
  lo = wr >= 0 ? j0 - diag - wr : 0;
  lo = lo < 0 ? 0 : lo;
  hi = wl >= 0 ? j1 - diag + wl + 1 : L;
  hi = hi > L ? L : hi;
}

// The score modifiers of one (sequence b, head h) score matrix (L x S, sequence-local indices).
struct ScoreCtx {
  const unsigned char* mask;  // element (i, j) at mask + (i * m_sl + j) * element size
  int64_t m_sl;
  int L, S, diag, wl, wr;  // wl / wr: window sizes (-1: unbounded); causal is wr = 0
  float scale_log2;  // scale * log2(e): scores are kept in log2 units (exp2 in the softmax)
  float alibi2;      // slope(b, h) * log2(e) (MODS kernels only; 0: none)
  float cap_in;      // softcap: z = cap2 tanh(s cap_in), cap_in = scale / softcap (MODS only)
  float cap2;        // softcap * log2(e); 0: no softcap
  AttnMaskKind kind;
};

template <typename T>
__device__ __forceinline__ ScoreCtx make_score_ctx(const AttnGeometry& g, const void* mask, int64_t b,
                                                   int64_t h, const SeqI& sq) {
  ScoreCtx c;
  c.kind = g.mask_kind;
  const int64_t esize = c.kind == AttnMaskKind::Bool ? 1 : (c.kind == AttnMaskKind::Float ? 4 : sizeof(T));
  c.mask = c.kind == AttnMaskKind::None
               ? nullptr
               : static_cast<const unsigned char*>(mask) + (b * g.m_sb + h * g.m_sh) * esize;
  c.m_sl = g.m_sl;
  c.L = sq.L;
  c.S = sq.S;
  c.diag = sq.diag;
  c.wl = eff_window(g.window_left, sq.L, sq.S);
  c.wr = eff_window(g.window_right, sq.L, sq.S);
  c.scale_log2 = g.scale * kLog2e;
  c.alibi2 = g.alibi != nullptr ? g.alibi[b * g.alibi_sb + h] * kLog2e : 0.f;
  c.cap2 = g.softcap > 0.f ? g.softcap * kLog2e : 0.f;
  c.cap_in = g.softcap > 0.f ? g.scale / g.softcap : 0.f;
  return c;
}

constexpr int kBigPos = 1 << 30;  // "no upper bound" for query positions

// The columns [lo, hi) a tile row x can see, window / causal cut included (key j visible from
// query i iff i + d - wl <= j <= i + d + wr and j < S). Not TRANS: x is a query, columns are
// keys (clamped to [0, S]). TRANS (the dK/dV kernel): x is a key, columns are queries (none for
// a key x >= S: the empty range [2^30, 2^30); no upper clamp at L: queries past L have p = 0
// anyway). Both bounds are non-decreasing in x (tile_full relies on it).
template <bool TRANS>
__device__ __forceinline__ void col_bounds(const ScoreCtx& c, int x, int& lo, int& hi) {
  int64_t l, h;
  if constexpr (!TRANS) {
    l = c.wl >= 0 ? static_cast<int64_t>(x) + c.diag - c.wl : 0;
    h = c.wr >= 0 ? static_cast<int64_t>(x) + c.diag + c.wr + 1 : c.S;
    h = h > c.S ? c.S : h;
  } else {
    l = c.wr >= 0 ? static_cast<int64_t>(x) - c.diag - c.wr : 0;
    h = c.wl >= 0 ? static_cast<int64_t>(x) - c.diag + c.wl + 1 : kBigPos;
    h = h > kBigPos ? kBigPos : h;
    if (x >= c.S) l = h = kBigPos;  // (kept monotone: a tile with such a key is never full)
  }
  l = l < 0 ? 0 : l;
  h = h < l ? l : h;
  lo = static_cast<int>(l);
  hi = static_cast<int>(h);
}

// Per-thread column bounds of the two tile rows a thread holds (row0 + gid, row0 + gid + 8),
// and the warp's bounds for tile_full (the tightest over its 16 rows).
struct RowBounds {
  int lo[2], hi[2];
  int wlo, whi;  // full tile iff col0 >= wlo and col0 + width <= whi (and no mask / ALiBi)
};

template <bool TRANS>
__device__ __forceinline__ RowBounds row_bounds(const ScoreCtx& c, int row0, int lane) {
  RowBounds rb;
  const int gid = lane >> 2;
  col_bounds<TRANS>(c, row0 + gid, rb.lo[0], rb.hi[0]);
  col_bounds<TRANS>(c, row0 + gid + 8, rb.lo[1], rb.hi[1]);
  int dummy;
  col_bounds<TRANS>(c, row0 + 15, rb.wlo, dummy);
  col_bounds<TRANS>(c, row0, dummy, rb.whi);
  return rb;
}

// Whether a tile of the warp's 16 rows x columns [col0, col0 + width) needs no per-element work
// beyond the scale (and the softcap): no mask, no ALiBi, every column visible from every row.
template <bool MODS>
__device__ __forceinline__ bool tile_full(const ScoreCtx& c, const RowBounds& rb, int col0, int width) {
  return c.kind == AttnMaskKind::None && (!MODS || c.alibi2 == 0.f) && col0 >= rb.wlo &&
         col0 + width <= rb.whi;
}

// s (the raw q.k) in log2 units: scale s log2(e), or with MODS and a softcap cap2 tanh(s cap_in).
template <bool MODS>
__device__ __forceinline__ float scaled_log2(const ScoreCtx& c, float s) {
  if constexpr (MODS) {
    if (c.cap2 != 0.f) return c.cap2 * tanhf(s * c.cap_in);
  }
  return s * c.scale_log2;
}

// z_ij * log2(e) for the raw product s = q_i . k_j of a visible pair: (s' + alibi_ij + mask_ij)
// log2(e) with s' the scaled (softcapped) score; -inf where a bool mask is false. Rows i >= L
// (tile padding) read no mask.
template <typename T, bool MODS>
__device__ __forceinline__ float score_log2(const ScoreCtx& c, float s, int i, int j) {
  float z = scaled_log2<MODS>(c, s);
  if constexpr (MODS) {
    const int64_t dist = static_cast<int64_t>(i) + c.diag - j;
    z -= c.alibi2 * static_cast<float>(dist < 0 ? -dist : dist);
  }
  if (c.kind != AttnMaskKind::None && i < c.L) {
    const int64_t off = i * c.m_sl + j;
    if (c.kind == AttnMaskKind::Bool) {
      if (c.mask[off] == 0) z = -INFINITY;
    } else {
      const float mv = c.kind == AttnMaskKind::Float
                           ? reinterpret_cast<const float*>(c.mask)[off]
                           : to_float<T>(reinterpret_cast<const T*>(c.mask)[off]);
      z = fmaf(mv, kLog2e, z);
    }
  }
  return z;
}

// Scores of a warp's accumulator tile acc[NT][4] in place (log2 units). Element (r, c) of the tile
// is score (i, j) = (row0 + r, col0 + c), or (col0 + c, row0 + r) when TRANS (the dK/dV kernel
// holds S^T: rows are keys); -inf outside the row's bounds rb (window, causal, j >= S). full:
// tile_full holds. MODS: ALiBi / softcap possible (kernels without them skip that code).
template <typename T, bool TRANS, bool MODS, int NT>
__device__ __forceinline__ void scores_log2(float (&acc)[NT][4], const ScoreCtx& c, const RowBounds& rb,
                                            int row0, int col0, bool full, int lane) {
  const int gid = lane >> 2, tig = lane & 3;
  if (full) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = scaled_log2<MODS>(c, acc[nt][e]);
    }
    return;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + gid + 8 * (e >> 1), col = col0 + nt * 8 + tig * 2 + (e & 1);
      if (col < rb.lo[e >> 1] || col >= rb.hi[e >> 1]) {
        acc[nt][e] = -INFINITY;
      } else {
        acc[nt][e] = TRANS ? score_log2<T, MODS>(c, acc[nt][e], col, r)
                           : score_log2<T, MODS>(c, acc[nt][e], r, col);
      }
    }
  }
}

// Dropout factor of score (r, c) in tensor coordinates (rows r of Lt, keys c of St) of flat head
// bh = tb * Hq + h: 1 / (1 - p) when kept, else 0 (kernels/include/fastattn/philox.h: one Philox
// call per score, the spec every backend shares).
__device__ __forceinline__ float dropout_factor(const AttnGeometry& g, int64_t bh, int64_t r, int64_t c,
                                                float rkeep) {
  const uint64_t idx = (static_cast<uint64_t>(bh) * static_cast<uint64_t>(g.Lt) + static_cast<uint64_t>(r)) *
                           static_cast<uint64_t>(g.St) +
                       static_cast<uint64_t>(c);
  return dropout_uniform(g.seed, g.offset, idx) >= g.dropout_p ? rkeep : 0.f;
}

// Dropout keep bits of a warp's accumulator tile acc[NT][4] (NT <= 8): bit 4 nt + e set when score
// acc[nt][e] is kept (rows / columns as in scores_log2, sequence-local) for sequence b, query
// head h. Tensor coordinates: head bh = tb * Hq + h, rows row_q + i, keys row_k + j (re-read here
// from cu_seqlens rather than kept in registers through the key loops). Scores outside the
// sequence's L x S get some bit that never matters (their p is 0 or their row is never stored).
// The Philox calls run in a rolled loop: unrolled, 32 interleaved calls cost ~60 registers.
template <bool TRANS, int NT>
__device__ __forceinline__ uint32_t dropout_bits(const AttnGeometry& g, int64_t b, int64_t h, int row0,
                                                 int col0, int lane) {
  static_assert(NT * 4 <= 32, "one bit per accumulator element");
  const int gid = lane >> 2, tig = lane & 3;
  int64_t bh = b * g.Hq + h, row_q = 0, row_k = 0;
  if (g.cu_q != nullptr) {
    bh = h;
    row_q = g.cu_q[b];
    row_k = g.cu_k[b];
  }
  uint32_t bits = 0;
#pragma unroll 2
  for (int x = 0; x < NT * 4; ++x) {
    const int r = row0 + gid + 8 * ((x & 3) >> 1), col = col0 + (x >> 2) * 8 + tig * 2 + (x & 1);
    const int i = TRANS ? col : r, j = TRANS ? r : col;
    if (dropout_factor(g, bh, row_q + i, row_k + j, 1.f) != 0.f) {
      bits |= 1u << x;
    }
  }
  return bits;
}

// acc[nt][e] = 0 where bit 4 nt + e of bits is clear, else acc[nt][e] * mul.
template <int NT>
__device__ __forceinline__ void apply_bits(float (&acc)[NT][4], uint32_t bits, float mul) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = ((bits >> (nt * 4 + e)) & 1u) ? acc[nt][e] * mul : 0.f;
  }
}

}  // namespace fastattn::cuda::attn
