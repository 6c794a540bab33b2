"""fastattn: fused transformer kernels (Triton, CUDA, vectorized CPU C++) as PyTorch operators.

    import fastattn
    o = fastattn.sdpa(q, k, v, attn_mask=keep, enable_gqa=True)   # as F.scaled_dot_product_attention
    o = fastattn.attention(q, k, v, causal=True, window=(4095, 0), cu_seqlens_q=cu, cu_seqlens_k=cu)
    o = fastattn.decode_attention(q, k_cache, v_cache, lengths, k_new=k, v_new=v)  # KV-cache step
    p = fastattn.softmax(scores, scale=d ** -0.5, mask=keep, causal=True)
    y = fastattn.layer_norm(x, (d,), weight, bias)
    h, s = fastattn.add_rms_norm(x, residual, (d,), weight)   # (rms_norm(x + residual), x + residual)
    report = fastattn.quantize(model, "int4", group_size=128)   # nn.Linear -> fastattn.nn.Int4Linear
    model, report = fastattn.patch(model)      # torch.nn / Hugging Face attention and norms swapped

Importing fastattn loads the operator library fastattn._C (one shared object) so that
torch.ops.fastattn.* exist; Triton is imported only when a Triton kernel first runs.
"""

from . import nn, reference
from .backends import BackendError, available_backends, explain, use_backend
from .kv_cache import KVCache, PagedKVCache
from .ops import (add_layer_norm, add_rms_norm, attention, decode_attention, int4_linear,
                  int8_linear, layer_norm, quantize_per_token_int8, rms_norm, sdpa, softmax,
                  w8a8_linear)
from .patch import PatchReport, patch, unpatch
from .quant import QuantizeReport, load_quantized, quantize, save_quantized
from .quant_formats import pack_int4, quantize_int4_weight, quantize_int8_weight, unpack_int4

__version__ = "0.1.0"

__all__ = ["BackendError", "KVCache", "PagedKVCache", "PatchReport", "QuantizeReport",
           "add_layer_norm", "add_rms_norm", "attention", "available_backends",
           "decode_attention", "explain", "int4_linear", "int8_linear", "layer_norm",
           "load_quantized", "nn", "pack_int4", "patch", "quantize", "quantize_int4_weight",
           "quantize_int8_weight", "quantize_per_token_int8", "reference", "rms_norm",
           "save_quantized", "sdpa", "softmax", "unpack_int4", "unpatch", "use_backend",
           "w8a8_linear"]
