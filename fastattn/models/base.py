"""What every model of fastattn.models shares: the config, backend forcing, weight init,
the block stack (with optional activation checkpointing) and KV-cache construction."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastattn

from .config import ModelConfig
from .positions import Embeddings, Rotary


class ModelBase(nn.Module):
    """Subclasses: DecoderLM, Encoder, Seq2Seq. Attributes: config, embed (Embeddings), rotary
    (Rotary or None), gradient_checkpointing (recompute each block in backward)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.rotary = (Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
                       if cfg.positions == "rotary" else None)
        self.gradient_checkpointing = False

    def backend_context(self):
        """fastattn.use_backend(config.backend) when a backend is forced, else a no-op."""
        b = self.config.backend
        return fastattn.use_backend(b) if b else contextlib.nullcontext()

    def init_weights(self) -> None:
        """Normal(0, init_std) linears and embeddings, zero biases; output projections of each
        sublayer scaled by 1/sqrt(2 * layers) (GPT-2)."""
        std = self.config.init_std
        depth = self.config.n_layers + (self.config.n_decoder_layers
                                        if self.config.arch == "seq2seq" else 0)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                s = std / (2 * depth) ** 0.5 if name.endswith((".out", ".down")) else std
                nn.init.normal_(m.weight, 0.0, s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)

    def _embed(self, tokens: torch.Tensor, pk) -> torch.Tensor:
        if pk.end > self.config.max_seq_len:
            raise ValueError(f"{type(self).__name__}: sequences longer than max_seq_len = "
                             f"{self.config.max_seq_len}")
        return self.embed(tokens, pk.positions)

    def _stack(self, blocks: nn.ModuleList, x: torch.Tensor, pk, caches=None, **cross):
        """Runs blocks in order; layer i gets caches[i] and cross["cross_kv"][i] if given."""
        cross_kv = cross.pop("cross_kv", None)
        for i, block in enumerate(blocks):
            kw = dict(cross, cache=None if caches is None else caches[i],
                      cross_kv=None if cross_kv is None else cross_kv[i])
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, pk, self.rotary, use_reentrant=False, **kw)
            else:
                x = block(x, pk, self.rotary, **kw)
        return x

    def new_caches(self, batch_size: int, max_len: int, n_layers: int | None = None) -> list:
        """One empty fastattn.KVCache per (decoder) layer, in the model's dtype and device."""
        p = next(self.parameters())
        cfg = self.config
        n = cfg.n_layers if n_layers is None else n_layers
        return [fastattn.KVCache(batch_size, max_len, cfg.n_kv_heads, cfg.head_dim,
                                 dtype=p.dtype, device=p.device) for _ in range(n)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
