"""Which implementation runs an op: the backend table, `use_backend`, and `explain`.

Backends: "cuda" (C++/CUDA kernels), "triton" (Triton kernels; CPU tensors only under
TRITON_INTERPRET=1, for tests), "cpu" (vectorized C++), "reference" (plain PyTorch math).
Choice, first match wins: the call's `backend=` argument, then the innermost
`fastattn.use_backend(...)`, then the default order for the tensors' device. A backend
named explicitly that cannot serve the call raises BackendError with the reason; the default
order falls through to the next backend and records why, which `explain` shows and the
"fastattn" logger reports at DEBUG level (once per op, device type and dtypes: choices are
cached, since they depend on nothing else).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import _library

BACKENDS = ("cuda", "triton", "cpu", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The fused backend that serves CUDA tensors first, per op. Each entry must cite the benchmark
# that decided it. softmax, layer_norm, rms_norm: no GPU run yet (this project's first GPU
# results will decide); "cuda" until then. sdpa: the same (no GPU run yet); the CUDA kernels
# take fp16/bf16 with head dims 32-256 (fastattn/ops/sdpa.py), everything else goes to Triton.
# int8_linear, int4_linear, w8a8_linear, quantize_per_token_int8: no GPU run yet either; the
# CUDA weight-only kernels run float32 activations with M > 8 as repeated GEMVs (Triton has a
# real float32 GEMM there), which the first GPU benchmark should settle. decode_attention: no GPU
# run either; the CUDA kernel takes fp16/bf16 with E == Ev in {64, 128, 256}, the rest runs on
# Triton. fastattn.attention shares sdpa's operators and therefore its entry.
GPU_PREFERENCE: dict[str, tuple[str, str]] = {
    "sdpa": ("cuda", "triton"),
    "decode_attention": ("cuda", "triton"),
    "int8_linear": ("cuda", "triton"),
    "int4_linear": ("cuda", "triton"),
    "w8a8_linear": ("cuda", "triton"),
    "quantize_per_token_int8": ("cuda", "triton"),
    "softmax": ("cuda", "triton"),
    "layer_norm": ("cuda", "triton"),
    "rms_norm": ("cuda", "triton"),
}

_log = logging.getLogger("fastattn")
_forced: list[str] = []


class BackendError(RuntimeError):
    """A backend named explicitly cannot run the call (the message says why)."""


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run fastattn ops inside the block on backend `name` (one of BACKENDS) unless a call
    passes its own `backend=`. Nested blocks: the innermost wins."""
    _check_name(name, "use_backend")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _check_name(name: str, where: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"fastattn.{where}: backend must be one of {BACKENDS}, got {name!r}")


@functools.cache
def triton_error() -> str | None:
    """None when Triton can be imported, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    return None


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_error(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run `op` on tensors of this device and dtype (None if it can)."""
    if backend == "reference":
        return None
    if dtype not in KERNEL_DTYPES:
        return f"its kernels take float32, float16 or bfloat16, not {dtype}"
    if backend == "triton":
        if triton_error() is not None:
            return triton_error()
        if device.type == "cpu" and not interpreting_triton():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels run on CUDA tensors, not {device.type}"
        return None
    key = {"cpu": "CPU", "cuda": "CUDA"}[backend]
    if device.type != backend:
        return f"the tensors are on {device.type}, the {backend} backend needs {backend} tensors"
    if not _library.has_kernel(op, key):
        return _library.load_error() or f"fastattn._C was built without {backend} kernels"
    return None


@dataclass(frozen=True)
class Choice:
    backend: str
    why: str


def default_order(op: str, device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return GPU_PREFERENCE.get(op, ("cuda", "triton")) + ("reference",)
    if device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


_choices: dict[tuple, Choice] = {}


def choose(op: str, requested: str | None, device: torch.device,
           unsupported: Callable[[str], str | None], key: tuple = ()) -> Choice:
    """Pick the backend for one call. `unsupported(name)` says why a backend cannot serve it;
    `key` holds everything else `unsupported` depends on (dtypes), so a choice, which is fixed
    for a given device type, request and key, is made once (errors are raised every time)."""
    if requested is None and _forced:
        requested, source = _forced[-1], "fastattn.use_backend"
    else:
        source = "backend="
    cache_key = (op, device.type, requested, source) + key
    choice = _choices.get(cache_key)
    if choice is None:
        choice = _choices[cache_key] = _decide(op, requested, source, device, unsupported)
    return choice


def _decide(op: str, requested: str | None, source: str, device: torch.device,
            unsupported: Callable[[str], str | None]) -> Choice:
    if requested is not None:
        _check_name(requested, op)
        reason = unsupported(requested)
        if reason is not None:
            raise BackendError(f"fastattn.{op}: backend {requested!r} cannot run this call: {reason}")
        return Choice(requested, f"{source}{requested!r}")
    return _choose_default(op, device, unsupported)


def _choose_default(op: str, device: torch.device,
                    unsupported: Callable[[str], str | None]) -> Choice:
    skipped = []
    for name in default_order(op, device):
        reason = unsupported(name)
        if reason is None:
            why = f"default for {device.type} tensors"
            if skipped:
                why += " after skipping " + "; ".join(skipped)
                if not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
                    _log.debug("fastattn.%s: backend %r (%s)", op, name, why)
            return Choice(name, why)
        skipped.append(f"{name}: {reason}")
    raise AssertionError("the reference backend serves every call")


_PLANNERS: dict[str, Callable[..., Choice]] = {}


def register_planner(op: str, planner: Callable[..., Choice]) -> None:
    _PLANNERS[op] = planner


def explain(op: str, *args, **kwargs) -> str:
    """Which backend `fastattn.<op>(*args, **kwargs)` would run, and why; runs no kernel.

    >>> fastattn.explain("softmax", torch.randn(4, 8))
    "softmax: backend 'cpu' (default for cpu tensors)"
    """
    if op not in _PLANNERS:
        raise ValueError(f"fastattn.explain: unknown op {op!r}; known: {sorted(_PLANNERS)}")
    choice = _PLANNERS[op](*args, **kwargs)
    return f"{op}: backend {choice.backend!r} ({choice.why})"


def available_backends(op: str, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> list[str]:
    """The backends that can run `op` for tensors of this device and dtype here."""
    device = torch.device(device)
    return [b for b in BACKENDS if device_error(b, op, device, dtype) is None]
