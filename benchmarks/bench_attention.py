"""Benchmark of fastattn.sdpa (fused scaled dot-product attention) against what users run
instead, forward and forward + backward.

Implementations timed in the same run, per case and mode (q, k, v (B, H, L, E) unless said):
  fastattn:<backend>  fastattn.sdpa(q, k, v, mask, is_causal=, enable_gqa=, backend=<backend>),
                      every available fused backend (not "triton" on CPU: interpreter only).
                      Where none is available (e.g. a build without the CPU kernel) the
                      "reference" backend (unfused math) is timed instead; its rows say so.
  torch.sdpa          CPU: F.scaled_dot_product_attention, same arguments (torch picks its CPU
                      kernel: flash where it supports the case, else math).
  eager               CPU: the math as users compose it: s = (q @ k^T) * scale [+ float mask]
                      [.masked_fill(drop, -inf)]; s.softmax(-1) @ v (GQA: k, v
                      repeat_interleave'd first; inverted bool / causal masks precomputed).
  compile             CPU: torch.compile(F.scaled_dot_product_attention, dynamic=False), once
                      per case (forward and fwd+bwd graphs).
  torch.sdpa:<b>      GPU: F.scaled_dot_product_attention under torch.nn.attention.sdpa_kernel(
                      SDPBackend.<B>), b in math, efficient, flash, cudnn (entering the context
                      is inside the timed call: a few us). A backend that refuses the case gets
                      a row without time, noted "skipped: <torch's reason>".
  flash_attn          GPU, when flash_attn imports: flash_attn_func(q, k, v, causal=) on its own
                      (B, L, H, E) layout, prepared outside the timing; skipped for masked cases.
No eager / compile rows on GPU: the math backend is the eager composition, and a compiled
F.scaled_dot_product_attention runs the same fused kernels.

Modes (Row.op "attention fwd" / "attention fwd+bwd"): fwd, inputs without grad, one call;
fwd+bwd, q, k, v require grad and one call runs the forward and out.backward(grad_out) (fixed
random grad_out), every .grad set to None first. Masks never require grad.

Per row:
  TFLOP/s   common.attention_flops(B, H, L, S, E, E, causal, mode) / median time: forward
            2*B*H*L*S*(E + Ev), causal half (L == S), fwd+bwd 3.5x forward; masks count as
            dense. CPU tables show GFLOP/s (report.py); Row.tflops stays in TFLOP/s.
  max err   max |out - ref| (fwd+bwd: over out, grad_q, grad_k, grad_v; the note names the
            worst) vs fastattn.reference.sdpa on float64 copies, float64 autograd for the
            gradients, computed per slice of one batch element and one kv head with its query
            heads (attention_reference.py). Cases too large for every slice (REF_BUDGET float64
            scores, REF_MAX_CHUNKS slices: big GPU cases) check the first slices; the note
            says how many.
  peak MiB  common.peak_memory_bytes over one call after the first: the most allocated at once
            beyond what was allocated before the call (outputs, gradients, saved tensors and
            freed temporaries count; inputs do not). CUDA: max_memory_allocated delta. CPU: the
            running sum of the PyTorch CPU allocator's events under torch.profiler(
            profile_memory=True): exact for tensors (at::empty, Inductor buffers), blind to
            scratch a kernel takes from malloc directly (a lower bound for such kernels). An
            unfused forward holds at least common.attention_scores_bytes(B, H, L, S).
  vs X      baseline time / fastattn time, for baselines that ran in the same case and mode.

Cases. CPU (2 vCPUs here; 16 cases sized so the full run stays near 5 minutes: each compiles
two graphs and the unfused impls take 10-20 calls of up to ~1 s): fp32 and bf16 of B=4 H=16
L=S=128; B=2 H=8 L=S=512 without mask, causal, with a float padding mask (B,1,1,S) and with a
bool keep-mask (B,1,L,S) (padding and causal, as Hugging Face builds it); B=1 H=8 L=S=1024
causal. fp32 only: B=1 H=8 L=S=512 E=128; B=1 H=8 L=S=2048 causal; GQA B=1 H=16 over 4 kv
heads L=S=512 causal; decode-like B=4 H=16 L=1 S=2048 (per-call overhead). E=64 unless said.
GPU: bf16 and fp16, B*L = 16384 tokens x 16 heads, L in 512..16384, E in {64, 128}, causal and
not; in bf16 float-mask, bool-mask, GQA and decode (L=1, S=8192) cases. Masks keep each batch's
first len_b >= S/2 keys (no fully masked row). `quick` keeps a few cases per device.

As a script: `python -m fastattn.cli bench --ops attention` (or `--ops sdpa`). Under
pytest-benchmark: `pytest benchmarks/bench_attention.py --benchmark-only` (quick CPU cases).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference

from .attention_reference import errors, reference64
from .common import (attention_flops, peak_memory_bytes, resolve_device, run_cases,
                     tflops, time_interleaved)
from .report import Row

MODES = ("fwd", "fwd+bwd")
# GPU baselines: row name suffix -> torch.nn.attention.SDPBackend member
GPU_SDPA_BACKENDS = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION",
                     "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
BASELINES = ("torch.sdpa", "eager", "compile",
             *(f"torch.sdpa:{n}" for n in GPU_SDPA_BACKENDS), "flash_attn")
MASKS = ("none", "causal", "float", "bool")
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration: q (B, H, L, E), k and v (B, Hkv, S, E), Hkv = kv_heads or H
    (GQA when smaller: query head h uses kv head h // (H / Hkv)). mask: "none", "causal"
    (is_causal=True), "float" (additive 0 / -inf padding mask (B, 1, 1, S) in q's dtype) or
    "bool" (keep-mask (B, 1, L, S): padding and causal combined)."""

    B: int
    H: int
    L: int
    S: int
    E: int
    dtype: torch.dtype
    mask: str = "none"
    kv_heads: int | None = None

    def __post_init__(self):
        if self.mask not in MASKS:
            raise ValueError(f"Case.mask must be one of {MASKS}, got {self.mask!r}")
        if self.H % self.hkv:
            raise ValueError(f"Case: kv_heads {self.hkv} must divide H {self.H}")

    @property
    def hkv(self) -> int:
        return self.kv_heads or self.H

    @property
    def group(self) -> int:
        """Query heads per kv head (1 without GQA)."""
        return self.H // self.hkv

    @property
    def gqa(self) -> bool:
        return self.hkv != self.H

    @property
    def causal(self) -> bool:
        return self.mask == "causal"

    @property
    def mask_shape(self) -> tuple[int, ...] | None:
        return {"float": (self.B, 1, 1, self.S), "bool": (self.B, 1, self.L, self.S)}.get(self.mask)

    @property
    def mask_label(self) -> str:
        shape = self.mask_shape
        return self.mask if shape is None else f"{self.mask}({','.join(map(str, shape))})"

    @property
    def shape_label(self) -> str:
        heads = f"{self.H}/{self.hkv}" if self.gqa else str(self.H)
        return f"B{self.B} H{heads} L{self.L} S{self.S} E{self.E}"

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.shape_label.replace(' ', '-').replace('/', 'kv')}-{dt}-{self.mask}"

    def flops(self, mode: str) -> int:
        return attention_flops(self.B, self.H, self.L, self.S, self.E, self.E, self.causal, mode)


def cases(device: str | torch.device = "cpu", quick: bool = False) -> list[Case]:
    """Benchmark cases (the module docstring lists them and says why the CPU list is small)."""
    device = resolve_device(device)
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    if device.type == "cuda":
        if quick:
            return [Case(8, 16, 2048, 2048, 128, bf16, "causal"),
                    Case(2, 16, 8192, 8192, 64, f16),
                    Case(8, 16, 2048, 2048, 128, bf16, "float"),
                    Case(4, 16, 4096, 4096, 128, bf16, "causal", kv_heads=4),
                    Case(16, 16, 1, 8192, 128, bf16)]
        out = [Case(16384 // n, 16, n, n, e, dt, m) for dt in (bf16, f16) for e in (64, 128)
               for n in (512, 1024, 2048, 4096, 8192, 16384) for m in ("none", "causal")]
        out += [Case(16384 // n, 16, n, n, 128, bf16, "float") for n in (1024, 4096)]
        out += [Case(8, 16, 2048, 2048, 128, bf16, "bool")]
        out += [Case(16384 // n, 16, n, n, 128, bf16, "causal", kv_heads=4) for n in (2048, 8192)]
        out += [Case(16, 16, 1, 8192, 128, bf16), Case(16, 32, 1, 8192, 128, bf16, kv_heads=8)]
        return out
    if quick:
        return [Case(2, 8, 512, 512, 64, f32, "causal"), Case(2, 8, 256, 256, 64, bf16, "float"),
                Case(2, 16, 256, 256, 64, f32, "bool", kv_heads=4),
                Case(1, 16, 1, 2048, 64, f32)]
    out = []
    for dt in (f32, bf16):
        out += [Case(4, 16, 128, 128, 64, dt)]
        out += [Case(2, 8, 512, 512, 64, dt, m) for m in MASKS]
        out += [Case(1, 8, 1024, 1024, 64, dt, "causal")]
    out += [Case(1, 8, 512, 512, 128, f32), Case(1, 8, 2048, 2048, 64, f32, "causal"),
            Case(1, 16, 512, 512, 64, f32, "causal", kv_heads=4), Case(4, 16, 1, 2048, 64, f32)]
    return out


def make_inputs(case: Case, device: str | torch.device, seed: int = 0) -> dict:
    """{"q", "k", "v", "mask"}: q (B, H, L, E), k and v (B, Hkv, S, E), N(0, 1) in case.dtype;
    mask None, float (B, 1, 1, S) in case.dtype (0 keep, -inf drop) or bool (B, 1, L, S) (True
    = keep). Each batch keeps its first len_b >= S/2 keys (bool: and j <= i), so every query
    keeps key 0 and the eager composition never gives NaN."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device).to(case.dtype)

    B, L, S = case.B, case.L, case.S
    inputs = {"q": randn(B, case.H, L, case.E), "k": randn(B, case.hkv, S, case.E),
              "v": randn(B, case.hkv, S, case.E), "mask": None}
    if case.mask in ("float", "bool"):
        lens = torch.randint(max(1, S // 2), S + 1, (B,), generator=g, device=device)  # (B,)
        keep = (torch.arange(S, device=device) < lens[:, None]).view(B, 1, 1, S)  # (B, 1, 1, S)
        if case.mask == "float":
            bias = torch.zeros(keep.shape, device=device).masked_fill(~keep, NEG_INF)
            inputs["mask"] = bias.to(case.dtype)  # (B, 1, 1, S)
        else:
            inputs["mask"] = keep & reference.causal_keep(L, S, device)  # (B, 1, L, S)
    return inputs


def make_grad_out(case: Case, device: str | torch.device, seed: int = 1) -> torch.Tensor:
    """Gradient of the output for fwd+bwd: (B, H, L, E) N(0, 1) in case.dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.H, case.L, case.E)
    return torch.randn(shape, generator=g, device=device).to(case.dtype)


# ---- implementations: Impl.fn(q, k, v) -> out, tensors in Impl.layout --------------------------


@dataclasses.dataclass
class Impl:
    fn: Callable
    layout: str = "bhle"  # "bhle": (B, H, L, E); "blhe": (B, L, H, E) (flash_attn)
    skip: str = ""  # why it cannot run this case (then a row with this note, no timing)


def torch_sdpa(q, k, v, mask, causal: bool, gqa: bool):
    """F.scaled_dot_product_attention (the torch.sdpa and compile baselines)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=gqa)


def eager_sdpa(q, k, v, bias, drop, scale: float, group: int):
    """The math composed from PyTorch ops (the eager baseline). q (B, H, L, E), k, v
    (B, H / group, S, E); bias: additive mask or None; drop: bool, True = masked, or None."""
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, L, S)
    if bias is not None:
        s = s + bias
    if drop is not None:
        s = s.masked_fill(drop, NEG_INF)
    return s.softmax(-1) @ v


def eager_masks(case: Case, mask, device) -> tuple:
    """(bias, drop) for eager_sdpa, precomputed: the float mask, and ~keep for a bool mask or
    ~causal_keep (L, S) for a causal case."""
    if case.mask == "float":
        return mask, None
    if case.mask == "bool":
        return None, ~mask  # (B, 1, L, S)
    if case.causal:
        return None, ~reference.causal_keep(case.L, case.S, device)  # (L, S)
    return None, None


def _flash_attn_func() -> Callable | None:
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - ImportError, or a build that does not match torch
        return None
    return flash_attn_func


def fused_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """fastattn backends to time: every available one except "reference", and except "triton"
    on CPU (the interpreter is a test tool); ["reference"] when that leaves none."""
    names = fastattn.available_backends("sdpa", device, dtype)
    fused = [b for b in names if b != "reference" and not (b == "triton" and device.type == "cpu")]
    return fused or ["reference"]


def impls(case: Case, device: torch.device, inputs: dict, backends: list[str],
          baselines) -> dict[str, Impl]:
    """impl name -> Impl. The compile baseline starts from a fresh dynamo cache."""
    mask, causal, gqa = inputs["mask"], case.causal, case.gqa
    fns = {f"fastattn:{b}": Impl(lambda q, k, v, b=b: fastattn.sdpa(
        q, k, v, mask, is_causal=causal, enable_gqa=gqa, backend=b)) for b in backends}
    if device.type != "cuda":
        if "torch.sdpa" in baselines:
            fns["torch.sdpa"] = Impl(lambda q, k, v: torch_sdpa(q, k, v, mask, causal, gqa))
        if "eager" in baselines:
            bias, drop = eager_masks(case, mask, device)
            scale, group = case.E ** -0.5, case.group
            fns["eager"] = Impl(lambda q, k, v: eager_sdpa(q, k, v, bias, drop, scale, group))
        if "compile" in baselines:
            torch._dynamo.reset()  # no recompile limit, no stale guards
            compiled = torch.compile(torch_sdpa, dynamic=False)
            fns["compile"] = Impl(lambda q, k, v: compiled(q, k, v, mask, causal, gqa))
        return fns
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, member in GPU_SDPA_BACKENDS.items():
        backend = getattr(SDPBackend, member, None)  # CUDNN_ATTENTION: torch >= 2.5
        if f"torch.sdpa:{name}" in baselines and backend is not None:
            def fn(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return torch_sdpa(q, k, v, mask, causal, gqa)
            fns[f"torch.sdpa:{name}"] = Impl(fn)
    flash = _flash_attn_func() if "flash_attn" in baselines else None
    if flash is not None:
        fns["flash_attn"] = Impl(lambda q, k, v: flash(q, k, v, causal=causal), "blhe",
                                 "flash_attn_func takes no attention mask" if mask is not None
                                 else "")
    return fns


# ---- running ------------------------------------------------------------------------------------


def _layout_args(inputs: dict, grad_out, layout: str, mode: str) -> tuple[list, object]:
    """([q, k, v], grad_out) in `layout`; for fwd+bwd q, k, v are new leaves requiring grad."""
    qkv = [inputs[n] for n in "qkv"]
    if layout == "blhe":
        qkv = [t.transpose(1, 2).contiguous() for t in qkv]  # (B, L, H, E)
        grad_out = None if grad_out is None else grad_out.transpose(1, 2).contiguous()
    if mode == "fwd+bwd":
        qkv = [t.detach().clone().requires_grad_() for t in qkv]
    return qkv, grad_out


def _step(fn: Callable, qkv: list, grad_out, mode: str) -> Callable[[], torch.Tensor]:
    """One timed call: the forward, or (fwd+bwd) .grad reset, forward and backward."""
    if mode == "fwd":
        return lambda: fn(*qkv)

    def step():
        for t in qkv:
            t.grad = None
        out = fn(*qkv)
        out.backward(grad_out)
        return out
    return step


def _results(out: torch.Tensor, qkv: list, layout: str, mode: str) -> dict:
    """{"out"[, "grad_q", "grad_k", "grad_v"]} in (B, H, L, E) layout."""
    back = (lambda t: t.transpose(1, 2)) if layout == "blhe" else (lambda t: t)
    res = {"out": back(out.detach())}
    if mode == "fwd+bwd":
        res |= {f"grad_{n}": back(t.grad) for n, t in zip("qkv", qkv)}
    return res


def _first_call(step: Callable) -> torch.Tensor:
    """step(), holding back torch's warnings: re-issued on success, returned with the error
    (torch explains a refused SDPA backend in warnings before raising)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = step()
        except Exception as e:  # reported by the caller (with the warnings)
            e.warnings = [str(w.message).split(" (Triggered internally")[0] for w in caught]
            raise
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


# what torch's SDPA raises when the backends allowed by sdpa_kernel cannot run a case (CUDA;
# CPU, torch 2.14)
_NO_SDPA_KERNEL = ("No available kernel", "No viable backend")


def _failure_note(name: str, e: Exception) -> str:
    """"skipped: <torch's reasons>" for a torch.sdpa:<backend> baseline that refuses the case,
    else "failed: <error>"."""
    msg = (str(e).splitlines() or [""])[0]
    why = [w for w in getattr(e, "warnings", []) if "not used because" not in w]
    if name.startswith("torch.sdpa:") and any(m in msg for m in _NO_SDPA_KERNEL):
        return "skipped: " + ("; ".join(why) or msg)[:120]
    return f"failed: {type(e).__name__}: {msg[:100]}"


def run_case(case: Case, device: torch.device, backends: list[str] | None = None,
             baselines=BASELINES, modes=MODES, warmup=None, rep=None) -> list[Row]:
    """Time every implementation of one case in each mode (per mode interleaved, see
    common.time_interleaved); rows carry TFLOP/s, ratios vs the baselines measured in the same
    mode, errors vs float64 and the peak memory of one call."""
    device = torch.device(device)
    inputs = make_inputs(case, device)
    grad_out = make_grad_out(case, device) if "fwd+bwd" in modes else None
    backends = fused_backends(device, case.dtype) if backends is None else backends
    fns = impls(case, device, inputs, backends, baselines)
    chunks = reference64(case, inputs, grad_out)  # out (and grads): fwd uses "out" only
    coverage = ("" if len(chunks) == case.B * case.hkv else
                f"err on {len(chunks)} of {case.B * case.hkv} (batch, kv-head) slices")
    threads = torch.get_num_threads() if device.type == "cpu" else None
    rows: list[Row] = []
    for mode in modes:
        mode_rows, steps, args = {}, {}, {}
        for name, impl in fns.items():
            row = mode_rows[name] = Row(
                op=f"attention {mode}", shape=case.shape_label,
                dtype=str(case.dtype).removeprefix("torch."), mask=case.mask_label, impl=name,
                median_ms=None, threads=threads, device=str(device))
            if impl.skip:
                row.note = f"skipped: {impl.skip}"
                continue
            if impl.layout not in args:
                args[impl.layout] = _layout_args(inputs, grad_out, impl.layout, mode)
            qkv, g_out = args[impl.layout]
            step = _step(impl.fn, qkv, g_out, mode)
            try:
                out = _first_call(step)  # the first call also compiles the compile baseline
            except Exception as e:  # noqa: BLE001 - a failing impl must not stop the run
                row.note = _failure_note(name, e)
                print(f"attention {case.id} {mode} {name}: {row.note}", file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            row.max_err, worst = errors(_results(out, qkv, impl.layout, mode), chunks, case)
            del out
            for t in qkv:
                t.grad = None
            peak = peak_memory_bytes(step, device)
            row.peak_mib = None if peak is None else peak / 2**20
            notes = [f"max err: {worst}"] * (mode == "fwd+bwd") + [coverage] * bool(coverage)
            notes += ["unfused reference math"] * (name == "fastattn:reference")
            notes += ["peak: not measurable here"] * (peak is None)
            row.note = "; ".join(notes)
            steps[name] = step
        for name, t in time_interleaved(steps, device=device, warmup=warmup, rep=rep).items():
            row = mode_rows[name]
            row.median_ms, row.p20_ms, row.p80_ms = t["median_ms"], t["p20_ms"], t["p80_ms"]
            row.tflops = tflops(case.flops(mode), row.median_ms)
        base_ms = {n: r.median_ms for n, r in mode_rows.items() if n in BASELINES and r.median_ms}
        for name, row in mode_rows.items():
            if name.startswith("fastattn:") and row.median_ms:
                row.ratios = {b: ms / row.median_ms for b, ms in base_ms.items()}
        rows += mode_rows.values()
        del steps, args
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(device: str | torch.device = "cpu", quick: bool = False,
        backends: list[str] | None = None, baselines=BASELINES) -> list[Row]:
    """Benchmark every case of `cases(device, quick)` in both modes; returns the rows, fwd
    rows first, then fwd+bwd (per case: fastattn backends first, then the baselines).
    backends: fastattn backends to time (default: see fused_backends)."""
    rows = run_cases(device, quick, cases, lambda case, dev, _peak, warmup, rep: run_case(
        case, dev, backends, baselines, MODES, warmup, rep), with_peak=False)
    order = {f"attention {m}": i for i, m in enumerate(MODES)}
    return sorted(rows, key=lambda r: order[r.op])


# ---- pytest-benchmark: `pytest benchmarks/bench_attention.py --benchmark-only` ----------------

try:
    import pytest
except ImportError:  # installed package without pytest: the CLI path still works
    pytest = None

if pytest is not None:
    _QUICK = [(c, m) for c in cases("cpu", quick=True) for m in MODES]

    @pytest.fixture(params=_QUICK, ids=[f"{c.id}-{m}" for c, m in _QUICK])
    def case_mode(request) -> tuple[Case, str]:
        return request.param

    def _bench(benchmark, case: Case, mode: str, impl: str) -> None:
        device = torch.device("cpu")
        inputs = make_inputs(case, device)
        backends = fused_backends(device, case.dtype)[:1]
        name = f"fastattn:{backends[0]}" if impl == "fastattn" else impl
        fn = impls(case, device, inputs, backends, (impl,))[name].fn
        qkv, g_out = _layout_args(inputs, make_grad_out(case, device), "bhle", mode)
        benchmark.group = f"{case.id}-{mode}"
        benchmark(_step(fn, qkv, g_out, mode))
        benchmark.extra_info["flops"] = case.flops(mode)
        benchmark.extra_info["threads"] = torch.get_num_threads()
        benchmark.extra_info["impl"] = name

    def test_attention_fastattn(benchmark, case_mode):
        _bench(benchmark, *case_mode, "fastattn")

    def test_attention_eager(benchmark, case_mode):
        _bench(benchmark, *case_mode, "eager")

    def test_attention_torch_sdpa(benchmark, case_mode):
        _bench(benchmark, *case_mode, "torch.sdpa")
