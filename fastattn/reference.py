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


def _philox_first_word(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10's first output word, on numpy uint64 arrays holding 32-bit values."""
    import numpy as np

    m32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & m32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & m32)
        k0 = (k0 + np.uint64(0x9E3779B9)) & m32
        k1 = (k1 + np.uint64(0xBB67AE85)) & m32
    return c0


def dropout_keep(seed: int, offset: int, shape: tuple[int, int, int, int], dropout_p: float,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The attention dropout mask every fastattn backend draws for (seed, offset): bool
    (B, Hq, L, S), True = kept. Spec (kernels/include/fastattn/philox.h): the score (b, h, i, j)
    has flat index idx = ((b * Hq + h) * L + i) * S + j; x0 = Philox4x32-10 with counter
    (lo32(idx), hi32(idx), lo32(offset), hi32(offset)) and key (lo32(seed), hi32(seed));
    kept when (x0 >> 8) * 2^-24 >= dropout_p (as float32)."""
    import numpy as np

    m32 = np.uint64(0xFFFFFFFF)
    idx = np.arange(int(np.prod(shape)), dtype=np.uint64)
    seed64, offset64 = np.uint64(seed % 2**64), np.uint64(offset % 2**64)
    zeros = np.zeros_like(idx)
    x0 = _philox_first_word(idx & m32, idx >> np.uint64(32), zeros + (offset64 & m32),
                            zeros + (offset64 >> np.uint64(32)), seed64 & m32,
                            seed64 >> np.uint64(32))
    u = (x0 >> np.uint64(8)).astype(np.float32) * np.float32(2.0 ** -24)
    keep = torch.from_numpy(u >= np.float32(dropout_p)).reshape(shape)
    return keep.to(device) if device is not None else keep


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
         attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
         scale: float | None = None, enable_gqa: bool = False, *,
         dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v, as torch.nn.functional.scaled_dot_product_attention.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev); leading dims
    broadcast; Hkv may divide Hq when enable_gqa. attn_mask: bool (True = attend) or additive,
    broadcastable to (..., Hq, L, S). is_causal: key j masked for query i when j > i (top-left).
    scale: default 1 / sqrt(E). A query row with every key masked gives zeros.
    dropout_mask: bool, broadcastable to the scores, True = kept (then dropout_p scales the kept
    probabilities by 1 / (1 - dropout_p)); without it dropout_p > 0 draws torch's own mask.
    Returns (..., Hq, L, Ev) in query's dtype.
    """
    ct = _compute_dtype(query.dtype)
    q, k, v = query.to(ct), key.to(ct), value.to(ct)
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1)
    p = softmax(scores, scale=scale, mask=attn_mask, causal=is_causal)
    if dropout_p > 0.0:
        if dropout_mask is None:
            p = torch.nn.functional.dropout(p, dropout_p)
        else:
            p = p.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    return (p @ v).to(query.dtype)


# ---- quantized linear layers (formats: fastattn/quant.py; op contract: kernels/registration.cpp) --

def dequantize_int8_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 weight (N, K), float32 scale (N,) -> float64 (N, K) = weight * scale[:, None]."""
    return weight.double() * scale.double()[:, None]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 (N, K): byte j holds q[2j] in bits 0-3 and q[2j+1] in bits 4-7."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4_weight(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """Group-wise asymmetric int4 -> float64 (N, K): w = (q - zero[g]) * scale[g], g = k // G.
    packed uint8 (N, K/2), scale float32 (N, K/G), zero uint8 (N, K/G)."""
    q = unpack_int4(packed).double()                                   # (N, K)
    z = zero.double().repeat_interleave(group_size, dim=1)             # (N, K)
    s = scale.double().repeat_interleave(group_size, dim=1)            # (N, K)
    return (q - z) * s


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype) @ w.to(dtype).T
    return y if bias is None else y + bias.to(dtype)


def int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None, *,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x (..., K) @ dequantized int8 weight (N, K)^T + bias, in `dtype` (float64: the exact math;
    x's dtype: what a dequantize-then-F.linear user gets). -> (..., N)"""
    return _linear(x, dequantize_int8_weight(weight, scale), bias, dtype)


def int4_weight_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                       zero: torch.Tensor, group_size: int, bias: torch.Tensor | None = None, *,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x (..., K) @ dequantized int4 weight (N, K)^T + bias, in `dtype`. -> (..., N)"""
    return _linear(x, dequantize_int4_weight(packed, scale, zero, group_size), bias, dtype)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of x (M, K), computed in float32 exactly as the kernels do:
    amax = max|x| per row, x_scale = amax / 127, xq = clamp(rint(x * (127 / amax)), -127, 127)
    (round half to even; 0 where amax == 0). -> (xq int8 (M, K), x_scale float32 (M,))"""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)                                       # (M,)
    # a true float32 division (torch computes `127.0 / tensor` as 127 * reciprocal(tensor),
    # which is 1 ulp off in about a quarter of rows)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xf * inv[:, None]).clamp(-127, 127).to(torch.int8)
    return xq, amax / 127


def int8_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                   w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W8A8: (xq (M, K) @ weight (N, K)^T exactly in int64) * x_scale[:, None] * w_scale + bias,
    scaled in `dtype`. -> (M, N)"""
    acc = xq.long() @ weight.long().T                                  # (M, N), exact
    y = acc.to(dtype) * x_scale.to(dtype)[:, None] * w_scale.to(dtype)
    return y if bias is None else y + bias.to(dtype)


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic W8A8 reference: per-token int8 of x (..., K), then int8_scaled_mm in float64."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_per_token_int8(x2)
    y = int8_scaled_mm(xq, x_scale, weight, w_scale, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])
