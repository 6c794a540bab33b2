"""DecoderLM: GPT-style causal language model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelBase
from .block import Block
from .config import ModelConfig
from .norm import Norm
from .packing import Packing, lengths_of


class DecoderLM(ModelBase):
    """Causal LM: embeddings -> n_layers causal blocks -> norm -> vocabulary logits (the head
    shares the embedding matrix when tie_embeddings).

    forward(input_ids (B, L), lengths=None) -> logits (B, L, V) (zeros at padding).
    prefill(input_ids, lengths, caches) -> (B, V) logits of each prompt's last token, caches
      filled; decode(tokens (B,), caches) -> (B, V) logits of the next token.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.blocks = nn.ModuleList(Block(cfg, causal=True) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.tok.weight

    def _run(self, tokens: torch.Tensor, pk: Packing, caches=None) -> torch.Tensor:
        return self._stack(self.blocks, self._embed(tokens, pk), pk, caches)  # (T, D)

    def forward(self, input_ids: torch.Tensor, lengths=None) -> torch.Tensor:
        with self.backend_context():
            pk = Packing.from_lengths(lengths_of(input_ids, lengths), input_ids.shape[1],
                                      input_ids.device)
            x = self._run(pk.pack(input_ids), pk)
            return pk.pad(self.head(self.norm(x)))  # (B, L, V)

    def prefill(self, input_ids: torch.Tensor, lengths, caches: list) -> torch.Tensor:
        with self.backend_context():
            pk = Packing.from_lengths(lengths_of(input_ids, lengths), input_ids.shape[1],
                                      input_ids.device)
            x = pk.last(self._run(pk.pack(input_ids), pk, caches))  # (B, D)
            return self.head(self.norm(x))

    def decode(self, tokens: torch.Tensor, caches: list) -> torch.Tensor:
        with self.backend_context():
            pk = Packing.for_decode(caches[0].lengths, tokens.device)
            return self.head(self.norm(self._run(tokens, pk, caches)))  # (B, V)

    def loss(self, input_ids: torch.Tensor, lengths=None) -> torch.Tensor:
        """Mean next-token cross-entropy over the real tokens."""
        return lm_loss(self(input_ids, lengths), input_ids, lengths)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, lengths=None) -> torch.Tensor:
    """Next-token F.cross_entropy of logits (B, L, V) against input_ids shifted by one, padding
    (positions >= lengths) and each sequence's last position ignored."""
    B, L = input_ids.shape
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    if lengths is not None:
        n = torch.as_tensor(lengths_of(input_ids, lengths), device=input_ids.device)
        targets[torch.arange(L, device=input_ids.device)[None] >= n[:, None] - 1] = -100
    return F.cross_entropy(logits.reshape(B * L, -1).float(), targets.reshape(-1),
                           ignore_index=-100)
