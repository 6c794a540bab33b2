// Host-side checks shared by the CPU and CUDA quantized-linear kernels (fastattn::
// int8_weight_linear, int4_weight_linear, quantize_per_token_int8, int8_scaled_mm; schemas and
// formats in kernels/registration.cpp). Each prepare_* validates the arguments with messages
// naming the argument and what was expected, and returns contiguous inputs plus the (M, N) output.
// The Triton launchers (kernels/triton/quant*.py) mirror these checks.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "fastattn/alloc.h"

namespace fastattn {

inline bool is_quant_activation(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

struct QuantLinear {
  at::Tensor x, weight, scale, bias;  // contiguous inputs (bias may be undefined); for
                                      // int8_scaled_mm x is xq and scale is w_scale
  at::Tensor zero;                    // int4 only
  at::Tensor x_scale;                 // int8_scaled_mm only
  at::Tensor out;                           // (M, N), x's dtype (out_dtype for int8_scaled_mm)
  int64_t M, N, K, group_size;              // group_size: 0 unless int4
};

namespace quant_detail {

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& x, const char* x_name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but ", x_name,
              " is on ", x.device());
}

// x: (M, K) floating activation; returns it contiguous.
inline at::Tensor activation(const char* op, const at::Tensor& x) {
  TORCH_CHECK(is_quant_activation(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-d (M, K), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have K >= 1 columns, got shape ", x.sizes());
  return x.contiguous();
}

inline at::Tensor channel_vector(const char* op, const char* name, const at::Tensor& t,
                                 const at::Tensor& x, int64_t N, at::ScalarType dtype) {
  check_same_device(op, name, t, x, "x");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must have shape (", N,
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  return t.contiguous();
}

inline at::Tensor optional_bias(const char* op, const std::optional<at::Tensor>& bias,
                                const at::Tensor& x, int64_t N, at::ScalarType dtype) {
  if (!bias.has_value() || !bias->defined()) return {};
  return channel_vector(op, "bias", *bias, x, N, dtype);
}

inline at::Tensor int8_weight(const char* op, const at::Tensor& w, const at::Tensor& x,
                              int64_t K) {
  check_same_device(op, "weight", w, x, "x");
  TORCH_CHECK(w.scalar_type() == at::kChar, op, ": weight must be int8, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == K, op, ": weight must have shape (N, ", K,
              ") (K = x.size(1)), got ", w.sizes());
  return w.contiguous();
}

}  // namespace quant_detail

inline QuantLinear prepare_int8_weight_linear(const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& scale,
                                              const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "fastattn::int8_weight_linear";
  QuantLinear q;
  q.x = quant_detail::activation(op, x);
  q.M = q.x.size(0);
  q.K = q.x.size(1);
  q.weight = quant_detail::int8_weight(op, weight, q.x, q.K);
  q.N = q.weight.size(0);
  q.scale = quant_detail::channel_vector(op, "scale", scale, q.x, q.N, at::kFloat);
  q.bias = quant_detail::optional_bias(op, bias, q.x, q.N, q.x.scalar_type());
  q.group_size = 0;
  q.out = new_output({q.M, q.N}, q.x.options());
  return q;
}

inline QuantLinear prepare_int4_weight_linear(const at::Tensor& x, const at::Tensor& packed,
                                              const at::Tensor& scale, const at::Tensor& zero,
                                              int64_t group_size,
                                              const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "fastattn::int4_weight_linear";
  QuantLinear q;
  q.x = quant_detail::activation(op, x);
  q.M = q.x.size(0);
  q.K = q.x.size(1);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, op,
              ": group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(q.K % group_size == 0, op, ": K = x.size(1) = ", q.K,
              " must be a multiple of group_size ", group_size);
  q.group_size = group_size;
  quant_detail::check_same_device(op, "packed", packed, q.x, "x");
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(1) == q.K / 2, op,
              ": packed must have shape (N, ", q.K / 2, ") (two 4-bit values per byte), got ",
              packed.sizes());
  q.weight = packed.contiguous();
  q.N = q.weight.size(0);
  const int64_t groups = q.K / group_size;
  for (const auto& [name, t, dtype] :
       {std::tuple<const char*, const at::Tensor&, at::ScalarType>{"scale", scale, at::kFloat},
        std::tuple<const char*, const at::Tensor&, at::ScalarType>{"zero", zero, at::kByte}}) {
    quant_detail::check_same_device(op, name, t, q.x, "x");
    TORCH_CHECK(t.dim() == 2 && t.size(0) == q.N && t.size(1) == groups, op, ": ", name,
                " must have shape (", q.N, ", ", groups, ") (N, K / group_size), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                t.scalar_type());
  }
  q.scale = scale.contiguous();
  q.zero = zero.contiguous();
  q.bias = quant_detail::optional_bias(op, bias, q.x, q.N, q.x.scalar_type());
  q.out = new_output({q.M, q.N}, q.x.options());
  return q;
}

// quantize_per_token_int8: only x is set (contiguous), and out/scale are the two outputs.
struct QuantizeRows {
  at::Tensor x, xq, x_scale;
  int64_t M, K;
};

inline QuantizeRows prepare_quantize_per_token_int8(const at::Tensor& x) {
  constexpr const char* op = "fastattn::quantize_per_token_int8";
  QuantizeRows r;
  r.x = quant_detail::activation(op, x);
  r.M = r.x.size(0);
  r.K = r.x.size(1);
  r.xq = at::empty({r.M, r.K}, r.x.options().dtype(at::kChar));
  r.x_scale = new_output({r.M}, r.x.options().dtype(at::kFloat));
  return r;
}

// int8_scaled_mm accumulates in int32, exact while K * 127 * 127 < 2^31.
constexpr int64_t kMaxExactK = 131071;

inline QuantLinear prepare_int8_scaled_mm(const at::Tensor& xq, const at::Tensor& x_scale,
                                          const at::Tensor& weight, const at::Tensor& w_scale,
                                          const std::optional<at::Tensor>& bias,
                                          at::ScalarType out_dtype) {
  constexpr const char* op = "fastattn::int8_scaled_mm";
  TORCH_CHECK(xq.scalar_type() == at::kChar, op, ": xq must be int8, got ", xq.scalar_type());
  TORCH_CHECK(xq.dim() == 2 && xq.size(1) >= 1, op, ": xq must be 2-d (M, K) with K >= 1, got ",
              xq.sizes());
  TORCH_CHECK(xq.size(1) <= kMaxExactK, op, ": K = ", xq.size(1), " exceeds ", kMaxExactK,
              ", beyond which the int32 sum of 127 x 127 products can overflow");
  TORCH_CHECK(is_quant_activation(out_dtype), op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  QuantLinear q;
  q.x = xq.contiguous();
  q.M = q.x.size(0);
  q.K = q.x.size(1);
  q.weight = quant_detail::int8_weight(op, weight, q.x, q.K);
  q.N = q.weight.size(0);
  q.x_scale = quant_detail::channel_vector(op, "x_scale", x_scale, q.x, q.M, at::kFloat);
  q.scale = quant_detail::channel_vector(op, "w_scale", w_scale, q.x, q.N, at::kFloat);
  q.bias = quant_detail::optional_bias(op, bias, q.x, q.N, out_dtype);
  q.group_size = 0;
  q.out = new_output({q.M, q.N}, q.x.options().dtype(out_dtype));
  return q;
}

}  // namespace fastattn
