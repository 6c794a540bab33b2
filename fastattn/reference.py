"""The math of every fastattn op in plain PyTorch: the ground truth for tests (run in float64)
and the "reference" backend (any device, any floating dtype, differentiable by autograd).

Low-precision inputs are computed in float32 and the result cast back, so the reference backend
is as accurate as the fused kernels; float64 inputs stay float64.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_keep(rows: int, cols: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(rows, cols) bool: column j of row i is kept when j <= i (top-left aligned, as the
    is_causal of torch's scaled_dot_product_attention)."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).tril()


def softmax(x: torch.Tensor, dim: int = -1, *, scale: float | None = None,
            mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """softmax(scale * x + mask) along `dim`; masked entries get probability 0.

    x: (..., N) any floating dtype. mask: bool (True = keep) or additive, broadcastable to x.
    causal: also mask column j of row i (dims -2, -1) when j > i; needs dim = -1.
    A row whose every entry is masked is all zeros (not NaN).
    Returns a tensor of x's shape and dtype.
    """
    z = x.to(_compute_dtype(x.dtype)) * (1.0 if scale is None else scale)
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(z.dtype)
    if causal:
        z = z.masked_fill(~causal_keep(z.shape[-2], z.shape[-1], z.device), float("-inf"))
    row_max = z.amax(dim, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max).detach()
    e = torch.exp(z - row_max)
    total = e.sum(dim, keepdim=True)
    out = e / torch.where(total == 0, torch.ones_like(total), total)
    return out.to(x.dtype)


def _norm_dims(x: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    n = 1 if isinstance(normalized_shape, int) else len(tuple(normalized_shape))
    return tuple(range(-n, 0)) if x.dim() else ()


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing dims `normalized_shape`
    (biased variance, as torch.nn.functional.layer_norm). x: (..., *normalized_shape);
    weight, bias: normalized_shape or None. Returns x's shape and dtype."""
    dims = _norm_dims(x, normalized_shape)
    z = x.to(_compute_dtype(x.dtype))
    mean = z.mean(dims, keepdim=True)
    centered = z - mean
    out = centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(z.dtype)
    if bias is not None:
        out = out + bias.to(z.dtype)
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the trailing dims `normalized_shape`, as
    torch.nn.functional.rms_norm. eps None: the machine epsilon of the compute dtype
    (float32 for float32/float16/bfloat16 inputs, float64 for float64), as torch does.
    Returns x's shape and dtype."""
    dims = _norm_dims(x, normalized_shape)
    z = x.to(_compute_dtype(x.dtype))
    if eps is None:
        eps = torch.finfo(z.dtype).eps
    out = z * torch.rsqrt(z.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(z.dtype)
    return out.to(x.dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step: s = x + residual (in x's dtype); returns (layer_norm(s), s)."""
    s = x + residual
    return layer_norm(s, normalized_shape, weight, bias, eps), s


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape,
                 weight: torch.Tensor | None = None,
                 eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm residual step: s = x + residual (in x's dtype); returns (rms_norm(s), s)."""
    s = x + residual
    return rms_norm(s, normalized_shape, weight, eps), s
