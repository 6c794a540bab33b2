"""fastattn.patch(model) / fastattn.unpatch(model): swap fastattn into a model you already have.

    model, report = fastattn.patch(model)   # same weights, same outputs, fastattn kernels
    print(report)                           # what was swapped, what was left and why
    model = fastattn.unpatch(model)         # the original modules again (exactly)

What is swapped (per instance, never a class and never at import time):
  torch.nn (fastattn/patch_torch.py)
    nn.MultiheadAttention      -> fastattn.nn.MultiheadAttention (same Parameters)
    nn.LayerNorm / nn.RMSNorm  -> fastattn.nn.LayerNorm / RMSNorm (same Parameters)
    nn.TransformerEncoderLayer -> a subclass whose forward always runs the module path (torch's
                                  eval "fast path" calls torch._transformer_encoder_layer_fwd and
                                  never self_attn.forward, so it must be replaced at this level)
    nn.TransformerEncoder      -> a subclass that never builds nested tensors; where torch would
                                  have taken its nested-tensor path it zeroes the padded positions,
                                  exactly what torch returns there (the meaning is kept)
    nn.TransformerDecoder(Layer), nn.Transformer: no fused path of their own; their
                                  MultiheadAttention / LayerNorm children are swapped.
  Hugging Face transformers (fastattn/patch_hf.py; optional, only when transformers is imported)
    attention: model.set_attn_implementation("fastattn") after registering the "fastattn"
               attention function and its mask function; models with attention logit softcapping
               (or whose code cannot switch implementation) are left on their own.
    norms: nn.LayerNorm (BERT, GPT-2), Llama/Mistral/Qwen2-style RMSNorm (weight *
           normalized-in-float32, matched by their forward's code), T5LayerNorm-style.

Only exact classes are swapped: a subclass (which may change forward) is left and reported.
Fully masked attention rows give 0 attention output after patching (torch's MultiheadAttention
gives 0 in training and NaN on its eval fast path).

Parameters are shared, not copied (inplace=True); forward/backward hooks and training mode are
kept; state_dict keys do not change. unpatch(model) puts back the very module objects patch
replaced and the attention implementation each HF config had. Moving or casting a patched
model (.to / .half) updates the shared Parameters in place, but not buffers of the originals:
unpatch before converting if you intend to unpatch at all.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

from torch import nn

ORIGINAL = "_fastattn_original"  # attribute of a replacement module: the module it replaced
HF_STATE = "_fastattn_hf_state"  # attribute of a patched HF model: the configs' original impls

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclasses.dataclass
class PatchReport:
    """What patch() did. swapped: (qualified name, original class, new class); left:
    (qualified name, class, reason). Names are model.named_modules() names ("" = the model)."""

    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    quantize: object = None  # the report of fastattn.quantize when patch(quantize=...) ran it

    def __str__(self) -> str:
        lines = [f"fastattn.patch: {len(self.swapped)} swapped, {len(self.left)} left"]
        for name, old, new in self.swapped:
            lines.append(f"  swapped {name or '<model>'}: {old} -> {new}")
        for name, cls, reason in self.left:
            lines.append(f"  left    {name or '<model>'}: {cls} ({reason})")
        if self.quantize is not None:
            lines.append("quantize:")
            lines.extend("  " + line for line in str(self.quantize).splitlines())
        return "\n".join(lines)


def qualified(cls: type) -> str:
    """torch.nn.X for torch's modules, fastattn.nn.X for fastattn's drop-ins, else module.X."""
    mod = cls.__module__
    for short in ("torch.nn", "fastattn.nn"):
        if mod.startswith(short + "."):
            mod = short
    return f"{mod}.{cls.__qualname__}"


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Make `new` (already sharing `old`'s Parameters) stand in for `old`: the same hooks (the
    same dicts, so existing handles still remove them), training mode, and a link back to old
    for unpatch (not registered as a child: state_dict and parameters() do not see it)."""
    for attr in _HOOK_DICTS:
        if attr in old.__dict__:
            object.__setattr__(new, attr, old.__dict__[attr])
    new.train(old.training)
    object.__setattr__(new, ORIGINAL, old)
    return new


def rebind(module: nn.Module, cls: type) -> nn.Module:
    """A new instance of cls (a subclass of type(module)) with module's state: attributes,
    hooks and Parameters shared, its child and parameter dicts copied (so swapping a child of
    the new module leaves the original intact)."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        state[key] = type(state[key])(state[key])
    new.__dict__.update(state)
    object.__setattr__(new, ORIGINAL, module)
    return new


def _is_hf(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def patch(model: nn.Module, *, attention: bool = True, norms: bool = True,
          quantize: str | None = None, inplace: bool = True, **quantize_kw):
    """Swap fastattn's attention and norm implementations into `model`.

    Args:
      model: a torch.nn.Module (plain PyTorch or a Hugging Face PreTrainedModel).
      attention: swap attention (nn.MultiheadAttention, the nn.Transformer* layers, HF
        attn_implementation "fastattn").
      norms: swap LayerNorm / RMSNorm modules (torch's and the HF families').
      quantize: None, or a format for fastattn.quantize(model, quantize, **quantize_kw), run
        after the swaps; its report is PatchReport.quantize.
      inplace: patch `model` itself (its Parameters are shared with the swapped modules);
        False patches a deep copy and leaves `model` alone.
    Returns (patched model, PatchReport). Use the returned model: when `model` itself is a
    swappable module (e.g. a bare nn.TransformerEncoderLayer) the result is a new object.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastattn.patch: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = PatchReport()
    from . import patch_torch

    if _is_hf(model):
        from . import patch_hf

        patch_hf.patch_attention(model, report, attention)
        model = patch_torch.walk(model, report, attention=attention, norms=norms,
                                 extra=patch_hf.swap_norm if norms else None)
    else:
        model = patch_torch.walk(model, report, attention=attention, norms=norms)
    if quantize is not None:
        try:
            from .quant import quantize as _quantize
        except ImportError as e:
            raise NotImplementedError(f"fastattn.patch(quantize={quantize!r}): fastattn.quantize "
                                      f"is not available in this build ({e})") from e
        out = _quantize(model, quantize, **quantize_kw)
        if isinstance(out, tuple) and len(out) == 2:
            model, report.quantize = out
        else:
            report.quantize = out
    return model, report


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): put back every original module and each HF config's attention
    implementation. Returns the model (the original object when `model` itself was swapped).
    Quantization is not undone (see fastattn.quantize)."""
    while getattr(model, ORIGINAL, None) is not None:
        model = getattr(model, ORIGINAL)
    changed = True
    while changed:  # a restored original can hold patched modules in a shared container
        changed = False
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                orig = getattr(child, ORIGINAL, None) if child is not None else None
                if orig is not None:
                    while getattr(orig, ORIGINAL, None) is not None:
                        orig = getattr(orig, ORIGINAL)
                    parent._modules[name] = orig
                    changed = True
    state = model.__dict__.pop(HF_STATE, None)
    if state is not None:
        for config, impl in state:
            config._attn_implementation_internal = impl
    return model


__all__ = ["PatchReport", "patch", "unpatch"]
