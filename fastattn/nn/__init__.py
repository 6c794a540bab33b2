"""Drop-in modules built on fastattn ops."""

from .layer_norm import LayerNorm
from .multihead_attention import MultiheadAttention
from .rms_norm import RMSNorm
from .softmax import Softmax

__all__ = ["LayerNorm", "MultiheadAttention", "RMSNorm", "Softmax"]
