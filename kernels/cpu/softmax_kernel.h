// CPU softmax kernels, compiled once per ISA (see fastattn/cpu_isa.h). Rows are independent:
// at::parallel_for splits them across threads; within a row at::vec vectors do the math in
// float32 whatever the storage type.
//
// forward, per row of N (causal keeps the first `len` columns, the rest are 0):
//   pass 1  max of z = scale * x + mask  (masked -> -inf); reduced types store z (float32)
//   pass 2  e = exp(z - max) (float rows recompute z) into the float32 row buffer; sum
//   pass 3  out = e / sum (0 where masked; a fully masked row is all 0)
// backward, per row:  dx = scale * y * (dy - sum(dy * y))
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "fastattn/softmax_geometry.h"
#include "softmax_cpu.h"
#include "vec_io.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// z where the kV bools at p are true, -inf elsewhere.
inline Vec keep_where(Vec z, const bool* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_mask_blend_ps(_mm_test_epi8_mask(bytes, bytes), _mm512_set1_ps(kNegInf), z);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256()));
  return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), z, keep);
#else
  alignas(64) float keep[kV];
  for (int k = 0; k < kV; ++k) keep[k] = p[k] ? 1.f : 0.f;
  return Vec::blendv(Vec(kNegInf), z, Vec::loadu(keep) != Vec(0.f));
#endif
}

// Applies the mask to the `count` (<= kV) logits from column j on.
template <typename M>
inline Vec apply_mask(Vec z, const M* mask, int64_t j, int64_t count) {
  if constexpr (std::is_same_v<M, bool>) {
    if (count == kV) return keep_where(z, mask + j);
    alignas(16) bool tmp[kV] = {};
    for (int64_t k = 0; k < count; ++k) tmp[k] = mask[j + k];
    return keep_where(z, tmp);
  } else if constexpr (std::is_same_v<M, std::nullptr_t>) {
    return z;
  } else {
    return z + load_f32(mask + j, count);
  }
}

// Every pass walks a row in vectors of kV, the last one partial, so sums and maxima are
// always lane-wise with one final tree reduction (a scalar tail loop would add up to kV - 1
// terms one by one onto the reduced sum and lose accuracy).
template <typename T, typename M>
void forward_rows(const SoftmaxForwardArgs& a, int64_t begin, int64_t end) {
  const SoftmaxGeometry& g = a.geom;
  const int64_t N = g.N;
  // float rows are computed in the output itself; reduced types need a float32 row buffer.
  std::unique_ptr<float[]> scratch;
  if constexpr (!std::is_same_v<T, float>) scratch.reset(new float[N]);
  const Vec vscale(a.scale), ninf(kNegInf), zero(0.f);
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * N;
    T* out = static_cast<T*>(a.out) + row * N;
    const M* mask = nullptr;
    if constexpr (!std::is_same_v<M, std::nullptr_t>) {
      mask = static_cast<const M*>(a.mask) + mask_row_offset(g, row);
    }
    float* buf;
    if constexpr (std::is_same_v<T, float>) {
      buf = out;
    } else {
      buf = scratch.get();
    }
    const int64_t len = causal_row_length(g, row, a.causal);

    // The logits of columns [j, j + n): scale * x + mask, -inf where masked or past n.
    auto logits = [&](int64_t j, int64_t n) {
      Vec z = apply_mask<M>(load_f32(x + j, n) * vscale, mask, j, n);
      return n < kV ? Vec::set(ninf, z, n) : z;
    };

    // pass 1: the max. float rows recompute the logits in pass 2 (saves a store of every
    // element: 2.9 ms instead of 3.5 ms on (1024, 4097), 1 thread); reduced types keep them
    // in the float32 buffer (converting and masking twice cost more than the store).
    constexpr bool kRecompute = std::is_same_v<T, float>;
    Vec vmax(kNegInf);
    for (int64_t j = 0; j < len; j += kV) {
      const int64_t n = std::min<int64_t>(kV, len - j);
      const Vec z = logits(j, n);
      if constexpr (!kRecompute) z.store(buf + j, n);
      vmax = at::vec::maximum(vmax, z);
    }
    const float mx = at::vec::vec_reduce_all<float>(
        [](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
    if (mx == kNegInf) {  // every column masked: define the row as 0
      for (int64_t k = 0; k < N; ++k) out[k] = T(0);
      continue;
    }

    // pass 2: exponentials into the row buffer and their sum
    const Vec vmx(mx);
    Vec vsum(0.f);
    for (int64_t j = 0; j < len; j += kV) {
      const int64_t n = std::min<int64_t>(kV, len - j);
      const Vec z = kRecompute ? logits(j, n) : Vec::loadu(buf + j, n);
      Vec e = (z - vmx).exp_u20();
      if (n < kV) e = Vec::set(zero, e, n);
      e.store(buf + j, n);
      vsum = vsum + e;
    }
    const float sum = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vsum);

    // pass 3: normalise; causally masked columns are 0
    const Vec vinv(1.f / sum);
    for (int64_t j = 0; j < len; j += kV) {
      const int64_t n = std::min<int64_t>(kV, len - j);
      store_f32(out + j, Vec::loadu(buf + j, n) * vinv, n);
    }
    for (int64_t k = len; k < N; ++k) out[k] = T(0);
  }
}

template <typename T>
void backward_rows(const SoftmaxBackwardArgs& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  const Vec vscale(a.scale);
  for (int64_t row = begin; row < end; ++row) {
    const T* dy = static_cast<const T*>(a.grad_out) + row * N;
    const T* y = static_cast<const T*>(a.out) + row * N;
    T* dx = static_cast<T*>(a.grad_in) + row * N;
    Vec vdot(0.f);
    for (int64_t j = 0; j < N; j += kV) {
      const int64_t n = std::min<int64_t>(kV, N - j);
      vdot = at::vec::fmadd(load_f32(dy + j, n), load_f32(y + j, n), vdot);
    }
    const Vec dot(at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, vdot));
    for (int64_t j = 0; j < N; j += kV) {
      const int64_t n = std::min<int64_t>(kV, N - j);
      store_f32(dx + j, vscale * load_f32(y + j, n) * (load_f32(dy + j, n) - dot), n);
    }
  }
}

// Rows per task: about 32K elements, so small rows are batched and long rows split evenly.
inline int64_t grain_rows(int64_t N) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)); }

template <typename T>
void forward_typed(const SoftmaxForwardArgs& a) {
  auto run = [&](auto mask_tag) {
    using M = decltype(mask_tag);
    at::parallel_for(0, a.geom.rows, grain_rows(a.geom.N),
                     [&](int64_t b, int64_t e) { forward_rows<T, M>(a, b, e); });
  };
  switch (a.mask_kind) {
    case MaskKind::None: return run(nullptr);
    case MaskKind::Bool: return run(bool{});
    case MaskKind::Same: return run(T{});
    case MaskKind::Float: return run(float{});
  }
}

}  // namespace

void softmax_forward(const SoftmaxForwardArgs& a) {
  switch (a.dtype) {
    case DType::Float: return forward_typed<float>(a);
    case DType::Half: return forward_typed<c10::Half>(a);
    case DType::BFloat16: return forward_typed<c10::BFloat16>(a);
  }
}

void softmax_backward(const SoftmaxBackwardArgs& a) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, a.rows, grain_rows(a.N),
                     [&](int64_t b, int64_t e) { backward_rows<T>(a, b, e); });
  };
  switch (a.dtype) {
    case DType::Float: return run(float{});
    case DType::Half: return run(c10::Half{});
    case DType::BFloat16: return run(c10::BFloat16{});
  }
}

}  // namespace fastattn::cpu::FASTATTN_ISA
