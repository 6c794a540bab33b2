// Every fastattn operator schema, declared once. Backends register kernels in
// kernels/cpu/<op>.cpp (CPU key), kernels/cuda/<op>.cu (CUDA key); Triton implementations
// are separate operators (fastattn::<op>_triton) defined from Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // softmax(scale * x + mask) over the last dim. mask: bool (True = keep) or additive
  // (x's dtype or float32), broadcastable to x. causal: keep column j of row i (dim -2)
  // only when j <= i (top-left aligned, as torch's is_causal). Fully masked rows give 0.
  m.def("softmax(Tensor x, Tensor? mask, float scale, bool causal) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // grad_x = scale * out * (grad_out - sum(grad_out * out, -1))
  m.def("softmax_backward(Tensor grad_out, Tensor out, float scale) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // Normalization over the last dim N of x (..., N); rows = x.numel() / N. With `residual`
  // (x's shape and dtype) the op normalizes s = x + residual (rounded to x's dtype) and also
  // returns s as residual_out; without it residual_out is an empty (0,) tensor. weight and
  // bias: (N,) in x's dtype or float32 (the same dtype when both are given). Outputs are
  // contiguous with x's shape and dtype; mean and rstd are float32 (rows,):
  //   layer_norm: out = (s - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps)
  //   rms_norm:   out = s * rstd * weight,                  rstd = 1 / sqrt(mean(s^2) + eps)
  // eps must be > 0. Statistics and math in float32 whatever the storage type.
  m.def("layer_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps) -> "
        "(Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor? weight, float eps) -> "
        "(Tensor out, Tensor residual_out, Tensor rstd)",
        {at::Tag::pt2_compliant_tag});
  // Gradients of the ops above. input: what was normalized (x, or residual_out when a
  // residual was added). grad_residual_out (optional): the gradient arriving at residual_out,
  // added to grad_input (which is then the gradient of both x and residual).
  // grad_weight: (N,) in weight's dtype, an empty (0,) tensor without weight. grad_bias
  // (layer_norm only, when has_bias): (N,) in weight's dtype, or input's dtype without weight.
  // grad_weight and grad_bias are reduced over rows in a fixed order (deterministic).
  m.def("layer_norm_backward(Tensor grad_out, Tensor? grad_residual_out, Tensor input, "
        "Tensor? weight, Tensor mean, Tensor rstd, bool has_bias) -> "
        "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
        {at::Tag::pt2_compliant_tag});
  m.def("rms_norm_backward(Tensor grad_out, Tensor? grad_residual_out, Tensor input, "
        "Tensor? weight, Tensor rstd) -> (Tensor grad_input, Tensor grad_weight)",
        {at::Tag::pt2_compliant_tag});

  // Fused scaled dot-product attention (FlashAttention-style: tiles of q against streamed k/v
  // with an online softmax; no (L, S) buffer). Canonical 4-d layout, arbitrary strides but
  // stride(-1) == 1 (the Python layer guarantees it; stride 0 allowed elsewhere):
  //   q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev); Hq % Hkv == 0, query head h reads
  //   key/value head h / (Hq / Hkv) (GQA; Hkv == Hq without it).
  //   mask: none, or a (B, Hq, L, S) view (stride(3) == 1, others may be 0), bool (True =
  //   attend) or additive (float32 or q's dtype).
  //   is_causal: key j is masked for query i when j > i (top-left aligned, as torch's
  //   is_causal); never together with a mask (the Python layer folds it in).
  //   Scores z = scale * q.k + mask, probabilities p = softmax(z) over keys.
  //   dropout_p > 0: p_ij is kept with probability 1 - dropout_p and scaled by
  //   1 / (1 - dropout_p); keep(b, h, i, j) is fixed by (seed, offset) through Philox4x32-10
  //   (spec in kernels/include/fastattn/philox.h, reference in fastattn/reference.py).
  // Returns out (B, Hq, L, Ev) contiguous in q's dtype and lse (B, Hq, L) float32 contiguous,
  // the natural log of sum_j exp(z_ij) (+inf for a row with no unmasked key, whose out is 0).
  //
  // Extensions (fastattn.attention; defaults keep the plain sdpa call). The full statement of
  // the per-sequence semantics is the AttnGeometry comment in fastattn/attention_args.h:
  //   cu_seqlens_q/cu_seqlens_k: int32 (B + 1,) prefix sums of packed sequences (both or
  //     neither; no mask). q (1, Hq, total_q, E), k (1, Hkv, total_k, E), v (1, Hkv, total_k,
  //     Ev); sequence b owns rows [cu[b], cu[b + 1]); out (1, Hq, total_q, Ev), lse
  //     (1, Hq, total_q). max_seqlen_q/max_seqlen_k bound the per-sequence lengths.
  //   window_left/window_right: key j visible to query i only if i + d - left <= j <=
  //     i + d + right (-1: unbounded on that side); is_causal sets right = 0.
  //   bottom_right: the diagonal offset d = S_b - L_b (FlashAttention's causal alignment),
  //     else 0 (torch's top-left is_causal).
  //   alibi_slopes: float32 (Hq,) or (B, Hq); z += -slope * |i + d - j|.
  //   softcap > 0: scale * q.k becomes softcap * tanh(scale * q.k / softcap).
  m.def("sdpa(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, "
        "float dropout_p, int seed, int offset, Tensor? cu_seqlens_q=None, "
        "Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0, "
        "int window_left=-1, int window_right=-1, bool bottom_right=False, "
        "Tensor? alibi_slopes=None, float softcap=0.0) -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  // Gradients of sdpa, recomputing p from lse (no (L, S) buffer unless want_grad_mask).
  // grad_out: (B, Hq, L, Ev), stride(-1) == 1. grad_q/grad_k/grad_v contiguous in q's dtype,
  // shaped as q/k/v (grad_k/grad_v summed over the Hq / Hkv query heads of each kv head, in a
  // fixed order: deterministic). grad_mask: dz, the gradient of the scores z (= of an additive
  // mask), (B, Hq, L, S) float32 when want_grad_mask, else an empty (0,) tensor.
  m.def("sdpa_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? mask, float scale, bool is_causal, float dropout_p, int seed, int offset, "
        "bool want_grad_mask, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "int max_seqlen_q=0, int max_seqlen_k=0, int window_left=-1, int window_right=-1, "
        "bool bottom_right=False, Tensor? alibi_slopes=None, float softcap=0.0) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_mask)",
        {at::Tag::pt2_compliant_tag});

  // Attention of Lq (1 to a few) new tokens per sequence against a KV cache that already
  // holds them (fastattn.decode_attention appends k_new/v_new first), forward only, split-K
  // over the cache ("flash-decoding") with a deterministic reduction. Full contract: the
  // DecodeArgs comment in fastattn/attention_args.h.
  //   q (B, Lq, Hq, E), stride(-1) == 1. Caches: paged (P, page_size, Hkv, E|Ev) indexed by
  //   block_table int32 (B, max_pages), or contiguous (B, S_max, Hkv, E|Ev) without one.
  //   cache_seqlens int32 (B,): tokens held per sequence (new ones included), at most
  //   max_seqlen (the host's bound, for the split plan). Query row i sits at position
  //   cache_seqlens[b] - Lq + i; window as in sdpa (window_right = 0: causal).
  //   num_splits: 0 picks from the machine's parallelism, else that many (at most).
  // Returns out (B, Lq, Hq, Ev) contiguous in q's dtype and lse (B, Hq, Lq) float32.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
        "Tensor? block_table, Tensor? alibi_slopes, float scale, int window_left, "
        "int window_right, float softcap, int max_seqlen, int num_splits) "
        "-> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});

  // Quantized linear layers, inference only (formats: fastattn/quant.py, FORMAT_VERSION).
  // x: (M, K) contiguous float32/float16/bfloat16 (the Python layer flattens leading dims);
  // K >= 1, M and N may be 0. bias: none or (N,) in x's dtype. Outputs (M, N) contiguous.
  // Accumulation in float32 (int32 for int8 x int8); the dequantized weight is never stored.
  //   int8_weight_linear: weight int8 (N, K) contiguous, symmetric per output channel,
  //     scale float32 (N,):  y[m, n] = scale[n] * sum_k x[m, k] * weight[n, k] + bias[n]
  m.def("int8_weight_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  //   int4_weight_linear: group-wise asymmetric 4-bit, group_size G in {32, 64, 128}, K % G == 0.
  //     packed uint8 (N, K / 2) contiguous: byte j of row n holds q[n, 2j] in bits 0-3 and
  //     q[n, 2j + 1] in bits 4-7, q in [0, 15]; scale float32 (N, K / G); zero uint8 (N, K / G)
  //     in [0, 15]:  w[n, k] = (q[n, k] - zero[n, k / G]) * scale[n, k / G],
  //     y = x @ w^T + bias
  m.def("int4_weight_linear(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size, "
        "Tensor? bias) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  //   quantize_per_token_int8: symmetric per-row int8 of x (finite values):
  //     amax[m] = max_k |x[m, k]| (float32), x_scale[m] = amax[m] / 127,
  //     xq[m, k] = clamp(rint(x[m, k] * (127 / amax[m])), -127, 127) (half to even; 0 if amax == 0)
  //     -> (xq int8 (M, K), x_scale float32 (M,))
  m.def("quantize_per_token_int8(Tensor x) -> (Tensor xq, Tensor x_scale)",
        {at::Tag::pt2_compliant_tag});
  //   int8_scaled_mm (W8A8): xq int8 (M, K), x_scale float32 (M,), weight int8 (N, K),
  //     w_scale float32 (N,), bias (N,) in out_dtype; out_dtype float32/float16/bfloat16:
  //     y[m, n] = float(sum_k int32(xq[m, k]) * int32(weight[n, k])) * x_scale[m] * w_scale[n]
  //               + bias[n]
  m.def("int8_scaled_mm(Tensor xq, Tensor x_scale, Tensor weight, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}

// `import fastattn._C` loads this library (and so runs the registrations above).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
