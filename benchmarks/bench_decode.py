"""Benchmark of fastattn.decode_attention (one new token per sequence against a KV cache)
against what users would run instead.

One case = (B, context, dtype) with Hq = 32 query heads over Hkv = 8 kv heads of E = 128
(a Llama-3-8B layer). Every sequence holds `context` tokens. Rows:
  torch SDPA          F.scaled_dot_product_attention(q, K, V, enable_gqa=True) on (B, H, S, E)
                      views of the same contiguous cache (the baseline)
  fastattn:<backend>  fastattn.decode_attention on the contiguous cache (B, S_max, Hkv, E)
  <backend> paged     the same tokens in a paged cache (pages of PAGE tokens in a random order)
  flash-attn          flash_attn_with_kvcache on the contiguous cache, when flash_attn imports
The cache is read without appending (the append is a (B, 1) scatter, timed by no one).

Decode is bound by memory: GB/s = bytes of K and V the call must read (B * context * Hkv *
2E * element size) / median time, also as a percentage of the copy bandwidth measured in the
same run. Max err: against the float64 math (fastattn.reference.decode_attention) where the
float64 copy fits (B * context <= 65536).

Cases. GPU: B in {1, 8, 64} x context in {512, 4096, 32768}, bfloat16 and float16 (B = 64 at
32k is 34 GB: skipped). CPU (2 cores here): B in {1, 8} x context in {512, 4096, 32768}
float32, and B = 1 bfloat16 at 4096 / 32768. `quick`: B = 1, contexts 512 and 4096, float32.

As a script: `python -m fastattn.cli bench --ops decode`. Under pytest-benchmark:
`pytest benchmarks/bench_decode.py --benchmark-only` (the quick CPU cases).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference

from .common import gbs, max_error, run_cases, time_interleaved
from .report import Row

HQ, HKV, E = 32, 8, 128
PAGE = 256
REF_TOKENS = 65536  # float64 reference only up to B * context tokens


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    context: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"b{self.B}-ctx{self.context}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def label(self) -> str:
        return f"B={self.B}, ctx={self.context}"


def cases(device: str | torch.device = "cpu", quick: bool = False) -> list[Case]:
    if torch.device(device).type == "cuda":
        if quick:
            return [Case(1, 4096, torch.bfloat16), Case(8, 4096, torch.bfloat16)]
        return [Case(b, s, dt) for dt in (torch.bfloat16, torch.float16) for b in (1, 8, 64)
                for s in (512, 4096, 32768) if b * s <= 8 * 32768]
    if quick:
        return [Case(1, s, torch.float32) for s in (512, 4096)]
    return ([Case(b, s, torch.float32) for b in (1, 8) for s in (512, 4096, 32768)] +
            [Case(1, s, torch.bfloat16) for s in (4096, 32768)])


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """q (B, 1, Hq, E); the contiguous cache k, v (B, S, Hkv, E) full to `context`; the same
    tokens as shuffled pages (P, PAGE, Hkv, E) with their block table; the lengths."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = case.context
    k = torch.randn(case.B, S, HKV, E, generator=g).to(device, case.dtype)
    v = torch.randn(case.B, S, HKV, E, generator=g).to(device, case.dtype)
    q = torch.randn(case.B, 1, HQ, E, generator=g).to(device, case.dtype)
    per = -(-S // PAGE)
    perm = torch.randperm(case.B * per, generator=g)
    table = perm.reshape(case.B, per).to(device, torch.int32)  # (B, pages per sequence)
    kp = torch.empty(case.B * per, PAGE, HKV, E, device=device, dtype=case.dtype)
    vp = torch.empty_like(kp)
    pad = per * PAGE - S
    for src, dst in ((k, kp), (v, vp)):
        full = F.pad(src, (0, 0, 0, 0, 0, pad)) if pad else src  # (B, per * PAGE, Hkv, E)
        dst[table.long()] = full.reshape(case.B, per, PAGE, HKV, E)
    lens = torch.full((case.B,), S, dtype=torch.int32, device=device)
    return {"q": q, "k": k, "v": v, "kp": kp, "vp": vp, "table": table, "lens": lens}


def _flash_attn(inputs: dict) -> Callable | None:
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    q, k, v, lens = inputs["q"], inputs["k"], inputs["v"], inputs["lens"]
    return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True)


def fns_for(case: Case, inputs: dict, device: torch.device,
            backends: list[str] | None = None) -> dict[str, Callable]:
    q, k, v, lens = inputs["q"], inputs["k"], inputs["v"], inputs["lens"]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, E) views
    fns: dict[str, Callable] = {
        "torch SDPA": lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)}
    backends = backends or [b for b in ("cuda", "triton", "cpu") if b in
                            fastattn.available_backends("decode_attention", device, case.dtype)]
    for b in backends:
        fns[f"fastattn:{b}"] = lambda b=b: fastattn.decode_attention(q, k, v, lens, backend=b)
        fns[f"fastattn:{b} paged"] = lambda b=b: fastattn.decode_attention(
            q, inputs["kp"], inputs["vp"], lens, block_table=inputs["table"], backend=b)
    fa = _flash_attn(inputs) if device.type == "cuda" else None
    if fa is not None:
        fns["flash-attn"] = fa
    return fns


def run_case(case: Case, device: torch.device, backends: list[str] | None = None,
             peak: float | None = None, warmup=None, rep=None) -> list[Row]:
    inputs = make_inputs(case, device)
    fns = fns_for(case, inputs, device, backends)
    ref = None
    if case.B * case.context <= REF_TOKENS:
        d = {n: inputs[n].double() for n in ("q", "k", "v")}
        ref = reference.decode_attention(d["q"], d["k"], d["v"], inputs["lens"])
    errs = {}
    with torch.no_grad():
        for name, fn in list(fns.items()):
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - a failing impl must not stop the run
                print(f"decode {case.id} {name}: failed: {type(e).__name__}: {e}",
                      file=sys.stderr)
                del fns[name]
                continue
            if ref is not None:
                out = out.transpose(1, 2) if name == "torch SDPA" else out
                errs[name] = max_error(out, ref)
        times = time_interleaved(fns, device=device, warmup=warmup, rep=rep)
    kv_bytes = 2 * case.B * case.context * HKV * E * inputs["k"].element_size()
    threads = torch.get_num_threads() if device.type == "cpu" else None
    base = times["torch SDPA"]["median_ms"]
    rows = []
    for name, t in times.items():
        r = Row(op="decode_attention", shape=case.label,
                dtype=str(case.dtype).removeprefix("torch."), mask="causal", impl=name,
                median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                threads=threads, device=str(device), max_err=errs.get(name), note="",
                mask_header="cache")
        r.gbs = gbs(kv_bytes, r.median_ms)
        r.pct_of_peak = 100 * r.gbs / peak if peak and r.gbs else None
        if name != "torch SDPA":
            r.ratios = {"torch SDPA": base / r.median_ms}
        r.mask = "paged" if name.endswith("paged") else "contiguous"
        rows.append(r)
    return rows


def run(device: str | torch.device = "cpu", quick: bool = False,
        backends: list[str] | None = None) -> list[Row]:
    """Benchmark every case of `cases(device, quick)`."""
    return run_cases(device, quick, cases, lambda case, dev, peak, warmup, rep: run_case(
        case, dev, backends, peak, warmup, rep))


# ---- pytest-benchmark: `pytest benchmarks/bench_decode.py --benchmark-only` --------------------

try:
    import pytest
except ImportError:  # installed package without pytest: the CLI path still works
    pytest = None

if pytest is not None:
    _QUICK = cases("cpu", quick=True)

    @pytest.fixture(params=_QUICK, ids=[c.id for c in _QUICK])
    def case(request) -> Case:
        return request.param

    @pytest.mark.parametrize("impl", ["torch SDPA", "fastattn:cpu", "fastattn:cpu paged"])
    def test_decode(benchmark, case, impl):
        inputs = make_inputs(case, torch.device("cpu"))
        fn = fns_for(case, inputs, torch.device("cpu"), ["cpu"])[impl]
        benchmark.group = case.id
        with torch.no_grad():
            benchmark(fn)
        benchmark.extra_info["kv_bytes"] = 2 * case.B * case.context * HKV * E * \
            inputs["k"].element_size()
        benchmark.extra_info["threads"] = torch.get_num_threads()
