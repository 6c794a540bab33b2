// Host-side preparation shared by the CPU and CUDA norm kernels (fastattn::layer_norm,
// rms_norm and their backward ops; schemas in kernels/registration.cpp): argument checks,
// contiguous (rows, N) views, output allocation, and the plain-data launch arguments.
// The Triton launcher (kernels/triton/norm.py) mirrors these checks.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "fastattn/alloc.h"
#include "fastattn/norm_args.h"

namespace fastattn {

inline bool is_norm_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Checks an optional (N,) parameter and returns it contiguous (undefined when absent).
inline at::Tensor norm_param(const char* op, const char* name, const std::optional<at::Tensor>& p,
                             const at::Tensor& x, int64_t N) {
  if (!p.has_value() || !p->defined()) return {};
  const at::Tensor& t = *p;
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must have shape (", N,
              ",) (the size of x's last dim), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ",
              name, " must be float32 or x's dtype ", x.scalar_type(), ", got ", t.scalar_type());
  return t.contiguous();
}

// The dtype the kernels read weight and bias in: weight's, else bias's, else x's.
inline at::ScalarType norm_param_dtype(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& bias) {
  if (weight.defined()) return weight.scalar_type();
  if (bias.defined()) return bias.scalar_type();
  return x.scalar_type();
}

struct NormForward {
  at::Tensor x, residual, weight, bias;       // inputs, contiguous (undefined when absent)
  at::Tensor out, residual_out, mean, rstd;   // outputs (residual_out (0,) without residual)
  at::ScalarType param_dtype;
  NormForwardArgs args;
};

inline NormForward prepare_norm_forward(const char* op, bool rms, const at::Tensor& x,
                                        const std::optional<at::Tensor>& residual,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(is_norm_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite number > 0, got ", eps);
  NormForward f;
  const int64_t N = x.size(-1);
  f.x = x.contiguous();
  if (residual.has_value() && residual->defined()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device() == x.device(), op, ": residual is on ", r.device(), " but x is on ",
                x.device());
    TORCH_CHECK(r.sizes() == x.sizes(), op, ": residual must have x's shape ", x.sizes(),
                ", got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), op, ": residual must have x's dtype ",
                x.scalar_type(), ", got ", r.scalar_type());
    f.residual = r.contiguous();
  }
  f.weight = norm_param(op, "weight", weight, x, N);
  f.bias = norm_param(op, "bias", bias, x, N);
  TORCH_CHECK(!f.weight.defined() || !f.bias.defined() ||
                  f.weight.scalar_type() == f.bias.scalar_type(),
              op, ": weight and bias must have the same dtype, got ", f.weight.scalar_type(),
              " and ", f.bias.scalar_type());
  f.param_dtype = norm_param_dtype(x, f.weight, f.bias);
  const int64_t rows = N == 0 ? 0 : x.numel() / N;
  const auto stats = x.options().dtype(at::kFloat);
  f.out = new_output(x.sizes(), x.options());
  f.residual_out = f.residual.defined() ? new_output(x.sizes(), x.options())
                                        : at::empty({0}, x.options());
  f.mean = rms ? at::Tensor() : new_output({rows}, stats);
  f.rstd = new_output({rows}, stats);
  f.args = NormForwardArgs{f.x.data_ptr(),
                           ptr_or_null(f.residual),
                           ptr_or_null(f.weight),
                           ptr_or_null(f.bias),
                           f.out.data_ptr(),
                           f.residual.defined() ? f.residual_out.data_ptr() : nullptr,
                           rms ? nullptr : f.mean.data_ptr<float>(),
                           f.rstd.data_ptr<float>(),
                           rows,
                           N,
                           static_cast<float>(eps),
                           rms};
  return f;
}

struct NormBackward {
  at::Tensor grad_out, grad_sum, input, weight, mean, rstd;  // contiguous (or undefined)
  at::Tensor grad_input, grad_weight, grad_bias;             // outputs
  at::ScalarType param_dtype;
  NormBackwardArgs args;
};

inline NormBackward prepare_norm_backward(const char* op, bool rms, const at::Tensor& grad_out,
                                          const std::optional<at::Tensor>& grad_residual_out,
                                          const at::Tensor& input,
                                          const std::optional<at::Tensor>& weight,
                                          const at::Tensor* mean, const at::Tensor& rstd,
                                          bool has_bias) {
  TORCH_CHECK(is_norm_float(input.scalar_type()), op,
              ": input must be float32, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dim");
  auto same_as_input = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " shape ", t.sizes(),
                " must match input shape ", input.sizes());
    TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " dtype ",
                t.scalar_type(), " must match input dtype ", input.scalar_type());
    TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(),
                " but input is on ", input.device());
  };
  same_as_input(grad_out, "grad_out");
  NormBackward b;
  b.grad_out = grad_out.contiguous();
  if (grad_residual_out.has_value() && grad_residual_out->defined()) {
    same_as_input(*grad_residual_out, "grad_residual_out");
    b.grad_sum = grad_residual_out->contiguous();
  }
  b.input = input.contiguous();
  const int64_t N = input.size(-1);
  const int64_t rows = N == 0 ? 0 : input.numel() / N;
  b.weight = norm_param(op, "weight", weight, input, N);
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == rows && t.device() == input.device(),
                op, ": ", name, " must be float32 with ", rows, " elements (one per row) on ",
                input.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    return t.contiguous();
  };
  if (!rms) b.mean = check_stat(*mean, "mean");
  b.rstd = check_stat(rstd, "rstd");
  b.param_dtype = b.weight.defined() ? b.weight.scalar_type() : input.scalar_type();
  const auto popts = input.options().dtype(b.param_dtype);
  b.grad_input = new_output(input.sizes(), input.options());
  b.grad_weight = b.weight.defined() ? new_output({N}, popts) : at::empty({0}, popts);
  b.grad_bias = has_bias ? new_output({N}, popts) : at::empty({0}, popts);
  b.args = NormBackwardArgs{b.grad_out.data_ptr(),
                            ptr_or_null(b.grad_sum),
                            b.input.data_ptr(),
                            ptr_or_null(b.weight),
                            rms ? nullptr : b.mean.data_ptr<float>(),
                            b.rstd.data_ptr<float>(),
                            b.grad_input.data_ptr(),
                            b.weight.defined() ? b.grad_weight.data_ptr() : nullptr,
                            has_bias ? b.grad_bias.data_ptr() : nullptr,
                            rows,
                            N,
                            rms};
  return b;
}

}  // namespace fastattn
