// fastattn::sdpa / sdpa_backward for CUDA tensors: argument checks (fastattn/attention_host.h,
// then the CUDA kernels' own limits: float16 / bfloat16, E == Ev in {32, 64, 96, 128, 256}),
// 16-byte readable inputs (a contiguous copy otherwise), output allocation, and the launch of the
// kernels in attention_forward.cu / attention_backward.cu (design: attention_common.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention_common.cuh"
#include "fastattn/alloc.h"

namespace fastattn::cuda::attn {
namespace {

std::tuple<at::Tensor, at::Tensor> sdpa_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask, double scale,
                                             bool is_causal, double dropout_p, int64_t seed,
                                             int64_t offset, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& alibi_slopes, double softcap) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttnInputs in = prepare_attention("sdpa", q, k, v, mask, scale, is_causal, dropout_p, seed,
                                    offset, AttnOptions{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                              window_right, bottom_right, alibi_slopes, softcap});
  check_cuda_attention("sdpa", in);
  align_inputs(in);
  auto [out, lse] = new_attention_outputs(in);  // out (B, Hq, L, Ev), lse (B, Hq, L)
  const AttnForwardArgs a = attention_forward_args(in, out, lse);
  attention_forward_cuda(a, c10::cuda::getCurrentCUDAStream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    double scale, bool is_causal, double dropout_p, int64_t seed, int64_t offset,
    bool want_grad_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t window_left, int64_t window_right, bool bottom_right,
    const std::optional<at::Tensor>& alibi_slopes, double softcap) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttnInputs in = prepare_attention("sdpa_backward", q, k, v, mask, scale, is_causal, dropout_p,
                                    seed, offset, AttnOptions{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                              window_right, bottom_right, alibi_slopes, softcap});
  check_attention_backward(in, grad_out, out, lse);
  check_cuda_attention("sdpa_backward", in);
  align_inputs(in);
  const AttnGeometry& g = in.g;
  const at::Tensor dO = aligned16(grad_out.contiguous());  // (B, Hq, L, Ev)
  const at::Tensor O = aligned16(out.contiguous());        // (B, Hq, L, Ev)
  const at::Tensor lse_c = lse.contiguous();               // (B, Hq, L)
  AttnGrads grads = new_attention_grads(in, want_grad_mask);
  // Varlen: grad_mask (B, Hq, max L, max S) has entries past each sequence's L_b x S_b that no
  // kernel block owns; zero it all first (the kernels write the rest).
  if (want_grad_mask && g.cu_q != nullptr) grads.mask.zero_();
  // D = rowsum(grad_out * out), scratch of the backward kernels, (B, Hq, L)
  at::Tensor delta = at::empty({g.Bt, g.Hq, g.Lt}, in.q.options().dtype(at::kFloat));
  const AttnBackwardArgs a = attention_backward_args(in, dO, O, lse_c, grads);
  attention_backward_cuda(a, delta.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  return {grads.q, grads.k, grads.v, grads.mask};
}

}  // namespace
}  // namespace fastattn::cuda::attn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("sdpa", &fastattn::cuda::attn::sdpa_cuda);
  m.impl("sdpa_backward", &fastattn::cuda::attn::sdpa_backward_cuda);
}
