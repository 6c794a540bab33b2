"""fastattn: fused transformer kernels (Triton, CUDA, vectorized CPU C++) as PyTorch operators.

    import fastattn
    p = fastattn.softmax(scores, scale=d ** -0.5, mask=keep, causal=True)

Importing fastattn loads the operator library fastattn._C (one shared object) so that
torch.ops.fastattn.* exist; Triton is imported only when a Triton kernel first runs.
"""

from . import nn, reference
from .backends import BackendError, available_backends, explain, use_backend
from .ops import softmax

__version__ = "0.1.0"

__all__ = ["BackendError", "available_backends", "explain", "nn", "reference", "softmax",
           "use_backend"]
