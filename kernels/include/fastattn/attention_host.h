// Host-side preparation shared by the CPU and CUDA attention kernels: argument checks (the
// Python layer checks first with friendlier messages; these keep the raw operators safe),
// the plain-data geometry, and output allocation. kernels/triton/attention.py mirrors it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "fastattn/alloc.h"
#include "fastattn/attention_args.h"

namespace fastattn {

inline AttnDType to_attn_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return AttnDType::Half;
    case at::kBFloat16: return AttnDType::BFloat16;
    default: return AttnDType::Float;
  }
}

// A tensor the kernels can read: same device, stride(-1) == 1 (else a contiguous copy).
inline at::Tensor attn_last_dim_dense(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

struct AttnInputs {
  at::Tensor q, k, v, mask;  // mask undefined when absent
  at::Tensor cu_q, cu_k, alibi;  // undefined when absent
  AttnGeometry g{};
};

// The score modifiers and varlen arguments that follow the core sdpa arguments in the
// sdpa / sdpa_backward schemas (kernels/registration.cpp), in schema order.
struct AttnOptions {
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = false;
  std::optional<at::Tensor> alibi_slopes;
  double softcap = 0.0;
};

namespace detail {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// cu_seqlens: int32 (B + 1,) contiguous on q's device. On the CPU its values are checked
// (starts at 0, non-decreasing, ends at `total`, largest step <= max_len); CUDA callers go
// through fastattn.attention, which checks them before launching.
inline at::Tensor check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu,
                                   const at::Tensor& q, int64_t total, int64_t max_len) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1, "fastattn.", op,
              ": ", name, " must be a 1-d int32 tensor of B + 1 offsets, got ", cu.scalar_type(),
              " ", cu.sizes());
  TORCH_CHECK(cu.device() == q.device(), "fastattn.", op, ": ", name, " is on ", cu.device(),
              " but query is on ", q.device());
  at::Tensor c = cu.contiguous();
  if (c.device().is_cpu()) {
    const int32_t* p = c.data_ptr<int32_t>();
    TORCH_CHECK(p[0] == 0, "fastattn.", op, ": ", name, "[0] must be 0, got ", p[0]);
    for (int64_t b = 1; b < c.size(0); ++b) {
      TORCH_CHECK(p[b] >= p[b - 1], "fastattn.", op, ": ", name,
                  " must be non-decreasing, but entry ", b, " (", p[b], ") < entry ", b - 1,
                  " (", p[b - 1], ")");
      TORCH_CHECK(p[b] - p[b - 1] <= max_len, "fastattn.", op, ": sequence ", b - 1, " of ",
                  name, " has ", p[b] - p[b - 1], " tokens, more than max_seqlen ", max_len);
    }
    TORCH_CHECK(p[c.size(0) - 1] == total, "fastattn.", op, ": ", name, "[-1] = ",
                p[c.size(0) - 1], " must equal the packed token count ", total);
  }
  return c;
}

}  // namespace detail

inline AttnInputs prepare_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                    double scale, bool is_causal, double dropout_p, int64_t seed,
                                    int64_t offset, const AttnOptions& opt = {}) {
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "fastattn.", op,
              ": query must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "fastattn.", op,
              ": key and value must have query's dtype ", dt, ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastattn.", op,
              ": the operator takes 4-d query (B, Hq, L, E), key (B, Hkv, S, E) and value "
              "(B, Hkv, S, Ev), got ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "fastattn.", op,
              ": query, key and value must be on one device, got ", q.device(), ", ",
              k.device(), " and ", v.device());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "fastattn.", op, ": batch sizes differ: query ",
              B, ", key ", k.size(0), ", value ", v.size(0));
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S, "fastattn.", op, ": key ", k.sizes(),
              " and value ", v.sizes(), " must agree in heads and length");
  TORCH_CHECK(k.size(3) == E, "fastattn.", op, ": key's last dim ", k.size(3),
              " must equal query's ", E);
  TORCH_CHECK(Hkv > 0 ? Hq % Hkv == 0 : Hq == 0, "fastattn.", op, ": query heads ", Hq,
              " must be a multiple of key/value heads ", Hkv);
  TORCH_CHECK(std::isfinite(scale), "fastattn.", op, ": scale must be finite, got ", scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn.", op,
              ": dropout_p must be in [0, 1), got ", dropout_p);
  AttnInputs in;
  in.q = attn_last_dim_dense(q);
  in.k = attn_last_dim_dense(k);
  in.v = attn_last_dim_dense(v);
  AttnGeometry& g = in.g;
  g = AttnGeometry{B, Hq, Hkv, L, S, E, Ev,
                   in.q.stride(0), in.q.stride(1), in.q.stride(2),
                   in.k.stride(0), in.k.stride(1), in.k.stride(2),
                   in.v.stride(0), in.v.stride(1), in.v.stride(2),
                   0, 0, 0, AttnMaskKind::None, static_cast<float>(scale),
                   static_cast<float>(dropout_p), static_cast<uint64_t>(seed),
                   static_cast<uint64_t>(offset),
                   B, L, S, nullptr, nullptr, opt.window_left, opt.window_right,
                   opt.bottom_right, nullptr, 0, static_cast<float>(opt.softcap)};
  TORCH_CHECK(opt.window_left >= -1 && opt.window_right >= -1, "fastattn.", op,
              ": window sizes must be >= 0 (or -1: unbounded), got (", opt.window_left, ", ",
              opt.window_right, ")");
  if (is_causal) g.window_right = 0;
  TORCH_CHECK(std::isfinite(opt.softcap) && opt.softcap >= 0.0, "fastattn.", op,
              ": softcap must be a finite number >= 0 (0: none), got ", opt.softcap);
  const bool varlen = detail::present(opt.cu_seqlens_q);
  TORCH_CHECK(varlen == detail::present(opt.cu_seqlens_k), "fastattn.", op,
              ": pass both cu_seqlens_q and cu_seqlens_k or neither");
  if (varlen) {
    TORCH_CHECK(B == 1, "fastattn.", op, ": with cu_seqlens the operator takes packed tensors "
                "with batch dim 1, query (1, Hq, total_q, E), got ", q.sizes());
    TORCH_CHECK(!(mask.has_value() && mask->defined()), "fastattn.", op,
                ": a mask cannot be combined with cu_seqlens (use the window, causal or ALiBi)");
    TORCH_CHECK(opt.max_seqlen_q >= 0 && opt.max_seqlen_k >= 0, "fastattn.", op,
                ": max_seqlen_q/max_seqlen_k must be >= 0");
    in.cu_q = detail::check_cu_seqlens(op, "cu_seqlens_q", *opt.cu_seqlens_q, q, L,
                                       opt.max_seqlen_q);
    in.cu_k = detail::check_cu_seqlens(op, "cu_seqlens_k", *opt.cu_seqlens_k, q, S,
                                       opt.max_seqlen_k);
    TORCH_CHECK(in.cu_q.size(0) == in.cu_k.size(0), "fastattn.", op,
                ": cu_seqlens_q has ", in.cu_q.size(0), " entries and cu_seqlens_k ",
                in.cu_k.size(0), "; both must be B + 1");
    g.B = in.cu_q.size(0) - 1;
    g.L = opt.max_seqlen_q;
    g.S = opt.max_seqlen_k;
    g.q_sb = g.k_sb = g.v_sb = 0;
    g.cu_q = in.cu_q.data_ptr<int32_t>();
    g.cu_k = in.cu_k.data_ptr<int32_t>();
  }
  if (detail::present(opt.alibi_slopes)) {
    const at::Tensor& a = *opt.alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, "fastattn.", op,
                ": alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK(a.device() == q.device(), "fastattn.", op, ": alibi_slopes is on ", a.device(),
                " but query is on ", q.device());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == Hq) || (a.dim() == 2 && a.size(0) == g.B &&
                                                      a.size(1) == Hq),
                "fastattn.", op, ": alibi_slopes must have shape (Hq,) = (", Hq, ") or (B, Hq) = (",
                g.B, ", ", Hq, "), got ", a.sizes());
    in.alibi = a.contiguous();
    g.alibi = in.alibi.data_ptr<float>();
    g.alibi_sb = a.dim() == 2 ? Hq : 0;
  }
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(!is_causal, "fastattn.", op, ": pass either a mask or is_causal, not both");
    TORCH_CHECK(!varlen, "fastattn.", op, ": a mask cannot be combined with cu_seqlens");
    TORCH_CHECK(m.device() == q.device(), "fastattn.", op, ": mask is on ", m.device(),
                " but query is on ", q.device());
    const at::ScalarType mt = m.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == dt || mt == at::kFloat, "fastattn.", op,
                ": mask must be bool, float32 or query's dtype ", dt, ", got ", mt);
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == Hq && m.size(2) == L &&
                    m.size(3) == S,
                "fastattn.", op, ": the operator takes a mask of shape (B, Hq, L, S) = (", B,
                ", ", Hq, ", ", L, ", ", S, ") (broadcast dims as stride 0), got ", m.sizes());
    in.mask = attn_last_dim_dense(m);
    g.m_sb = in.mask.stride(0);
    g.m_sh = in.mask.stride(1);
    g.m_sl = in.mask.stride(2);
    g.mask_kind = mt == at::kBool ? AttnMaskKind::Bool
                                  : (mt == dt ? AttnMaskKind::Same : AttnMaskKind::Float);
  }
  return in;
}

// out (Bt, Hq, Lt, Ev) in q's dtype and lse (Bt, Hq, Lt) float32, both contiguous.
inline std::tuple<at::Tensor, at::Tensor> new_attention_outputs(const AttnInputs& in) {
  const AttnGeometry& g = in.g;
  return {new_output({g.Bt, g.Hq, g.Lt, g.Ev}, in.q.options()),
          new_output({g.Bt, g.Hq, g.Lt}, in.q.options().dtype(at::kFloat))};
}

// The forward kernels' launch arguments for outputs from new_attention_outputs.
inline AttnForwardArgs attention_forward_args(const AttnInputs& in, at::Tensor& out,
                                              at::Tensor& lse) {
  return {in.q.data_ptr(),
          in.k.data_ptr(),
          in.v.data_ptr(),
          in.mask.defined() ? in.mask.data_ptr() : nullptr,
          out.data_ptr(),
          lse.data_ptr<float>(),
          in.g,
          to_attn_dtype(in.q.scalar_type())};
}

// What sdpa_backward returns: grad_q/k/v contiguous in q's dtype with q/k/v's shapes, and
// grad_mask (B, Hq, L, S) float32 when wanted, else an empty (0,) float32 tensor.
struct AttnGrads {
  at::Tensor q, k, v, mask;
  bool want_mask;
};

inline AttnGrads new_attention_grads(const AttnInputs& in, bool want_grad_mask) {
  const AttnGeometry& g = in.g;
  const auto f32 = in.q.options().dtype(at::kFloat);
  return {new_output({g.Bt, g.Hq, g.Lt, g.E}, in.q.options()),
          new_output({g.Bt, g.Hkv, g.St, g.E}, in.q.options()),
          new_output({g.Bt, g.Hkv, g.St, g.Ev}, in.q.options()),
          want_grad_mask ? new_output({g.B, g.Hq, g.L, g.S}, f32) : at::empty({0}, f32),
          want_grad_mask};
}

// The backward kernels' launch arguments. dO, O: (Bt, Hq, Lt, Ev) contiguous; lse (Bt, Hq, Lt)
// float32 contiguous; grads from new_attention_grads.
inline AttnBackwardArgs attention_backward_args(const AttnInputs& in, const at::Tensor& dO,
                                                const at::Tensor& O, const at::Tensor& lse,
                                                AttnGrads& grads) {
  return {dO.data_ptr(),
          in.q.data_ptr(),
          in.k.data_ptr(),
          in.v.data_ptr(),
          O.data_ptr(),
          lse.data_ptr<float>(),
          in.mask.defined() ? in.mask.data_ptr() : nullptr,
          grads.q.data_ptr(),
          grads.k.data_ptr(),
          grads.v.data_ptr(),
          grads.want_mask ? grads.mask.data_ptr<float>() : nullptr,
          in.g,
          to_attn_dtype(in.q.scalar_type())};
}

inline void check_attention_backward(const AttnInputs& in, const at::Tensor& grad_out,
                                     const at::Tensor& out, const at::Tensor& lse) {
  const AttnGeometry& g = in.g;
  const std::vector<int64_t> o_shape{g.Bt, g.Hq, g.Lt, g.Ev};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(o_shape) && out.sizes() == grad_out.sizes(),
              "fastattn.sdpa_backward: grad_out ", grad_out.sizes(), " and out ", out.sizes(),
              " must have shape (Bt, Hq, Lt, Ev) = ", at::IntArrayRef(o_shape));
  TORCH_CHECK(grad_out.scalar_type() == in.q.scalar_type() &&
                  out.scalar_type() == in.q.scalar_type(),
              "fastattn.sdpa_backward: grad_out and out must have query's dtype ",
              in.q.scalar_type(), ", got ", grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef(std::vector<int64_t>{g.Bt, g.Hq, g.Lt}),
              "fastattn.sdpa_backward: lse must be float32 of shape (Bt, Hq, Lt), got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(grad_out.device() == in.q.device() && out.device() == in.q.device() &&
                  lse.device() == in.q.device(),
              "fastattn.sdpa_backward: grad_out, out and lse must be on query's device ",
              in.q.device());
}

}  // namespace fastattn
