"""Benchmark of fastattn.softmax (fused softmax(scale * x + mask)) against what users write instead.

Implementations timed in the same run, per case:
  fastattn:<backend>  fastattn.softmax(x, scale=, mask=, causal=, backend=<backend>)
  eager               PyTorch composing the same math: (x * scale).masked_fill(drop, -inf)
                      [.masked_fill(causal_drop, -inf)] .softmax(-1); an additive mask is
                      (x * scale + mask).softmax(-1). The inverted masks are precomputed.
  torch.softmax       torch.softmax(x, -1) alone (no scale, no mask): the unfused lower bound.
  compile             torch.compile(eager, dynamic=False), compiled once per case.
GB/s uses common.softmax_bytes (x read + out written + un-broadcast mask read). torch.softmax's
bytes and error exclude the mask and scale it does not apply.

As a script: `python -m fastattn.cli bench --ops softmax`. Under pytest-benchmark:
`pytest benchmarks/bench_softmax.py --benchmark-only` (the quick CPU cases).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

import fastattn
from fastattn import reference

from .common import (gbs, max_error, resolve_device, run_cases, softmax_bytes,
                     time_interleaved)
from .report import Row

BASELINES = ("eager", "torch.softmax", "compile")
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration. mask: "none", "bool" (padding keep-mask, True = keep) or
    "additive" (0 / -inf padding bias), both of shape (B, 1, 1, S) for a (B, H, L, S) x."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float | None = None
    mask: str = "none"
    causal: bool = False

    @property
    def mask_shape(self) -> tuple[int, ...] | None:
        return None if self.mask == "none" else (self.shape[0], 1, 1, self.shape[-1])

    @property
    def mask_label(self) -> str:
        parts = [] if self.mask == "none" else [
            f"{self.mask}({','.join(map(str, self.mask_shape))})"]
        return "+".join(parts + ["causal"] * self.causal) or "none"

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{'x'.join(map(str, self.shape))}-{dt}-{self.mask_label}"


def cases(device: str | torch.device = "cpu", quick: bool = False) -> list[Case]:
    """Benchmark cases: plain rows (R, N) and attention scores (B, H, L, S) with padding
    masks, causal masking and a decode-sized row that shows per-call dispatch overhead."""
    device = resolve_device(device)
    att = 64 ** -0.5  # 1/sqrt(head dim)
    if device.type == "cuda":
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        shapes = [Case((16384, n), None) for n in (1024, 4096, 16384)] + [
            Case((8, 16, 2048, 2048), None, att, "bool", True),
            Case((8, 16, 2048, 2048), None, att, "additive"),
            Case((1, 32, 1, 4096), None, att, "bool"),
            Case((1, 8, 1, 128), None, att),
        ]
        if quick:
            dtypes, shapes = (torch.float32, torch.bfloat16), [shapes[1], shapes[3], shapes[6]]
    else:
        dtypes = (torch.float32, torch.bfloat16)
        shapes = [Case(s, None) for s in ((4096, 512), (4096, 2048), (1024, 4097), (64, 65536))]
        shapes += [
            Case((2, 8, 512, 512), None, att, "bool", True),
            Case((2, 8, 512, 512), None, att, "additive"),
            Case((1, 8, 1, 128), None, att),
        ]
        if quick:
            return [Case((4096, 512), torch.float32),
                    Case((1024, 4097), torch.bfloat16),
                    Case((2, 8, 512, 512), torch.bfloat16, att, "bool", True),
                    Case((1, 8, 1, 128), torch.float32, att)]
    return [dataclasses.replace(s, dtype=dt) for s in shapes for dt in dtypes]


def make_inputs(case: Case, device: str | torch.device, seed: int = 0):
    """(x, mask) for a case. x: case.shape in case.dtype, N(0, 1) logits. mask: None,
    bool (B, 1, 1, S) keep-mask, or additive (B, 1, 1, S) in x's dtype (0 keep, -inf drop).
    Each batch keeps its first len_b >= S/2 columns, so every row (causal too: column 0 is
    always kept) keeps at least one column and the eager composition never gives NaN."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(case.shape, generator=g, device=device).to(case.dtype)  # case.shape
    if case.mask == "none":
        return x, None
    b, s = case.shape[0], case.shape[-1]
    lens = torch.randint(s // 2, s + 1, (b,), generator=g, device=device)  # (B,)
    keep = (torch.arange(s, device=device) < lens[:, None]).view(b, 1, 1, s)  # (B, 1, 1, S)
    if case.mask == "bool":
        return x, keep
    bias = torch.zeros(keep.shape, device=device).masked_fill(~keep, NEG_INF)  # (B, 1, 1, S)
    return x, bias.to(case.dtype)


def eager_softmax(x, scale, drop, bias, causal_drop):
    """The same math composed from PyTorch ops (the eager and compile baselines).
    x: (..., L, S); drop: bool broadcastable to x, True = masked; bias: additive mask;
    causal_drop: (L, S) bool, True above the diagonal. Any of the three may be None."""
    z = x if scale is None else x * scale
    if drop is not None:
        z = z.masked_fill(drop, NEG_INF)
    if bias is not None:
        z = z + bias
    if causal_drop is not None:
        z = z.masked_fill(causal_drop, NEG_INF)
    return z.softmax(-1)


def fused_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """fastattn backends to time here: every available one except "reference", and except
    "triton" on CPU (the interpreter is a test tool, not a fast path)."""
    names = fastattn.available_backends("softmax", device, dtype)
    return [b for b in names if b != "reference" and not (b == "triton" and device.type == "cpu")]


def _reference64(x, mask, case: Case):
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    return reference.softmax(x.double(), -1, scale=case.scale, mask=m64, causal=case.causal)


def eager_args(case: Case, x, mask) -> tuple:
    """Arguments of eager_softmax for a case, inverted masks precomputed (outside the timing)."""
    drop = None if mask is None or mask.dtype != torch.bool else ~mask  # (B, 1, 1, S)
    bias = None if mask is None or mask.dtype == torch.bool else mask  # (B, 1, 1, S)
    causal_drop = None
    if case.causal:
        causal_drop = ~reference.causal_keep(x.shape[-2], x.shape[-1], x.device)  # (L, S)
    return x, case.scale, drop, bias, causal_drop


def _impls(case: Case, x, mask, backends: list[str], baselines) -> dict:
    """impl name -> zero-argument callable."""
    args = eager_args(case, x, mask)
    fns = {}
    for b in backends:
        fns[f"fastattn:{b}"] = (lambda b=b: fastattn.softmax(
            x, scale=case.scale, mask=mask, causal=case.causal, backend=b))
    if "eager" in baselines:
        fns["eager"] = lambda: eager_softmax(*args)
    if "torch.softmax" in baselines:
        fns["torch.softmax"] = lambda: torch.softmax(x, -1)
    if "compile" in baselines:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
        compiled = torch.compile(eager_softmax, dynamic=False)
        fns["compile"] = lambda: compiled(*args)
    return fns


def run_case(case: Case, device: torch.device, backends: list[str] | None = None,
             baselines=BASELINES, peak: float | None = None, warmup=None, rep=None) -> list[Row]:
    """Time every implementation of one case (interleaved, see common.time_interleaved);
    rows carry GB/s, % of peak, ratios vs the baselines and errors vs float64."""
    x, mask = make_inputs(case, device)
    backends = fused_backends(device, case.dtype) if backends is None else backends
    ref = _reference64(x, mask, case)
    plain_ref = reference.softmax(x.double(), -1) if "torch.softmax" in baselines else None
    threads = torch.get_num_threads() if device.type == "cpu" else None
    rows, fns, nbytes = {}, {}, {}
    for name, fn in _impls(case, x, mask, backends, baselines).items():
        row = rows[name] = Row(op="softmax", shape=str(tuple(case.shape)),
                               dtype=str(case.dtype).removeprefix("torch."),
                               mask=case.mask_label, impl=name, median_ms=None, threads=threads,
                               device=str(device))
        try:
            out = fn()  # the first call also compiles the compile baseline
        except Exception as e:  # noqa: BLE001 - a failing baseline must not stop the run
            row.note = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
            print(f"softmax {case.id} {name}: {row.note}", file=sys.stderr)
            continue
        plain = name == "torch.softmax"
        row.note = "no scale/mask" if plain else ""
        row.max_err = max_error(out, plain_ref if plain else ref)
        nbytes[name] = softmax_bytes(x, None if plain else mask, out)
        fns[name] = fn
        del out
    del ref, plain_ref
    for name, t in time_interleaved(fns, device=device, warmup=warmup, rep=rep).items():
        row = rows[name]
        row.median_ms, row.p20_ms, row.p80_ms = t["median_ms"], t["p20_ms"], t["p80_ms"]
        row.gbs = gbs(nbytes[name], row.median_ms)
        row.pct_of_peak = 100 * row.gbs / peak if peak else None
    base_ms = {n: r.median_ms for n, r in rows.items() if n in BASELINES and r.median_ms}
    for name, row in rows.items():
        if name.startswith("fastattn:") and row.median_ms:
            row.ratios = {b: ms / row.median_ms for b, ms in base_ms.items()}
    return list(rows.values())


def run(device: str | torch.device = "cpu", quick: bool = False,
        backends: list[str] | None = None, baselines=BASELINES) -> list[Row]:
    """Benchmark every case of `cases(device, quick)`; returns the rows (fastattn backends
    first, then the baselines, per case). backends: fastattn backends to time (default: all
    available here, see fused_backends). The copy-bandwidth ceiling is measured first."""
    return run_cases(device, quick, cases, lambda case, dev, peak, warmup, rep: run_case(
        case, dev, backends, baselines, peak, warmup, rep))


# ---- pytest-benchmark: `pytest benchmarks/bench_softmax.py --benchmark-only` ------------------

try:
    import pytest
except ImportError:  # installed package without pytest: the CLI path still works
    pytest = None

if pytest is not None:
    _QUICK = cases("cpu", quick=True)

    @pytest.fixture(params=_QUICK, ids=[c.id for c in _QUICK])
    def case(request) -> Case:
        return request.param

    def _bench(benchmark, fn, x, mask, out_like_mask=True):
        out = benchmark(fn)
        benchmark.extra_info["bytes"] = softmax_bytes(x, mask if out_like_mask else None, out)
        benchmark.extra_info["threads"] = torch.get_num_threads()

    def test_softmax_fastattn(benchmark, case):
        x, mask = make_inputs(case, "cpu")
        benchmark.group = case.id
        _bench(benchmark, lambda: fastattn.softmax(x, scale=case.scale, mask=mask,
                                                   causal=case.causal, backend="cpu"), x, mask)

    def test_softmax_eager(benchmark, case):
        x, mask = make_inputs(case, "cpu")
        args = eager_args(case, x, mask)
        benchmark.group = case.id
        _bench(benchmark, lambda: eager_softmax(*args), x, mask)

    def test_softmax_torch(benchmark, case):
        x, mask = make_inputs(case, "cpu")
        benchmark.group = case.id
        _bench(benchmark, lambda: torch.softmax(x, -1), x, mask, out_like_mask=False)
