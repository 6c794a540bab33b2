"""fastattn.nn.W8A8Linear: nn.Linear in dynamic W8A8 (int8 weights, int8 per-token activations)."""

from __future__ import annotations

from torch import Tensor

from ..ops.w8a8_linear import w8a8_linear
from .int8_linear import Int8Linear


class W8A8Linear(Int8Linear):
    """The weight format of Int8Linear (so its state_dict is interchangeable with one), but the
    activations are quantized per token at run time and the product runs in int8 x int8 -> int32.
    forward(x: (..., in_features)) -> (..., out_features) in x's dtype."""

    FORMAT = "w8a8"

    def forward(self, x: Tensor) -> Tensor:
        return w8a8_linear(x, self.weight, self.scale, self.bias, backend=self.backend)
