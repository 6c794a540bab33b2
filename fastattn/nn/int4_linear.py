"""fastattn.nn.Int4Linear: nn.Linear with a group-wise int4 weight-only quantized weight."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.int4_linear import int4_linear
from ..quant_formats import check_group_size, dequantize_int4_weight, quantize_int4_weight
from ._quantized_linear import QuantizedLinear


class Int4Linear(QuantizedLinear):
    """y = x @ W^T + bias with W = (code - zero) * scale per group of `group_size` inputs:
    packed uint8 (out_features, in_features / 2), scale float32 and zero uint8
    (out_features, in_features / group_size). forward(x: (..., in_features)) ->
    (..., out_features) in x's dtype. Build it with `Int4Linear.from_float(linear, group_size)`."""

    FORMAT = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        check_group_size(group_size, in_features, type(self).__name__)
        super().__init__(in_features, out_features, group_size, backend=backend)
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8,
                                                 device=device))
        self._set_bias(torch.zeros(out_features, device=device, dtype=dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128, *,
                   backend: str | None = None) -> Int4Linear:
        """Quantizes linear.weight in groups of `group_size` along in_features; bias kept."""
        cls._check_linear(linear, f"{cls.__name__}.from_float")
        new = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size,
                  backend=backend)
        new.packed, new.scale, new.zero = quantize_int4_weight(linear.weight, group_size)
        new._set_bias(linear.bias)
        return new.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out_features, in_features), for inspection (forward never builds it)."""
        return dequantize_int4_weight(self.packed, self.scale, self.zero, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.packed, self.scale, self.zero, self.group_size, self.bias,
                           backend=self.backend)
