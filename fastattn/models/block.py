"""Pre-norm transformer block: self-attention, optional cross-attention, MLP; the residual
add and the next norm run fused (Norm.add)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttention, SelfAttention
from .mlp import MLP
from .norm import Norm


class Block(nn.Module):
    """x (T, D) -> (T, D):
        h = attn(norm1(x));          n, x = norm_x.add(h, x);  h = cross(n, memory)   [cross]
        n, x = norm2.add(h, x);      return x + mlp(n)
    """

    def __init__(self, cfg, causal: bool, cross: bool = False) -> None:
        super().__init__()
        self.norm1 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.attn = SelfAttention(cfg, causal)
        if cross:
            self.norm_x = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
            self.cross = CrossAttention(cfg)
        self.norm2 = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pk, rotary=None, cache=None, memory=None, pk_kv=None,
                cross_kv=None) -> torch.Tensor:
        h = self.drop(self.attn(self.norm1(x), pk, rotary, cache))
        if hasattr(self, "cross"):
            n, x = self.norm_x.add(h, x)
            h = self.drop(self.cross(n, pk, memory, pk_kv, cross_kv))
        n, x = self.norm2.add(h, x)
        return x + self.drop(self.mlp(n))
