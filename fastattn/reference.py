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


def score_modifier_keep(L: int, S: int, window: tuple[int, int], diag: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """(L, S) bool: key j visible to query i under a (left, right) window around the diagonal
    i + diag (-1 = unbounded side): i + diag - left <= j <= i + diag + right."""
    i = torch.arange(L, device=device)[:, None] + diag
    j = torch.arange(S, device=device)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool, device=device)
    if window[0] >= 0:
        keep &= j >= i - window[0]
    if window[1] >= 0:
        keep &= j <= i + window[1]
    return keep


def _attention_one(q, k, v, scale, window, bottom_right, slopes, softcap, keep_drop, dropout_p):
    """One sequence: q (L, Hq, E), k (S, Hkv, E), v (S, Hkv, Ev) in the compute dtype;
    slopes (Hq,) or None; keep_drop (Hq, L, S) bool or None. Returns (L, Hq, Ev)."""
    L, Hq, _ = q.shape
    S, Hkv, _ = k.shape
    if S == 0:  # no key at all: every row is zero (keeps the graph for autograd)
        return (q[..., :1] * 0).expand(L, Hq, v.shape[-1]) + v.sum() * 0
    group = Hq // Hkv if Hkv else 1
    qh = q.transpose(0, 1)  # (Hq, L, E)
    kh = k.transpose(0, 1).repeat_interleave(group, 0)  # (Hq, S, E)
    vh = v.transpose(0, 1).repeat_interleave(group, 0)  # (Hq, S, Ev)
    s = (qh @ kh.transpose(1, 2)) * scale  # (Hq, L, S)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    diag = S - L if bottom_right else 0
    if slopes is not None:
        i = torch.arange(L, device=q.device, dtype=s.dtype)[:, None] + diag
        j = torch.arange(S, device=q.device, dtype=s.dtype)[None, :]
        s = s - slopes.to(s.dtype)[:, None, None] * (i - j).abs()
    keep = score_modifier_keep(L, S, window, diag, q.device)
    p = softmax(s, mask=keep.expand(Hq, L, S))
    if dropout_p >= 1.0:
        p = p * 0.0
    elif dropout_p > 0.0:
        p = p.masked_fill(~keep_drop, 0.0) / (1.0 - dropout_p)
    return (p @ vh).transpose(0, 1)  # (L, Hq, Ev)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              causal_align: str = "bottom_right", window: tuple[int, int] | None = None,
              alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
              scale: float | None = None, dropout_p: float = 0.0,
              dropout_mask: torch.Tensor | None = None,
              cu_seqlens_q: torch.Tensor | None = None,
              cu_seqlens_k: torch.Tensor | None = None,
              compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The math of fastattn.attention, one sequence at a time.

    Dense: q (B, L, Hq, E), k (B, S, Hkv, E), v (B, S, Hkv, Ev). Packed (cu_seqlens_q and
    cu_seqlens_k, int (B + 1,) prefix sums): q (total_q, Hq, E), k (total_k, Hkv, E),
    v (total_k, Hkv, Ev). Hkv divides Hq (query head h reads kv head h // (Hq / Hkv)).
    Scores s = scale * q.k (default scale 1 / sqrt(E)); softcap: s = softcap * tanh(s / softcap);
    alibi_slopes (Hq,) or (B, Hq): s -= slope * |i + d - j|; key j is visible to query i when
    i + d - left <= j <= i + d + right for window (left, right) (-1: unbounded side), causal
    meaning right = 0; d = S_b - L_b for causal_align "bottom_right", 0 for "top_left".
    dropout_mask: bool in the operator's tensor coordinates, (B, Hq, L, S) dense or
    (1, Hq, total_q, total_k) packed, True = kept (needed when 0 < dropout_p < 1;
    dropout_p >= 1 drops everything). Rows with no visible key give zeros.
    compute_dtype: default float32 (float64 for float64 inputs); the tests pass q's own dtype
    to measure what eager PyTorch gets in that precision.
    Returns q's layout with Ev: (B, L, Hq, Ev) or (total_q, Hq, Ev), in q's dtype.
    """
    ct = compute_dtype or _compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal:
        right = 0
    slopes = None if alibi_slopes is None else alibi_slopes.to(ct)
    packed = cu_seqlens_q is not None
    if packed:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        seqs = [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]
    else:
        seqs = list(range(q.shape[0]))
    outs = []
    for b, seq in enumerate(seqs):
        if packed:
            qb, kb, vb = q[seq[0]], k[seq[1]], v[seq[1]]
            keep = None if dropout_mask is None else dropout_mask[0][:, seq[0], seq[1]]
        else:
            qb, kb, vb = q[seq], k[seq], v[seq]
            keep = None if dropout_mask is None else dropout_mask[seq]
        sb = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        outs.append(_attention_one(qb.to(ct), kb.to(ct), vb.to(ct), scale, (left, right),
                                   causal_align == "bottom_right", sb, softcap, keep,
                                   dropout_p))
    if packed:
        out = torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], v.shape[-1], dtype=ct)
    else:
        out = torch.stack(outs) if outs else q.new_zeros(0, q.shape[1], q.shape[2], v.shape[-1],
                                                         dtype=ct)
    return out.to(q.dtype)


def gather_kv_cache(cache: torch.Tensor, seqlen: int, b: int,
                    block_table: torch.Tensor | None = None) -> torch.Tensor:
    """The first `seqlen` tokens of sequence b from a KV cache: contiguous (B, S_max, H, E) or
    paged (pages, page_size, H, E) through block_table (B, max_pages). Returns (seqlen, H, E)."""
    if block_table is None:
        return cache[b, :seqlen]
    page = cache.shape[1]
    pos = torch.arange(seqlen, device=cache.device)
    pages = block_table[b].long()[pos // page]
    return cache[pages, pos % page]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, *, block_table: torch.Tensor | None = None,
                     scale: float | None = None, alibi_slopes: torch.Tensor | None = None,
                     window: tuple[int, int] | None = None, softcap: float | None = None,
                     causal: bool = True) -> torch.Tensor:
    """The math of the decode_attention operator: q (B, Lq, Hq, E) are the LAST Lq tokens of
    each sequence, whose cache (contiguous (B, S_max, Hkv, E) or paged through block_table)
    holds cache_seqlens[b] tokens (the query tokens included). Full attention of the queries
    over those tokens, bottom-right aligned (query i at position cache_seqlens[b] - Lq + i),
    causal unless causal=False. Returns (B, Lq, Hq, Ev) in q's dtype."""
    outs = []
    for b, n in enumerate(cache_seqlens.tolist()):
        kb = gather_kv_cache(k_cache, n, b, block_table)
        vb = gather_kv_cache(v_cache, n, b, block_table)
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        outs.append(attention(q[b:b + 1], kb[None], vb[None], causal=causal,
                              causal_align="bottom_right", window=window, alibi_slopes=slopes,
                              softcap=softcap, scale=scale)[0])
    if not outs:
        return q.new_zeros(*q.shape[:3], v_cache.shape[-1])
    return torch.stack(outs)


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
