// fastattn::sdpa / sdpa_backward for CPU tensors: checks and allocation
// (fastattn/attention_host.h), then the kernel built for the widest ISA this CPU has
// (kernels/cpu/attention_kernel.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention_cpu.h"
#include "fastattn/alloc.h"
#include "fastattn/attention_host.h"
#include "fastattn/cpu_isa.h"

namespace fastattn::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sdpa_cpu(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v,
                                            const std::optional<at::Tensor>& mask, double scale,
                                            bool is_causal, double dropout_p, int64_t seed,
                                            int64_t offset, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& alibi_slopes, double softcap) {
  const AttnInputs in = prepare_attention("sdpa", q, k, v, mask, scale, is_causal, dropout_p, seed,
                                          offset, AttnOptions{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                              window_right, bottom_right, alibi_slopes, softcap});
  auto [out, lse] = new_attention_outputs(in);  // out (Bt, Hq, Lt, Ev), lse (Bt, Hq, Lt)
  const AttnForwardArgs a = attention_forward_args(in, out, lse);
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::attention_forward(a); break;
    case Isa::Avx2: avx2::attention_forward(a); break;
    default: generic::attention_forward(a); break;
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    double scale, bool is_causal, double dropout_p, int64_t seed, int64_t offset,
    bool want_grad_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& alibi_slopes, double softcap) {
  const AttnInputs in = prepare_attention("sdpa_backward", q, k, v, mask, scale, is_causal,
                                          dropout_p, seed, offset, AttnOptions{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                              window_right, bottom_right, alibi_slopes, softcap});
  check_attention_backward(in, grad_out, out, lse);
  const at::Tensor dO = grad_out.contiguous();  // (Bt, Hq, Lt, Ev)
  const at::Tensor O = out.contiguous();        // (Bt, Hq, Lt, Ev)
  const at::Tensor lse_c = lse.contiguous();    // (Bt, Hq, Lt)
  AttnGrads grads = new_attention_grads(in, want_grad_mask);
  const AttnBackwardArgs a = attention_backward_args(in, dO, O, lse_c, grads);
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::attention_backward(a); break;
    case Isa::Avx2: avx2::attention_backward(a); break;
    default: generic::attention_backward(a); break;
  }
  return {grads.q, grads.k, grads.v, grads.mask};
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("sdpa", &fastattn::cpu::sdpa_cpu);
  m.impl("sdpa_backward", &fastattn::cpu::sdpa_backward_cpu);
}
