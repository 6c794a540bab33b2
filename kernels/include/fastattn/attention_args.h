// Plain-data launch arguments of the attention kernels (no ATen types), shared by host code
// (fastattn/attention_host.h fills them), the CPU kernels and CUDA device code. Shapes and
// semantics: the sdpa / sdpa_backward schemas in kernels/registration.cpp.
#pragma once
#include <cstdint>

namespace fastattn {

enum class AttnDType : int { Float = 0, Half = 1, BFloat16 = 2 };  // of q, k, v, out
enum class AttnMaskKind : int { None = 0, Bool = 1, Same = 2, Float = 3 };  // Same: q's dtype

// Sizes, element strides (stride(-1) of every tensor is 1) and the score modifiers.
//
// Batches of sequences: B sequences, sequence b with L_b query rows and S_b keys.
//   dense (cu_q == cu_k == nullptr): L_b = L, S_b = S, tensors (B, H, L|S, .), row offsets 0.
//   varlen (cu_q, cu_k: int32 (B + 1,) prefix sums, cu[0] == 0): the tensors hold ONE batch
//     entry (Bt == 1) of Lt = total query tokens and St = total key tokens; sequence b owns
//     query rows [cu_q[b], cu_q[b+1]) and key rows [cu_k[b], cu_k[b+1]); L and S are the
//     largest L_b and S_b (launch sizing only; the host checks them on CPU).
// Every tensor index uses the TENSOR coordinates: batch tb = varlen ? 0 : b, query row
// r = row0_q(b) + i, key row c = row0_k(b) + j. That includes out/lse/grads and the Philox
// dropout index ((tb * Hq + h) * Lt + r) * St + c. The score modifiers use the sequence-local
// i in [0, L_b), j in [0, S_b):
//   z_ij = s_ij + alibi_ij + mask_ij, s_ij = scale * q_i.k_j, or with softcap > 0
//          s_ij = softcap * tanh(scale * q_i.k_j / softcap);
//   alibi_ij = -slope(b, h) * |i + d_b - j| (when alibi != nullptr);
//   key j is masked (z = -inf) for query i unless
//          (window_left < 0 || j >= i + d_b - window_left) &&
//          (window_right < 0 || j <= i + d_b + window_right),
//   with the diagonal offset d_b = bottom_right ? S_b - L_b : 0. is_causal is window_right = 0
//   (the host folds it in: window_right = min(window_right, 0) or 0 when unbounded).
struct AttnGeometry {
  int64_t B, Hq, Hkv, L, S, E, Ev;
  int64_t q_sb, q_sh, q_sl;  // q (Bt, Hq, Lt, E)
  int64_t k_sb, k_sh, k_ss;  // k (Bt, Hkv, St, E)
  int64_t v_sb, v_sh, v_ss;  // v (Bt, Hkv, St, Ev)
  int64_t m_sb, m_sh, m_sl;  // mask (B, Hq, L, S); 0 for broadcast dims; dense batches only
  AttnMaskKind mask_kind;
  float scale;
  float dropout_p;  // 0: no dropout
  uint64_t seed, offset;
  int64_t Bt, Lt, St;        // tensor dims: (B, L, S) dense, (1, total_q, total_k) varlen
  const int32_t* cu_q;       // (B + 1,) or nullptr (dense)
  const int32_t* cu_k;       // (B + 1,) or nullptr (dense); both or neither
  int64_t window_left;       // -1: unbounded
  int64_t window_right;      // -1: unbounded; 0: causal
  bool bottom_right;         // diagonal offset d_b = S_b - L_b (else 0)
  const float* alibi;        // slopes, alibi[b * alibi_sb + h]; nullptr: none
  int64_t alibi_sb;          // 0 for per-head slopes (Hq,), Hq for (B, Hq)
  float softcap;             // 0: none
};

// Per-sequence view of a geometry: lengths and the tensor row offsets of sequence b.
struct AttnSeq {
  int64_t tb, row_q, row_k, L, S, diag;  // tensor batch, first rows, lengths, d_b
};

inline AttnSeq attn_seq(const AttnGeometry& g, int64_t b) {
  AttnSeq s{b, 0, 0, g.L, g.S, 0};
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

// out (Bt, Hq, Lt, Ev) and lse (Bt, Hq, Lt) are contiguous.
struct AttnForwardArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // null when mask_kind == None
  void* out;
  float* lse;
  AttnGeometry g;
  AttnDType dtype;
};

// grad_out and out (Bt, Hq, Lt, Ev) are contiguous here (the host makes them so); grad_q/k/v
// contiguous with q/k/v's shapes; grad_mask (B, Hq, L, S) float32 contiguous or null.
struct AttnBackwardArgs {
  const void* grad_out;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const float* lse;
  const void* mask;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  float* grad_mask;
  AttnGeometry g;
  AttnDType dtype;
};

}  // namespace fastattn

namespace fastattn {

// Decode attention (fastattn::decode_attention): Lq (1 to a few) new query tokens per sequence
// against a KV cache that already holds them. Cache pages: k (P, page_size, Hkv, E),
// v (P, page_size, Hkv, Ev) with any page/slot/head strides (stride(-1) == 1). Token t of
// sequence b lives in page block_table[b * bt_sb + t / page_size], slot t % page_size; a
// contiguous cache (B, S_max, Hkv, E) is the case block_table == nullptr, page = b,
// page_size = S_max. Sequence b holds seqlens[b] tokens (the new ones included); query row i
// sits at position p_i = seqlens[b] - Lq + i. Key t is visible to row i iff t < seqlens[b] and
//   (window_left < 0 || t >= p_i - window_left) && (window_right < 0 || t <= p_i + window_right)
// (window_right = 0: causal). z = s + alibi with s as in AttnGeometry (softcap) and
// alibi = -slope(b, h) * |p_i - t|. A row with no visible key: out 0, lse +inf.
// Split-K ("flash-decoding"): split s of num_splits covers keys [s * split_len,
// (s + 1) * split_len) (the host picks split_len, a multiple of 16, from the largest seqlen
// so the splits cover every visible key). With num_splits == 1 the kernel writes out/lse
// directly; otherwise each (b, kv head, split) writes its normalised partial output and its
// log-sum-exp (-inf for a split with no visible key, output 0) to the workspace and a
// reduction kernel combines the splits in a fixed order (deterministic):
//   lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) * out_s (lse +inf, out 0 when
//   every lse_s is -inf).
// The queries of one kv head (its Hq / Hkv heads times Lq rows) are processed together so
// each K/V element is read once per (b, kv head).
struct DecodeArgs {
  const void* q;                    // (B, Lq, Hq, E)
  int64_t q_sb, q_sl, q_sh;
  const void* k;                    // (P, page_size, Hkv, E)
  const void* v;                    // (P, page_size, Hkv, Ev)
  int64_t k_sp, k_ss, k_sh;         // page, slot, head strides of k
  int64_t v_sp, v_ss, v_sh;
  const int32_t* seqlens;           // (B,)
  const int32_t* block_table;       // (B, max_pages) (row stride bt_sb) or nullptr: contiguous
  int64_t bt_sb;
  int64_t B, Lq, Hq, Hkv, E, Ev, P, page_size, max_pages;
  const float* alibi;               // alibi[b * alibi_sb + h] or nullptr
  int64_t alibi_sb;
  float scale, softcap;             // softcap 0: none
  int64_t window_left, window_right;  // -1: unbounded
  int64_t num_splits, split_len;    // split s: keys [s * split_len, (s + 1) * split_len)
  void* out;                        // (B, Lq, Hq, Ev) contiguous, q's dtype
  float* lse;                       // (B, Hq, Lq) contiguous
  float* ws_out;                    // (B, Hq, Lq, num_splits, Ev) float32 (num_splits > 1)
  float* ws_lse;                    // (B, Hq, Lq, num_splits) float32 (num_splits > 1)
  AttnDType dtype;
};

}  // namespace fastattn
