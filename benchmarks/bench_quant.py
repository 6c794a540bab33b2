"""Benchmark of fastattn's quantized linears against the float F.linear users would run instead.

One case = (M, K, N, activation dtype): x (M, K) times a weight of out_features N. Per case:
  F.linear            torch.nn.functional.linear(x, W, b) with W in x's dtype (the baseline)
  fastattn:<backend>  fastattn.int8_linear / int4_linear (group size 128) / w8a8_linear on the
                      packed weights of the same W
  torchao, bnb        torchao int8/int4 weight-only and bitsandbytes int8 rows when those
                      packages import (absent otherwise)
Tables: one per format ("int8_linear", "int4_linear g128", "w8a8_linear"); each repeats the
F.linear row of the case so the ratio (F.linear time / fastattn time, > 1 = faster) is read
against a baseline measured in the same run.

GB/s counts the bytes one call must move at least: the weights as stored (codes + scales +
zero points; the float weight for F.linear), x and the output. Decode (small M) is bound by
the weight bytes, so a format's ceiling over F.linear is the ratio of weight bytes: fp32 -> int8
~4x, fp32 -> int4 ~7x, bf16 -> int4 ~3.6x. Max err: against the float64 math of the same
quantized weights (kernel correctness); the note gives the SQNR of the output against the
float layer (the quantization's own accuracy).

Cases. GPU: M in {1, 4, 16, 64, 512, 4096} on (K, N) = (4096, 4096), (4096, 11008),
(11008, 4096), (8192, 28672) in float16 and bfloat16. CPU (2 cores here): M in {1, 4, 16, 64}
on the first three shapes in float32, M = 1 and 16 in bfloat16, and M = 512 on 4096 x 4096;
`quick`: M in {1, 16} on 4096 x 4096, float32. "dram" cases (shape label suffix): M = 1 on the
first three shapes (float32 on CPU, bfloat16 on GPU) with every implementation cycling through
weight copies of STREAM_BYTES in all, so the weights come from DRAM on every call (the other
cases reuse one weight, which a large last-level cache keeps: on this CPU, F.linear then reads
its fp32 weights at twice the DRAM copy bandwidth).

As a script: `python -m fastattn.cli bench --ops quant`. Under pytest-benchmark:
`pytest benchmarks/bench_quant.py --benchmark-only` (the quick CPU cases).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.quant_formats import quantize_int4_weight, quantize_int8_weight, sqnr_db

from .common import gbs, max_error, nbytes, run_cases, time_interleaved
from .report import Row

FORMATS = ("int8", "int4", "w8a8")
TABLE = {"int8": "int8_linear", "int4": "int4_linear g128", "w8a8": "w8a8_linear"}
GROUP_SIZE = 128
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672))  # (K, N)


@dataclasses.dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    dtype: torch.dtype
    streamed: bool = False  # every call reads its weights from DRAM (see STREAM_BYTES)

    @property
    def id(self) -> str:
        dram = "-dram" if self.streamed else ""
        return f"{self.M}x{self.K}x{self.N}-{str(self.dtype).removeprefix('torch.')}{dram}"

    @property
    def label(self) -> str:
        return f"({self.M}, {self.K}, {self.N})" + (" dram" if self.streamed else "")


# Streamed cases cycle each implementation through distinct copies of its weights totalling at
# least this many bytes, so no call finds its weights in cache (this machine's L3 is 260 MiB, an
# H100's L2 50 MiB): what decode over a whole model, layer after layer, sees.
STREAM_BYTES = 1 << 30


def cases(device: str | torch.device = "cpu", quick: bool = False) -> list[Case]:
    if torch.device(device).type == "cuda":
        dts = (torch.float16, torch.bfloat16)
        ms = (1, 16) if quick else (1, 4, 16, 64, 512, 4096)
        shapes = GPU_SHAPES[:1] if quick else GPU_SHAPES
        out = [Case(m, k, n, dt) for dt in dts for (k, n) in shapes for m in ms]
        return out + ([] if quick else [Case(1, k, n, torch.bfloat16, streamed=True)
                                        for (k, n) in GPU_SHAPES[:3]])
    if quick:
        return [Case(m, 4096, 4096, torch.float32) for m in (1, 16)]
    out = [Case(m, k, n, torch.float32) for (k, n) in GPU_SHAPES[:3] for m in (1, 4, 16, 64)]
    out += [Case(1, k, n, torch.float32, streamed=True) for (k, n) in GPU_SHAPES[:3]]
    out += [Case(m, 4096, 4096, torch.bfloat16) for m in (1, 16)]
    return out + [Case(512, 4096, 4096, torch.float32)]


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """x (M, K), the float weight W (N, K) ~ N(0, 1/K) and bias (N,) in x's dtype, and W
    packed in every format."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(case.N, case.K, generator=g) * case.K ** -0.5).to(device)  # (N, K) fp32
    x = torch.randn(case.M, case.K, generator=g).to(device, case.dtype)  # (M, K)
    bias = (torch.randn(case.N, generator=g) * 0.1).to(device, case.dtype)  # (N,)
    q8, s8 = quantize_int8_weight(w)
    p4, s4, z4 = quantize_int4_weight(w, GROUP_SIZE)
    return {"x": x, "w": w.to(case.dtype), "bias": bias, "int8": (q8, s8), "w8a8": (q8, s8),
            "int4": (p4, s4, z4)}


def linear_of(fmt: str | None, x: torch.Tensor, bias: torch.Tensor,
              backend: str | None = None) -> Callable[..., torch.Tensor]:
    """f(*weights) -> x @ W^T + bias for one format's weight tensors (None: F.linear on W)."""
    if fmt is None:
        return lambda w: F.linear(x, w, bias)
    if fmt == "int8":
        return lambda q, s: fastattn.int8_linear(x, q, s, bias, backend=backend)
    if fmt == "w8a8":
        return lambda q, s: fastattn.w8a8_linear(x, q, s, bias, backend=backend)
    return lambda p, s, z: fastattn.int4_linear(x, p, s, z, GROUP_SIZE, bias, backend=backend)


def weights_of(fmt: str | None, inputs: dict) -> tuple:
    return (inputs["w"],) if fmt is None else inputs[fmt]


def cycled(fn: Callable[..., torch.Tensor], weights: tuple,
           streamed: bool) -> Callable[[], torch.Tensor]:
    """fn(*weights) as a no-argument call; streamed: each call takes the next of enough clones of
    the weights (>= STREAM_BYTES in all) that they are never in cache when used."""
    if not streamed:
        return lambda: fn(*weights)
    copies = -(-STREAM_BYTES // sum(nbytes(t) for t in weights))
    pool = itertools.cycle([weights] + [tuple(t.clone() for t in weights)
                                        for _ in range(copies - 1)])
    return lambda: fn(*next(pool))


def quantized_fn(fmt: str, inputs: dict, backend: str) -> Callable[[], torch.Tensor]:
    return cycled(linear_of(fmt, inputs["x"], inputs["bias"], backend), weights_of(fmt, inputs),
                  False)


def reference64(fmt: str, inputs: dict) -> torch.Tensor:
    """The float64 math of the quantized layer (what the kernel must compute)."""
    x, bias = inputs["x"], inputs["bias"]
    if fmt == "int8":
        return reference.int8_weight_linear(x, *inputs["int8"], bias)
    if fmt == "w8a8":
        return reference.w8a8_linear(x, *inputs["w8a8"], bias)
    return reference.int4_weight_linear(x, *inputs["int4"], GROUP_SIZE, bias)


def weight_bytes(fmt: str | None, inputs: dict) -> int:
    return nbytes(inputs["w"]) if fmt is None else sum(nbytes(t) for t in inputs[fmt])


def _third_party(case: Case, inputs: dict, device: torch.device) -> dict[str, Callable]:
    """torchao / bitsandbytes rows, when they import and support the device (else none)."""
    fns = {}
    try:
        import torchao.quantization as tq
    except ImportError:
        tq = None
    if tq is not None:
        for name, config in (("torchao int8wo", "Int8WeightOnlyConfig"),
                             ("torchao int4wo", "Int4WeightOnlyConfig")):
            try:
                lin = torch.nn.Linear(case.K, case.N, device=device, dtype=case.dtype)
                lin.weight.data.copy_(inputs["w"])
                tq.quantize_(lin, getattr(tq, config)())
                fns[name] = functools.partial(lin, inputs["x"])
            except Exception as e:  # noqa: BLE001 - an unsupported combination: no row
                print(f"quant {case.id}: {name} unavailable ({type(e).__name__})", file=sys.stderr)
    return fns


def run_case(case: Case, device: torch.device, backends: list[str] | None = None,
             formats=FORMATS, peak: float | None = None, warmup=None, rep=None) -> list[Row]:
    """Time F.linear and every (format, backend) of one case, interleaved."""
    inputs = make_inputs(case, device)
    x, w, bias = inputs["x"], inputs["w"], inputs["bias"]
    backends = backends or [b for b in ("cuda", "triton", "cpu")
                            if b in fastattn.available_backends("int8_weight_linear", device,
                                                                case.dtype)]
    threads = torch.get_num_threads() if device.type == "cpu" else None
    fns: dict[str, Callable] = {
        "F.linear": cycled(linear_of(None, x, bias), weights_of(None, inputs), case.streamed)}
    for fmt in formats:
        for b in backends:
            fns[f"{fmt}|fastattn:{b}"] = cycled(linear_of(fmt, x, bias, b),
                                                weights_of(fmt, inputs), case.streamed)
    fns.update(_third_party(case, inputs, device))
    with torch.no_grad():
        dense = F.linear(x.float(), w.float(), bias.float())
        errs, notes = {}, {}
        for name, fn in list(fns.items()):
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - a failing impl must not stop the run
                print(f"quant {case.id} {name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
                del fns[name]
                continue
            fmt = name.split("|")[0] if "|" in name else None
            if fmt is not None:
                errs[name] = max_error(out, reference64(fmt, inputs))
            notes[name] = f"SQNR {sqnr_db(dense, out):.1f} dB" if name != "F.linear" else ""
        times = time_interleaved(fns, device=device, warmup=warmup, rep=rep)
    io_bytes = nbytes(x) + case.M * case.N * x.element_size()

    def row(table: str, impl: str, name: str, fmt: str | None) -> Row:
        t = times[name]
        r = Row(op=table, shape=case.label,
                dtype=str(case.dtype).removeprefix("torch."), mask=fmt or "float", impl=impl,
                median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                threads=threads, device=str(device), max_err=errs.get(name),
                note=notes.get(name, ""), mask_header="weights")
        r.gbs = gbs(weight_bytes(fmt if fmt in FORMATS else None, inputs) + io_bytes,
                    r.median_ms)
        r.pct_of_peak = 100 * r.gbs / peak if peak and r.gbs else None
        return r

    rows = []
    for fmt in formats:
        base = row(TABLE[fmt], "F.linear", "F.linear", None)
        mine = [row(TABLE[fmt], n.split("|")[1], n, fmt) for n in times if n.startswith(f"{fmt}|")]
        for r in mine:
            r.ratios = {"F.linear": base.median_ms / r.median_ms}
        rows += mine + [base]
    rows += [row("third-party", n, n, None) for n in times if n.startswith(("torchao", "bnb"))]
    return rows


def run(device: str | torch.device = "cpu", quick: bool = False,
        backends: list[str] | None = None, formats=FORMATS) -> list[Row]:
    """Benchmark every case of `cases(device, quick)`; rows grouped per format table."""
    rows = run_cases(device, quick, cases, lambda case, dev, peak, warmup, rep: run_case(
        case, dev, backends, formats, peak, warmup, rep))
    order = {t: i for i, t in enumerate([TABLE[f] for f in formats] + ["third-party"])}
    return sorted(rows, key=lambda r: order[r.op])


# ---- pytest-benchmark: `pytest benchmarks/bench_quant.py --benchmark-only` ---------------------

try:
    import pytest
except ImportError:  # installed package without pytest: the CLI path still works
    pytest = None

if pytest is not None:
    _QUICK = cases("cpu", quick=True)

    @pytest.fixture(params=_QUICK, ids=[c.id for c in _QUICK])
    def case(request) -> Case:
        return request.param

    def _bench(benchmark, case: Case, name: str, fn, fmt: str | None, inputs: dict) -> None:
        benchmark.group = case.id
        with torch.no_grad():
            benchmark(fn)
        benchmark.extra_info["weight_bytes"] = weight_bytes(fmt, inputs)
        benchmark.extra_info["threads"] = torch.get_num_threads()

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_quant_fastattn(benchmark, case, fmt):
        inputs = make_inputs(case, torch.device("cpu"))
        _bench(benchmark, case, fmt, quantized_fn(fmt, inputs, "cpu"), fmt, inputs)

    def test_quant_f_linear(benchmark, case):
        inputs = make_inputs(case, torch.device("cpu"))
        x, w, b = inputs["x"], inputs["w"], inputs["bias"]
        _bench(benchmark, case, "F.linear", lambda: F.linear(x, w, b), None, inputs)
