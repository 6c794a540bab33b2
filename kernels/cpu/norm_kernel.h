// CPU LayerNorm / RMSNorm kernels, compiled once per ISA (see fastattn/cpu_isa.h). Rows are
// independent: at::parallel_for splits them across threads; within a row at::vec vectors do
// the math in float32 whatever the storage type.
//
// forward, per row of N (s = x, or x + residual rounded to x's dtype and stored):
//   pass 1  s into a float32 row buffer (float x without residual is read in place); rms
//           norm sums s^2; layer norm sums d = s - K and d^2, K the mean of the first
//           vector: var = mean(d^2) - mean(d)^2, mean = K + mean(d) (shifted moments; a plain
//           E[s^2] - E[s]^2 loses every digit on rows like 1e4 + 1e-2 * noise). When K is
//           far from the mean, a second pass sums around the mean found instead.
//   pass 2  out = (s - mean) * rstd * weight + bias
// backward, per row: xhat = (input - mean) * rstd, g = dy * weight,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (rms norm: without the mean(g) term)
//   + the gradient of residual_out; grad_weight = sum over rows of dy * xhat and grad_bias =
//   sum of dy, summed per row group into float32 partial rows, then over groups in order.
// Sums over a row use CascadeSum, whose rounding error grows with log(N), not N.
#pragma once
#ifndef FASTATTN_ISA
#error "include an isa_<name>.h first"
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>

#include "norm_cpu.h"
#include "vec_io.h"

namespace fastattn::cpu::FASTATTN_ISA {
namespace {

// A sum of vectors in three levels of 16: each float32 lane adds at most 16 terms per level
// (plus N / (256 kV) at the top), so a 65536-long row sums as accurately as a short one.
// Hot loops feed it sums of up to 16 vectors (one more level, no per-vector bookkeeping).
class CascadeSum {
 public:
  void add(const Vec& v) {
    l0_ = l0_ + v;
    if (++c0_ == 16) {
      l1_ = l1_ + l0_;
      l0_ = Vec(0.f);
      c0_ = 0;
      if (++c1_ == 16) {
        l2_ = l2_ + l1_;
        l1_ = Vec(0.f);
        c1_ = 0;
      }
    }
  }
  float total() const { return reduce_sum(l2_ + (l1_ + l0_)); }

 private:
  Vec l0_{0.f}, l1_{0.f}, l2_{0.f};
  int c0_ = 0, c1_ = 0;
};

// `v` with the lanes from `n` on set to 0 (n < kV: the last, partial vector of a row).
inline Vec first_lanes(const Vec& v, int64_t n) { return n < kV ? Vec::set(Vec(0.f), v, n) : v; }

template <typename T, typename W, bool RMS, bool RES>
void forward_rows(const NormForwardArgs& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  const float inv_n = 1.f / static_cast<float>(N);
  constexpr bool kInPlace = std::is_same_v<T, float> && !RES;  // s is x itself
  std::unique_ptr<float[]> buffer;
  if constexpr (!kInPlace) buffer.reset(new float[N]);
  const W* w = static_cast<const W*>(a.weight);
  const W* b = static_cast<const W*>(a.bias);
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * N;
    T* out = static_cast<T*>(a.out) + row * N;
    const float* s;
    if constexpr (kInPlace) {
      s = x;
    } else {
      s = buffer.get();
    }
    // s[j, j + n) as float32 (lanes past n are 0); with a residual, also stores the sum.
    auto load_s = [&](int64_t j, int64_t n) {
      if constexpr (kInPlace) {
        return Vec::loadu(s + j, n);
      } else {
        Vec v = load_f32(x + j, n);
        if constexpr (RES) {
          T* so = static_cast<T*>(a.residual_out) + row * N;
          v = v + load_f32(static_cast<const T*>(a.residual) + row * N + j, n);
          store_f32(so + j, v, n);
          if constexpr (!std::is_same_v<T, float>) v = load_f32(so + j, n);  // the rounded sum
        }
        v.store(buffer.get() + j, n);
        return v;
      }
    };

    // pass 1: rms norm sums s^2. layer norm sums d = s - K and d^2 with K the mean of the
    // first vector (shifted moments: one pass, and exact to rounding while |mean - K| is
    // within a couple of standard deviations, e.g. for rows like 1e4 + 1e-2 * noise).
    float mean = 0.f, var;
    const int64_t n0 = std::min<int64_t>(kV, N);
    const Vec v0 = load_s(0, n0);
    const float K = RMS ? 0.f : reduce_sum(v0) / static_cast<float>(n0);
    const Vec vK(K);
    CascadeSum sum, sq;  // of blocks of up to 16 vectors, summed in plain accumulators
    Vec bsum(0.f), bsq(0.f);
    auto accumulate = [&](const Vec& v, int64_t n) {
      if constexpr (RMS) {
        bsq = at::vec::fmadd(v, v, bsq);
      } else {
        const Vec d = first_lanes(v - vK, n);
        bsum = bsum + d;
        bsq = at::vec::fmadd(d, d, bsq);
      }
    };
    accumulate(v0, n0);
    for (int64_t j = kV; j < N;) {
      for (const int64_t block_end = std::min<int64_t>(N, j + 15 * kV); j < block_end; j += kV) {
        const int64_t n = std::min<int64_t>(kV, N - j);
        accumulate(load_s(j, n), n);
      }
      sum.add(bsum);
      sq.add(bsq);
      bsum = bsq = Vec(0.f);
    }
    sum.add(bsum);
    sq.add(bsq);
    if constexpr (RMS) {
      var = sq.total() * inv_n;  // mean of s^2
    } else {
      float dmean = sum.total() * inv_n, dsq = sq.total() * inv_n;
      if (dmean * dmean > 0.75f * dsq) {
        // K was far from the mean (an outlier first vector): the difference lost more than
        // two bits, so sum again around the mean found (the corrected two-pass algorithm).
        const Vec vm(K + dmean);
        CascadeSum sum2, sq2;
        for (int64_t j = 0; j < N; j += kV) {
          const int64_t n = std::min<int64_t>(kV, N - j);
          const Vec d = first_lanes(Vec::loadu(s + j, n) - vm, n);
          sum2.add(d);
          sq2.add(d * d);
        }
        const float d2 = sum2.total() * inv_n;
        dmean += d2;
        dsq = sq2.total() * inv_n;
        var = dsq - d2 * d2;
      } else {
        var = dsq - dmean * dmean;
      }
      mean = K + dmean;
      var = std::max(0.f, var);
      a.mean[row] = mean;
    }
    const float rstd = 1.f / std::sqrt(var + a.eps);
    a.rstd[row] = rstd;

    // pass 2: out = (s - mean) * rstd * weight + bias
    const Vec vm(mean), vr(rstd);
    for (int64_t j = 0; j < N; j += kV) {
      const int64_t n = std::min<int64_t>(kV, N - j);
      Vec y = (Vec::loadu(s + j, n) - vm) * vr;
      if (w != nullptr) y = y * load_f32(w + j, n);
      if (b != nullptr) y = y + load_f32(b + j, n);
      store_f32(out + j, y, n);
    }
  }
}

// dx for rows [begin, end); with `pw`/`pb` (float32 partial rows of N) also adds each row's
// dy * xhat / dy into them.
template <typename T, typename W, bool RMS>
void backward_rows(const NormBackwardArgs& a, int64_t begin, int64_t end, float* pw, float* pb) {
  const int64_t N = a.N;
  const float inv_n = 1.f / static_cast<float>(N);
  const W* w = static_cast<const W*>(a.weight);
  for (int64_t row = begin; row < end; ++row) {
    const T* in = static_cast<const T*>(a.input) + row * N;
    const T* dy = static_cast<const T*>(a.grad_out) + row * N;
    T* dx = static_cast<T*>(a.grad_input) + row * N;
    const Vec vm(RMS ? 0.f : a.mean[row]), vr(a.rstd[row]);
    auto xhat = [&](int64_t j, int64_t n) { return (load_f32(in + j, n) - vm) * vr; };
    auto scaled = [&](const Vec& d, int64_t j, int64_t n) {  // g = dy * weight
      return w != nullptr ? d * load_f32(w + j, n) : d;
    };
    CascadeSum sum_g, sum_gx;  // of blocks of up to 16 vectors
    for (int64_t j = 0; j < N;) {
      Vec bg(0.f), bgx(0.f);
      for (const int64_t block_end = std::min<int64_t>(N, j + 16 * kV); j < block_end; j += kV) {
        const int64_t n = std::min<int64_t>(kV, N - j);
        const Vec d = load_f32(dy + j, n);  // lanes past n are 0, so g and g * xhat are too
        const Vec xh = xhat(j, n);
        const Vec g = scaled(d, j, n);
        if constexpr (!RMS) bg = bg + g;
        bgx = at::vec::fmadd(g, xh, bgx);
        if (pw != nullptr) at::vec::fmadd(d, xh, Vec::loadu(pw + j, n)).store(pw + j, n);
        if (pb != nullptr) (Vec::loadu(pb + j, n) + d).store(pb + j, n);
      }
      sum_g.add(bg);
      sum_gx.add(bgx);
    }
    const Vec mg(RMS ? 0.f : sum_g.total() * inv_n), mgx(sum_gx.total() * inv_n);
    const T* gs = static_cast<const T*>(a.grad_sum);
    for (int64_t j = 0; j < N; j += kV) {
      const int64_t n = std::min<int64_t>(kV, N - j);
      Vec r = vr * (scaled(load_f32(dy + j, n), j, n) - mg - xhat(j, n) * mgx);
      if (gs != nullptr) r = r + load_f32(gs + row * N + j, n);
      store_f32(dx + j, r, n);
    }
  }
}

// Rows per task: about 32K elements, so small rows are batched and long rows split evenly.
inline int64_t grain_rows(int64_t N) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)); }

// out[c] = sum over groups g (in order) of partial[g * N + c], stored as W.
template <typename W>
void reduce_partials(const float* partial, int64_t groups, int64_t N, W* out) {
  at::parallel_for(0, N, 4096, [&](int64_t c0, int64_t c1) {
    for (int64_t j = c0; j < c1; j += kV) {
      const int64_t n = std::min<int64_t>(kV, c1 - j);
      Vec acc(0.f);
      for (int64_t g = 0; g < groups; ++g) acc = acc + Vec::loadu(partial + g * N + j, n);
      store_f32(out + j, acc, n);
    }
  });
}

template <typename T, typename W>
void forward_typed(const NormForwardArgs& a) {
  auto run = [&](auto rms, auto res) {
    at::parallel_for(0, a.rows, grain_rows(a.N), [&](int64_t b, int64_t e) {
      forward_rows<T, W, decltype(rms)::value, decltype(res)::value>(a, b, e);
    });
  };
  using F = std::false_type;
  using Tr = std::true_type;
  if (a.rms) {
    a.residual ? run(Tr{}, Tr{}) : run(Tr{}, F{});
  } else {
    a.residual ? run(F{}, Tr{}) : run(F{}, F{});
  }
}

template <typename T, typename W>
void backward_typed(const NormBackwardArgs& a, float* partial_w, float* partial_b) {
  auto run = [&](auto rms) {
    constexpr bool kRms = decltype(rms)::value;
    if (partial_w == nullptr && partial_b == nullptr) {
      at::parallel_for(0, a.rows, grain_rows(a.N), [&](int64_t b, int64_t e) {
        backward_rows<T, W, kRms>(a, b, e, nullptr, nullptr);
      });
      return;
    }
    const int64_t groups = norm_grad_groups(a.rows);
    const int64_t per_group = (a.rows + groups - 1) / groups;
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        float* pw = partial_w ? partial_w + g * a.N : nullptr;
        float* pb = partial_b ? partial_b + g * a.N : nullptr;
        if (pw) std::fill(pw, pw + a.N, 0.f);
        if (pb) std::fill(pb, pb + a.N, 0.f);
        backward_rows<T, W, kRms>(a, std::min(a.rows, g * per_group),
                                  std::min(a.rows, (g + 1) * per_group), pw, pb);
      }
    });
    if (partial_w) reduce_partials(partial_w, groups, a.N, static_cast<W*>(a.grad_weight));
    if (partial_b) reduce_partials(partial_b, groups, a.N, static_cast<W*>(a.grad_bias));
  };
  a.rms ? run(std::true_type{}) : run(std::false_type{});
}

// Calls fn(T{}, W{}) for the storage type of x and the parameter type (float32 or T).
template <typename Fn>
void dispatch_types(DType x, DType w, Fn&& fn) {
  auto with_w = [&](auto t) {
    using T = decltype(t);
    if (w == DType::Float) {
      fn(T{}, float{});
    } else {
      fn(T{}, T{});
    }
  };
  switch (x) {
    case DType::Float: return fn(float{}, float{});
    case DType::Half: return with_w(c10::Half{});
    case DType::BFloat16: return with_w(c10::BFloat16{});
  }
}

}  // namespace

void norm_forward(const NormForwardArgs& a, DType x, DType w) {
  dispatch_types(x, w, [&](auto t, auto p) { forward_typed<decltype(t), decltype(p)>(a); });
}

void norm_backward(const NormBackwardArgs& a, DType x, DType w, float* partial_w,
                   float* partial_b) {
  dispatch_types(x, w, [&](auto t, auto p) {
    backward_typed<decltype(t), decltype(p)>(a, partial_w, partial_b);
  });
}

}  // namespace fastattn::cpu::FASTATTN_ISA
