"""build_model, and save / load as model.safetensors + config.json (never pickled)."""

from __future__ import annotations

import os

import torch

from .config import ModelConfig

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model class for cfg.arch, freshly initialised."""
    from .decoder import DecoderLM
    from .encoder import Encoder
    from .seq2seq import Seq2Seq

    return {"decoder": DecoderLM, "encoder": Encoder, "seq2seq": Seq2Seq}[cfg.arch](cfg)


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Writes directory/model.safetensors (tied weights stored once) and config.json."""
    from safetensors.torch import save_model

    os.makedirs(directory, exist_ok=True)
    save_model(model, os.path.join(directory, WEIGHTS))
    model.config.to_json(os.path.join(directory, CONFIG))


def load_pretrained(directory: str | os.PathLike, *, device: str | torch.device = "cpu",
                    **overrides) -> torch.nn.Module:
    """The model saved by save_pretrained (config fields may be overridden, e.g. backend=)."""
    from safetensors.torch import load_model

    cfg = ModelConfig.from_json(os.path.join(directory, CONFIG)).replace(**overrides)
    model = build_model(cfg)
    load_model(model, os.path.join(directory, WEIGHTS), device=str(device))
    return model.to(device)


def load_weights(model: torch.nn.Module, directory: str | os.PathLike, *,
                 strict: bool = True) -> tuple[list[str], list[str]]:
    """Loads directory/model.safetensors into an existing model (strict=False: e.g. an MLM
    encoder into a classifier, whose new head keeps its init). Returns (missing, unexpected)
    parameter names."""
    from safetensors.torch import load_model

    device = next(model.parameters()).device
    missing, unexpected = load_model(model, os.path.join(directory, WEIGHTS), strict=strict,
                                     device=str(device))
    return sorted(missing), sorted(unexpected)
