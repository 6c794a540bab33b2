// float32 vector loads and stores of any storage type, for the per-ISA CPU kernels
// (include after an isa_<name>.h; see fastattn/cpu_isa.h). Partial vectors (count < kV) read
// and write only `count` elements, so rows of any length are walked in whole vectors.
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kV = Vec::size();

// Loads `count` (<= kV) values as float32 lanes; lanes past `count` are 0.
template <typename T>
inline Vec load_f32(const T* p, int64_t count = kV) {
  if constexpr (std::is_same_v<T, float>) {
    return count == kV ? Vec::loadu(p) : Vec::loadu(p, count);
  } else {
    Vec v;
    if (count == kV) {
      at::vec::load_to_float<T>(p, v);
      return v;
    }
    alignas(64) float tmp[kV] = {};
    for (int64_t k = 0; k < count; ++k) tmp[k] = static_cast<float>(p[k]);
    return Vec::loadu(tmp);
  }
}

// Stores the first `count` (<= kV) lanes.
template <typename T>
inline void store_f32(T* p, const Vec& v, int64_t count = kV) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, count);
  }
}

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, v);
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
