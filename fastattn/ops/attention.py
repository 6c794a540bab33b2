"""fastattn.attention: FlashAttention-style entry point with packed variable-length batches
and the score modifiers of long-context and inference models (sliding window, causal with
either alignment, ALiBi, logit soft-capping), forward and backward on every backend.

It runs the same operators as fastattn.sdpa (fastattn::sdpa / sdpa_backward and their Triton
twins) through their trailing arguments (kernels/registration.cpp; exact per-sequence
semantics in kernels/include/fastattn/attention_args.h). Layouts are FlashAttention's:
(B, L, H, E) tensors, or packed (total_tokens, H, E) with cu_seqlens; the operators take the
head-major views of these, so no input is copied when its last dim is dense.
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch

from .. import _library, backends, reference
from .sdpa import _autocast, _choose, _dense_last, _draw_seed, _triton_sdpa

ALIGNS = ("bottom_right", "top_left")


def _err(msg: str) -> str:
    return f"fastattn.attention: {msg}"


def _check_tensors(q, k, v, packed: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(_err(f"{name} must be a floating torch.Tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}"))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(_err(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, "
                             f"{v.dtype}"))
    if k.device != q.device or v.device != q.device:
        raise ValueError(_err(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                              f"{v.device}"))
    want = 3 if packed else 4
    form = "packed (total, H, E) with cu_seqlens" if packed else "(B, L, H, E)"
    if q.dim() != want or k.dim() != want or v.dim() != want:
        raise ValueError(_err(f"q, k and v must be {want}-d {form}, got {tuple(q.shape)}, "
                              f"{tuple(k.shape)}, {tuple(v.shape)}"))
    if not packed and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(_err(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v "
                              f"{v.shape[0]}"))
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(_err(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in all "
                              f"but the last dim"))
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(_err(f"k's head dim {k.shape[-1]} must equal q's {q.shape[-1]}"))
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(_err(f"q's heads ({hq}) must be a multiple of k/v's heads ({hkv})"))


def _check_cu(name: str, cu, q: torch.Tensor, total: int, max_len: int | None) -> tuple:
    """cu_seqlens as int32 on q's device and its largest step. The values are checked on the
    host (one device sync on a GPU): starts at 0, non-decreasing, ends at `total`."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or \
            cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(_err(f"{name} must be a 1-d int32 tensor of B + 1 offsets, got "
                             f"{getattr(cu, 'dtype', type(cu).__name__)} "
                             f"{tuple(getattr(cu, 'shape', ()))}"))
    if cu.device != q.device:
        raise ValueError(_err(f"{name} is on {cu.device} but q is on {q.device}"))
    vals = cu.tolist()
    steps = [b - a for a, b in itertools.pairwise(vals)]
    if vals[0] != 0 or any(s < 0 for s in steps):
        raise ValueError(_err(f"{name} must start at 0 and be non-decreasing, got {vals}"))
    if vals[-1] != total:
        raise ValueError(_err(f"{name}[-1] = {vals[-1]} must equal the packed token count "
                              f"{total}"))
    longest = max(steps, default=0)
    if max_len is not None and longest > max_len:
        raise ValueError(_err(f"{name} has a sequence of {longest} tokens, more than the "
                              f"max_seqlen {max_len} given"))
    return cu.to(torch.int32).contiguous(), longest if max_len is None else int(max_len)


def _window(window, causal: bool) -> tuple[int, int]:
    if window is None:
        left, right = -1, -1
    else:
        try:
            left, right = window
        except (TypeError, ValueError):
            raise TypeError(_err(f"window must be (left, right) or None, got {window!r}")) from None
        left, right = (-1 if w is None else w for w in (left, right))
        if not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1
                   for w in (left, right)):
            raise ValueError(_err(f"window sizes must be integers >= 0 (-1 or None: unbounded), "
                                  f"got {window!r}"))
    return int(left), (0 if causal else int(right))


def _check_alibi(slopes, q, batch: int, op: str = "attention") -> torch.Tensor | None:
    """alibi_slopes as float32 (Hq,) or (B, Hq) on q's device; q (..., Hq, E)."""
    if slopes is None:
        return None
    prefix = f"fastattn.{op}: "
    hq = q.shape[-2]
    if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point() or \
            tuple(slopes.shape) not in ((hq,), (batch, hq)):
        raise ValueError(prefix + f"alibi_slopes must be a float tensor of shape (Hq,) = ({hq},) "
                         f"or (B, Hq) = ({batch}, {hq}), got "
                         f"{tuple(getattr(slopes, 'shape', ()))}")
    if slopes.device != q.device:
        raise ValueError(prefix + f"alibi_slopes is on {slopes.device} but q is on {q.device}")
    if slopes.requires_grad:
        raise ValueError(prefix + "alibi_slopes get no gradient here; pass them detached")
    return slopes.to(torch.float32).contiguous()


def _number(name: str, x, default: float, *, low: float, high: float | None = None) -> float:
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or \
            x < low or (high is not None and x > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(_err(f"{name} must be a finite number {bounds}, got {x!r}"))
    return float(x)


def _plan(q, k, v, *, causal=False, causal_align="bottom_right", window=None, alibi_slopes=None,
          softcap=None, scale=None, dropout_p=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
          max_seqlen_q=None, max_seqlen_k=None, backend=None, **_):
    """Checks every argument (cheapest first) and picks the backend. Returns (choice, args)
    with args the operator's arguments after q4, k4, v4."""
    q, k, v = _autocast(q, k, v)
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError(_err("pass both cu_seqlens_q and cu_seqlens_k (or neither)"))
    _check_tensors(q, k, v, packed)
    if causal_align not in ALIGNS:
        raise ValueError(_err(f"causal_align must be one of {ALIGNS}, got {causal_align!r}"))
    left, right = _window(window, bool(causal))
    cap = _number("softcap", softcap, 0.0, low=0.0)
    p = _number("dropout_p", dropout_p, 0.0, low=0.0, high=1.0)
    E = q.shape[-1]
    sc = _number("scale", scale, 1.0 / math.sqrt(E) if E else 1.0, low=-math.inf)
    if packed:
        cu_q, max_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q, q.shape[0], max_seqlen_q)
        cu_k, max_k = _check_cu("cu_seqlens_k", cu_seqlens_k, q, k.shape[0], max_seqlen_k)
        if cu_q.numel() != cu_k.numel():
            raise ValueError(_err(f"cu_seqlens_q has {cu_q.numel()} entries and cu_seqlens_k "
                                  f"{cu_k.numel()}; both must be B + 1"))
        batch = cu_q.numel() - 1
    else:
        cu_q = cu_k = None
        max_q, max_k = q.shape[1], k.shape[1]
        batch = q.shape[0]
    slopes = _check_alibi(alibi_slopes, q, batch)
    choice = _choose(q, k, v, p, backend)
    extras = (cu_q, cu_k, max_q, max_k, left, right, causal_align == "bottom_right", slopes, cap)
    return choice, (q, k, v, sc, p, extras)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              causal_align: str = "bottom_right", window: tuple[int, int] | None = None,
              alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
              scale: float | None = None, dropout_p: float = 0.0,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              return_lse: bool = False, backend: str | None = None,
              dropout_seed: tuple[int, int] | None = None):
    """Fused attention in FlashAttention's layout, with packed batches and score modifiers.

    Args:
      q: (B, L, Hq, E), k: (B, S, Hkv, E), v: (B, S, Hkv, Ev); or packed q (total_q, Hq, E),
        k (total_k, Hkv, E), v (total_k, Hkv, Ev) with cu_seqlens_q / cu_seqlens_k (int32
        (B + 1,) prefix sums: sequence b owns rows cu[b]:cu[b + 1]). float32, float16 or
        bfloat16 (float64 runs on the reference backend); any strides. Hkv must divide Hq
        (GQA / MQA: query head h reads kv head h // (Hq / Hkv)).
      causal: key j is hidden from query i when j > i + d, where d = S_b - L_b for
        causal_align="bottom_right" (FlashAttention's convention: the last query sees every
        key) and d = 0 for "top_left" (torch's is_causal).
      window: (left, right): query i sees keys i + d - left .. i + d + right (-1 or None:
        unbounded side); with causal, right is 0. Mistral-style sliding window: causal=True,
        window=(w - 1, 0).
      alibi_slopes: float (Hq,) or (B, Hq); adds -slope * |i + d - j| to the scores (no
        gradient).
      softcap: > 0 replaces scores s with softcap * tanh(s / softcap) (Gemma 2), before ALiBi.
      scale: default 1 / sqrt(E). dropout_p: as fastattn.sdpa (always applied when > 0).
      max_seqlen_q / max_seqlen_k: the longest packed sequences (computed when None).
        The cu_seqlens values are checked on the host (one sync on a GPU).
      return_lse: also return the natural-log log-sum-exp of each row's scores, float32
        (B, Hq, L) or (Hq, total_q) (+inf for a row with no visible key).
      backend: "cpu", "cuda", "triton" or "reference" to force one.
      dropout_seed: (seed, offset) instead of drawing them (debugging, as fastattn.sdpa).

    Returns:
      out (B, L, Hq, Ev) or (total_q, Hq, Ev) in q's dtype: a view of a head-major buffer
      (.contiguous() copies). A row with no visible key gives zeros and zero gradients.
    """
    choice, (q, k, v, sc, p, extras) = _plan(
        q, k, v, causal=causal, causal_align=causal_align, window=window,
        alibi_slopes=alibi_slopes, softcap=softcap, scale=scale, dropout_p=dropout_p,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, backend=backend)
    packed = extras[0] is not None
    if choice.backend == "reference":
        return _reference(q, k, v, sc, p, extras, causal_align, window, causal, softcap,
                          return_lse, dropout_seed)
    if packed:  # (T, H, E) -> (1, H, T, E)
        q4, k4, v4 = (_dense_last(t.transpose(0, 1)[None]) for t in (q, k, v))
    else:  # (B, L, H, E) -> (B, H, L, E)
        q4, k4, v4 = (_dense_last(t.transpose(1, 2)) for t in (q, k, v))
    seed, offset = (0, 0) if p == 0 else (dropout_seed or _draw_seed())
    op = _triton_sdpa() if choice.backend == "triton" else torch.ops.fastattn.sdpa.default
    args = (q4, k4, v4, None, sc, False, p, int(seed), int(offset), *extras)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out4, lse = op(*args)
    else:
        out4, lse = _library.call_without_autograd(op, *args)
    out = out4[0].transpose(0, 1) if packed else out4.transpose(1, 2)
    if not return_lse:
        return out
    return out, (lse[0] if packed else lse)


def _reference(q, k, v, sc, p, extras, causal_align, window, causal, softcap, return_lse,
               dropout_seed):
    """The reference backend (any dtype, autograd through plain PyTorch)."""
    cu_q, cu_k, _, _, left, right, _, slopes, cap = extras
    keep = None
    if 0 < p < 1:
        seed, offset = dropout_seed or _draw_seed()
        if cu_q is None:
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        else:
            shape = (1, q.shape[1], q.shape[0], k.shape[0])
        keep = reference.dropout_keep(seed, offset, shape, p, q.device)
    out = reference.attention(q, k, v, causal=causal, causal_align=causal_align,
                              window=(left, right), alibi_slopes=slopes, softcap=cap or None,
                              scale=sc, dropout_p=p, dropout_mask=keep, cu_seqlens_q=cu_q,
                              cu_seqlens_k=cu_k)
    if return_lse:
        raise ValueError(_err("return_lse is not available on the reference backend"))
    return out


backends.register_planner("attention", lambda *a, **kw: _plan(*a, **kw)[0])
