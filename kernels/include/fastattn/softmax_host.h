// Host-side preparation shared by the CPU and CUDA softmax kernels: input validation and the
// canonical (B, H, M, N) view. The Triton launcher (kernels/triton/softmax.py) mirrors it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "fastattn/alloc.h"
#include "fastattn/softmax_geometry.h"

namespace fastattn {

struct SoftmaxInputs {
  at::Tensor x;     // contiguous (..., N)
  at::Tensor mask;  // undefined, or a (B, H, M, N) view with stride(3) == 1
  MaskKind mask_kind = MaskKind::None;
  SoftmaxGeometry geom{};
};

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline SoftmaxInputs prepare_softmax(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                     double scale) {
  TORCH_CHECK(is_kernel_float(x.scalar_type()),
              "fastattn.softmax: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "fastattn.softmax: x must have at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK(std::isfinite(scale), "fastattn.softmax: scale must be finite, got ", scale);
  SoftmaxInputs in;
  in.x = x.contiguous();
  const int64_t d = x.dim();
  SoftmaxGeometry& g = in.geom;
  g.N = x.size(d - 1);
  g.M = d >= 2 ? x.size(d - 2) : 1;
  g.H = d >= 3 ? x.size(d - 3) : 1;
  g.rows = g.N == 0 ? 0 : x.numel() / g.N;
  const int64_t B = (g.M * g.H) == 0 ? 0 : g.rows / (g.M * g.H);
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& mk = *mask;
    TORCH_CHECK(mk.device() == x.device(), "fastattn.softmax: mask is on ", mk.device(),
                " but x is on ", x.device());
    const at::ScalarType mt = mk.scalar_type();
    if (mt == at::kBool) {
      in.mask_kind = MaskKind::Bool;
    } else if (mt == x.scalar_type()) {
      in.mask_kind = MaskKind::Same;
    } else if (mt == at::kFloat) {
      in.mask_kind = MaskKind::Float;
    } else {
      TORCH_CHECK(false, "fastattn.softmax: mask must be bool, float32 or x's dtype (",
                  x.scalar_type(), "), got ", mt);
    }
    TORCH_CHECK(mk.dim() <= d, "fastattn.softmax: mask with shape ", mk.sizes(),
                " has more dims than x with shape ", x.sizes());
    for (int64_t i = 1; i <= mk.dim(); ++i) {
      const int64_t ms = mk.size(mk.dim() - i), xs = x.size(d - i);
      TORCH_CHECK(ms == xs || ms == 1, "fastattn.softmax: mask with shape ", mk.sizes(),
                  " is not broadcastable to x's shape ", x.sizes());
    }
    // A view when the broadcast dims merge (the usual (B|1, H|1, M|1, N) masks), else a copy.
    at::Tensor m4 = mk.expand(x.sizes()).reshape({B, g.H, g.M, g.N});
    if (g.N > 1 && m4.stride(3) != 1) m4 = m4.contiguous();
    g.mask_stride_b = m4.stride(0);
    g.mask_stride_h = m4.stride(1);
    g.mask_stride_m = m4.stride(2);
    in.mask = m4;
  }
  return in;
}

inline void check_softmax_backward(const at::Tensor& grad_out, const at::Tensor& out) {
  TORCH_CHECK(is_kernel_float(out.scalar_type()),
              "fastattn.softmax_backward: out must be float32, float16 or bfloat16, got ",
              out.scalar_type());
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(),
              "fastattn.softmax_backward: grad_out dtype ", grad_out.scalar_type(),
              " must match out dtype ", out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "fastattn.softmax_backward: grad_out shape ",
              grad_out.sizes(), " must match out shape ", out.sizes());
  TORCH_CHECK(grad_out.device() == out.device(), "fastattn.softmax_backward: grad_out is on ",
              grad_out.device(), " but out is on ", out.device());
  TORCH_CHECK(out.dim() >= 1, "fastattn.softmax_backward: out must have at least 1 dim");
}

}  // namespace fastattn
