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
  AttnGeometry g{};
};

inline AttnInputs prepare_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                    double scale, bool is_causal, double dropout_p, int64_t seed,
                                    int64_t offset) {
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
                   0, 0, 0, AttnMaskKind::None, static_cast<float>(scale), is_causal,
                   static_cast<float>(dropout_p), static_cast<uint64_t>(seed),
                   static_cast<uint64_t>(offset)};
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(!is_causal, "fastattn.", op, ": pass either a mask or is_causal, not both");
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

// out (B, Hq, L, Ev) in q's dtype and lse (B, Hq, L) float32, both contiguous.
inline std::tuple<at::Tensor, at::Tensor> new_attention_outputs(const AttnInputs& in) {
  const AttnGeometry& g = in.g;
  return {new_output({g.B, g.Hq, g.L, g.Ev}, in.q.options()),
          new_output({g.B, g.Hq, g.L}, in.q.options().dtype(at::kFloat))};
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
  return {new_output({g.B, g.Hq, g.L, g.E}, in.q.options()),
          new_output({g.B, g.Hkv, g.S, g.E}, in.q.options()),
          new_output({g.B, g.Hkv, g.S, g.Ev}, in.q.options()),
          want_grad_mask ? new_output({g.B, g.Hq, g.L, g.S}, f32) : at::empty({0}, f32),
          want_grad_mask};
}

// The backward kernels' launch arguments. dO, O: (B, Hq, L, Ev) contiguous; lse (B, Hq, L)
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
  const std::vector<int64_t> o_shape{g.B, g.Hq, g.L, g.Ev};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(o_shape) && out.sizes() == grad_out.sizes(),
              "fastattn.sdpa_backward: grad_out ", grad_out.sizes(), " and out ", out.sizes(),
              " must have shape (B, Hq, L, Ev) = ", at::IntArrayRef(o_shape));
  TORCH_CHECK(grad_out.scalar_type() == in.q.scalar_type() &&
                  out.scalar_type() == in.q.scalar_type(),
              "fastattn.sdpa_backward: grad_out and out must have query's dtype ",
              in.q.scalar_type(), ", got ", grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef(std::vector<int64_t>{g.B, g.Hq, g.L}),
              "fastattn.sdpa_backward: lse must be float32 of shape (B, Hq, L), got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(grad_out.device() == in.q.device() && out.device() == in.q.device() &&
                  lse.device() == in.q.device(),
              "fastattn.sdpa_backward: grad_out, out and lse must be on query's device ",
              in.q.device());
}

}  // namespace fastattn
