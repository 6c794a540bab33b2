"""fastattn: fused transformer kernels (Triton, CUDA, vectorized CPU C++) as PyTorch operators.

    import fastattn
    o = fastattn.sdpa(q, k, v, attn_mask=keep, enable_gqa=True)   # as F.scaled_dot_product_attention
    p = fastattn.softmax(scores, scale=d ** -0.5, mask=keep, causal=True)
    y = fastattn.layer_norm(x, (d,), weight, bias)
    h, s = fastattn.add_rms_norm(x, residual, (d,), weight)   # (rms_norm(x + residual), x + residual)

Importing fastattn loads the operator library fastattn._C (one shared object) so that
torch.ops.fastattn.* exist; Triton is imported only when a Triton kernel first runs.
"""

from . import nn, reference
from .backends import BackendError, available_backends, explain, use_backend
from .ops import add_layer_norm, add_rms_norm, layer_norm, rms_norm, sdpa, softmax

__version__ = "0.1.0"

__all__ = ["BackendError", "add_layer_norm", "add_rms_norm", "available_backends", "explain",
           "layer_norm", "nn", "reference", "rms_norm", "sdpa", "softmax", "use_backend"]
