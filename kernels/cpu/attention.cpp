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
                                            int64_t offset) {
  const AttnInputs in =
      prepare_attention("sdpa", q, k, v, mask, scale, is_causal, dropout_p, seed, offset);
  auto [out, lse] = new_attention_outputs(in);  // out (B, Hq, L, Ev), lse (B, Hq, L)
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
    bool want_grad_mask) {
  const AttnInputs in = prepare_attention("sdpa_backward", q, k, v, mask, scale, is_causal,
                                          dropout_p, seed, offset);
  check_attention_backward(in, grad_out, out, lse);
  const at::Tensor dO = grad_out.contiguous();  // (B, Hq, L, Ev)
  const at::Tensor O = out.contiguous();        // (B, Hq, L, Ev)
  const at::Tensor lse_c = lse.contiguous();    // (B, Hq, L)
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
