// Plain-data arguments of the CPU softmax kernels and their per-ISA entry points.
#pragma once
#include <cstdint>

#include "cpu_dtype.h"
#include "fastattn/softmax_geometry.h"

namespace fastattn::cpu {

struct SoftmaxForwardArgs {
  const void* x;     // (rows, N) contiguous
  const void* mask;  // see SoftmaxGeometry; null when mask_kind == None
  void* out;         // (rows, N) contiguous
  SoftmaxGeometry geom;
  MaskKind mask_kind;
  DType dtype;
  float scale;
  bool causal;
};

struct SoftmaxBackwardArgs {
  const void* grad_out;  // (rows, N) contiguous, all three
  const void* out;
  void* grad_in;
  int64_t rows;
  int64_t N;
  DType dtype;
  float scale;
};

#define FASTATTN_DECLARE_SOFTMAX(isa)                   \
  namespace isa {                                       \
  void softmax_forward(const SoftmaxForwardArgs& a);    \
  void softmax_backward(const SoftmaxBackwardArgs& a);  \
  }
FASTATTN_DECLARE_SOFTMAX(avx512)
FASTATTN_DECLARE_SOFTMAX(avx2)
FASTATTN_DECLARE_SOFTMAX(generic)
#undef FASTATTN_DECLARE_SOFTMAX

}  // namespace fastattn::cpu
