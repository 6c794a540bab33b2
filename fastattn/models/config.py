"""ModelConfig: one dataclass describes every model of fastattn.models, with named presets.

    cfg = ModelConfig.preset("tiny", arch="encoder", num_labels=2)
    cfg.to_json("config.json"); ModelConfig.from_json("config.json") == cfg
"""

from __future__ import annotations

import dataclasses
import json
import os

ARCHS = ("decoder", "encoder", "seq2seq")
POSITIONS = ("learned", "sinusoidal", "rotary")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
BACKENDS = (None, "reference", "cpu", "cuda", "triton")


@dataclasses.dataclass
class ModelConfig:
    """Shape and options of a transformer of fastattn.models.

    arch: "decoder" (causal LM), "encoder" (bidirectional; MLM head, and a classification head
      when num_labels > 0) or "seq2seq" (encoder of n_layers + causal decoder of
      n_decoder_layers with cross-attention).
    n_kv_heads: key/value heads (GQA when < n_heads; must divide n_heads); None = n_heads.
    d_ff: hidden width of the MLP (for swiglu, of each of the gate and up projections).
    positions: "learned" / "sinusoidal" (added to the token embeddings) or "rotary" (applied
      to q and k of self-attention). max_seq_len bounds every sequence.
    tie_embeddings: the output projection shares the token embedding matrix.
    dropout: residual, embedding and attention-probability dropout in training.
    backend: None (fastattn picks the fused kernel per op) or a fastattn backend forced for
      every op of the forward (e.g. "reference": the identical model on plain PyTorch math).
    """

    arch: str = "decoder"
    vocab_size: int = 264
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int = 128
    max_seq_len: int = 128
    positions: str = "rotary"
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    tie_embeddings: bool = True
    dropout: float = 0.0
    num_labels: int = 0
    n_decoder_layers: int | None = None
    bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        checks = [(self.arch in ARCHS, f"arch must be one of {ARCHS}"),
                  (self.positions in POSITIONS, f"positions must be one of {POSITIONS}"),
                  (self.norm in NORMS, f"norm must be one of {NORMS}"),
                  (self.mlp in MLPS, f"mlp must be one of {MLPS}"),
                  (self.backend in BACKENDS, f"backend must be one of {BACKENDS}"),
                  (self.d_model % self.n_heads == 0, "n_heads must divide d_model"),
                  (self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
                   "n_kv_heads must divide n_heads"),
                  (self.positions != "rotary" or self.head_dim % 2 == 0,
                   "rotary positions need an even head dim"),
                  (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
                  (min(self.vocab_size, self.d_model, self.n_layers, self.d_ff,
                       self.max_seq_len) >= 1, "sizes must be >= 1"),
                  (self.num_labels >= 0, "num_labels must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}, got {self}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> ModelConfig:
        """From a JSON file path, or from JSON text (a string starting with '{')."""
        s = str(path_or_text)
        if s.lstrip().startswith("{"):
            return cls.from_dict(json.loads(s))
        with open(s) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named preset (PRESETS) with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; known: "
                             f"{sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # unit tests (~90k parameters), byte vocabulary
    "tiny": {"vocab_size": 264, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
             "d_ff": 128, "max_seq_len": 128},
    # CPU demo (~3.0M parameters): trains on the stdlib corpus in minutes
    "small": {"vocab_size": 264, "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4,
              "d_ff": 704, "max_seq_len": 256},
    # GPT-2 small shape (124M): learned positions, LayerNorm, GELU, MHA, tied embeddings
    "gpt2-small": {"vocab_size": 50304, "d_model": 768, "n_layers": 12, "n_heads": 12,
                   "d_ff": 3072, "max_seq_len": 1024, "positions": "learned",
                   "norm": "layernorm", "mlp": "gelu", "bias": True},
    # ~1.1B Llama-style decoder (TinyLlama's shape): rotary, RMSNorm, SwiGLU, GQA 32/4
    "1b": {"vocab_size": 32000, "d_model": 2048, "n_layers": 22, "n_heads": 32,
           "n_kv_heads": 4, "d_ff": 5632, "max_seq_len": 2048, "tie_embeddings": False},
}
