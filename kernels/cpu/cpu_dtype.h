// The storage types the CPU kernels are instantiated for, as plain data for the per-ISA
// entry points (which take no ATen types).
#pragma once
#include <c10/core/ScalarType.h>

namespace fastattn::cpu {

enum class DType { Float, Half, BFloat16 };

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default: return DType::Float;
  }
}

}  // namespace fastattn::cpu
