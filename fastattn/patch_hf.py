"""Hugging Face transformers side of fastattn.patch (transformers is optional: this module is
imported only by patch() on a PreTrainedModel or by an explicit fastattn.patch_hf.register()).

register() adds, under the name "fastattn":
  * transformers.AttentionInterface: `attention_forward` below (fastattn.sdpa);
  * transformers.masking_utils.AttentionMaskInterface: transformers' own sdpa_mask (a boolean
    (B, 1, L, S) mask, True = attend, or None where is_causal can stand in). Without a mask
    function under the same name HF builds no mask at all and padding is silently ignored.
After register(), `from_pretrained(..., attn_implementation="fastattn")` and
`model.set_attn_implementation("fastattn")` work; patch() calls the latter for you.

Not supported (the model is left on its own implementation and the report says why):
attention logit softcapping (Gemma 2 style `attn_logit_softcapping`), attention sinks
(`s_aux`), output_attentions=True (as HF's sdpa: warned, weights returned as None).
"""

from __future__ import annotations

import torch
from torch import nn

from .ops.rms_norm import rms_norm
from .ops.sdpa import sdpa
from .patch import HF_STATE, ORIGINAL, PatchReport, adopt, qualified

NAME = "fastattn"
_registered = False


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention function (the contract of transformers' sdpa_attention_forward, 5.x):
    query (B, Hq, L, E), key/value (B, Hkv, S, E) un-expanded for GQA, attention_mask None, bool
    (True = attend) or additive float, broadcastable to (B, Hq, L, S); position_bias (T5) an
    additive (1|B, Hq, L, S) float bias (gradients flow to it). Returns ((B, L, Hq, Ev)
    contiguous, None)."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("fastattn attention: softcap (attention logit softcapping) is "
                                  "not supported; use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("fastattn attention: attention sinks (s_aux) are not "
                                  "supported; use attn_implementation='eager'")
    if kwargs.get("output_attentions", False):
        from transformers.utils import logging

        logging.get_logger(__name__).warning_once(
            "fastattn attention does not return attention weights (output_attentions=True); "
            "use attn_implementation='eager' for them.")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:  # top-left causal: the later keys are never seen
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if attention_mask is not None and attention_mask.dtype != torch.bool \
            and attention_mask.dtype not in (torch.float32, query.dtype):
        attention_mask = attention_mask.to(query.dtype)
    out = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
               is_causal=is_causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _position_bias_mask(bias, mask, is_causal, query, key):
    """transformers' create_position_bias_mask (the same values): bias where attending,
    finfo.min where not (bool mask or causal), or bias + mask for an additive mask."""
    lowest = torch.finfo(key.dtype).min
    if mask is None:
        if not is_causal:
            return bias
        L, S = query.shape[2], key.shape[2]
        keep = torch.ones(L, S, dtype=torch.bool, device=key.device).tril()
        return torch.where(keep.view(1, 1, L, S), bias, lowest)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, lowest)
    return bias + mask


def register() -> None:
    """Register "fastattn" with transformers' AttentionInterface and AttentionMaskInterface
    (idempotent). Raises ImportError without transformers."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


# ---- attention ----------------------------------------------------------------------------

_SOFTCAP_KEYS = ("attn_logit_softcapping",)


def _configs(model) -> list:
    """Every config whose _attn_implementation set_attn_implementation may change."""
    from transformers import PreTrainedModel

    seen, out = set(), []

    def add(c):
        if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation_internal"):
            seen.add(id(c))
            out.append(c)
            for key in getattr(c, "sub_configs", {}) or {}:
                add(getattr(c, key, None))

    add(model.config)
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            add(m.config)
    return out


def _unsupported(model) -> str | None:
    for c in _configs(model):
        for key in _SOFTCAP_KEYS:
            if getattr(c, key, None) is not None:
                return f"config.{key}={getattr(c, key)}: softcapping is not supported by fastattn"
    for name, m in model.named_modules():
        if isinstance(getattr(m, "sinks", None), nn.Parameter):
            return f"{name}.sinks: attention sinks are not supported by fastattn"
    if not model._can_set_attn_implementation():
        return "the model's attention does not go through transformers' AttentionInterface"
    return None


def patch_attention(model, report: PatchReport, attention: bool) -> None:
    """Switch the model (and its sub-models) to attn_implementation "fastattn", remembering
    each config's implementation for unpatch."""
    if not attention:
        return
    reason = _unsupported(model)
    if reason is not None:
        report.left.append(("", qualified(type(model)), f"attention: {reason}"))
        return
    register()
    configs = _configs(model)
    before = model.config._attn_implementation
    state = getattr(model, HF_STATE, None) or [(c, c._attn_implementation_internal)
                                               for c in configs]
    model.set_attn_implementation(NAME)
    from transformers import PreTrainedModel

    for c in configs:  # set_attn_implementation marks sub-configs it visited
        if "_attn_was_changed" in c.__dict__:
            del c.__dict__["_attn_was_changed"]
    # set_attn_implementation skips sub-models whose config has the model's config class but is
    # another object (T5's encoder/decoder stacks): set those directly.
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and m.config._attn_implementation != NAME:
            if m._can_set_attn_implementation():
                m.config._attn_implementation_internal = NAME
            else:
                report.left.append((name, qualified(type(m)), ("attention: its attention does "
                                    "not go through transformers' AttentionInterface")))
    model.__dict__[HF_STATE] = state
    for name, m in model.named_modules():
        if type(m).__name__.endswith("Attention") and hasattr(m, "config"):
            new = f"{type(m).__name__} with attn_implementation {NAME!r} (was {before!r})"
            report.swapped.append((name, qualified(type(m)), new))


# ---- norms --------------------------------------------------------------------------------

class HFRMSNorm(nn.Module):
    """The HF RMSNorm families on fastattn.rms_norm, holding the original's `weight` Parameter
    and `variance_epsilon` (state_dict keys unchanged). style "llama": LlamaRMSNorm and the
    classes with its forward (weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype));
    "t5": T5LayerNorm (the same math, the cast to the weight's dtype only for half weights).
    When x and weight dtypes differ (the HF result then has a promoted dtype) the original
    module's own forward runs."""

    def __init__(self, original: nn.Module, style: str) -> None:
        super().__init__()
        self.weight = original.weight
        self.variance_epsilon = original.variance_epsilon
        self.style = style

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if hidden_states.dtype != w.dtype:  # the original math (its forward, not its hooks)
            orig = getattr(self, ORIGINAL)
            return type(orig).forward(orig, hidden_states)
        return rms_norm(hidden_states, (w.shape[-1],), w, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, style={self.style}"


_STYLE_CACHE: dict[type, str | None] = {}


def _code_key(fn):
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    consts = tuple(c for c in code.co_consts if not isinstance(c, str))
    return code.co_code, code.co_names, consts


def _style(cls: type) -> str | None:
    if cls not in _STYLE_CACHE:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        key = _code_key(cls.__dict__.get("forward"))
        style = None
        if key is not None:
            if key == _code_key(LlamaRMSNorm.forward):
                style = "llama"
            elif key == _code_key(T5LayerNorm.forward):
                style = "t5"
        _STYLE_CACHE[cls] = style
    return _STYLE_CACHE[cls]


def swap_norm(m: nn.Module):
    """patch_torch.walk's `extra` for HF models: (replacement, None) for an HF RMSNorm of a
    known style, (None, reason) for another HF class named like a norm, else (None, None)."""
    cls = type(m)
    if not cls.__module__.startswith("transformers.") or "Norm" not in cls.__name__:
        return None, None
    if not isinstance(getattr(m, "weight", None), nn.Parameter) \
            or not isinstance(getattr(m, "variance_epsilon", None), float) \
            or m.weight.dim() != 1 or list(m._parameters) != ["weight"] or m._modules:
        return None, ("not the Llama/T5 RMSNorm structure (weight + variance_epsilon); "
                      "not swapped")
    style = _style(cls)
    if style is None:
        return None, ("forward differs from LlamaRMSNorm's and T5LayerNorm's (e.g. (1 + weight) "
                      "scaling or an offset); not swapped")
    if m.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None, f"weight dtype {m.weight.dtype}: fastattn's kernels take fp32/fp16/bf16"
    return adopt(HFRMSNorm(m, style), m), None
