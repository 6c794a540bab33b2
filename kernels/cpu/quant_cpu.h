// Per-ISA entry points of the CPU quantized-linear kernels (kernels/cpu/quant_kernel.h): the
// arguments as plain pointers and sizes (no ATen types), filled by kernels/cpu/quant.cpp from
// the checked tensors of fastattn/quant_host.h.
#pragma once
#include <cstdint>

#include "cpu_dtype.h"

namespace fastattn::cpu {

struct QuantLinearArgs {
  const void* x = nullptr;          // (M, K) activations in x's dtype; int8 xq for int8_scaled_mm
  const void* weight = nullptr;     // int8 (N, K), or uint8 packed int4 (N, K / 2)
  const float* scale = nullptr;     // int8: (N,); int4: (N, K / G); int8_scaled_mm: w_scale (N,)
  const uint8_t* zero = nullptr;    // int4 only: (N, K / G)
  const float* x_scale = nullptr;   // int8_scaled_mm only: (M,)
  const void* bias = nullptr;       // (N,) in the output's dtype, or null
  void* out = nullptr;              // (M, N) in the output's dtype
  int64_t M = 0, N = 0, K = 0, group_size = 0;  // M, N >= 1 here (the host skips empty calls)
};

// x / out: storage type of the activations (int8_weight_linear, int4_weight_linear,
// quantize_per_token_int8) or of the output (int8_scaled_mm). vnni: the CPU has AVX-512 VNNI
// (only the avx512 build uses it).
#define FASTATTN_DECLARE_QUANT(isa)                                                      \
  namespace isa {                                                                        \
  void int8_weight_linear(const QuantLinearArgs& a, DType x);                            \
  void int4_weight_linear(const QuantLinearArgs& a, DType x);                            \
  void quantize_per_token_int8(const void* x, int8_t* xq, float* x_scale, int64_t M,     \
                               int64_t K, DType x_dtype);                                \
  void int8_scaled_mm(const QuantLinearArgs& a, DType out, bool vnni);                   \
  }
FASTATTN_DECLARE_QUANT(avx512)
FASTATTN_DECLARE_QUANT(avx2)
FASTATTN_DECLARE_QUANT(generic)
#undef FASTATTN_DECLARE_QUANT

}  // namespace fastattn::cpu
