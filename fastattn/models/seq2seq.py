"""Seq2Seq: encoder-decoder transformer (T5 / original Transformer layout, pre-norm)."""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelBase
from .block import Block
from .config import ModelConfig
from .norm import Norm
from .packing import Packing, lengths_of


class Seq2Seq(ModelBase):
    """Encoder of n_layers bidirectional blocks; decoder of n_decoder_layers blocks with causal
    self-attention and cross-attention to the encoder output; one shared embedding.

    encode(src (B, S), src_lengths) -> (memory (Ts, D), Packing)
    forward(src, tgt (B, L), src_lengths=None, tgt_lengths=None) -> logits (B, L, V)
    start(memory, pk_src, caches) -> per-layer CrossKV (cross K/V computed once)
    prefill(tgt, tgt_lengths, memory, pk_src, caches, cross_kv) -> (B, V); decode(tokens (B,),
      pk_src, caches, cross_kv) -> (B, V).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.enc_blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layers))
        self.enc_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.dec_blocks = nn.ModuleList(Block(cfg, causal=True, cross=True)
                                        for _ in range(cfg.n_decoder_layers))
        self.norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.tok.weight

    def encode(self, src: torch.Tensor, src_lengths=None) -> tuple[torch.Tensor, Packing]:
        with self.backend_context():
            pk = Packing.from_lengths(lengths_of(src, src_lengths), src.shape[1], src.device)
            x = self._stack(self.enc_blocks, self._embed(pk.pack(src), pk), pk)
            return self.enc_norm(x), pk

    def _decode_stack(self, tokens, pk, memory, pk_src, caches=None, cross_kv=None):
        x = self._stack(self.dec_blocks, self._embed(tokens, pk), pk, caches, memory=memory,
                        pk_kv=pk_src, cross_kv=cross_kv)
        return self.norm(x)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_lengths=None,
                tgt_lengths=None) -> torch.Tensor:
        memory, pk_src = self.encode(src, src_lengths)
        with self.backend_context():
            pk = Packing.from_lengths(lengths_of(tgt, tgt_lengths), tgt.shape[1], tgt.device)
            return pk.pad(self.head(self._decode_stack(pk.pack(tgt), pk, memory, pk_src)))

    def new_caches(self, batch_size: int, max_len: int, n_layers: int | None = None) -> list:
        return super().new_caches(batch_size, max_len, self.config.n_decoder_layers)

    def start(self, memory: torch.Tensor, pk_src: Packing) -> list:
        with self.backend_context():
            return [b.cross.precompute(memory, pk_src) for b in self.dec_blocks]

    def prefill(self, tgt, tgt_lengths, memory, pk_src, caches, cross_kv) -> torch.Tensor:
        with self.backend_context():
            pk = Packing.from_lengths(lengths_of(tgt, tgt_lengths), tgt.shape[1], tgt.device)
            x = self._decode_stack(pk.pack(tgt), pk, memory, pk_src, caches, cross_kv)
            return self.head(pk.last(x))

    def decode(self, tokens, pk_src, caches, cross_kv) -> torch.Tensor:
        with self.backend_context():
            pk = Packing.for_decode(caches[0].lengths, tokens.device)
            return self.head(self._decode_stack(tokens, pk, None, pk_src, caches, cross_kv))
