"""Public functions, one op per module."""

from .layer_norm import add_layer_norm, layer_norm
from .rms_norm import add_rms_norm, rms_norm
from .sdpa import sdpa
from .softmax import softmax

__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm", "sdpa", "softmax"]
