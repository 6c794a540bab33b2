// The CPU W8A8 kernels, compiled once per ISA: quantize_per_token_int8 (per-row symmetric int8
// of x) and int8_scaled_mm (exact int32 dot products, then the float epilogue).
//
// quantize, per row (threads split the rows): amax = max |x| in float32, inv = 127 / amax
//   (0 when amax == 0), xq = clamp(round_half_even(x * inv), -127, 127), x_scale = amax / 127:
//   the same float32 operations as reference.quantize_per_token_int8, so bit-identical.
// int8_scaled_mm, acc[m, n] = sum_k xq[m, k] * w[n, k] exactly in int32 (|acc| < 2^31 for
//   K < 133000), by micro-kernels of MR rows of xq x NR rows of w along K:
//   avx512 + VNNI  vpdpbusd (u8 x s8 -> s32, 4 products per lane) on u = xq + 128 (xq ^ 0x80),
//                  minus 128 * sum_k w[n, k], summed alongside with vpdpbusd(1, w): both sums
//                  wrap mod 2^32, and their difference is the exact acc (uint32 arithmetic).
//   avx512 (no VNNI) / avx2  sign-extend to int16 and vpmaddwd (pairs of products, |.| <= 32258).
//   generic        scalar int32 loops.
//   Epilogue: y = float(acc) * x_scale[m] * w_scale[n] + bias[n], rounded to the output dtype.
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "quant_cpu.h"
#include "quant_weight_only.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

template <typename T>
void quantize_rows(const T* x, int8_t* xq, float* x_scale, int64_t K, int64_t begin,
                   int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * K;
    int8_t* qr = xq + r * K;
    Vec vmax(0.f);
    for (int64_t k = 0; k < K; k += kV) {
      const int64_t c = std::min<int64_t>(kV, K - k);
      vmax = at::vec::maximum(vmax, load_f32(xr + k, c).abs());  // lanes past c are 0
    }
    const float amax =
        at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    x_scale[r] = amax / 127.f;
    const Vec vinv(inv), lo(-127.f), hi(127.f);
    alignas(64) float t[kV];
    for (int64_t k = 0; k < K; k += kV) {
      const int64_t c = std::min<int64_t>(kV, K - k);
      const Vec q = at::vec::clamp((load_f32(xr + k, c) * vinv).round(), lo, hi);  // half even
      q.store(t);
      for (int64_t i = 0; i < c; ++i) qr[k + i] = static_cast<int8_t>(static_cast<int>(t[i]));
    }
  }
}

// ---- exact int8 dot products: res[i * NR + j] = sum_k x[i * K + k] * w[j * K + k] ----------
#if defined(CPU_CAPABILITY_AVX512)
#define FASTATTN_VNNI_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx,avx2,fma,f16c")))
struct DotVnni {
  template <int MR, int NR>
  FASTATTN_VNNI_TARGET static void run(const int8_t* x, const int8_t* w, int64_t K,
                                       int32_t* res) {
    __m512i acc[MR][NR], wsum[NR];
    for (int j = 0; j < NR; ++j) {
      wsum[j] = _mm512_setzero_si512();
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_setzero_si512();
    }
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), ones = _mm512_set1_epi8(1);
    for (int64_t k = 0; k < K; k += 64) {
      const int64_t r = K - k;
      const __mmask64 mk = r >= 64 ? ~0ULL : ((1ULL << r) - 1);
      __m512i xv[MR];
      for (int i = 0; i < MR; ++i)  // tail lanes become 128, times a zero weight
        xv[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, x + i * K + k), flip);
      for (int j = 0; j < NR; ++j) {
        const __m512i wv = _mm512_maskz_loadu_epi8(mk, w + j * K + k);
        wsum[j] = _mm512_dpbusd_epi32(wsum[j], ones, wv);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv[i], wv);
      }
    }
    for (int j = 0; j < NR; ++j) {
      const uint32_t corr = 128u * static_cast<uint32_t>(_mm512_reduce_add_epi32(wsum[j]));
      for (int i = 0; i < MR; ++i)
        res[i * NR + j] =
            static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][j])) - corr);
    }
  }
};
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
struct DotMadd {
  template <int MR, int NR>
  static void run(const int8_t* x, const int8_t* w, int64_t K, int32_t* res) {
#if defined(CPU_CAPABILITY_AVX512)
    using IV = __m512i;
    constexpr int64_t kStep = 32;
    auto widen = [](const int8_t* p, int64_t r) {
      const __mmask32 mk = r >= 32 ? ~0u : ((1u << r) - 1);
      return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, p));
    };
    auto madd = [](IV acc, IV a, IV b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); };
    auto hsum = [](IV v) { return _mm512_reduce_add_epi32(v); };
    const int64_t full = K;  // masked loads cover the tail
#else
    using IV = __m256i;
    constexpr int64_t kStep = 16;
    auto widen = [](const int8_t* p, int64_t) {
      return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    };
    auto madd = [](IV acc, IV a, IV b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); };
    auto hsum = [](IV v) {
      alignas(32) int32_t t[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
      return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
    };
    const int64_t full = K - K % kStep;  // the tail is summed in scalar below
#endif
    IV acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = IV{};
    for (int64_t k = 0; k < full; k += kStep) {
      IV xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = widen(x + i * K + k, K - k);
      for (int j = 0; j < NR; ++j) {
        const IV wv = widen(w + j * K + k, K - k);
        for (int i = 0; i < MR; ++i) acc[i][j] = madd(acc[i][j], xv[i], wv);
      }
    }
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NR; ++j) {
        int32_t s = hsum(acc[i][j]);
        for (int64_t k = full; k < K; ++k) s += int32_t(x[i * K + k]) * int32_t(w[j * K + k]);
        res[i * NR + j] = s;
      }
    }
  }
};
#endif

struct DotScalar {
  template <int MR, int NR>
  static void run(const int8_t* x, const int8_t* w, int64_t K, int32_t* res) {
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NR; ++j) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += int32_t(x[i * K + k]) * int32_t(w[j * K + k]);
        res[i * NR + j] = s;
      }
    }
  }
};

// Output rows [m0, m1) x channels [n0, n1): kMR rows of xq (in L1) against kNR weight rows.
template <typename T, class Dot>
void scaled_mm_block(const QuantLinearArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K = a.K, N = a.N;
  const int8_t* x = static_cast<const int8_t*>(a.x);
  const int8_t* w = static_cast<const int8_t*>(a.weight);
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  int32_t res[kMR * kNR];
  for (int64_t m = m0; m < m1; m += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, m1 - m);
    for (int64_t n = n0; n < n1; n += kNR) {
      const int64_t nr = std::min<int64_t>(kNR, n1 - n);
      const int8_t* xm = x + m * K;
      const int8_t* wn = w + n * K;
      if (nr == kNR && mr == kMR) {
        Dot::template run<kMR, kNR>(xm, wn, K, res);
      } else if (nr == kNR && mr == 1) {  // GEMV
        Dot::template run<1, kNR>(xm, wn, K, res);
      } else if (nr == kNR && mr == 2) {
        Dot::template run<2, kNR>(xm, wn, K, res);
      } else {  // other edges: one (row, channel) at a time
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < nr; ++j)
            Dot::template run<1, 1>(xm + i * K, wn + j * K, K, res + i * kNR + j);
      }
      for (int64_t i = 0; i < mr; ++i) {
        const float xs = a.x_scale[m + i];
        for (int64_t j = 0; j < nr; ++j) {
          float y = static_cast<float>(res[i * kNR + j]) * xs * a.scale[n + j];
          if (bias) y += static_cast<float>(bias[n + j]);
          out[(m + i) * N + n + j] = static_cast<T>(y);
        }
      }
    }
  }
}

template <typename T, class Dot>
void scaled_mm(const QuantLinearArgs& a) {
  const int64_t M = a.M, N = a.N;
  constexpr int64_t NB = 64;  // channels per task: 64 K-byte rows, in L2
  const int64_t nblk = (N + NB - 1) / NB, threads = at::get_num_threads();
  int64_t mchunks = 1;
  if (nblk < 2 * threads)
    mchunks = std::max<int64_t>(1, std::min<int64_t>((M + 31) / 32, (4 * threads + nblk - 1) / nblk));
  const int64_t mrows = ((M + mchunks - 1) / mchunks + kMR - 1) / kMR * kMR;
  mchunks = (M + mrows - 1) / mrows;
  at::parallel_for(0, nblk * mchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / mchunks, mc = t % mchunks;
      scaled_mm_block<T, Dot>(a, mc * mrows, std::min(M, (mc + 1) * mrows), nb * NB,
                              std::min(N, (nb + 1) * NB));
    }
  });
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
