// CPU scaled dot-product attention kernels, compiled once per ISA (see fastattn/cpu_isa.h):
// the entry points of attention_cpu.h, dispatching on the storage dtype and the mask kind.
// The algorithm: attention_forward.h (forward), attention_backward.h (backward); their shared
// pieces: attention_gemm.h (products, packing) and attention_score.h (mask, dropout, exp).
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "attention_backward.h"
#include "attention_cpu.h"
#include "attention_forward.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

// Calls fn(T{}, M{}) with T the storage type and M the mask element type (nullptr_t: none).
template <typename Fn>
void dispatch_attention(AttnDType dtype, AttnMaskKind mask_kind, const Fn& fn) {
  auto with_mask = [&](auto t) {
    using T = decltype(t);
    switch (mask_kind) {
      case AttnMaskKind::None: return fn(t, nullptr);
      case AttnMaskKind::Bool: return fn(t, bool{});
      case AttnMaskKind::Same: return fn(t, T{});
      case AttnMaskKind::Float: return fn(t, float{});
    }
  };
  switch (dtype) {
    case AttnDType::Float: return with_mask(float{});
    case AttnDType::Half: return with_mask(c10::Half{});
    case AttnDType::BFloat16: return with_mask(c10::BFloat16{});
  }
}

}  // namespace

void attention_forward(const AttnForwardArgs& a) {
  dispatch_attention(a.dtype, a.g.mask_kind, [&](auto t, auto m) {
    attention_forward_typed<decltype(t), decltype(m)>(a);
  });
}

void attention_backward(const AttnBackwardArgs& a) {
  dispatch_attention(a.dtype, a.g.mask_kind, [&](auto t, auto m) {
    attention_backward_typed<decltype(t), decltype(m)>(a);
  });
}

}  // namespace fastattn::cpu::FASTATTN_ISA
