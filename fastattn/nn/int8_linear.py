"""fastattn.nn.Int8Linear: nn.Linear with an int8 weight-only quantized weight."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.int8_linear import int8_linear
from ..quant_formats import dequantize_int8_weight, quantize_int8_weight
from ._quantized_linear import QuantizedLinear


class Int8Linear(QuantizedLinear):
    """y = x @ (weight * scale)^T + bias with weight int8 (out_features, in_features) and
    scale float32 (out_features,) (per-channel symmetric). forward(x: (..., in_features)) ->
    (..., out_features) in x's dtype. Build it with `Int8Linear.from_float(linear)`."""

    FORMAT = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str | None = None) -> None:
        super().__init__(in_features, out_features, backend=backend)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("scale", torch.ones(out_features, device=device))
        self._set_bias(torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, *, backend: str | None = None) -> Int8Linear:
        """Quantizes linear.weight (per output channel); the bias is kept as it is."""
        cls._check_linear(linear, f"{cls.__name__}.from_float")
        new = cls(linear.in_features, linear.out_features, bias=False, backend=backend)
        new.weight, new.scale = quantize_int8_weight(linear.weight)
        new._set_bias(linear.bias)
        return new.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out_features, in_features), for inspection (forward never builds it)."""
        return dequantize_int8_weight(self.weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, self.bias, backend=self.backend)
