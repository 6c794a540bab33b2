"""Token embeddings and positions: learned / sinusoidal tables added to the embeddings, and
rotary embeddings applied to q and k."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """(n, d) float32: sin at even columns, cos at odd (Vaswani et al.)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table.float()


class Embeddings(nn.Module):
    """tokens (T,) and positions (T,) -> (T, d_model): token embedding plus, for "learned" /
    "sinusoidal" positions, the position's vector (rotary positions are applied in attention)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.kind = cfg.positions
        self.max_seq_len = cfg.max_seq_len
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(cfg.max_seq_len, cfg.d_model),
                                 persistent=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)  # (T, D)
        if self.kind == "learned":
            x = x + self.pos(positions)
        elif self.kind == "sinusoidal":
            x = x + self.table[positions].to(x.dtype)
        return self.drop(x)


class Rotary(nn.Module):
    """Rotary position embedding (GPT-NeoX "rotate half" layout) for (T, H, E) q or k at
    positions (T,)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        ang = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv[None]  # (S, E/2)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos = self.cos[positions][:, None].to(x.dtype)  # (T, 1, E/2)
        sin = self.sin[positions][:, None].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
