// fastattn::layer_norm / rms_norm and their backward ops for CPU tensors: validation and
// allocation (fastattn/norm_host.h), then the kernel built for the widest ISA this CPU has
// (kernels/cpu/norm_kernel.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "fastattn/cpu_isa.h"
#include "fastattn/norm_host.h"
#include "norm_cpu.h"

namespace fastattn::cpu {
namespace {

void forward(const NormForward& f) {
  if (f.args.rows == 0) return;
  const DType x = to_dtype(f.x.scalar_type()), w = to_dtype(f.param_dtype);
  switch (cpu_isa()) {
    case Isa::Avx512: return avx512::norm_forward(f.args, x, w);
    case Isa::Avx2: return avx2::norm_forward(f.args, x, w);
    default: return generic::norm_forward(f.args, x, w);
  }
}

void backward(NormBackward& b) {
  if (b.args.rows == 0) {  // the parameter gradients are sums over no rows
    b.grad_weight.zero_();
    b.grad_bias.zero_();
    return;
  }
  const int64_t groups = norm_grad_groups(b.args.rows);
  const auto f32 = b.input.options().dtype(at::kFloat);
  const at::Tensor pw = b.args.grad_weight ? at::empty({groups, b.args.N}, f32) : at::Tensor();
  const at::Tensor pb = b.args.grad_bias ? at::empty({groups, b.args.N}, f32) : at::Tensor();
  float* pw_ptr = pw.defined() ? pw.data_ptr<float>() : nullptr;
  float* pb_ptr = pb.defined() ? pb.data_ptr<float>() : nullptr;
  const DType x = to_dtype(b.input.scalar_type()), w = to_dtype(b.param_dtype);
  switch (cpu_isa()) {
    case Isa::Avx512: return avx512::norm_backward(b.args, x, w, pw_ptr, pb_ptr);
    case Isa::Avx2: return avx2::norm_backward(b.args, x, w, pw_ptr, pb_ptr);
    default: return generic::norm_backward(b.args, x, w, pw_ptr, pb_ptr);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  NormForward f = prepare_norm_forward("fastattn.layer_norm", false, x, residual, weight, bias, eps);
  forward(f);
  return {f.out, f.residual_out, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, double eps) {
  NormForward f = prepare_norm_forward("fastattn.rms_norm", true, x, residual, weight, {}, eps);
  forward(f);
  return {f.out, f.residual_out, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool has_bias) {
  NormBackward b = prepare_norm_backward("fastattn.layer_norm_backward", false, grad_out,
                                         grad_residual_out, input, weight, &mean, rstd, has_bias);
  backward(b);
  return {b.grad_input, b.grad_weight, b.grad_bias};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  NormBackward b = prepare_norm_backward("fastattn.rms_norm_backward", true, grad_out,
                                         grad_residual_out, input, weight, nullptr, rstd, false);
  backward(b);
  return {b.grad_input, b.grad_weight};
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("layer_norm", &fastattn::cpu::layer_norm_cpu);
  m.impl("rms_norm", &fastattn::cpu::rms_norm_cpu);
  m.impl("layer_norm_backward", &fastattn::cpu::layer_norm_backward_cpu);
  m.impl("rms_norm_backward", &fastattn::cpu::rms_norm_backward_cpu);
}
