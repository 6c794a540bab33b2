"""torch.nn side of fastattn.patch: the module walk, and the swaps for nn.MultiheadAttention,
nn.LayerNorm, nn.RMSNorm, nn.TransformerEncoderLayer and nn.TransformerEncoder (see
fastattn/patch.py for the rules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nn.layer_norm import LayerNorm
from .nn.multihead_attention import MultiheadAttention
from .nn.rms_norm import RMSNorm
from .patch import ORIGINAL, PatchReport, adopt, qualified, rebind

_FASTATTN_TYPES: tuple[type, ...] = (LayerNorm, RMSNorm, MultiheadAttention)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer whose forward always runs torch's module path (norm1/norm2,
    self_attn with need_weights=False, the feed-forward block), in every mode, so that
    patched self_attn / norms run. Made by fastattn.patch (never constructed directly): it holds
    the original layer's Parameters and submodules (self_attn and norms possibly swapped).
    A nested-tensor input (only torch's own nested path makes those) goes to the original layer."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if src.is_nested:
            return nn.TransformerEncoderLayer.forward(getattr(self, ORIGINAL), src, src_mask,
                                                      src_key_padding_mask, is_causal)
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask), other_name="src_mask", target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None,
                                     other_name="", target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask,
                                   is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask,
                                              is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


def _torch_would_nest(enc: nn.TransformerEncoder, src, mask, kpm) -> bool:
    """Whether torch's TransformerEncoder.forward (2.6 .. 2.14) would convert src to a nested
    tensor here (its checks, in its order); kpm and mask already canonical."""
    first = enc.layers[0]
    if not torch.backends.mha.get_fastpath_enabled() or not getattr(enc, "use_nested_tensor",
                                                                     False):
        return False
    if first.training or src.dim() != 3 or kpm is None or src.is_nested or mask is not None:
        return False
    if getattr(enc, "mask_check", True):
        if torch.compiler.is_compiling():
            return False
        if not torch._nested_tensor_from_mask_left_aligned(src, kpm.logical_not()):
            return False
    if torch.is_autocast_enabled():
        return False
    sa = first.self_attn
    args = (src, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
            first.norm1.weight, first.norm1.bias, first.norm2.weight, first.norm2.bias,
            first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias)
    if torch.overrides.has_torch_function(args):
        return False
    if src.device.type not in ("cpu", "cuda", "xpu",
                               torch.utils.backend_registration._privateuse1_backend_name):
        return False
    return not (torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args))


class TransformerEncoder(nn.TransformerEncoder):
    """nn.TransformerEncoder that never converts its input to a nested tensor. torch converts
    (eval, no grad, a left-aligned src_key_padding_mask and no mask, ...) and returns 0 at the
    padded positions (before the final norm); this class computes the padded tensor through
    the layers and, in exactly those cases, zeroes the padded positions too, so the outputs mean
    what torch's mean. Made by fastattn.patch."""

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None,
                is_causal: bool | None = None) -> torch.Tensor:
        if src.is_nested:
            return nn.TransformerEncoder.forward(getattr(self, ORIGINAL), src, mask,
                                                 src_key_padding_mask, is_causal)
        kpm = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                other_type=F._none_or_dtype(mask), other_name="mask",
                                target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        nest = _torch_would_nest(self, src, mask, kpm)
        batch_first = self.layers[0].self_attn.batch_first
        from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, batch_first))
        out = src
        for mod in self.layers:
            out = mod(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=kpm)
        if nest:  # torch: output.to_padded_tensor(0.0, src.size())
            pad = kpm != 0 if kpm.dtype != torch.bool else kpm  # canonical: -inf = padded
            pad = pad if batch_first else pad.transpose(0, 1)
            out = out.masked_fill(pad.unsqueeze(-1), 0.0)
        if self.norm is not None:
            out = self.norm(out)
        return out


def _norm_reason(m: nn.Module) -> str | None:
    w = getattr(m, "weight", None)
    if w is not None and w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"weight dtype {w.dtype}: fastattn's norm kernels take float32/float16/bfloat16"
    return None


def swap(m: nn.Module, *, attention: bool, norms: bool) -> tuple[nn.Module | None, str | None]:
    """(replacement, None), (None, reason to report it as left), or (None, None): not ours."""
    t = type(m)
    if attention and t is nn.MultiheadAttention:
        return adopt(MultiheadAttention.from_torch(m), m), None
    if norms and t is nn.LayerNorm:
        reason = _norm_reason(m)
        return (None, reason) if reason else (adopt(LayerNorm.from_torch(m), m), None)
    if norms and t is nn.RMSNorm:
        reason = _norm_reason(m)
        return (None, reason) if reason else (adopt(RMSNorm.from_torch(m), m), None)
    if attention and t is nn.TransformerEncoderLayer:
        return rebind(m, TransformerEncoderLayer), None
    if attention and t is nn.TransformerEncoder:
        new = rebind(m, TransformerEncoder)
        new.layers = nn.ModuleList(list(m.layers))  # swaps in it leave m.layers intact
        return new, None
    if isinstance(m, _FASTATTN_TYPES) or getattr(m, ORIGINAL, None) is not None:
        return None, None  # already fastattn
    base = next((b for b in (nn.MultiheadAttention, nn.LayerNorm, nn.RMSNorm,
                             nn.TransformerEncoderLayer, nn.TransformerEncoder)
                 if isinstance(m, b)), None)
    if base is not None and ((attention and base in (nn.MultiheadAttention,
                                                     nn.TransformerEncoderLayer,
                                                     nn.TransformerEncoder))
                             or (norms and base in (nn.LayerNorm, nn.RMSNorm))):
        return None, (f"a subclass of {qualified(base)} (its own code may rely on the original "
                      f"forward); only exact classes are swapped")
    return None, None


def walk(model: nn.Module, report: PatchReport, *, attention: bool, norms: bool,
         extra=None) -> nn.Module:
    """Swap every supported module in model (depth first, the model itself included), recording
    each swap and each skip in report. extra(module) -> (replacement|None, reason|None) is
    tried first (the HF norms). Returns the model (a new object if the model itself was
    swapped)."""

    def decide(m):
        if extra is not None:
            new, reason = extra(m)
            if new is not None or reason is not None:
                return new, reason
        return swap(m, attention=attention, norms=norms)

    def visit(m: nn.Module, prefix: str) -> nn.Module:
        new, reason = decide(m)
        if reason is not None:
            report.left.append((prefix, qualified(type(m)), reason))
        if new is not None:
            report.swapped.append((prefix, qualified(type(m)), qualified(type(new))))
            m = new
        for name, child in list(m._modules.items()):
            if child is None:
                continue
            out = visit(child, f"{prefix}.{name}" if prefix else name)
            if out is not child:
                m._modules[name] = out
        return m

    return visit(model, "")
