"""Public functions, one op per module."""

from .attention import attention
from .decode_attention import decode_attention
from .int4_linear import int4_linear
from .int8_linear import int8_linear
from .layer_norm import add_layer_norm, layer_norm
from .rms_norm import add_rms_norm, rms_norm
from .sdpa import sdpa
from .softmax import softmax
from .w8a8_linear import quantize_per_token_int8, w8a8_linear

__all__ = ["add_layer_norm", "add_rms_norm", "attention", "decode_attention", "int4_linear",
           "int8_linear", "layer_norm",
           "quantize_per_token_int8", "rms_norm", "sdpa", "softmax", "w8a8_linear"]
