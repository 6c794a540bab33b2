// The attention dropout's random numbers: Philox4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11), the same function on every backend so that a
// (seed, offset) pair fixes one dropout mask everywhere. Usable from C++ and CUDA device code;
// kernels/triton/attention.py and fastattn/reference.py implement the same spec.
//
// Spec, for the score of query i against key j in head h of batch b:
//   idx      = ((b * Hq + h) * L + i) * S + j                       (uint64)
//   key      = (lo32(seed), hi32(seed))                              (seed as uint64 bits)
//   counter  = (lo32(idx), hi32(idx), lo32(offset), hi32(offset))
//   x0       = first word of Philox4x32-10(counter, key)
//   u        = (x0 >> 8) * 2^-24                                     (float32, exact, [0, 1))
//   keep     = u >= dropout_p                                        (dropout_p as float32)
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_HD inline
#endif

namespace fastattn {

FASTATTN_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// First output word of Philox4x32-10 for counter (c0, c1, c2, c3) and key (k0, k1).
FASTATTN_HD uint32_t philox4x32_10_first(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                         uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(0xCD9E8D57u, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// u in [0, 1) for the score with flat index idx (see the spec above).
FASTATTN_HD float dropout_uniform(uint64_t seed, uint64_t offset, uint64_t idx) {
  const uint32_t x0 = philox4x32_10_first(
      static_cast<uint32_t>(idx), static_cast<uint32_t>(idx >> 32), static_cast<uint32_t>(offset),
      static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
      static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(x0 >> 8) * (1.0f / 16777216.0f);
}

}  // namespace fastattn
