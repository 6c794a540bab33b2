// Host-side preparation of fastattn::decode_attention shared by the CPU and CUDA kernels:
// argument checks, the split-K plan, the plain-data DecodeArgs (fastattn/attention_args.h)
// and output/workspace allocation. kernels/triton/decode.py mirrors it for the Triton twin.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "fastattn/alloc.h"
#include "fastattn/attention_args.h"
#include "fastattn/attention_host.h"

namespace fastattn {

struct DecodeInputs {
  at::Tensor q, k, v, seqlens, block_table, alibi;  // block_table/alibi undefined when absent
  at::Tensor out, lse, ws_out, ws_lse;               // ws_* undefined when num_splits == 1
  DecodeArgs a{};
};

// Split-K plan: how many splits and how many keys each. requested > 0 is used as given
// (capped so no split is empty); 0 picks enough splits that B * Hkv * splits reaches
// `target_programs` (the machine's parallelism), each split at least `min_split` keys.
inline void plan_decode_splits(DecodeArgs& a, int64_t max_seqlen, int64_t requested,
                               int64_t target_programs, int64_t min_split) {
  const int64_t n = std::max<int64_t>(max_seqlen, 1);
  int64_t splits = requested;
  if (splits <= 0) {
    const int64_t units = std::max<int64_t>(a.B * a.Hkv, 1);
    splits = (target_programs + units - 1) / units;
    splits = std::min(splits, std::max<int64_t>(n / std::max<int64_t>(min_split, 16), 1));
  }
  splits = std::clamp<int64_t>(splits, 1, 256);
  int64_t len = (n + splits - 1) / splits;
  len = (len + 15) / 16 * 16;
  a.split_len = len;
  a.num_splits = (n + len - 1) / len;
}

// Checks decode_attention's arguments (schema in kernels/registration.cpp) and fills the
// launch arguments, allocating out (B, Lq, Hq, Ev), lse (B, Hq, Lq) and the split-K
// workspace. On the CPU the cache contents are checked too (seqlens within the capacity,
// block_table entries in range); CUDA callers go through fastattn.decode_attention, which
// checks them before launching. target_programs / min_split: plan_decode_splits.
inline DecodeInputs prepare_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& seqlens,
                                   const std::optional<at::Tensor>& block_table,
                                   const std::optional<at::Tensor>& alibi_slopes, double scale,
                                   int64_t window_left, int64_t window_right, double softcap,
                                   int64_t max_seqlen, int64_t num_splits,
                                   int64_t target_programs, int64_t min_split) {
  const char* op = "decode_attention";
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastattn.", op,
              ": query must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, "fastattn.", op,
              ": k_cache and v_cache must have query's dtype ", dt, ", got ",
              k_cache.scalar_type(), " and ", v_cache.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "fastattn.", op,
              ": takes query (B, Lq, Hq, E) and caches (pages, page_size, Hkv, E|Ev), got ",
              q.sizes(), ", ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device() &&
                  seqlens.device() == q.device(),
              "fastattn.", op, ": query, caches and cache_seqlens must be on one device");
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), E = q.size(3);
  const int64_t P = k_cache.size(0), page = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t Ev = v_cache.size(3);
  TORCH_CHECK(v_cache.size(0) == P && v_cache.size(1) == page && v_cache.size(2) == Hkv,
              "fastattn.", op, ": k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
              " must agree in all but the last dim");
  TORCH_CHECK(k_cache.size(3) == E, "fastattn.", op, ": k_cache's head dim ", k_cache.size(3),
              " must equal query's ", E);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fastattn.", op, ": query heads ", Hq,
              " must be a multiple of the cache's heads ", Hkv);
  TORCH_CHECK(seqlens.scalar_type() == at::kInt && seqlens.dim() == 1 && seqlens.size(0) == B,
              "fastattn.", op, ": cache_seqlens must be int32 of shape (B,) = (", B, "), got ",
              seqlens.scalar_type(), " ", seqlens.sizes());
  TORCH_CHECK(std::isfinite(scale), "fastattn.", op, ": scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "fastattn.", op,
              ": softcap must be finite and >= 0 (0: none), got ", softcap);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fastattn.", op,
              ": window sizes must be >= 0 (or -1: unbounded), got (", window_left, ", ",
              window_right, ")");
  TORCH_CHECK(max_seqlen >= 0, "fastattn.", op, ": max_seqlen must be >= 0, got ", max_seqlen);

  DecodeInputs in;
  in.q = attn_last_dim_dense(q);
  in.k = attn_last_dim_dense(k_cache);
  in.v = attn_last_dim_dense(v_cache);
  in.seqlens = seqlens.contiguous();
  int64_t max_pages = 1, capacity = page;
  if (block_table.has_value() && block_table->defined()) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == B,
                "fastattn.", op, ": block_table must be int32 of shape (B, max_pages) with B = ",
                B, ", got ", bt.scalar_type(), " ", bt.sizes());
    TORCH_CHECK(bt.device() == q.device(), "fastattn.", op, ": block_table is on ",
                bt.device(), " but query is on ", q.device());
    in.block_table = bt.stride(1) == 1 ? bt : bt.contiguous();
    max_pages = bt.size(1);
    capacity = max_pages * page;
  } else {
    TORCH_CHECK(P == B, "fastattn.", op, ": a contiguous cache (no block_table) must have shape "
                "(B, S_max, Hkv, E) with B = ", B, ", got ", k_cache.sizes());
  }
  TORCH_CHECK(max_seqlen <= capacity, "fastattn.", op, ": max_seqlen ", max_seqlen,
              " exceeds the cache capacity ", capacity);
  if (q.device().is_cpu()) {
    const int32_t* len = in.seqlens.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(len[b] >= 0 && len[b] <= max_seqlen, "fastattn.", op, ": cache_seqlens[", b,
                  "] = ", len[b], " is outside [0, max_seqlen = ", max_seqlen, "]");
      if (!in.block_table.defined()) continue;
      const int32_t* row = in.block_table.data_ptr<int32_t>() + b * in.block_table.stride(0);
      for (int64_t p = 0; p < (len[b] + page - 1) / page; ++p) {
        TORCH_CHECK(row[p] >= 0 && row[p] < P, "fastattn.", op, ": block_table[", b, ", ", p,
                    "] = ", row[p], " is not a page index in [0, ", P, ")");
      }
    }
  }
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device() == q.device() &&
                    ((s.dim() == 1 && s.size(0) == Hq) ||
                     (s.dim() == 2 && s.size(0) == B && s.size(1) == Hq)),
                "fastattn.", op, ": alibi_slopes must be float32 of shape (Hq,) or (B, Hq) on "
                "query's device, got ", s.scalar_type(), " ", s.sizes());
    in.alibi = s.contiguous();
  }

  DecodeArgs& a = in.a;
  a.q = in.q.data_ptr();
  a.q_sb = in.q.stride(0);
  a.q_sl = in.q.stride(1);
  a.q_sh = in.q.stride(2);
  a.k = in.k.data_ptr();
  a.v = in.v.data_ptr();
  a.k_sp = in.k.stride(0);
  a.k_ss = in.k.stride(1);
  a.k_sh = in.k.stride(2);
  a.v_sp = in.v.stride(0);
  a.v_ss = in.v.stride(1);
  a.v_sh = in.v.stride(2);
  a.seqlens = in.seqlens.data_ptr<int32_t>();
  a.block_table = in.block_table.defined() ? in.block_table.data_ptr<int32_t>() : nullptr;
  a.bt_sb = in.block_table.defined() ? in.block_table.stride(0) : 0;
  a.B = B;
  a.Lq = Lq;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.E = E;
  a.Ev = Ev;
  a.P = P;
  a.page_size = page;
  a.max_pages = max_pages;
  a.alibi = in.alibi.defined() ? in.alibi.data_ptr<float>() : nullptr;
  a.alibi_sb = in.alibi.defined() && in.alibi.dim() == 2 ? Hq : 0;
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.window_left = window_left;
  a.window_right = window_right;
  a.dtype = to_attn_dtype(dt);
  plan_decode_splits(a, max_seqlen, num_splits, target_programs, min_split);

  const auto f32 = q.options().dtype(at::kFloat);
  in.out = new_output({B, Lq, Hq, Ev}, q.options());
  in.lse = new_output({B, Hq, Lq}, f32);
  a.out = in.out.data_ptr();
  a.lse = in.lse.data_ptr<float>();
  a.ws_out = a.ws_lse = nullptr;
  if (a.num_splits > 1) {
    in.ws_out = at::empty({B, Hq, Lq, a.num_splits, Ev}, f32);
    in.ws_lse = at::empty({B, Hq, Lq, a.num_splits}, f32);
    a.ws_out = in.ws_out.data_ptr<float>();
    a.ws_lse = in.ws_lse.data_ptr<float>();
  }
  return in;
}

}  // namespace fastattn
