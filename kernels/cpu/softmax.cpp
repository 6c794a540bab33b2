// fastattn::softmax / softmax_backward for CPU tensors: validation, then the kernel built for
// the widest ISA this CPU has (kernels/cpu/softmax_kernel.h).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "fastattn/alloc.h"
#include "fastattn/cpu_isa.h"
#include "fastattn/softmax_host.h"
#include "softmax_cpu.h"

namespace fastattn::cpu {
namespace {

at::Tensor softmax_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                       bool causal) {
  SoftmaxInputs in = prepare_softmax(x, mask, scale);
  at::Tensor out = new_output(in.x.sizes(), in.x.options());
  if (in.geom.rows == 0) return out;
  const SoftmaxForwardArgs a{in.x.data_ptr(),
                             in.mask.defined() ? in.mask.data_ptr() : nullptr,
                             out.data_ptr(),
                             in.geom,
                             in.mask_kind,
                             to_dtype(in.x.scalar_type()),
                             static_cast<float>(scale),
                             causal};
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::softmax_forward(a); break;
    case Isa::Avx2: avx2::softmax_forward(a); break;
    default: generic::softmax_forward(a); break;
  }
  return out;
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, double scale) {
  check_softmax_backward(grad_out, out);
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor y = out.contiguous();
  at::Tensor dx = new_output(y.sizes(), y.options());
  const int64_t N = y.size(-1);
  if (y.numel() == 0) return dx;
  const SoftmaxBackwardArgs a{dy.data_ptr(), y.data_ptr(),  dx.data_ptr(),
                              y.numel() / N, N,             to_dtype(y.scalar_type()),
                              static_cast<float>(scale)};
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::softmax_backward(a); break;
    case Isa::Avx2: avx2::softmax_backward(a); break;
    default: generic::softmax_backward(a); break;
  }
  return dx;
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("softmax", &fastattn::cpu::softmax_cpu);
  m.impl("softmax_backward", &fastattn::cpu::softmax_backward_cpu);
}
