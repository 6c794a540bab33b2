"""Norm: LayerNorm or RMSNorm on fastattn's fused kernels, with the fused residual add."""

from __future__ import annotations

import torch
from torch import nn

import fastattn


class Norm(nn.Module):
    """forward(x (..., D)) -> (..., D); add(x, residual) -> (norm(x + residual), x + residual)
    in one fused pass (fastattn.add_layer_norm / add_rms_norm)."""

    def __init__(self, d: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps, self.shape = kind, eps, (d,)
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return fastattn.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        return fastattn.rms_norm(x, self.shape, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "layernorm":
            return fastattn.add_layer_norm(x, residual, self.shape, self.weight, self.bias,
                                           self.eps)
        return fastattn.add_rms_norm(x, residual, self.shape, self.weight, self.eps)
