// The per-ISA entry points of the CPU quantized-linear kernels (declared in quant_cpu.h; one
// copy per kernels/cpu/quant_<isa>.cpp): the storage-type dispatch and the float32 copy of x.
// The kernels: quant_weight_only.h (+ quant_gemv.h) and quant_int8.h.
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <memory>
#include <type_traits>

#include "quant_cpu.h"
#include "quant_int8.h"
#include "quant_weight_only.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

// Rows of about this many elements of x per task of the elementwise passes.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 16384 / K); }

// x (M, K) as float32 rows: (M, K) floats, deinterleaved per block of 2 kV for int4
// (quant_gemv.h). Returns x itself for float32 int8.
template <typename T>
const float* float_rows(const QuantLinearArgs& a, bool deinterleave,
                        std::unique_ptr<float[]>& buf) {
  const T* x = static_cast<const T*>(a.x);
  const int64_t K = a.K;
  if constexpr (std::is_same_v<T, float>) {
    if (!deinterleave) return x;
  }
  buf.reset(new float[a.M * K]);
  float* xf = buf.get();
  at::parallel_for(0, a.M, row_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (deinterleave) {
        deinterleave_row(x + m * K, xf + m * K, K);
      } else {
        for (int64_t k = 0; k < K; k += kV) {
          const int64_t c = std::min<int64_t>(kV, K - k);
          load_f32(x + m * K + k, c).store(xf + m * K + k, c);
        }
      }
    }
  });
  return xf;
}

template <typename T>
void int8_wo(const QuantLinearArgs& a) {
  std::unique_ptr<float[]> buf;
  const float* xf = float_rows<T>(a, false, buf);
  const Int8Row w{static_cast<const int8_t*>(a.weight), a.K};
  weight_only_linear<T>(a, xf, w, a.scale);
}

template <typename T>
void int4_wo(const QuantLinearArgs& a) {
  std::unique_ptr<float[]> buf;
  const float* xf = float_rows<T>(a, true, buf);
  const Int4Row w{static_cast<const uint8_t*>(a.weight), a.scale, a.zero, a.K, a.group_size};
  weight_only_linear<T>(a, xf, w, nullptr);
}

template <typename T>
void scaled_mm_dispatch(const QuantLinearArgs& a, bool vnni) {
#if defined(CPU_CAPABILITY_AVX512)
  if (vnni) return scaled_mm<T, DotVnni>(a);
  return scaled_mm<T, DotMadd>(a);
#elif defined(CPU_CAPABILITY_AVX2)
  (void)vnni;
  return scaled_mm<T, DotMadd>(a);
#else
  (void)vnni;
  return scaled_mm<T, DotScalar>(a);
#endif
}

#define FASTATTN_QUANT_DTYPES(dtype, F, ...)      \
  switch (dtype) {                                \
    case DType::Half: return F<c10::Half>(__VA_ARGS__);     \
    case DType::BFloat16: return F<c10::BFloat16>(__VA_ARGS__); \
    default: return F<float>(__VA_ARGS__);        \
  }

}  // namespace

void int8_weight_linear(const QuantLinearArgs& a, DType x) {
  FASTATTN_QUANT_DTYPES(x, int8_wo, a)
}

void int4_weight_linear(const QuantLinearArgs& a, DType x) {
  FASTATTN_QUANT_DTYPES(x, int4_wo, a)
}

void quantize_per_token_int8(const void* x, int8_t* xq, float* x_scale, int64_t M, int64_t K,
                             DType x_dtype) {
  at::parallel_for(0, M, row_grain(K), [&](int64_t begin, int64_t end) {
    switch (x_dtype) {
      case DType::Half:
        return quantize_rows(static_cast<const c10::Half*>(x), xq, x_scale, K, begin, end);
      case DType::BFloat16:
        return quantize_rows(static_cast<const c10::BFloat16*>(x), xq, x_scale, K, begin, end);
      default: return quantize_rows(static_cast<const float*>(x), xq, x_scale, K, begin, end);
    }
  });
}

void int8_scaled_mm(const QuantLinearArgs& a, DType out, bool vnni) {
  FASTATTN_QUANT_DTYPES(out, scaled_mm_dispatch, a, vnni)
}

#undef FASTATTN_QUANT_DTYPES

}  // namespace fastattn::cpu::FASTATTN_ISA
