"""fastattn.int8_linear: x @ W^T + bias with W stored as per-channel symmetric int8 (weight-only
quantization; format in fastattn/quant_formats.py). Shared plumbing: fastattn/ops/_quant.py."""

from __future__ import annotations

import torch

from .. import backends, reference
from . import _quant

OP = "int8_linear"


def _plan(x, weight, scale, bias=None, *, backend=None):
    N = _quant.check_int8_weight(OP, weight, scale, x)
    bias = _quant.check_bias(OP, bias, N, x)
    return _quant.choose(OP, "int8_weight_linear", x, backend), N, bias


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """F.linear with an int8 weight-only quantized weight, dequantized inside the kernel.

    Args:
      x: (..., K) float32, float16 or bfloat16 activations, any strides.
      weight: int8 (N, K), from fastattn.quantize_int8_weight (symmetric per output channel).
      scale: float32 (N,): the float weight is weight * scale[:, None].
      bias: (N,) or None, used in x's dtype.
      backend: "cpu", "cuda", "triton" or "reference" to force one (see fastattn.backends).

    Returns:
      (..., N) in x's dtype, accumulated in float32. Inference only: asking for a gradient
      raises InferenceOnlyError.
    """
    x = _quant.autocast_input(x)
    choice, N, bias = _plan(x, weight, scale, bias, backend=backend)
    if choice.backend == "reference":
        dt = reference._compute_dtype(x.dtype)
        return reference.int8_weight_linear(x, weight, scale, bias, dtype=dt).to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    out = _quant.run("int8_weight_linear", choice, x2, weight, scale, bias)  # (M, N)
    return out.view(*x.shape[:-1], N)


backends.register_planner(OP, lambda *a, **k: _plan(*a, **k)[0])
