"""Triton W8A8 (dynamic int8 activations x int8 weights): the operators
fastattn::quantize_per_token_int8_triton and fastattn::int8_scaled_mm_triton (same contracts
as the C++ fastattn::quantize_per_token_int8 / int8_scaled_mm; schemas in
kernels/registration.cpp, checks mirrored from kernels/include/fastattn/quant_host.h).

_quantize_rows: one program per row of x (M, K): pass 1 takes amax = max |x| in float32, then
inv = 127 / amax with an IEEE division (tl.div_rn; 0 when amax == 0), x_scale = amax / 127
(tl.div_rn), and pass 2 writes xq = clamp(rint(x * inv), -127, 127) as int8. rint is round
half to even: libdevice rint (cvt.rni) on a GPU; under the interpreter, which has no
libdevice, (t + 1.5 * 2^23) - 1.5 * 2^23 in float32 (exact RNE for |t| < 2^22; numpy does
not fuse it with the multiply). This matches reference.quantize_per_token_int8 bit for bit.

_int8_scaled_mm: tiled GEMM over int8 tiles (configs in quant_common.CONFIGS, by M regime and
K alignment), tl.dot with an int32 accumulator (exact while K * 128 * 128 < 2**31,
i.e. K <= 131,071 for any int8 codes; not checked), epilogue
float(acc) * x_scale[m] * w_scale[n] + bias[n] in float32, cast to out_dtype. M <= 16 splits K
as the weight-only GEMV does (quant_common): int32 partials into a (SPLIT, M, N) workspace,
summed exactly by _w8a8_reduce, which then applies the same epilogue.
"""

from __future__ import annotations

import torch

# Absolute import: the resource report loads this file by path, outside the package.
from fastattn._triton.quant_common import (
    ACTIVATION_DTYPES,
    GROUP_M,
    REDUCE_BLOCK,
    REDUCE_WARPS,
    check_activation,
    check_bias,
    check_channel_vector,
    check_int8_weight,
    interpreting,
    new_output,
    quantize_config,
    tile_coords,
    w8a8_config,
)
from torch.library import triton_op, wrap_triton

import triton
import triton.language as tl
from triton.language.extra import libdevice

QUANT_OP = "fastattn::quantize_per_token_int8_triton"
MM_OP = "fastattn::int8_scaled_mm_triton"
RNE_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds |t| < 2**22 to an integer


@triton.jit
def _rint(t, INTERPRET: tl.constexpr):
    """Round half to even of float32 t (|t| < 2**22)."""
    if INTERPRET:
        return (t + 12582912.0) - 12582912.0  # RNE_MAGIC
    else:
        return libdevice.rint(t)


@triton.jit
def _quantize_rows(x_ptr, xq_ptr, scale_ptr, K, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """Row program_id(0) of x (M, K): xq (M, K) int8 and x_scale (M,) float32."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * K
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        v = tl.load(x_ptr + base + ks, mask=ks < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    top = tl.max(amax, axis=0)
    inv = tl.where(top > 0, tl.div_rn(127.0, tl.where(top > 0, top, 1.0)), 0.0)
    tl.store(scale_ptr + row, tl.div_rn(top, 127.0))
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rk
        v = tl.load(x_ptr + base + ks, mask=ks < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rint(v * inv, INTERPRET), -127.0), 127.0)
        tl.store(xq_ptr + base + ks, q.to(tl.int8), mask=ks < K)


@triton.jit
def _w8a8_epilogue(acc, rm, rn, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr):
    """out[rm, rn] = float(acc) * x_scale[rm] * w_scale[rn] (+ bias[rn]), cast to out's dtype;
    rm, rn and acc (int32) of one shape (2-d tile or flat)."""
    ok = (rm < M) & (rn < N)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * xs * ws
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm.to(tl.int64) * N + rn, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _int8_scaled_mm(xq_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, K_SPLIT,
                    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Program (tile, chunk): int32 xq[rows, chunk] @ w[cols, chunk]^T; xq int8 (M, K), w int8
    (N, K). Then the epilogue into out (M, N) in out_dtype, or with PARTIAL the raw int32 sums
    into the (SPLIT, M, N) workspace at chunk program_id(1)."""
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    k_start = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    x_rows = xq_ptr + rm.to(tl.int64)[:, None] * K  # [BLOCK_M, 1]
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * K  # [1, BLOCK_N]
    m_ok = (rm < M)[:, None]
    n_ok = (rn < N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < k_end
        a = tl.load(x_rows + ks[None, :], mask=m_ok & k_ok[None, :], other=0)  # [BM, BK] int8
        b = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & n_ok, other=0)  # [BK, BN] int8
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    if PARTIAL:
        offs = tl.program_id(1).to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(out_ptr + offs, acc, mask=m_ok & n_ok)
    else:
        _w8a8_epilogue(acc, rm[:, None], rn[None, :], xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N,
                       HAS_BIAS)


@triton.jit
def _w8a8_reduce(part_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, SPLIT,
                 HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Split-K stage 2: the int32 sum of the SPLIT partials (M, N) of BLOCK outputs (exact, so
    any order gives the same bits), then the epilogue."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = M * N  # M <= SPLITK_MAX_M on this path
    acc = tl.zeros([BLOCK], tl.int32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + tl.cast(s, tl.int64) * total + idx, mask=idx < total, other=0)
    _w8a8_epilogue(acc, idx // N, idx % N, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, HAS_BIAS)


@triton_op("fastattn::quantize_per_token_int8_triton", mutates_args=())
def quantize_per_token_int8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of fastattn::quantize_per_token_int8: x (M, K) -> (xq int8 (M, K),
    x_scale float32 (M,))."""
    x = check_activation(QUANT_OP, x)
    M, K = x.shape
    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
    x_scale = new_output((M,), torch.float32, x.device)
    if M == 0:
        return xq, x_scale
    cfg = quantize_config(K)
    wrap_triton(_quantize_rows)[(M,)](x, xq, x_scale, K, BLOCK_K=cfg["BLOCK_K"],
                                      INTERPRET=interpreting(), num_warps=cfg["num_warps"])
    return xq, x_scale


# The int32 accumulator is exact while K * 127 * 127 < 2^31 (codes are in [-127, 127]).
MAX_EXACT_K = 131071


@triton_op("fastattn::int8_scaled_mm_triton", mutates_args=())
def int8_scaled_mm_triton(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                          w_scale: torch.Tensor, bias: torch.Tensor | None,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of fastattn::int8_scaled_mm: float(xq (M, K) @ weight (N, K)^T, int32) *
    x_scale[:, None] * w_scale + bias -> (M, N) in out_dtype."""
    torch._check(xq.dtype == torch.int8, lambda: f"{MM_OP}: xq must be int8, got {xq.dtype}")
    torch._check(xq.dim() == 2 and xq.shape[1] >= 1,
                 lambda: f"{MM_OP}: xq must be 2-d (M, K) with K >= 1, got {list(xq.shape)}")
    torch._check(xq.shape[1] <= MAX_EXACT_K,
                 lambda: f"{MM_OP}: K = {xq.shape[1]} exceeds {MAX_EXACT_K}, beyond which the "
                         "int32 sum of 127 x 127 products can overflow")
    torch._check(out_dtype in ACTIVATION_DTYPES,
                 lambda: f"{MM_OP}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    xq = xq.contiguous()
    M, K = xq.shape
    weight = check_int8_weight(MM_OP, weight, xq, K)
    N = weight.shape[0]
    x_scale = check_channel_vector(MM_OP, "x_scale", x_scale, xq, M, torch.float32)
    w_scale = check_channel_vector(MM_OP, "w_scale", w_scale, xq, N, torch.float32)
    bias = check_bias(MM_OP, bias, xq, N, out_dtype)
    out = new_output((M, N), out_dtype, xq.device)
    if M == 0 or N == 0:
        return out
    cfg = w8a8_config(M, N, K, xq.device)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = cfg["SPLIT"]
    bias_arg = out if bias is None else bias  # never read without HAS_BIAS
    meta = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
            "GROUP": GROUP_M, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if split == 1:
        wrap_triton(_int8_scaled_mm)[(tiles, 1)](
            xq, weight, x_scale, w_scale, bias_arg, out, M, N, K, cfg["K_SPLIT"],
            HAS_BIAS=bias is not None, PARTIAL=False, **meta)
        return out
    part = torch.empty((split, M, N), dtype=torch.int32, device=xq.device)
    wrap_triton(_int8_scaled_mm)[(tiles, split)](
        xq, weight, x_scale, w_scale, bias_arg, part, M, N, K, cfg["K_SPLIT"],
        HAS_BIAS=False, PARTIAL=True, **meta)
    wrap_triton(_w8a8_reduce)[(triton.cdiv(M * N, REDUCE_BLOCK),)](
        part, x_scale, w_scale, bias_arg, out, M, N, split, HAS_BIAS=bias is not None,
        BLOCK=REDUCE_BLOCK, num_warps=REDUCE_WARPS)
    return out
