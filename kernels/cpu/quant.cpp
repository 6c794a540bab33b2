// fastattn::int8_weight_linear / int4_weight_linear / quantize_per_token_int8 / int8_scaled_mm
// for CPU tensors: validation and allocation (fastattn/quant_host.h), then the kernels built for
// the widest ISA this CPU has (kernels/cpu/quant_kernel.h); int8_scaled_mm also asks whether the
// CPU has AVX-512 VNNI (at run time, never only at compile time).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "fastattn/cpu_isa.h"
#include "fastattn/quant_host.h"
#include "quant_cpu.h"

namespace fastattn::cpu {
namespace {

QuantLinearArgs args_of(const QuantLinear& q) {
  QuantLinearArgs a;
  a.x = q.x.data_ptr();
  a.weight = q.weight.data_ptr();
  a.scale = q.scale.data_ptr<float>();
  a.zero = q.zero.defined() ? q.zero.data_ptr<uint8_t>() : nullptr;
  a.x_scale = q.x_scale.defined() ? q.x_scale.data_ptr<float>() : nullptr;
  a.bias = q.bias.defined() ? q.bias.data_ptr() : nullptr;
  a.out = q.out.data_ptr();
  a.M = q.M;
  a.N = q.N;
  a.K = q.K;
  a.group_size = q.group_size;
  return a;
}

at::Tensor int8_weight_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  QuantLinear q = prepare_int8_weight_linear(x, weight, scale, bias);
  if (q.M == 0 || q.N == 0) return q.out;
  const QuantLinearArgs a = args_of(q);
  const DType t = to_dtype(q.x.scalar_type());
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::int8_weight_linear(a, t); break;
    case Isa::Avx2: avx2::int8_weight_linear(a, t); break;
    default: generic::int8_weight_linear(a, t);
  }
  return q.out;
}

at::Tensor int4_weight_linear_cpu(const at::Tensor& x, const at::Tensor& packed,
                                  const at::Tensor& scale, const at::Tensor& zero,
                                  int64_t group_size, const std::optional<at::Tensor>& bias) {
  QuantLinear q = prepare_int4_weight_linear(x, packed, scale, zero, group_size, bias);
  if (q.M == 0 || q.N == 0) return q.out;
  const QuantLinearArgs a = args_of(q);
  const DType t = to_dtype(q.x.scalar_type());
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::int4_weight_linear(a, t); break;
    case Isa::Avx2: avx2::int4_weight_linear(a, t); break;
    default: generic::int4_weight_linear(a, t);
  }
  return q.out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cpu(const at::Tensor& x) {
  QuantizeRows r = prepare_quantize_per_token_int8(x);
  if (r.M == 0) return {r.xq, r.x_scale};
  const void* xp = r.x.data_ptr();
  int8_t* xq = r.xq.data_ptr<int8_t>();
  float* xs = r.x_scale.data_ptr<float>();
  const DType t = to_dtype(r.x.scalar_type());
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::quantize_per_token_int8(xp, xq, xs, r.M, r.K, t); break;
    case Isa::Avx2: avx2::quantize_per_token_int8(xp, xq, xs, r.M, r.K, t); break;
    default: generic::quantize_per_token_int8(xp, xq, xs, r.M, r.K, t);
  }
  return {r.xq, r.x_scale};
}

at::Tensor int8_scaled_mm_cpu(const at::Tensor& xq, const at::Tensor& x_scale,
                              const at::Tensor& weight, const at::Tensor& w_scale,
                              const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  QuantLinear q = prepare_int8_scaled_mm(xq, x_scale, weight, w_scale, bias, out_dtype);
  if (q.M == 0 || q.N == 0) return q.out;
  const QuantLinearArgs a = args_of(q);
  const DType t = to_dtype(out_dtype);
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::int8_scaled_mm(a, t, cpu_has_avx512_vnni()); break;
    case Isa::Avx2: avx2::int8_scaled_mm(a, t, false); break;
    default: generic::int8_scaled_mm(a, t, false);
  }
  return q.out;
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("int8_weight_linear", &fastattn::cpu::int8_weight_linear_cpu);
  m.impl("int4_weight_linear", &fastattn::cpu::int4_weight_linear_cpu);
  m.impl("quantize_per_token_int8", &fastattn::cpu::quantize_per_token_int8_cpu);
  m.impl("int8_scaled_mm", &fastattn::cpu::int8_scaled_mm_cpu);
}
