// Plain-data launch arguments of the attention kernels (no ATen types), shared by host code
// (fastattn/attention_host.h fills them), the CPU kernels and CUDA device code. Shapes and
// semantics: the sdpa / sdpa_backward schemas in kernels/registration.cpp.
#pragma once
#include <cstdint>

namespace fastattn {

enum class AttnDType : int { Float = 0, Half = 1, BFloat16 = 2 };  // of q, k, v, out
enum class AttnMaskKind : int { None = 0, Bool = 1, Same = 2, Float = 3 };  // Same: q's dtype

// Sizes, element strides (stride(-1) of every tensor is 1) and the score modifiers.
struct AttnGeometry {
  int64_t B, Hq, Hkv, L, S, E, Ev;
  int64_t q_sb, q_sh, q_sl;  // q (B, Hq, L, E)
  int64_t k_sb, k_sh, k_ss;  // k (B, Hkv, S, E)
  int64_t v_sb, v_sh, v_ss;  // v (B, Hkv, S, Ev)
  int64_t m_sb, m_sh, m_sl;  // mask (B, Hq, L, S); 0 for broadcast dims
  AttnMaskKind mask_kind;
  float scale;
  bool is_causal;
  float dropout_p;  // 0: no dropout
  uint64_t seed, offset;
};

// out (B, Hq, L, Ev) and lse (B, Hq, L) are contiguous.
struct AttnForwardArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // null when mask_kind == None
  void* out;
  float* lse;
  AttnGeometry g;
  AttnDType dtype;
};

// grad_out and out (B, Hq, L, Ev) are contiguous here (the host makes them so); grad_q/k/v
// contiguous with q/k/v's shapes; grad_mask (B, Hq, L, S) float32 contiguous or null.
struct AttnBackwardArgs {
  const void* grad_out;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const float* lse;
  const void* mask;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  float* grad_mask;
  AttnGeometry g;
  AttnDType dtype;
};

}  // namespace fastattn
