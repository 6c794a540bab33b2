"""fastattn.int4_linear: x @ W^T + bias with W stored as group-wise asymmetric 4-bit codes, two per
byte (weight-only quantization; format in fastattn/quant_formats.py). Shared plumbing:
fastattn/ops/_quant.py."""

from __future__ import annotations

import torch

from .. import backends, reference
from ..quant_formats import check_group_size
from . import _quant

OP = "int4_linear"


def _plan(x, packed, scale, zero, group_size, bias=None, *, backend=None):
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"fastattn.{OP}: packed must be a 2-d uint8 tensor (out_features, "
                        f"in_features / 2), got {getattr(packed, 'dtype', type(packed).__name__)}")
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] % 2:
        raise ValueError(f"fastattn.{OP}: in_features K = x.shape[-1] = {x.shape[-1]} must be "
                         "even (two 4-bit values per byte) and a multiple of group_size")
    N, K = packed.shape[0], packed.shape[1] * 2
    _quant.check_activation(OP, x, K)
    check_group_size(group_size, K, f"fastattn.{OP}")
    for name, t, dtype in (("scale", scale, torch.float32), ("zero", zero, torch.uint8)):
        _quant.check_tensor(OP, name, t, (N, K // group_size), dtype, x)
    bias = _quant.check_bias(OP, bias, N, x)
    return _quant.choose(OP, "int4_weight_linear", x, backend), N, bias


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int, bias: torch.Tensor | None = None, *,
                backend: str | None = None) -> torch.Tensor:
    """F.linear with an int4 group-wise quantized weight, unpacked and dequantized in the kernel.

    Args:
      x: (..., K) float32, float16 or bfloat16 activations, any strides; K % group_size == 0.
      packed: uint8 (N, K / 2), two codes per byte (low nibble = even k), from
        fastattn.quantize_int4_weight.
      scale: float32 (N, K / group_size); zero: uint8 (N, K / group_size) in [0, 15]:
        the float weight is (code - zero) * scale per group of group_size along K.
      group_size: 32, 64 or 128.
      bias: (N,) or None, used in x's dtype.
      backend: "cpu", "cuda", "triton" or "reference" to force one (see fastattn.backends).

    Returns:
      (..., N) in x's dtype, accumulated in float32. Inference only.
    """
    x = _quant.autocast_input(x)
    choice, N, bias = _plan(x, packed, scale, zero, group_size, bias, backend=backend)
    if choice.backend == "reference":
        dt = reference._compute_dtype(x.dtype)
        return reference.int4_weight_linear(x, packed, scale, zero, group_size, bias,
                                            dtype=dt).to(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    out = _quant.run("int4_weight_linear", choice, x2, packed, scale, zero, group_size, bias)
    return out.view(*x.shape[:-1], N)  # (..., N)


backends.register_planner(OP, lambda *a, **k: _plan(*a, **k)[0])
