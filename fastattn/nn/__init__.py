"""Drop-in modules built on fastattn ops."""

from .int4_linear import Int4Linear
from .int8_linear import Int8Linear
from .layer_norm import LayerNorm
from .multihead_attention import MultiheadAttention
from .rms_norm import RMSNorm
from .softmax import Softmax
from .w8a8_linear import W8A8Linear

__all__ = ["Int4Linear", "Int8Linear", "LayerNorm", "MultiheadAttention", "RMSNorm", "Softmax",
           "W8A8Linear"]
