// Per-ISA entry points of the CPU attention kernels (kernels/cpu/attention_kernel.h). The
// arguments are plain data (fastattn/attention_args.h): sizes, element strides, pointers.
#pragma once
#include "fastattn/attention_args.h"

namespace fastattn::cpu {

// forward: writes every element of out (B, Hq, L, Ev) and lse (B, Hq, L).
// backward: writes every element of grad_q, grad_k, grad_v and (when not null) grad_mask.
#define FASTATTN_DECLARE_ATTENTION(isa)                \
  namespace isa {                                      \
  void attention_forward(const AttnForwardArgs& a);    \
  void attention_backward(const AttnBackwardArgs& a);  \
  }
FASTATTN_DECLARE_ATTENTION(avx512)
FASTATTN_DECLARE_ATTENTION(avx2)
FASTATTN_DECLARE_ATTENTION(generic)
#undef FASTATTN_DECLARE_ATTENTION

}  // namespace fastattn::cpu
