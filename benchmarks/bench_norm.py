"""Benchmark of fastattn's LayerNorm / RMSNorm ops (layer_norm, rms_norm, add_layer_norm,
add_rms_norm) against what users write instead, forward and forward + backward.

Implementations timed in the same run, per case and mode:
  fastattn:<backend>  fastattn.<op>(x, [residual,] (N,), weight, [bias,] eps, backend=<backend>)
  eager               torch.nn.functional.layer_norm / rms_norm; the add_* ops are
                      `s = x + residual; (F.<norm>(s, ...), s)`.
  compile             torch.compile(eager, dynamic=False), compiled once per case (a forward
                      graph, and a forward + backward graph the first time inputs require grad).
  apex                apex.normalization.fused_layer_norm.fused_layer_norm_affine /
                      fused_rms_norm_affine (CUDA, when apex imports; add_*: s = x + residual
                      first).
  liger               liger_kernel.transformers.functional.liger_layer_norm / liger_rms_norm
                      (CUDA, when liger_kernel imports; in_place=False, casting_mode "llama";
                      add_*: s = x + residual first).
apex and liger rows are simply absent where the package does not import.

Modes (the Row's op is "<op> fwd" or "<op> fwd+bwd", so tables and summaries keep them apart):
  fwd      inputs that do not require grad; one call.
  fwd+bwd  x, residual, weight and bias require grad; one call runs the forward and
           torch.autograd.backward(outputs, grads) with fixed random grads (for add_* one for
           each output), every .grad set to None first so that no impl pays for accumulation.
GB/s uses the bytes of the row's own mode: common.norm_bytes (fwd) or common.norm_fwd_bwd_bytes
(fwd+bwd). Max error: fwd, max |out - ref| over the outputs; fwd+bwd, max over the outputs and
every gradient against float64 autograd through fastattn.reference (the note names the tensor
that holds the maximum). Weight (and bias for LayerNorm) are in x's dtype; eps 1e-5 for
LayerNorm, torch's RMSNorm default torch.finfo(float32).eps for RMSNorm (passed explicitly, so
the float64 reference uses the same value). Normalization is over the last dim.

Cases: GPU, rows of 4096 x {512, ..., 16384} and odd sizes (4096 x 4097, 8192 x 1000,
1 x 65536, and a decode-sized 1 x 4096 that shows per-call overhead) for layer_norm and
rms_norm, fewer for the add_* ops, in bfloat16, float16 and float32. CPU: a smaller list (each
case compiles two graphs, seconds each on a 2-core machine, and the full run should take a few
minutes): float32 on 4096 x {512, 2048, 8192}, 1024 x 4097, 8192 x 1000, 1 x 65536 and 1 x 4096,
bfloat16 on three of them, add_* on 4096 x 2048 (add_rms_norm also 1 x 4096), both dtypes.
`quick` keeps four cases per device.

As a script: `python -m fastattn.cli bench --ops norm`. Under pytest-benchmark:
`pytest benchmarks/bench_norm.py --benchmark-only` (the quick CPU cases, both modes).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference

from .common import (gbs, max_error, norm_bytes, norm_fwd_bwd_bytes, resolve_device, run_cases,
                     time_interleaved)
from .report import Row

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
MODES = ("fwd", "fwd+bwd")
BASELINES = ("eager", "compile", "apex", "liger")


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration: op (one of OPS) on x of shape (R, N), normalized over N, with
    weight (and bias for LayerNorm) of shape (N,) in x's dtype; add_* ops add a residual of
    x's shape."""

    op: str
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def norm(self) -> str:
        """"layer_norm" or "rms_norm": the backend table's op name."""
        return self.op.removeprefix("add_")

    @property
    def residual(self) -> bool:
        return self.op.startswith("add_")

    @property
    def bias(self) -> bool:
        return self.norm == "layer_norm"

    @property
    def eps(self) -> float:
        """F.layer_norm's default 1e-5; F.rms_norm's default eps (None) is float32's epsilon."""
        return 1e-5 if self.bias else torch.finfo(torch.float32).eps

    @property
    def params_label(self) -> str:
        return "+".join(["residual"] * self.residual + ["weight"] + ["bias"] * self.bias)

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.op}-{'x'.join(map(str, self.shape))}-{dt}"


def cases(device: str | torch.device = "cpu", quick: bool = False) -> list[Case]:
    """Benchmark cases (see the module docstring for the lists and why the CPU one is
    smaller)."""
    device = resolve_device(device)
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    if device.type == "cuda":
        if quick:
            return [Case("layer_norm", (4096, 4096), bf16), Case("rms_norm", (4096, 4096), f32),
                    Case("add_rms_norm", (4096, 4096), bf16), Case("rms_norm", (1, 4096), bf16)]
        dtypes = (bf16, f16, f32)
        norm_shapes = [(4096, n) for n in (512, 1024, 2048, 4096, 8192, 16384)]
        norm_shapes += [(4096, 4097), (8192, 1000), (1, 65536), (1, 4096)]
        per_op = {"layer_norm": norm_shapes, "rms_norm": norm_shapes,
                  "add_rms_norm": [(4096, 1024), (4096, 4096), (4096, 8192), (4096, 4097),
                                   (1, 4096)],
                  "add_layer_norm": [(4096, 1024), (4096, 4096), (1, 4096)]}
        return [Case(op, s, dt) for op, shapes in per_op.items() for s in shapes for dt in dtypes]
    if quick:
        return [Case("layer_norm", (4096, 512), f32), Case("rms_norm", (1024, 4097), bf16),
                Case("add_rms_norm", (4096, 512), bf16), Case("rms_norm", (1, 4096), f32)]
    fp32_shapes = [(4096, 512), (4096, 2048), (4096, 8192), (1024, 4097), (8192, 1000),
                   (1, 65536), (1, 4096)]
    bf16_shapes = [(4096, 2048), (1024, 4097), (1, 4096)]
    out = []
    for op in ("layer_norm", "rms_norm"):
        out += [Case(op, s, f32) for s in fp32_shapes] + [Case(op, s, bf16) for s in bf16_shapes]
    for op, shapes in (("add_rms_norm", [(4096, 2048), (1, 4096)]),
                       ("add_layer_norm", [(4096, 2048)])):
        out += [Case(op, s, dt) for s in shapes for dt in (f32, bf16)]
    return out


def make_inputs(case: Case, device: str | torch.device, seed: int = 0) -> dict:
    """{"x", "residual", "weight", "bias"} for a case (absent ones None), all in case.dtype.
    x, residual: (R, N) N(0, 1); weight: (N,) 1 + 0.1 N(0, 1); bias: (N,) 0.1 N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = case.shape[-1]

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device)

    return {"x": randn(*case.shape).to(case.dtype),  # (R, N)
            "residual": randn(*case.shape).to(case.dtype) if case.residual else None,  # (R, N)
            "weight": (1 + 0.1 * randn(n)).to(case.dtype),  # (N,)
            "bias": (0.1 * randn(n)).to(case.dtype) if case.bias else None}  # (N,)


def make_grads(case: Case, device: str | torch.device, seed: int = 1) -> tuple:
    """Gradients of the outputs for fwd+bwd: (grad_out,) or, for add_*, (grad_out,
    grad_residual_out); (R, N) N(0, 1) in case.dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(case.shape, generator=g, device=device).to(case.dtype)
                 for _ in range(1 + case.residual))


# ---- implementations: fn(x, residual, weight, bias, eps) -> tuple of outputs -------------------


def eager_layer_norm(x, residual, weight, bias, eps):
    return (F.layer_norm(x, x.shape[-1:], weight, bias, eps),)


def eager_rms_norm(x, residual, weight, bias, eps):
    return (F.rms_norm(x, x.shape[-1:], weight, eps),)


def eager_add_layer_norm(x, residual, weight, bias, eps):
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps), s


def eager_add_rms_norm(x, residual, weight, bias, eps):
    s = x + residual
    return F.rms_norm(s, s.shape[-1:], weight, eps), s


EAGER = {"layer_norm": eager_layer_norm, "rms_norm": eager_rms_norm,
         "add_layer_norm": eager_add_layer_norm, "add_rms_norm": eager_add_rms_norm}


def fastattn_fn(op: str, backend: str) -> Callable:
    """fastattn.<op> on `backend` with the uniform signature."""
    f = getattr(fastattn, op)
    ln = op.endswith("layer_norm")

    def fn(x, residual, weight, bias, eps):
        lead = (x,) if residual is None else (x, residual)
        params = (weight, bias) if ln else (weight,)
        out = f(*lead, x.shape[-1:], *params, eps, backend=backend)
        return out if isinstance(out, tuple) else (out,)
    return fn


def _with_residual(norm: Callable) -> Callable:
    """norm(s, weight, bias, eps) -> out, as fn(x, residual, ...) with s = x + residual."""
    def fn(x, residual, weight, bias, eps):
        if residual is None:
            return (norm(x, weight, bias, eps),)
        s = x + residual
        return norm(s, weight, bias, eps), s
    return fn


def apex_fn(op: str) -> Callable | None:
    """apex's functional fused LayerNorm / RMSNorm, or None when apex does not import."""
    try:
        from apex.normalization.fused_layer_norm import (fused_layer_norm_affine,
                                                         fused_rms_norm_affine)
    except Exception:  # noqa: BLE001 - ImportError, or apex built without its CUDA extension
        return None
    if op.endswith("layer_norm"):
        return _with_residual(lambda s, w, b, eps: fused_layer_norm_affine(
            s, w, b, s.shape[-1:], eps))
    return _with_residual(lambda s, w, b, eps: fused_rms_norm_affine(s, w, s.shape[-1:], eps))


def liger_fn(op: str) -> Callable | None:
    """Liger's functional LayerNorm / RMSNorm, or None when liger_kernel does not import."""
    try:
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm
    except Exception:  # noqa: BLE001 - ImportError or a Triton/transformers mismatch
        return None
    if op.endswith("layer_norm"):
        return _with_residual(lambda s, w, b, eps: liger_layer_norm(s, w, b, eps))
    return _with_residual(lambda s, w, b, eps: liger_rms_norm(s, w, eps, 0.0, "llama", False))


def fused_backends(op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """fastattn backends to time for "layer_norm" / "rms_norm": every available one except
    "reference", and except "triton" on CPU (as bench_softmax.fused_backends)."""
    names = fastattn.available_backends(op, device, dtype)
    return [b for b in names if b != "reference" and not (b == "triton" and device.type == "cpu")]


def impls(case: Case, device: torch.device, backends: list[str], baselines) -> dict:
    """impl name -> fn(x, residual, weight, bias, eps) -> tuple of outputs. The compile
    baseline starts from a fresh dynamo cache (no recompile limit, no stale guards)."""
    fns = {f"fastattn:{b}": fastattn_fn(case.op, b) for b in backends}
    if "eager" in baselines:
        fns["eager"] = EAGER[case.op]
    if "compile" in baselines:
        torch._dynamo.reset()
        fns["compile"] = torch.compile(EAGER[case.op], dynamic=False)
    if device.type == "cuda":
        for name, make in (("apex", apex_fn), ("liger", liger_fn)):
            fn = make(case.op) if name in baselines else None
            if fn is not None:
                fns[name] = fn
    return fns


# ---- float64 reference, errors ------------------------------------------------------------------

_OUT_NAMES = ("out", "residual_out")
_GRAD_NAMES = ("grad_x", "grad_residual", "grad_weight", "grad_bias")


def _ref_call(case: Case, x, residual, weight, bias):
    f = getattr(reference, case.op)
    lead = (x,) if residual is None else (x, residual)
    params = (weight, bias) if case.bias else (weight,)
    out = f(*lead, x.shape[-1:], *params, case.eps)
    return out if isinstance(out, tuple) else (out,)


def reference64(case: Case, inputs: dict, grads: tuple | None = None) -> dict:
    """Float64 results through fastattn.reference: name -> tensor for the outputs and, when
    grads are given, the gradients of x, residual, weight and bias (float64 autograd)."""
    leaves = {k: None if v is None else v.double().requires_grad_(grads is not None)
              for k, v in inputs.items()}
    with torch.set_grad_enabled(grads is not None):
        outs = _ref_call(case, leaves["x"], leaves["residual"], leaves["weight"], leaves["bias"])
        if grads is not None:
            torch.autograd.backward(outs, [g.double() for g in grads])
    res = {n: o.detach() for n, o in zip(_OUT_NAMES, outs)}
    if grads is not None:
        res |= {n: t.grad for n, t in zip(_GRAD_NAMES, leaves.values()) if t is not None}
    return res


def errors(results: dict, ref: dict) -> tuple[float, str]:
    """(max error over the tensors of `ref`, the name of the tensor holding it)."""
    errs = {n: max_error(results[n], r) for n, r in ref.items()}
    worst = max(errs, key=lambda n: errs[n])
    return errs[worst], worst


def _fwd_step(fn, inputs, eps):
    args = (inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], eps)
    return lambda: fn(*args)


def _fwd_bwd_step(fn, leaves, grads, eps):
    """Forward + backward in one call; leaves: x, residual, weight, bias (requires_grad, or
    None). Returns the outputs; the gradients are in the leaves' .grad."""
    args = (leaves["x"], leaves["residual"], leaves["weight"], leaves["bias"], eps)
    params = [t for t in leaves.values() if t is not None]

    def step():
        for t in params:
            t.grad = None
        outs = fn(*args)
        torch.autograd.backward(outs, grads)
        return outs
    return step


def _results(mode: str, outs: tuple, leaves: dict) -> dict:
    res = dict(zip(_OUT_NAMES, outs))
    if mode == "fwd+bwd":
        res |= {n: t.grad for n, t in zip(_GRAD_NAMES, leaves.values()) if t is not None}
    return res


# ---- running ------------------------------------------------------------------------------------


def run_case(case: Case, device: torch.device, backends: list[str] | None = None,
             baselines=BASELINES, modes=MODES, peak: float | None = None, warmup=None,
             rep=None) -> list[Row]:
    """Time every implementation of one case in each mode (per mode interleaved, see
    common.time_interleaved); rows carry GB/s, % of peak, ratios vs the baselines measured in
    the same mode and errors vs float64."""
    device = torch.device(device)
    inputs = make_inputs(case, device)
    grads = make_grads(case, device)
    leaves = {k: None if v is None else v.detach().clone().requires_grad_()
              for k, v in inputs.items()}
    backends = fused_backends(case.norm, device, case.dtype) if backends is None else backends
    fns = impls(case, device, backends, baselines)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    x, w, b, r = inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"]
    mode_bytes = {"fwd": norm_bytes(x, w, b, r),
                  "fwd+bwd": norm_fwd_bwd_bytes(x, w, b, r, stats=2 if case.bias else 1)}
    rows: list[Row] = []
    for mode in modes:
        ref = reference64(case, inputs, grads if mode == "fwd+bwd" else None)
        mode_rows, steps = {}, {}
        for name, fn in fns.items():
            row = mode_rows[name] = Row(
                op=f"{case.op} {mode}", shape=str(tuple(case.shape)),
                dtype=str(case.dtype).removeprefix("torch."), mask=case.params_label,
                impl=name, median_ms=None, threads=threads, device=str(device),
                mask_header="params")
            step = (_fwd_step(fn, inputs, case.eps) if mode == "fwd"
                    else _fwd_bwd_step(fn, leaves, grads, case.eps))
            try:
                outs = step()  # the first call also compiles the compile baseline
            except Exception as e:  # noqa: BLE001 - a failing baseline must not stop the run
                row.note = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
                print(f"norm {case.id} {mode} {name}: {row.note}", file=sys.stderr)
                continue
            row.max_err, worst = errors(_results(mode, outs, leaves), ref)
            if mode == "fwd+bwd":
                row.note = f"max err: {worst}"
            steps[name] = step
            del outs
        del ref
        for name, t in time_interleaved(steps, device=device, warmup=warmup, rep=rep).items():
            row = mode_rows[name]
            row.median_ms, row.p20_ms, row.p80_ms = t["median_ms"], t["p20_ms"], t["p80_ms"]
            row.gbs = gbs(mode_bytes[mode], row.median_ms)
            row.pct_of_peak = 100 * row.gbs / peak if peak else None
        base_ms = {n: r.median_ms for n, r in mode_rows.items() if n in BASELINES and r.median_ms}
        for name, row in mode_rows.items():
            if name.startswith("fastattn:") and row.median_ms:
                row.ratios = {b: ms / row.median_ms for b, ms in base_ms.items()}
        rows += mode_rows.values()
    for t in leaves.values():
        if t is not None:
            t.grad = None
    return rows


def run(device: str | torch.device = "cpu", quick: bool = False,
        backends: list[str] | None = None, baselines=BASELINES) -> list[Row]:
    """Benchmark every case of `cases(device, quick)` in both modes; returns the rows
    (per case: fwd rows, then fwd+bwd rows; fastattn backends first, then the baselines).
    backends: fastattn backends to time (default: all available, see fused_backends). The
    copy-bandwidth ceiling is measured first."""
    rows = run_cases(device, quick, cases, lambda case, dev, peak, warmup, rep: run_case(
        case, dev, backends, baselines, MODES, peak, warmup, rep))
    # one table per op and mode, in OPS x MODES order (cases interleave ops)
    order = {f"{op} {mode}": i for i, (op, mode) in
             enumerate((op, mode) for op in OPS for mode in MODES)}
    return sorted(rows, key=lambda r: order[r.op])


# ---- pytest-benchmark: `pytest benchmarks/bench_norm.py --benchmark-only` ---------------------

try:
    import pytest
except ImportError:  # installed package without pytest: the CLI path still works
    pytest = None

if pytest is not None:
    _QUICK = [(c, m) for c in cases("cpu", quick=True) for m in MODES]

    @pytest.fixture(params=_QUICK, ids=[f"{c.id}-{m}" for c, m in _QUICK])
    def case_mode(request) -> tuple[Case, str]:
        return request.param

    def _bench(benchmark, case: Case, mode: str, fn) -> None:
        inputs = make_inputs(case, "cpu")
        if mode == "fwd":
            step = _fwd_step(fn, inputs, case.eps)
        else:
            leaves = {k: None if v is None else v.detach().clone().requires_grad_()
                      for k, v in inputs.items()}
            step = _fwd_bwd_step(fn, leaves, make_grads(case, "cpu"), case.eps)
        benchmark.group = f"{case.id}-{mode}"
        benchmark(step)
        x, w, b, r = inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"]
        benchmark.extra_info["bytes"] = (norm_bytes(x, w, b, r) if mode == "fwd" else
                                         norm_fwd_bwd_bytes(x, w, b, r, 2 if case.bias else 1))
        benchmark.extra_info["threads"] = torch.get_num_threads()

    def test_norm_fastattn(benchmark, case_mode):
        case, mode = case_mode
        _bench(benchmark, case, mode, fastattn_fn(case.op, "cpu"))

    def test_norm_eager(benchmark, case_mode):
        case, mode = case_mode
        _bench(benchmark, case, mode, EAGER[case.op])
