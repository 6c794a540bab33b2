// The score modifiers of the CPU attention kernels (kernels/registration.cpp's sdpa contract),
// compiled once per ISA (see fastattn/cpu_isa.h): the mask (bool or additive, as vectors and as
// a transposed block), dropout (Philox4x32-10 of fastattn/philox.h, kV counters at once), the
// softmax's exponential, and lane helpers.
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "attention_gemm.h"
#include "fastattn/attention_args.h"
#include "fastattn/philox.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

// The additive value of one mask element: bool True (attend) -> 0, False -> -inf.
template <typename M>
inline float mask_value(M x) {
  if constexpr (std::is_same_v<M, bool>) {
    return x ? 0.f : kNegInf;
  } else {
    return static_cast<float>(x);
  }
}

// 0 where the kV bools at p are true, -inf elsewhere.
inline Vec bool_mask_vec(const bool* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_mask_blend_ps(_mm_test_epi8_mask(bytes, bytes), _mm512_set1_ps(kNegInf),
                              _mm512_setzero_ps());
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256()));
  return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_setzero_ps(), keep);
#else
  alignas(64) float v[kV];
  for (int k = 0; k < kV; ++k) v[k] = p[k] ? 0.f : kNegInf;
  return Vec::loadu(v);
#endif
}

// The additive mask of `count` (<= kV) consecutive keys at p (lanes past count: 0).
template <typename M>
inline Vec mask_vec(const M* p, int64_t count) {
  if constexpr (std::is_same_v<M, bool>) {
    if (count == kV) return bool_mask_vec(p);
    alignas(16) bool tmp[kV];
    for (int64_t k = 0; k < kV; ++k) tmp[k] = k < count ? p[k] : true;
    return bool_mask_vec(tmp);
  } else {
    return load_f32(p, count);
  }
}

// The mask block of queries [0, bm) x keys [0, bn), transposed: mt[j * ldt + i] (float32,
// additive). mask points at (query 0, key 0) of the block; m_sl is its query stride (0 when
// broadcast over queries). Lanes i in [bm, ldt) are 0 (ldt: a multiple of kV).
template <typename M>
inline void pack_mask_transposed(const M* mask, int64_t m_sl, int64_t bm, int64_t bn, float* mt,
                                 int64_t ldt) {
  if (m_sl == 0) {  // one row for every query: broadcast each key's value along its row of mt
    for (int64_t j = 0; j < bn; ++j) {
      const Vec val(mask_value(mask[j]));
      for (int64_t i = 0; i < ldt; i += kV) val.store(mt + j * ldt + i);
    }
    return;
  }
  pack_transposed_with(
      [&](int64_t i, int64_t j, int64_t n) { return mask_vec(mask + i * m_sl + j, n); }, bm, bn,
      mt, ldt, ldt);
}

// Dropout of the sdpa contract (fastattn/philox.h): z_scale = keep ? 1 / (1 - p) : 0.
struct Dropout {
  bool on;
  float p, inv_keep;
  uint64_t seed, offset;
};

inline Dropout make_dropout(const AttnGeometry& g) {
  return Dropout{g.dropout_p > 0.f, g.dropout_p, 1.f / (1.f - g.dropout_p), g.seed, g.offset};
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
using IVec = __m512i;
inline IVec iv_set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline IVec iv_load(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline IVec iv_xor(IVec a, IVec b) { return _mm512_xor_si512(a, b); }
// (hi, lo) 32-bit halves of the 64-bit products a * m, lane by lane
inline IVec iv_mulhilo(IVec a, IVec m, IVec* lo) {
  *lo = _mm512_mullo_epi32(a, m);
  const IVec even = _mm512_srli_epi64(_mm512_mul_epu32(a, m), 32);
  const IVec odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}
inline Vec iv_uniform(IVec x) {  // (x >> 8) * 2^-24
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(x, 8)),
                       _mm512_set1_ps(1.f / 16777216.f));
}
#else
using IVec = __m256i;
inline IVec iv_set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline IVec iv_load(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline IVec iv_xor(IVec a, IVec b) { return _mm256_xor_si256(a, b); }
inline IVec iv_mulhilo(IVec a, IVec m, IVec* lo) {
  *lo = _mm256_mullo_epi32(a, m);
  const IVec even = _mm256_srli_epi64(_mm256_mul_epu32(a, m), 32);
  const IVec odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  return _mm256_blend_epi32(even, odd, 0xAA);
}
inline Vec iv_uniform(IVec x) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)),
                       _mm256_set1_ps(1.f / 16777216.f));
}
#endif

// The dropout factors of the kV scores with flat indices idx0 + lane * stride: Philox4x32-10
// of fastattn/philox.h evaluated for kV counters at once.
inline Vec dropout_factors(const Dropout& d, uint64_t idx0, uint64_t stride) {
  alignas(64) uint32_t lo[kV], hi[kV];
  for (int k = 0; k < kV; ++k) {
    const uint64_t idx = idx0 + static_cast<uint64_t>(k) * stride;
    lo[k] = static_cast<uint32_t>(idx);
    hi[k] = static_cast<uint32_t>(idx >> 32);
  }
  IVec c0 = iv_load(lo), c1 = iv_load(hi);
  IVec c2 = iv_set1(static_cast<uint32_t>(d.offset));
  IVec c3 = iv_set1(static_cast<uint32_t>(d.offset >> 32));
  const IVec m0 = iv_set1(0xD2511F53u), m1 = iv_set1(0xCD9E8D57u);
  uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  for (int round = 0; round < 10; ++round) {
    IVec lo0, lo1;
    const IVec hi0 = iv_mulhilo(c0, m0, &lo0);
    const IVec hi1 = iv_mulhilo(c2, m1, &lo1);
    c0 = iv_xor(iv_xor(hi1, c1), iv_set1(k0));
    c1 = lo1;
    c2 = iv_xor(iv_xor(hi0, c3), iv_set1(k1));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const Vec u = iv_uniform(c0);
  return Vec::blendv(Vec(0.f), Vec(d.inv_keep), u >= Vec(d.p));
}
#else
// The dropout factors of the kV scores with flat indices idx0 + lane * stride.
inline Vec dropout_factors(const Dropout& d, uint64_t idx0, uint64_t stride) {
  alignas(64) float f[kV];
  for (int k = 0; k < kV; ++k) {
    f[k] = dropout_uniform(d.seed, d.offset, idx0 + static_cast<uint64_t>(k) * stride) >= d.p
               ? d.inv_keep
               : 0.f;
  }
  return Vec::loadu(f);
}
#endif

// 2^t, for the softmax's e^x = 2^(x log2(e)) (log2(e) is not folded into the score's scale and
// shift: x = z - m is formed first, so the rounding of t stays relative to |z - m|, not |z|);
// 0 below t = -126 (and for -inf), as at::vec's exp_u20 is 0 below ln(FLT_MIN). t = n + r,
// |r| <= 1/2 (exact), 2^r by a degree-6 minimax polynomial, times 2^n: by vscalefps on AVX-512
// (11 instructions against exp_u20's 19), by the exponent field on AVX2. Max relative error 7e-8
// on [-126, 7] beyond the rounding of t itself (exp_u20: 3.8e-7). Generic: exp_u20.
constexpr float kLog2e = 1.44269504088896341f;

inline Vec fast_exp2(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
#define FA_PS(op) _mm512_##op##_ps
  using R = __m512;
#else
#define FA_PS(op) _mm256_##op##_ps
  using R = __m256;
#endif
  const R v = t;
#if defined(CPU_CAPABILITY_AVX512)
  const R n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const R n = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  const R r = FA_PS(sub)(v, n);
  // degree-6 minimax polynomial of 2^r on [-1/2, 1/2] (relative error 1.9e-9)
  R p = FA_PS(set1)(1.53458055e-04f);
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(1.33999312e-03f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(9.61848898e-03f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(5.55032878e-02f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(2.40226469e-01f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(6.93147206e-01f));
  p = FA_PS(fmadd)(p, r, FA_PS(set1)(1.f));
#undef FA_PS
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(live, p, n);
#else
  const __m256 live = _mm256_cmp_ps(v, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
#endif
#else
  return (t * Vec(1.f / kLog2e)).exp_u20();
#endif
}

// e^x (see fast_exp2).
inline Vec fast_exp(const Vec& x) { return fast_exp2(x * Vec(kLog2e)); }

// Lanes [0, count) of v replaced by x (count clamped to [0, kV]).
inline Vec set_first(const Vec& v, const Vec& x, int64_t count) {
  if (count <= 0) return v;
  return Vec::set(v, x, std::min<int64_t>(count, kV));
}

// Lanes [count, kV) of v replaced by x (count clamped to [0, kV]).
inline Vec keep_first(const Vec& v, const Vec& x, int64_t count) {
  if (count >= kV) return v;
  return Vec::set(x, v, std::max<int64_t>(count, 0));
}

// max(a, b) without at::vec::maximum's NaN propagation (scores here are never NaN).
inline Vec vec_max(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}


// The score modifiers of one (sequence, head) (fastattn/attention_args.h): scale and softcap
// of the product, ALiBi, the window (sequence-local i, j; diagonal offset d).
struct ScoreMods {
  float scale, cap, inv_cap, neg_slope;  // cap 0: no softcap
  bool softcap, alibi;
  int64_t d, wl, wr, L, S;  // L, S: the sequence's query rows and keys
};

inline ScoreMods score_mods(const AttnGeometry& g, const AttnSeq& sq, int64_t b, int64_t h) {
  const bool cap = g.softcap > 0.f;
  return ScoreMods{g.scale, g.softcap, cap ? 1.f / g.softcap : 0.f,
                   g.alibi ? -g.alibi[b * g.alibi_sb + h] : 0.f, cap, g.alibi != nullptr,
                   sq.diag, g.window_left, g.window_right, sq.L, sq.S};
}

// Visible keys [key_lo(i), key_hi(i)) of query i; queries [query_lo(j), query_hi(j)) seeing key
// j (all clamped to the sequence). Both bounds grow with i (with j).
inline int64_t key_lo(const ScoreMods& m, int64_t i) {
  return m.wl < 0 ? 0 : std::clamp<int64_t>(i + m.d - m.wl, 0, m.S);
}
inline int64_t key_hi(const ScoreMods& m, int64_t i) {
  return m.wr < 0 ? m.S : std::clamp<int64_t>(i + m.d + m.wr + 1, 0, m.S);
}
inline int64_t query_lo(const ScoreMods& m, int64_t j) {
  return m.wr < 0 ? 0 : std::clamp<int64_t>(j - m.d - m.wr, 0, m.L);
}
inline int64_t query_hi(const ScoreMods& m, int64_t j) {
  return m.wl < 0 ? m.L : std::clamp<int64_t>(j - m.d + m.wl + 1, 0, m.L);
}

// Whether the window masks some pair of the tile queries [i0, i1) x keys [j0, j1).
inline bool window_cuts(const ScoreMods& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  return (m.wl >= 0 && j0 < i1 - 1 + m.d - m.wl) || (m.wr >= 0 && j1 - 1 > i0 + m.d + m.wr);
}

// s = scale * (q.k), then softcap * tanh(s / softcap) when on: the "capped" score (th: that
// tanh, for the backward's softcap_grad).
inline Vec capped_score(const ScoreMods& m, const Vec& raw, Vec* th = nullptr) {
  Vec s = raw * Vec(m.scale);
  if (m.softcap) {
    const Vec y = (s * Vec(m.inv_cap)).tanh();
    if (th) *th = y;
    s = Vec(m.cap) * y;
  }
  return s;
}

// d(capped)/d(scale q.k) = 1 - tanh^2, as (1 - y)(1 + y): no cancellation near |y| = 1.
inline Vec softcap_grad(const Vec& y) { return (Vec(1.f) - y) * (Vec(1.f) + y); }

// ALiBi bias of lanes l: -slope * |x0 + sign * l| (x0 = i + d - j of lane 0; sign +1 with the
// queries along the lanes, -1 with the keys).
inline Vec alibi_bias(const ScoreMods& m, int64_t x0, float sign) {
  const Vec lanes = Vec::arange(0.f, sign);
  return Vec(m.neg_slope) * (Vec(static_cast<float>(x0)) + lanes).abs();
}

// Window masking of z: queries along the lanes (lanes i_first + l, one key j).
inline Vec window_q_lanes(const ScoreMods& m, const Vec& z, int64_t i_first, int64_t j) {
  Vec r = z;
  if (m.wr >= 0) r = set_first(r, Vec(kNegInf), j - m.d - m.wr - i_first);
  if (m.wl >= 0) r = keep_first(r, Vec(kNegInf), j - m.d + m.wl + 1 - i_first);
  return r;
}

}  // namespace
}  // namespace fastattn::cpu::FASTATTN_ISA
