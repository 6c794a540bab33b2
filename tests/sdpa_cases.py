"""Attention test cases and the comparison shared by test_sdpa.py and test_sdpa_api.py:
fastattn.sdpa vs the float64 reference, within 2x of PyTorch's own error in the same dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastattn
from tolerances import assert_within_torch_error

MASKS = ("none", "causal", "bool", "float", "float-grad")


@dataclass(frozen=True)
class Case:
    """One attention call: query (*batch, Hq, L, E), key (*batch, Hkv, S, E), value
    (*batch, Hkv, S, Ev). mask: one of MASKS; mask_shape: the mask's own (broadcastable) shape
    (None: the full score shape). layout "bhle" = contiguous; "blhe" = (B, L, H, E) tensors
    transposed to (B, H, L, E) views (non-contiguous, as a model's projections give)."""
    batch: tuple[int, ...] = (2,)
    Hq: int = 3
    Hkv: int = 3
    L: int = 17
    S: int = 23
    E: int = 16
    Ev: int = 16
    mask: str = "none"
    mask_shape: tuple[int, ...] | None = None
    layout: str = "bhle"
    scale: float | None = None
    masked_rows: bool = False  # make some query rows fully masked

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hkv

    @property
    def id(self) -> str:
        b = "x".join(map(str, self.batch)) or "-"
        s = f"b{b}-h{self.Hq}" + (f"/{self.Hkv}" if self.gqa else "")
        s += f"-L{self.L}-S{self.S}-E{self.E}" + (f"-Ev{self.Ev}" if self.Ev != self.E else "")
        s += f"-{self.mask}"
        if self.mask_shape is not None:
            s += "(" + ",".join(map(str, self.mask_shape)) + ")"
        if self.layout != "bhle":
            s += f"-{self.layout}"
        if self.scale is not None:
            s += f"-scale{self.scale}"
        return s + ("-masked-rows" if self.masked_rows else "")


def _tensor(case: Case, heads: int, n: int, d: int, dtype, device) -> torch.Tensor:
    if case.layout == "blhe":
        t = torch.randn(*case.batch, n, heads, d, device=device).to(dtype)
        return t.transpose(-2, -3)  # (*batch, heads, n, d), non-contiguous
    return torch.randn(*case.batch, heads, n, d, device=device).to(dtype)


def make_inputs(case: Case, dtype: torch.dtype, device, requires_grad: bool = False):
    """(q, k, v, mask) for a case; leaves require grad when asked (a float-grad mask too)."""
    q = _tensor(case, case.Hq, case.L, case.E, dtype, device)
    k = _tensor(case, case.Hkv, case.S, case.E, dtype, device)
    v = _tensor(case, case.Hkv, case.S, case.Ev, dtype, device)
    mask = None
    if case.mask in ("bool", "float", "float-grad"):
        shape = case.mask_shape or (*case.batch, case.Hq, case.L, case.S)
        keep = torch.rand(shape, device=device) < 0.75
        if case.masked_rows and len(shape) >= 2 and shape[-2] > 1:
            keep[..., ::3, :] = False  # every third query row (of the mask) fully masked
        if case.mask == "bool":
            mask = keep
        else:
            mask = torch.randn(shape, device=device).masked_fill(~keep, float("-inf")).to(dtype)
    leaves = [q, k, v] + ([mask] if case.mask == "float-grad" else [])
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return q, k, v, mask


def _kwargs(case: Case, mask) -> dict:
    return dict(attn_mask=mask, is_causal=case.mask == "causal", scale=case.scale,
                enable_gqa=case.gqa)


def _max_abs_lse(d64, case: Case) -> float:
    """max |logsumexp_j z_ij| over rows with an unmasked key, in float64."""
    q, k, _, mask = (t.detach() if isinstance(t, torch.Tensor) else t for t in d64)
    if case.gqa:
        k = k.repeat_interleave(case.Hq // case.Hkv, dim=-3)
    scale = case.scale if case.scale is not None else q.shape[-1] ** -0.5
    z = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask
    if case.mask == "causal":
        z = z.masked_fill(~fastattn.reference.causal_keep(z.shape[-2], z.shape[-1]), float("-inf"))
    lse = torch.logsumexp(z, -1)
    lse = lse[torch.isfinite(lse)]
    return lse.abs().max().item() if lse.numel() else 0.0


def check(case: Case, backend: str, device, dtype: torch.dtype, *, backward: bool,
          interpreted: bool = False) -> None:
    """fastattn.sdpa on `backend` vs the float64 reference (fastattn.reference.sdpa), bounded by
    2x of F.scaled_dot_product_attention's own error in `dtype`; with backward, the gradients of
    q, k, v (and of a float-grad mask) too."""
    q, k, v, mask = make_inputs(case, dtype, device, requires_grad=backward)
    kw = _kwargs(case, mask)
    got = fastattn.sdpa(q, k, v, **kw, backend=backend)
    leaves = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    d64 = [t.detach().double().requires_grad_(t.requires_grad)
           if t is not None and t.is_floating_point() else t for t in (q, k, v, mask)]
    ref = fastattn.reference.sdpa(*d64[:3], **_kwargs(case, d64[3]))
    theirs = F.scaled_dot_product_attention(q, k, v, **kw)
    what = f"sdpa {backend} {case.id} {dtype}"
    assert got.dtype == dtype and got.shape == theirs.shape, (what, got.shape, theirs.shape)
    # The fused kernels exponentiate in base 2 (log2(e) folded into the scores) and, in the
    # backward, recompute p from the float32 log-sum-exp: both add a relative error of about
    # eps * |score| that PyTorch's math path does not have (measured: up to ~4x torch's
    # float32 error once scores reach ~10-30, e.g. scale 1.0). The floor therefore scales with
    # the largest |log-sum-exp| of the call; a real defect is off by 1e-2 .. 1.
    lse_ulps = max(1, math.ceil(_max_abs_lse(d64, case)))
    assert_within_torch_error(got, ref, theirs, what, interpreted=interpreted, ulps=lse_ulps)
    if not backward:
        return
    # Gradients: p = exp(z - lse) with lse rounded to float32 is a relative error of ~eps * |lse|
    # shared by a whole row (a plain-torch model of both schemes: 2-4x torch's gradient error
    # once |lse| ~ 10-30; storing (max, sum) instead of lse brings it back to torch's), so they
    # get 2 ulps scaled the same way.
    ulps = 2 * lse_ulps
    g = torch.randn_like(got)
    g_got = torch.autograd.grad(got, leaves, g)
    g_ref = torch.autograd.grad(ref, [t for t in d64 if t is not None and t.requires_grad],
                                g.double())
    g_theirs = torch.autograd.grad(theirs, leaves, g)
    names = [n for n, t in zip(("q", "k", "v", "mask"), (q, k, v, mask))
             if t is not None and t.requires_grad]
    for name, leaf, a, r, t in zip(names, leaves, g_got, g_ref, g_theirs):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, f"{what} grad {name}"
        assert_within_torch_error(a, r, t, f"{what} grad {name}", dtype=dtype,
                                  interpreted=interpreted, ulps=ulps)
