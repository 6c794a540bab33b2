"""fastattn.nn.MultiheadAttention: torch.nn.MultiheadAttention with attention on fastattn.sdpa.

The argument checks, mask conventions and mask merging mirror
torch.nn.functional.multi_head_attention_forward (torch 2.14) step by step; the difference is
where attention runs (fastattn.sdpa for need_weights=False, fastattn.softmax for the weights)
and what a fully masked query row gives (zeros, never NaN).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.sdpa import sdpa
from ..ops.softmax import softmax


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention: the same constructor arguments, parameters
    (`in_proj_weight`, or `q_proj_weight`/`k_proj_weight`/`v_proj_weight` when kdim/vdim differ
    from embed_dim; `in_proj_bias`, `bias_k`, `bias_v`, `out_proj`) and state_dict keys (a torch
    state_dict loads unchanged, and vice versa), the same forward arguments, return values,
    mask conventions and errors.

    forward(query, key, value, ...) -> (attn_output, attn_weights or None); see `forward`.

    - need_weights=False is the fast path: attention runs in fastattn.sdpa (fused, no (L, S)
      buffer). need_weights=True (torch's default) is slower: it materializes the (N, H, L, S)
      probabilities (q k^T, then fastattn.softmax with the mask, dropout, then @ v) to return
      them. Pass need_weights=False whenever the weights are not needed.
    - A query row whose every key is masked gives attention output 0 (attn_output = the
      out_proj bias there), attention weights 0 and zero gradients, on both paths. torch gives
      the same zeros in training mode with need_weights=False; its need_weights=True path and
      its eval fast path give NaN there.
    - is_causal is, as in torch, a hint that attn_mask is the causal mask: it still needs
      attn_mask (RuntimeError without it); with need_weights=False and no key_padding_mask the
      attn_mask is then ignored and fastattn.sdpa runs with is_causal=True (top-left aligned,
      so with add_bias_kv / add_zero_attn the appended keys are not visible, exactly as torch);
      otherwise attn_mask is used and the hint is ignored.
    - Dropout (`dropout`) applies in training mode only: on the fast path as fastattn.sdpa's
      dropout_p (Philox mask seeded from torch's default generator), on the weights path as
      F.dropout of the weights (the returned weights are the dropped ones, as torch's).
    - `backend` (keyword-only) forces a fastattn backend for sdpa and softmax (default: chosen
      per call, see fastattn.backends).
    - Not supported: nested tensors (torch takes them only on its eval fast path).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *,
                   backend: str | None = None) -> MultiheadAttention:
        """A fastattn MultiheadAttention with `module`'s configuration that shares its
        parameters (the same Parameter objects, so optimizers and tied weights keep working)
        and its training mode."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttention.from_torch: module must be a "
                            f"torch.nn.MultiheadAttention, got {type(module).__name__}")
        bias = module.in_proj_bias is not None or module.out_proj.bias is not None
        new = cls(module.embed_dim, module.num_heads, module.dropout, bias=bias,
                  add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn,
                  kdim=module.kdim, vdim=module.vdim, batch_first=module.batch_first,
                  device="meta", backend=backend)  # "meta": allocates nothing, all replaced below
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias"):
            setattr(new, name, getattr(module, name))
        new.bias_k, new.bias_v = module.bias_k, module.bias_v
        new.out_proj.weight, new.out_proj.bias = module.out_proj.weight, module.out_proj.bias
        new.train(module.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head attention of query over key/value, as torch.nn.MultiheadAttention.

        Shapes (N batch, L target length, S source length, E = embed_dim, H = num_heads):
          query: (L, E) unbatched, (L, N, E), or (N, L, E) when batch_first.
          key: (S, kdim) / (S, N, kdim) / (N, S, kdim); value: the same with vdim.
          key_padding_mask: (S) unbatched or (N, S); bool (True = ignore that key) or float
            (added to the scores).
          attn_mask: (L, S) or (N * H, L, S) ((H, L, S) unbatched); bool (True = NOT allowed
            to attend: the opposite of scaled_dot_product_attention's bool mask) or float
            (added). With both masks, they are added (bool ones as -inf), as torch does.
          need_weights: also return the attention weights (slower path, see the class doc).
          average_attn_weights: average the returned weights over heads.
          is_causal: hint that attn_mask is causal (see the class doc); needs attn_mask.

        Returns:
          attn_output: (L, E) / (L, N, E) / (N, L, E), query's dtype.
          attn_weights: None unless need_weights; (N, L, S) averaged or (N, H, L, S) per head,
            without N when unbatched. S counts the bias_k / zero keys when add_bias_kv /
            add_zero_attn. After dropout in training mode (as torch returns them).
        """
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError("fastattn.nn.MultiheadAttention does not take nested tensors")
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if key_padding_mask is not None and attn_mask is not None \
                and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=2)
        H, E = self.num_heads, self.embed_dim
        is_batched = _shape_check(query, key, value, key_padding_mask, attn_mask, H)
        self_attn, kv_same = query is key and key is value, key is value
        if not is_batched:  # as torch: a batch of one, seq-first
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        bf = self.batch_first and is_batched  # layout: (N, T, .) if bf else (T, N, .)
        N, L = (query.shape[0], query.shape[1]) if bf else (query.shape[1], query.shape[0])
        S = key.shape[1] if bf else key.shape[0]

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None  # torch trusts the hint and runs SDPA with is_causal=True
        self._check_shapes(query, key, value, key_padding_mask, attn_mask, N, L, S, bf)

        q, k, v = self._in_projection(query, key, value, self_attn, kv_same)  # (.., E) each
        q, k, v = (_split_heads(t, H, bf) for t in (q, k, v))  # (N, H, L|S, hd)
        pad = 0  # keys appended after the S given ones (always allowed)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, H, 1, -1).expand(N, -1, -1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, -1).expand(N, -1, -1, -1)], dim=2)
            pad += 1
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must be both set or both None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, k.shape[-1])], dim=2)  # (N, H, S', hd)
            v = torch.cat([v, v.new_zeros(N, H, 1, v.shape[-1])], dim=2)
            pad += 1
        mask = _merge_masks(attn_mask, key_padding_mask, N, H, pad, q.dtype)  # (N|1, H|1, L|1, S')
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1)  # (N, H, L, S')
            weights = softmax(scores, scale=q.shape[-1] ** -0.5, mask=mask, backend=self.backend)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v  # (N, H, L, hd)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, S')
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            if mask is not None:  # a free stride-0 expand: fastattn.sdpa's canonical view
                mask = mask.expand(N, H, L, k.shape[2])  # does not broadcast a size-1 L dim
            out = sdpa(q, k, v, mask, dropout_p, is_causal=causal, backend=self.backend)
        out = out.transpose(1, 2) if bf else out.permute(2, 0, 1, 3)  # (N, L, H, hd)|(L, N, ..)
        out = F.linear(out.reshape(*out.shape[:2], E), self.out_proj.weight, self.out_proj.bias)
        return (out if is_batched else out.squeeze(1)), weights

    # ---- helpers ---------------------------------------------------------------------------

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask, N, L, S,
                      bf: bool) -> None:
        """The checks (and exception types) of torch's multi_head_attention_forward, with the
        argument named and expected vs. actual shapes in each message."""
        E, H = self.embed_dim, self.num_heads
        if query.shape[-1] != E:
            raise AssertionError(f"was expecting embedding dimension of {E}, but got "
                                 f"{query.shape[-1]} (query's last dim; embed_dim={E})")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape "
                                     f"{value.shape}")
            if key.shape[-1] != E:
                raise RuntimeError(f"key and value must have embed_dim={E} features (last "
                                   f"dim), got key shape {tuple(key.shape)}")
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match "
                                     f"value's {value.shape[:2]}")
            if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
                raise AssertionError(f"expecting key with kdim={self.kdim} and value with "
                                     f"vdim={self.vdim} features (last dim), got key "
                                     f"{tuple(key.shape)} and value {tuple(value.shape)}")
        if key.shape[0 if bf else 1] != N:
            raise RuntimeError(f"key and value must have the batch size of query ({N}), got key "
                               f"shape {tuple(key.shape)} and query shape {tuple(query.shape)}")
        if attn_mask is not None:
            want = (L, S) if attn_mask.dim() == 2 else (N * H, L, S)
            if tuple(attn_mask.shape) != want:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is "
                                   f"{attn_mask.shape}, but should be {want}.")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise AssertionError(f"key_padding_mask must have shape (N, S) = {(N, S)} (batch, "
                                 f"source length), got {tuple(key_padding_mask.shape)}")

    def _in_projection(self, query, key, value, self_attn: bool, kv_same: bool):
        """q, k, v = the input projections of query (.., E), key (.., kdim), value (.., vdim),
        each (.., E) in the input's layout: one GEMM for self-attention, two when key is
        value (as torch), three with separate weights."""
        E, b = self.embed_dim, self.in_proj_bias
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight  # (3E, E)
            if self_attn:
                return F.linear(query, w, b).chunk(3, dim=-1)
            if kv_same:
                q = F.linear(query, w[:E], None if b is None else b[:E])
                k, v = F.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
                return q, k, v
            ws, bs = w.chunk(3), (None,) * 3 if b is None else b.chunk(3)
        else:
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            bs = (None,) * 3 if b is None else b.chunk(3)
        return tuple(F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))


def _check_mask_dtype(mask: torch.Tensor | None, name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported, got "
                             f"{mask.dtype}")


def _shape_check(query, key, value, key_padding_mask, attn_mask, num_heads: int) -> bool:
    """torch's _mha_shape_check: whether the inputs are batched; AssertionError on bad ranks."""
    if query.dim() not in (2, 3):
        raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received "
                             f"{query.dim()}-D query tensor")
    batched = query.dim() == 3
    which = "batched (3-D)" if batched else "unbatched (2-D)"
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise AssertionError(f"For {which} `query`, expected `key` and `value` to be "
                             f"{query.dim()}-D but found {key.dim()}-D and {value.dim()}-D "
                             f"tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise AssertionError(f"For {which} `query`, expected `key_padding_mask` to be `None` or "
                             f"{query.dim() - 1}-D but found {key_padding_mask.dim()}-D tensor "
                             f"instead")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise AssertionError(f"For {which} `query`, expected `attn_mask` to be `None`, 2-D or "
                                 f"3-D but found {attn_mask.dim()}-D tensor instead")
        want = (num_heads, query.shape[0], key.shape[0])
        if not batched and attn_mask.dim() == 3 and tuple(attn_mask.shape) != want:
            raise AssertionError(f"Expected `attn_mask` shape to be {want} but got "
                                 f"{attn_mask.shape}")
    return batched


def _split_heads(x: torch.Tensor, heads: int, batch_first: bool) -> torch.Tensor:
    """x (N, T, E) if batch_first else (T, N, E) -> a (N, H, T, E / H) view."""
    x = x.unflatten(-1, (heads, -1))  # (N, T, H, hd) | (T, N, H, hd)
    return x.permute(0, 2, 1, 3) if batch_first else x.permute(1, 2, 0, 3)


def _pad_keys(mask: torch.Tensor, n: int, value) -> torch.Tensor:
    """mask (..., S) -> (..., S + n), the new columns `value`."""
    if n == 0:
        return mask
    return torch.cat([mask, mask.new_full((*mask.shape[:-1], n), value)], dim=-1)


def _merge_masks(attn_mask, key_padding_mask, N: int, H: int, pad: int,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """torch MHA's masks as one mask for fastattn.sdpa / fastattn.softmax, broadcastable to
    (N, H, L, S + pad): bool (True = attend) when every given mask is bool, else additive
    (bool ones as -inf, the sum as torch forms it) in float32 or `dtype`. attn_mask: (L, S)
    or (N * H, L, S), True = NOT allowed; key_padding_mask: (N, S), True = ignore. The `pad`
    keys appended for bias_k / zero attention are allowed (torch pads its masks with 0)."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask[None, None] if attn_mask.dim() == 2
                     else attn_mask.unflatten(0, (N, H)))  # (1|N, 1|H, L, S)
    if key_padding_mask is not None:
        masks.append(key_padding_mask[:, None, None, :])  # (N, 1, 1, S)
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        ignore = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return _pad_keys(~ignore, pad, True)
    masks = [torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf"))
             if m.dtype == torch.bool else m for m in masks]
    merged = masks[0] if len(masks) == 1 else masks[0] + masks[1]
    if merged.dtype not in (torch.float32, dtype):
        merged = merged.to(dtype)
    return _pad_keys(merged, pad, 0.0)
