"""fastattn.sdpa: fused scaled dot-product attention with the signature and semantics of
torch.nn.functional.scaled_dot_product_attention (torch 2.14), forward and backward kernels
on every backend, no (L, S) buffer in memory.

Operators (schemas and the exact contract in kernels/registration.cpp):
  fastattn::sdpa(q, k, v, mask, scale, is_causal, dropout_p, seed, offset) -> (out, lse)
  fastattn::sdpa_backward(...) -> (grad_q, grad_k, grad_v, grad_mask)     CPU and CUDA (C++)
  fastattn::sdpa_triton / sdpa_backward_triton                            Triton
The operators take canonical 4-d views q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev)
and a (B, Hq, L, S) mask view; `sdpa()` below validates torch's argument forms, broadcasts
the leading dims into those views (expand: no copies for broadcast dims), picks a backend and
maps the result back.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _library, backends, reference

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)  # E == Ev; others run on Triton
TRITON_MAX_HEAD_DIM = 256


# ---- operator registrations: fake (meta) kernels and autograd ---------------------------------

def _fake_sdpa(q, k, v, mask, scale, is_causal, dropout_p, seed, offset, *extras):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "fastattn.sdpa: the operator takes 4-d query, key and value")
    torch._check(q.dtype in backends.KERNEL_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype,
                 lambda: f"fastattn.sdpa: query, key and value must share one of float32, "
                         f"float16, bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(k.shape[3] == q.shape[3],
                 lambda: f"fastattn.sdpa: key's last dim {k.shape[3]} must equal query's "
                         f"{q.shape[3]}")
    Bt, Hq, Lt, _ = q.shape
    return (q.new_empty((Bt, Hq, Lt, v.shape[3])),  # out (Bt, Hq, Lt, Ev)
            q.new_empty((Bt, Hq, Lt), dtype=torch.float32))  # lse (Bt, Hq, Lt)


def _fake_sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed,
                        offset, want_grad_mask, *extras):
    torch._check(grad_out.shape == out.shape,
                 lambda: f"fastattn.sdpa_backward: grad_out shape {tuple(grad_out.shape)} must "
                         f"match out shape {tuple(out.shape)}")
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    grad_mask = q.new_empty((B, Hq, L, S) if want_grad_mask else (0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_mask


# The schema's trailing score-modifier / varlen arguments (kernels/registration.cpp), in order;
# tensors among them: cu_seqlens_q, cu_seqlens_k, alibi_slopes.
EXTRA_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "window_left",
              "window_right", "bottom_right", "alibi_slopes", "softcap")
_EXTRA_TENSORS = (0, 1, 7)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, dropout_p, seed, offset = inputs[:9]
    extras = list(inputs[9:])
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (scale, is_causal, dropout_p, seed, offset)
    ctx.extras = [None if i in _EXTRA_TENSORS else x for i, x in enumerate(extras)]
    ctx.save_for_backward(q, k, v, out, lse, mask,
                          *[extras[i] if i < len(extras) else None for i in _EXTRA_TENSORS])


def _autograd_for(backward_op):
    """Autograd of sdpa / sdpa_triton through the matching backward operator, which recomputes
    the probabilities from the saved log-sum-exp. The mask gradient is dz (float32, in the
    canonical (B, Hq, L, S) shape; the expand that made that view sums it back)."""

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, mask, *extra_tensors = ctx.saved_tensors
        extras = list(ctx.extras)
        for i, t in zip(_EXTRA_TENSORS, extra_tensors):
            if i < len(extras):
                extras[i] = t
        want_mask = bool(ctx.needs_input_grad[3])
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        gq, gk, gv, gm = backward_op(grad_out.contiguous(), q, k, v, out, lse, mask, *ctx.args,
                                     want_mask, *extras)
        return (gq, gk, gv, (gm.to(mask.dtype) if want_mask else None),
                *([None] * (5 + len(extras))))

    return backward


for _key in ("CPU", "CUDA"):
    _library.has_kernel("sdpa", _key)
    _library.has_kernel("sdpa_backward", _key)
if _library.has_kernel("sdpa", "CPU") or _library.has_kernel("sdpa", "CUDA"):
    torch.library.register_fake("fastattn::sdpa")(_fake_sdpa)
    torch.library.register_fake("fastattn::sdpa_backward")(_fake_sdpa_backward)
    torch.library.register_autograd(
        "fastattn::sdpa", _autograd_for(torch.ops.fastattn.sdpa_backward.default),
        setup_context=_setup_context)

_triton_op = None


def _triton_sdpa():
    """fastattn::sdpa_triton, imported (and Triton with it) on first use."""
    global _triton_op
    if _triton_op is None:
        from .._triton import attention as kernels

        torch.library.register_autograd(
            "fastattn::sdpa_triton", _autograd_for(kernels.sdpa_backward_triton),
            setup_context=_setup_context)
        _triton_op = kernels.sdpa_triton
    return _triton_op


# ---- argument checks ----------------------------------------------------------------------------

def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastattn.sdpa: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"fastattn.sdpa: {name} must be a floating tensor, got {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"fastattn.sdpa: {name} must have at least 2 dims (..., length, "
                         f"head dim), got shape {tuple(t.shape)}")


def _broadcast(shapes: list[tuple[int, ...]], what: str) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise ValueError(f"fastattn.sdpa: the batch dims of {what} do not broadcast: "
                         f"{', '.join(str(s) for s in shapes)}") from None


def _validate(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Checks torch's argument forms (cheapest first). Returns (lead, gqa, scale): lead = the
    broadcast leading dims of the output, ending with the query heads (empty for 2-d inputs)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check_tensor(name, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"fastattn.sdpa: query, key and value must have the same dtype, got "
                        f"{q.dtype}, {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"fastattn.sdpa: query, key and value must be on one device, got "
                         f"{q.device}, {k.device} and {v.device}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"fastattn.sdpa: key's head dim (last) must equal query's: key "
                         f"{tuple(k.shape)}, query {tuple(q.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"fastattn.sdpa: key and value must have the same length (dim -2): key "
                         f"{tuple(k.shape)}, value {tuple(v.shape)}")
    gqa = bool(enable_gqa) and q.dim() >= 3 and k.dim() >= 3 and v.dim() >= 3 \
        and k.shape[-3] != q.shape[-3]
    if gqa:
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        if hk != hv or hk == 0 or hq % hk:
            raise ValueError(f"fastattn.sdpa: with enable_gqa, key and value heads (dim -3) must "
                             f"be equal and divide the query heads; got query {hq}, key {hk}, "
                             f"value {hv}")
        lead = _broadcast([q.shape[:-3], k.shape[:-3], v.shape[:-3]],
                          "query, key and value") + (hq,)
    else:
        if q.dim() >= 3 and k.dim() >= 3 and 1 not in (q.shape[-3], k.shape[-3]) \
                and k.shape[-3] != q.shape[-3]:
            raise ValueError(f"fastattn.sdpa: query has {q.shape[-3]} heads (dim -3) and key "
                             f"{k.shape[-3]}; pass enable_gqa=True for grouped-query attention")
        lead = _broadcast([q.shape[:-2], k.shape[:-2], v.shape[:-2]], "query, key and value")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) \
            or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"fastattn.sdpa: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"fastattn.sdpa: scale must be a finite number or None, got {scale!r}")
    if attn_mask is not None:
        if is_causal:
            raise ValueError("fastattn.sdpa: pass either attn_mask or is_causal=True, not both "
                             "(as torch's scaled_dot_product_attention)")
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"fastattn.sdpa: attn_mask must be a torch.Tensor or None, got "
                            f"{type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"fastattn.sdpa: attn_mask must be bool (True = attend) or a float "
                            f"mask of dtype float32 or query's dtype {q.dtype}, got "
                            f"{attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"fastattn.sdpa: attn_mask is on {attn_mask.device} but query is on "
                             f"{q.device}")
        scores = lead + (q.shape[-2], k.shape[-2])
        ms = tuple(attn_mask.shape)
        if len(ms) > len(scores) or any(m not in (1, s) for m, s in
                                        zip(ms[::-1], scores[::-1])):
            raise ValueError(f"fastattn.sdpa: attn_mask with shape {ms} is not broadcastable to "
                             f"the attention scores' shape {scores} (..., L, S)")
    return lead, gqa, float(scale)


# ---- canonical views ------------------------------------------------------------------------

def _dense_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _as4d(t: torch.Tensor, lead: tuple[int, ...], heads: int, n: int, d: int) -> torch.Tensor:
    """t (broadcastable to lead[:-1] + (heads, n, d)) expanded to that shape and viewed as
    (B, heads, n, d)."""
    batch = lead[:-1]
    t = t.expand(*batch, heads, n, d)
    return _dense_last(t.reshape(math.prod(batch), heads, n, d))


def _canonical(q, k, v, mask, lead, gqa):
    """(q4, k4, v4, mask4): q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask
    (B, Hq, L, S) or None, views of the inputs wherever strides allow."""
    lead = lead if lead else (1,)
    hq = lead[-1]
    hkv = k.shape[-3] if gqa else hq
    L, E = q.shape[-2:]
    S, Ev = v.shape[-2:]
    q4 = _as4d(q, lead, hq, L, E)
    k4 = _as4d(k, lead, hkv, S, E)
    v4 = _as4d(v, lead, hkv, S, Ev)
    m4 = None
    if mask is not None:
        if mask.dim() >= 1 and mask.shape[-1] == 1 and S > 1:
            # materialize only the key dim (the kernels read a mask row contiguously)
            mask = mask.expand(*mask.shape[:-1], S).contiguous()
        m4 = _as4d(mask, lead, hq, L, S)
    return q4, k4, v4, m4


# ---- backend choice -------------------------------------------------------------------------

def _unsupported(name: str, q: torch.Tensor, E: int, Ev: int, dropout_p: float) -> str | None:
    reason = backends.device_error(name, "sdpa", q.device, q.dtype)
    if reason is not None or name == "reference":
        return reason
    if dropout_p >= 1.0:
        return "dropout_p = 1 drops everything (the reference backend returns the zeros)"
    if name == "cuda":
        if q.dtype not in CUDA_DTYPES:
            return "the CUDA kernels take float16 or bfloat16 (float32 runs on Triton)"
        if E != Ev or E not in CUDA_HEAD_DIMS:
            return (f"the CUDA kernels take head dims E == Ev in {CUDA_HEAD_DIMS}, got E={E}, "
                    f"Ev={Ev}")
    if name == "triton" and max(E, Ev) > TRITON_MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got E={E}, Ev={Ev}"
    return None


def _choose(q, k, v, dropout_p, backend):
    E, Ev = q.shape[-1], v.shape[-1]
    return backends.choose("sdpa", backend, q.device,
                           lambda name: _unsupported(name, q, E, Ev, dropout_p),
                           (q.dtype, E, Ev, dropout_p >= 1.0))


def _autocast(q, k, v):
    """Under torch.autocast, attention runs in the autocast dtype (as torch's SDPA does)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return q, k, v  # _validate says what is wrong
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if q.dtype == torch.float32 and dt in CUDA_DTYPES:
            return q.to(dt), k.to(dt), v.to(dt)
    return q, k, v


def _draw_seed() -> tuple[int, int]:
    """(seed, offset) for the dropout mask, from torch's default CPU generator (so
    torch.manual_seed makes dropout reproducible)."""
    s = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64)
    return int(s[0]), int(s[1])


# ---- the public function ------------------------------------------------------------------

def _plan(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False, *, backend=None, dropout_seed=None):
    query, key, value = _autocast(query, key, value)
    lead, gqa, scale = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                 enable_gqa)
    return _choose(query, key, value, dropout_p, backend), query, key, value, lead, gqa, scale


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
         attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
         scale: float | None = None, enable_gqa: bool = False, *, backend: str | None = None,
         dropout_seed: tuple[int, int] | None = None) -> torch.Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, fused (FlashAttention-style
    tiles with an online softmax; neither pass stores the (L, S) scores).

    Args:
      query: (..., Hq, L, E); key: (..., Hkv, S, E); value: (..., Hkv, S, Ev); float32,
        float16 or bfloat16 (float64 runs on the reference backend), any strides. Leading dims
        broadcast; Hkv == Hq unless enable_gqa.
      attn_mask: bool (True = attend) or additive (float32 or query's dtype), broadcastable to
        (..., Hq, L, S). An additive mask that requires grad gets its gradient (this
        materializes an (L, S) float32 gradient, as the mask itself is that size).
      dropout_p: probability of dropping each attention probability (always applied when > 0,
        as in torch's functional form; pass 0.0 in eval). The mask is Philox-generated from
        (seed, offset) drawn from torch's default generator (torch.manual_seed reproduces it)
        and regenerated in backward.
      is_causal: key j is masked for query i when j > i (top-left aligned when L != S, as
        torch). Not together with attn_mask.
      scale: default 1 / sqrt(E).
      enable_gqa: let Hq be a multiple of Hkv; query head h uses key/value head h // (Hq / Hkv).
      backend: "cpu", "cuda", "triton" or "reference" to force one (see fastattn.backends).
      dropout_seed: (seed, offset) to use instead of drawing them; the dropout mask is then
        fastattn.reference.dropout_keep(seed, offset, (B, Hq, L, S), dropout_p) (debugging).

    Returns:
      (..., Hq, L, Ev) in query's dtype (the autocast dtype under torch.autocast). A query row
      whose every key is masked gives zeros and zero gradients, as torch 2.14's
      scaled_dot_product_attention does.
    """
    choice, q, k, v, lead, gqa, scale = _plan(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale, enable_gqa, backend=backend)
    if choice.backend == "reference":
        keep = None
        if dropout_p > 0 and dropout_seed is not None and dropout_p < 1:
            L, S = q.shape[-2], k.shape[-2]
            keep = reference.dropout_keep(*dropout_seed, (math.prod(lead or (1,)), L, S),
                                          dropout_p, q.device).reshape(*lead, L, S)
        return reference.sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              dropout_mask=keep)
    q4, k4, v4, m4 = _canonical(q, k, v, attn_mask, lead, gqa)
    seed, offset = (0, 0) if dropout_p == 0 else (dropout_seed or _draw_seed())
    op = _triton_sdpa() if choice.backend == "triton" else torch.ops.fastattn.sdpa.default
    args = (q4, k4, v4, m4, scale, bool(is_causal), float(dropout_p), int(seed), int(offset))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or
                                    (m4 is not None and m4.requires_grad)):
        out, _ = op(*args)
    else:
        out, _ = _library.call_without_autograd(op, *args)
    return out.reshape(*lead, q.shape[-2], v.shape[-1]) if lead else out[0, 0]


backends.register_planner("sdpa", lambda *a, **k: _plan(*a, **k)[0])
