"""The float64 side of benchmarks/bench_attention.py: reference results of a case computed
slice by slice within a memory budget, and the max error of an implementation's results
against them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fastattn import reference

from .common import max_error

if TYPE_CHECKING:
    from .bench_attention import Case

REF_BUDGET = 1 << 27  # float64 scores the error check may compute per case (1 GiB)
REF_MAX_CHUNKS = 64  # ... in at most this many (batch element, kv-head group) slices


def reference64(case: Case, inputs: dict, grad_out: torch.Tensor | None = None,
                budget: int = REF_BUDGET, max_chunks: int = REF_MAX_CHUNKS) -> list[dict]:
    """Float64 results through fastattn.reference.sdpa, one slice at a time: batch element b
    and kv head g with its G = H/Hkv query heads. Slices are taken in order (b, then g) while
    their float64 scores (G*L*S each) stay within `budget` and there are at most max_chunks
    (always at least one). Each: {"index": (b, g), "out": (G, L, E)} and, with grad_out,
    "grad_q" (G, L, E), "grad_k" (1, S, E), "grad_v" (1, S, E) by float64 autograd."""
    G, per = case.group, case.group * case.L * case.S
    chunks: list[dict] = []
    for b in range(case.B):
        for g in range(case.hkv):
            if chunks and (len(chunks) >= max_chunks or (len(chunks) + 1) * per > budget):
                return chunks
            heads = slice(g * G, (g + 1) * G)
            leaves = [inputs["q"][b:b + 1, heads], inputs["k"][b:b + 1, g:g + 1],
                      inputs["v"][b:b + 1, g:g + 1]]
            leaves = [t.double().requires_grad_(grad_out is not None) for t in leaves]
            mask = inputs["mask"]
            if mask is not None:
                mask = mask[b:b + 1] if mask.dtype == torch.bool else mask[b:b + 1].double()
            with torch.set_grad_enabled(grad_out is not None):
                out = reference.sdpa(*leaves, mask, is_causal=case.causal,
                                     enable_gqa=case.gqa)  # (1, G, L, E)
                if grad_out is not None:
                    out.backward(grad_out[b:b + 1, heads].double())
            chunk = {"index": (b, g), "out": out.detach()[0]}
            if grad_out is not None:
                chunk |= {f"grad_{n}": t.grad[0] for n, t in zip("qkv", leaves)}
            chunks.append(chunk)
    return chunks


def errors(results: dict, chunks: list[dict], case: Case) -> tuple[float, str]:
    """(max error over the tensors of `results` ("out" and the "grad_*" present) against the
    reference slices, the name of the tensor holding it); NaN anywhere gives NaN."""
    G = case.group
    errs: dict[str, float] = {}
    for chunk in chunks:
        b, g = chunk["index"]
        for name, got in results.items():
            sub = got[b, g * G:(g + 1) * G] if name in ("out", "grad_q") else got[b, g:g + 1]
            e = max_error(sub, chunk[name])
            if name not in errs or math.isnan(e) or e > errs[name]:
                errs[name] = e
    worst = max(errs, key=lambda n: math.inf if math.isnan(errs[n]) else errs[n])
    return errs[worst], worst
