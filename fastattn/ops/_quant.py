"""What the quantized linears share: argument checks, fake (meta) kernels, the inference-only
autograd guard, backend choice and the call into an operator. The public functions live in
int8_linear.py, int4_linear.py and w8a8_linear.py; the formats in fastattn/quant_formats.py.

Operators (schemas in kernels/registration.cpp), x always (M, K) contiguous:
  fastattn::int8_weight_linear(x, weight, scale, bias) -> y
  fastattn::int4_weight_linear(x, packed, scale, zero, group_size, bias) -> y
  fastattn::quantize_per_token_int8(x) -> (xq, x_scale)
  fastattn::int8_scaled_mm(xq, x_scale, weight, w_scale, bias, out_dtype) -> y
CPU and CUDA kernels (C++) under those names; Triton twins fastattn::<op>_triton
(kernels/triton/int8_linear.py, int4_linear.py, w8a8.py).
"""

from __future__ import annotations

import importlib

import torch

from .. import _library, backends

RAW_OPS = ("int8_weight_linear", "int4_weight_linear", "quantize_per_token_int8",
           "int8_scaled_mm")
_TRITON_MODULE = {"int8_weight_linear": "int8_linear", "int4_weight_linear": "int4_linear",
                  "quantize_per_token_int8": "w8a8", "int8_scaled_mm": "w8a8"}


# ---- fake (meta) kernels: shapes and dtypes only, checks as in quant_host.h ---------------------

def _fake_linear(x, n: int, out_dtype: torch.dtype) -> torch.Tensor:
    torch._check(x.dim() == 2, lambda: "fastattn quantized linear: x must be 2-d (M, K)")
    return x.new_empty((x.shape[0], n), dtype=out_dtype)


def _fake_int8_weight_linear(x, weight, scale, bias):
    torch._check(weight.dtype == torch.int8, lambda: "fastattn::int8_weight_linear: weight must be int8")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: "fastattn::int8_weight_linear: weight must have shape (N, K)")
    return _fake_linear(x, weight.shape[0], x.dtype)


def _fake_int4_weight_linear(x, packed, scale, zero, group_size, bias):
    torch._check(packed.dtype == torch.uint8, lambda: "fastattn::int4_weight_linear: packed must be uint8")
    torch._check(packed.dim() == 2 and packed.shape[1] * 2 == x.shape[-1],
                 lambda: "fastattn::int4_weight_linear: packed must have shape (N, K / 2)")
    return _fake_linear(x, packed.shape[0], x.dtype)


def _fake_quantize_per_token_int8(x):
    torch._check(x.dim() == 2, lambda: "fastattn::quantize_per_token_int8: x must be 2-d (M, K)")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def _fake_int8_scaled_mm(xq, x_scale, weight, w_scale, bias, out_dtype):
    torch._check(weight.dim() == 2 and weight.shape[1] == xq.shape[-1],
                 lambda: "fastattn::int8_scaled_mm: weight must have shape (N, K)")
    return _fake_linear(xq, weight.shape[0], out_dtype)


_FAKES = {"int8_weight_linear": _fake_int8_weight_linear,
          "int4_weight_linear": _fake_int4_weight_linear,
          "quantize_per_token_int8": _fake_quantize_per_token_int8,
          "int8_scaled_mm": _fake_int8_scaled_mm}


# ---- autograd: inference only --------------------------------------------------------------------

class InferenceOnlyError(RuntimeError):
    """A quantized linear was asked for a gradient."""


def _no_backward(op: str):
    def backward(ctx, *grads):
        raise InferenceOnlyError(
            f"fastattn.{op} is inference-only and has no backward: train or fine-tune the float "
            "model and quantize it afterwards (fastattn.quantize), or run the quantized model "
            "under torch.no_grad() / torch.inference_mode()")
    return backward


def _register(qualname: str, raw: str, fake: bool) -> None:
    if fake:
        torch.library.register_fake(qualname)(_FAKES[raw])
    torch.library.register_autograd(qualname, _no_backward(raw))


for _op in RAW_OPS:
    for _key in ("CPU", "CUDA"):
        _library.has_kernel(_op, _key)
    if _library.load_error() is None and hasattr(torch.ops.fastattn, _op):
        _register(f"fastattn::{_op}", _op, fake=True)

_triton_ops: dict[str, object] = {}


def triton_op(raw: str):
    """fastattn::<raw>_triton, imported (and Triton with it) on first use."""
    if raw not in _triton_ops:
        module = importlib.import_module(f"fastattn._triton.{_TRITON_MODULE[raw]}")
        fn = getattr(module, f"{raw}_triton")
        _register(f"fastattn::{raw}_triton", raw, fake=False)
        _triton_ops[raw] = fn
    return _triton_ops[raw]


# ---- argument checks (cheapest first; these run every call) --------------------------------------

def check_activation(op: str, x, K: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastattn.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"fastattn.{op}: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"fastattn.{op}: x must have shape (..., in_features={K}), got "
                         f"{tuple(x.shape)}")


def check_tensor(op: str, name: str, t, shape: tuple[int, ...], dtype: torch.dtype,
                 x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastattn.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"fastattn.{op}: {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"fastattn.{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"fastattn.{op}: {name} is on {t.device} but x is on {x.device}")


def check_bias(op: str, bias, N: int, x: torch.Tensor) -> torch.Tensor | None:
    """bias: None or (N,) floating on x's device; returned in x's dtype (as the kernels read it)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"fastattn.{op}: bias must be a floating tensor or None, got "
                        f"{getattr(bias, 'dtype', type(bias).__name__)}")
    if tuple(bias.shape) != (N,):
        raise ValueError(f"fastattn.{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"fastattn.{op}: bias is on {bias.device} but x is on {x.device}")
    return bias.to(x.dtype)


def check_int8_weight(op: str, weight, scale, x: torch.Tensor) -> int:
    """weight int8 (N, K), scale float32 (N,); returns N."""
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
        raise TypeError(f"fastattn.{op}: weight must be a 2-d int8 tensor (out_features, "
                        f"in_features), got {getattr(weight, 'dtype', type(weight).__name__)}"
                        f"{' shape ' + str(tuple(weight.shape)) if isinstance(weight, torch.Tensor) else ''}")
    check_activation(op, x, weight.shape[1])
    N = weight.shape[0]
    check_tensor(op, "weight", weight, (N, x.shape[-1]), torch.int8, x)
    check_tensor(op, "scale", scale, (N,), torch.float32, x)
    return N


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast, x in the autocast dtype (as F.linear would compute)."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(dev))
    return x


# ---- backend choice and the call -----------------------------------------------------------------

def choose(op: str, raw: str, x: torch.Tensor, backend: str | None) -> backends.Choice:
    """The backend for a call: only x's device and dtype matter."""
    return backends.choose(op, backend, x.device,
                           lambda name: backends.device_error(name, raw, x.device, x.dtype),
                           (x.dtype,))


def run(raw: str, choice: backends.Choice, *args):
    """fastattn::<raw> (or its Triton twin) on already-checked arguments. Goes through autograd
    only when an input wants a gradient (whose backward then raises InferenceOnlyError)."""
    fn = triton_op(raw) if choice.backend == "triton" else getattr(torch.ops.fastattn, raw).default
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return fn(*args) if needs_grad else _library.call_without_autograd(fn, *args)
