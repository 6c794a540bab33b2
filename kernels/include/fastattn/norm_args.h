// Plain-data launch arguments of the LayerNorm/RMSNorm kernels (no ATen types), shared by host
// code (fastattn/norm_host.h fills them), the per-ISA CPU kernels and CUDA device code.
#pragma once
#include <cstdint>

namespace fastattn {

// Plain-data forward arguments (no ATen types): usable by CPU and CUDA kernels alike.
// Row r of x/residual/out/residual_out starts at r * N; weight/bias have N elements (null
// when absent); residual/residual_out are null without a residual; mean is null for rms.
struct NormForwardArgs {
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* out;
  void* residual_out;
  float* mean;
  float* rstd;
  int64_t rows;
  int64_t N;
  float eps;
  bool rms;
};

// Plain-data backward arguments. input: what was normalized; grad_sum: the gradient of
// residual_out (null when absent), added to grad_input. grad_weight/grad_bias null when not
// wanted. mean is null for rms.
struct NormBackwardArgs {
  const void* grad_out;
  const void* grad_sum;
  const void* input;
  const void* weight;
  const float* mean;
  const float* rstd;
  void* grad_input;
  void* grad_weight;
  void* grad_bias;
  int64_t rows;
  int64_t N;
  bool rms;
};

}  // namespace fastattn
