"""Encoder: BERT-style bidirectional encoder with an MLM head and a classification head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelBase
from .block import Block
from .config import ModelConfig
from .norm import Norm
from .packing import Packing, lengths_of


class Encoder(ModelBase):
    """Bidirectional encoder over right-padded batches (padding excluded by packing).

    encode(input_ids (B, L), lengths=None) -> (hidden (T, D) packed and normed, Packing)
    forward(input_ids, lengths=None, head="mlm") -> MLM logits (B, L, V) (zeros at padding),
      or with head="classify" the classification logits
    classify(input_ids, lengths=None) -> (B, num_labels): mean of each sequence's hidden
      states -> Linear -> tanh -> Linear.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.mlm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.num_labels:
            self.pool = nn.Linear(cfg.d_model, cfg.d_model)
            self.cls_head = nn.Linear(cfg.d_model, cfg.num_labels)
        self.init_weights()
        if cfg.tie_embeddings:
            self.mlm_head.weight = self.embed.tok.weight

    def encode(self, input_ids: torch.Tensor, lengths=None) -> tuple[torch.Tensor, Packing]:
        with self.backend_context():
            pk = Packing.from_lengths(lengths_of(input_ids, lengths), input_ids.shape[1],
                                      input_ids.device)
            x = self._stack(self.blocks, self._embed(pk.pack(input_ids), pk), pk)
            return self.norm(x), pk  # (T, D)

    def forward(self, input_ids: torch.Tensor, lengths=None, *, head: str = "mlm") -> torch.Tensor:
        """head "mlm": (B, L, V) MLM logits; head "classify": classify(input_ids, lengths)."""
        if head == "classify":
            return self.classify(input_ids, lengths)
        if head != "mlm":
            raise ValueError(f"Encoder.forward: head must be 'mlm' or 'classify', got {head!r}")
        h, pk = self.encode(input_ids, lengths)
        return pk.pad(self.mlm_head(h))  # (B, L, V)

    def classify(self, input_ids: torch.Tensor, lengths=None) -> torch.Tensor:
        """(B, num_labels) logits."""
        if not self.config.num_labels:
            raise ValueError("Encoder.classify: the config has num_labels = 0")
        h, pk = self.encode(input_ids, lengths)
        seq = torch.repeat_interleave(torch.arange(pk.batch_size, device=h.device),
                                      torch.as_tensor(pk.lengths, device=h.device))
        sums = h.new_zeros(pk.batch_size, h.shape[1]).index_add(0, seq, h)
        mean = sums / torch.as_tensor(pk.lengths, device=h.device).clamp(min=1)[:, None]
        return self.cls_head(torch.tanh(self.pool(mean)))  # (B, num_labels)

    def mlm_loss(self, input_ids, labels, lengths=None) -> torch.Tensor:
        """F.cross_entropy of the MLM logits at positions where labels != -100."""
        logits = self(input_ids, lengths)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=-100)
