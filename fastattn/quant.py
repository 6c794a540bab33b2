"""fastattn.quantize(model, format): swap a model's nn.Linear layers for fastattn's quantized
linears in place, with a report of what changed; and safetensors save/load of the result.

    report = fastattn.quantize(model, "int4", group_size=128)
    print(report)                              # what was replaced, what was left and why
    fastattn.save_quantized(model, "model.safetensors")
    fastattn.load_quantized(other, "model.safetensors")   # `other`: quantized the same way first

Formats and quantizers: fastattn/quant_formats.py. Modules: fastattn/nn/int8_linear.py,
int4_linear.py, w8a8_linear.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .quant_formats import FORMAT_VERSION, FORMATS, INT4_GROUP_SIZES

_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class QuantizeReport:
    """What fastattn.quantize did. replaced: (qualified name, description); skipped:
    (qualified name, reason); notes: model-level changes (e.g. a disabled torch fast path)."""

    format: str
    group_size: int | None
    replaced: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bytes_before: int = 0  # weight bytes of the replaced layers, float
    bytes_after: int = 0   # and quantized (codes + scales + zero points)

    def __str__(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        lines = [(f"fastattn.quantize({self.format}{group}): replaced {len(self.replaced)} "
                  f"linear layer(s), skipped {len(self.skipped)}; weight bytes "
                  f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB")]
        lines += [f"  replaced {name}: {what}" for name, what in self.replaced]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _module_class(fmt: str):
    from .nn import Int4Linear, Int8Linear, W8A8Linear
    return {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}[fmt]


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every qualified name it is reachable under (tied weights share one)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _skip_reason(name: str, module: nn.Linear, fmt: str, group_size: int,
                 parent: nn.Module | None, flt) -> str | None:
    if type(module) is not nn.Linear:
        if isinstance(parent, nn.MultiheadAttention):
            return (f"{type(module).__name__} inside nn.MultiheadAttention: the attention reads "
                    "its .weight directly instead of calling it")
        return f"subclass {type(module).__name__} of nn.Linear: its forward may differ"
    if flt is not None and not flt(name, module):
        return "excluded by filter"
    if module.weight.device.type == "meta":
        return "weight is on the meta device (no values to quantize)"
    if fmt == "int4" and module.in_features % group_size:
        return (f"in_features {module.in_features} is not a multiple of group_size "
                f"{group_size}")
    return None


def quantize(model: nn.Module, format: str, *, group_size: int = 128,
             filter: Callable[[str, nn.Module], bool] | None = None,
             backend: str | None = None) -> QuantizeReport:
    """Replaces the nn.Linear layers of `model` in place with fastattn quantized linears.

    Args:
      model: any nn.Module (an nn.Linear itself cannot be replaced in place: wrap it).
      format: "int8" (weight-only), "int4" (weight-only, group-wise) or "w8a8" (dynamic int8
        activations x int8 weights). Layouts: fastattn/quant_formats.py.
      group_size: int4 group size along in_features (32, 64 or 128); layers whose in_features
        it does not divide are skipped and reported.
      filter: filter(qualified_name, linear) -> bool; False leaves that layer in float.
      backend: forwarded to every new module (None: chosen per call).

    Returns a QuantizeReport. Inside nn.TransformerEncoderLayer / DecoderLayer, torch's fused
    eval fast path reads the float weights directly, so it is turned off for layers that hold a
    quantized linear (and an nn.TransformerEncoder stops converting padded batches to nested
    tensors); the report notes each one. Quantized layers are inference-only.
    """
    if format not in FORMATS:
        raise ValueError(f"fastattn.quantize: format must be one of {FORMATS}, got {format!r}")
    if format == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"fastattn.quantize: group_size must be one of {INT4_GROUP_SIZES}, "
                         f"got {group_size}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastattn.quantize: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("fastattn.quantize: model is itself an nn.Linear and cannot be replaced "
                        "in place; use fastattn.nn.Int8Linear.from_float(linear) (or Int4Linear, "
                        "W8A8Linear), or wrap it in a module")
    cls = _module_class(format)
    report = QuantizeReport(format, group_size if format == "int4" else None)
    tied = _tied_names(model)
    changed_layers: list[tuple[str, nn.Module]] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            reason = _skip_reason(name, child, format, group_size, parent, filter)
            if reason is not None:
                report.skipped.append((name, reason))
                continue
            new = cls.from_float(child, group_size, backend=backend) if format == "int4" \
                else cls.from_float(child, backend=backend)
            setattr(parent, child_name, new)
            report.bytes_before += child.weight.numel() * child.weight.element_size()
            report.bytes_after += sum(b.numel() * b.element_size()
                                      for n, b in new.named_buffers() if n != "bias")
            what = f"Linear({child.in_features}, {child.out_features}) -> {cls.__name__}"
            others = [n for n in tied.get(id(child.weight), []) if n != f"{name}.weight"]
            if others:
                what += f" (weight tied to {', '.join(others)}, which keeps the float copy)"
            report.replaced.append((name, what))
            if isinstance(parent, _TRANSFORMER_LAYERS):
                changed_layers.append((parent_name, parent))
    _disable_torch_fast_paths(model, changed_layers, report)
    return report


def _no_fast_path(module, args):
    """A forward pre-hook that does nothing: its presence turns torch's fused Transformer layer
    path off (that path passes linear1.weight etc. to a kernel that expects float weights)."""
    return


def _disable_torch_fast_paths(model: nn.Module, layers: list[tuple[str, nn.Module]],
                              report: QuantizeReport) -> None:
    seen = set()
    for name, layer in layers:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        layer.register_forward_pre_hook(_no_fast_path)
        report.notes.append(f"{name or type(layer).__name__}: torch's fused eval fast path is off "
                            "(it reads the float weights directly)")
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False) \
                and any(id(m) in seen for m in module.layers):
            module.use_nested_tensor = False
            report.notes.append(
                f"{name or 'model'}: nn.TransformerEncoder no longer converts padded batches to "
                "nested tensors, so outputs at padded positions are computed instead of zeroed "
                "(outputs at real tokens are unchanged)")


def save_quantized(model: nn.Module, path: str | os.PathLike,
                   metadata: dict[str, str] | None = None) -> None:
    """Writes model's state (quantized buffers included) to a safetensors file, with the format
    version in its metadata. Never pickles."""
    from safetensors.torch import save_model

    meta = {"fastattn.quant_format_version": str(FORMAT_VERSION)}
    meta.update(metadata or {})
    save_model(model, os.fspath(path), metadata=meta)


def load_quantized(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Loads a save_quantized file into `model`, which must already have the same structure
    (build the float model, run fastattn.quantize with the same format and group_size, then
    load). Checks the format version. Returns model."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(os.fspath(path), framework="pt") as f:
        version = (f.metadata() or {}).get("fastattn.quant_format_version")
    if version is not None and int(version) != FORMAT_VERSION:
        raise RuntimeError(f"fastattn.load_quantized: {path} uses quantized format version "
                           f"{version}; this fastattn reads version {FORMAT_VERSION}")
    load_model(model, os.fspath(path), strict=strict, device=str(device))
    return model
