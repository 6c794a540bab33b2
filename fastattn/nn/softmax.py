"""fastattn.nn.Softmax: the fused attention softmax as a module."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.softmax import softmax


class Softmax(nn.Module):
    """Drop-in for torch.nn.Softmax(dim) that also takes the attention extras.

    forward(x: (..., N), mask=None) -> (..., N): softmax(scale * x + mask) along `dim`, with an
    optional causal mask over the last two dims. See fastattn.softmax for the semantics.
    """

    def __init__(self, dim: int = -1, *, scale: float | None = None, causal: bool = False,
                 backend: str | None = None) -> None:
        super().__init__()
        self.dim, self.scale, self.causal, self.backend = dim, scale, causal, backend

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return softmax(x, self.dim, scale=self.scale, mask=mask, causal=self.causal,
                       backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, causal={self.causal}"
