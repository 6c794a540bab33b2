// Per-ISA entry points of the CPU decode attention kernel (kernels/cpu/decode_kernel.h). The
// arguments are plain data (fastattn/attention_args.h DecodeArgs): sizes, strides, pointers.
#pragma once
#include "fastattn/attention_args.h"

namespace fastattn::cpu {

// Writes every element of out (B, Lq, Hq, Ev) and lse (B, Hq, Lq) (through the split-K
// workspace when num_splits > 1).
#define FASTATTN_DECLARE_DECODE(isa) \
  namespace isa {                    \
  void decode_attention(const DecodeArgs& a); \
  }
FASTATTN_DECLARE_DECODE(avx512)
FASTATTN_DECLARE_DECODE(avx2)
FASTATTN_DECLARE_DECODE(generic)
#undef FASTATTN_DECLARE_DECODE

}  // namespace fastattn::cpu
