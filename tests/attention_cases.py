"""Cases and the comparison for fastattn.attention (packed batches, window, causal alignment,
ALiBi, softcap) and fastattn.decode_attention: the kernel vs the float64 reference, bounded by
2x the error of the same math in eager PyTorch in the kernel's dtype (tests/tolerances.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import fastattn
from tolerances import assert_within_torch_error


@dataclass(frozen=True)
class AttnCase:
    """lens_q / lens_k: per-sequence lengths. packed: one (total, H, E) batch with cu_seqlens;
    else (B, L, H, E) (then every length must be equal). window (left, right) or None; alibi:
    None, "head" (Hq,) or "batch" (B, Hq); softcap: None or the cap; layout "blhe"
    (contiguous) or "bhle" (head-major tensors transposed: non-contiguous views)."""
    lens_q: tuple[int, ...] = (17,)
    lens_k: tuple[int, ...] = (23,)
    packed: bool = False
    Hq: int = 4
    Hkv: int = 2
    E: int = 16
    Ev: int = 16
    causal: bool = False
    align: str = "bottom_right"
    window: tuple[int, int] | None = None
    alibi: str | None = None
    softcap: float | None = None
    scale: float | None = None
    dropout_p: float = 0.0
    layout: str = "blhe"

    @property
    def id(self) -> str:
        s = "packed" if self.packed else "dense"
        s += "-q" + ",".join(map(str, self.lens_q)) + "-k" + ",".join(map(str, self.lens_k))
        s += f"-h{self.Hq}/{self.Hkv}-E{self.E}" + (f"-Ev{self.Ev}" if self.Ev != self.E else "")
        if self.causal:
            s += "-causal-" + ("br" if self.align == "bottom_right" else "tl")
        elif self.align != "bottom_right":
            s += "-tl"
        if self.window is not None:
            s += f"-win{self.window[0]},{self.window[1]}"
        if self.alibi:
            s += f"-alibi-{self.alibi}"
        if self.softcap:
            s += f"-cap{self.softcap}"
        if self.dropout_p:
            s += f"-drop{self.dropout_p}"
        return s + ("-bhle" if self.layout == "bhle" else "")


def _rand(n: int, h: int, d: int, case: AttnCase, dtype, device, batch: int | None):
    if batch is None:  # packed (n, h, d)
        return torch.randn(n, h, d, device=device).to(dtype)
    if case.layout == "bhle":
        return torch.randn(batch, h, n, d, device=device).to(dtype).transpose(1, 2)
    return torch.randn(batch, n, h, d, device=device).to(dtype)


def alibi_slopes(case: AttnCase, device) -> torch.Tensor | None:
    if case.alibi is None:
        return None
    base = torch.tensor([2.0 ** (-8.0 * (h + 1) / case.Hq) for h in range(case.Hq)])
    if case.alibi == "batch":
        base = base[None] * torch.linspace(0.5, 1.5, len(case.lens_q))[:, None]
    return base.to(device)


def make_inputs(case: AttnCase, dtype, device) -> tuple[torch.Tensor, ...]:
    """q, k, v (leaves) and the cu_seqlens (None when dense)."""
    B = len(case.lens_q)
    if case.packed:
        q = _rand(sum(case.lens_q), case.Hq, case.E, case, dtype, device, None)
        k = _rand(sum(case.lens_k), case.Hkv, case.E, case, dtype, device, None)
        v = _rand(sum(case.lens_k), case.Hkv, case.Ev, case, dtype, device, None)
        cu_q = torch.tensor([0, *torch.tensor(case.lens_q).cumsum(0).tolist()],
                            dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, *torch.tensor(case.lens_k).cumsum(0).tolist()],
                            dtype=torch.int32, device=device)
        return q, k, v, cu_q, cu_k
    assert len(set(case.lens_q)) == 1 and len(set(case.lens_k)) == 1
    q = _rand(case.lens_q[0], case.Hq, case.E, case, dtype, device, B)
    k = _rand(case.lens_k[0], case.Hkv, case.E, case, dtype, device, B)
    v = _rand(case.lens_k[0], case.Hkv, case.Ev, case, dtype, device, B)
    return q, k, v, None, None


def kwargs(case: AttnCase, device) -> dict:
    return dict(causal=case.causal, causal_align=case.align, window=case.window,
                alibi_slopes=alibi_slopes(case, device), softcap=case.softcap, scale=case.scale,
                dropout_p=case.dropout_p)


def lse_ulps(lse: torch.Tensor) -> int:
    """The fused kernels' exp2 / float32-lse scheme adds ~eps * |lse| relative error (see
    tests/sdpa_cases.py); the floor scales with the largest finite |lse|."""
    finite = lse[torch.isfinite(lse)]
    return max(1, math.ceil(finite.abs().max().item())) if finite.numel() else 1


def check(case: AttnCase, backend: str, device, dtype, *, backward: bool,
          interpreted: bool = False) -> None:
    """fastattn.attention on `backend` vs fastattn.reference.attention in float64, within 2x
    of eager PyTorch's own error in `dtype` (reference math with compute_dtype=dtype), forward
    and (with backward) the gradients of q, k and v."""
    q, k, v, cu_q, cu_k = make_inputs(case, dtype, device)
    kw = kwargs(case, device)
    seed = (1234, 5678)
    keep = None
    if case.dropout_p:
        shape = ((1, case.Hq, q.shape[0], k.shape[0]) if case.packed else
                 (q.shape[0], case.Hq, q.shape[1], k.shape[1]))
        keep = fastattn.reference.dropout_keep(*seed, shape, case.dropout_p, device)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    got, lse = fastattn.attention(*leaves, **kw, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  return_lse=True, backend=backend, dropout_seed=seed)
    d64 = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    rkw = dict(kw, dropout_mask=keep, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref = fastattn.reference.attention(*d64, **rkw)
    eager_leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    eager = fastattn.reference.attention(*eager_leaves, **rkw, compute_dtype=dtype)
    what = f"attention {backend} {case.id} {dtype}"
    assert got.dtype == dtype and got.shape == ref.shape, (what, got.shape, ref.shape)
    ulps = lse_ulps(lse)
    if case.softcap:  # |z| <= softcap: the tanh's own rounding sets the scale instead
        ulps = max(ulps, 2)
    assert_within_torch_error(got, ref, eager, what, interpreted=interpreted, ulps=ulps)
    if not backward:
        return
    g = torch.randn_like(got)
    g_got = torch.autograd.grad(got, leaves, g)
    g_ref = torch.autograd.grad(ref, d64, g.double())
    g_eager = torch.autograd.grad(eager, eager_leaves, g)
    for name, leaf, a, r, t in zip("qkv", leaves, g_got, g_ref, g_eager):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, f"{what} grad {name}"
        assert_within_torch_error(a, r, t, f"{what} grad {name}", dtype=dtype,
                                  interpreted=interpreted, ulps=2 * ulps)
