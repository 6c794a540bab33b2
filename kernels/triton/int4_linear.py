"""Triton int4 weight-only linear: the operator fastattn::int4_weight_linear_triton (same
contract as the C++ fastattn::int4_weight_linear; schema and packed format in
kernels/registration.cpp, checks mirrored from kernels/include/fastattn/quant_host.h).

Format: packed uint8 (N, K/2), byte j of row n = q[n, 2j] | q[n, 2j+1] << 4 (natural order, low
nibble = even k); scale float32 (N, K/G), zero uint8 (N, K/G), G in {32, 64, 128}:
w[n, k] = (q[n, k] - zero[n, k / G]) * scale[n, k / G];  y = x @ w^T + bias.

Kernel _int4_linear (regimes and split-K as in quant_common.linear_config): BLOCK_K divides G,
so each K block lies in one group. Per block the program loads the [BLOCK_N, BLOCK_K / 2]
bytes, unpacks lo = b & 0xF, hi = b >> 4, tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K) (k order),
subtracts the group's zero point in x's dtype ((q - z) in [-15, 15] is exact in fp16 / bf16)
and runs tl.dot of x [BLOCK_M, BLOCK_K] with (q - z)^T into a float32 block result, then adds
block * scale[group] to the accumulator. The group scale is thus applied in float32 after an
exact integer-weight dot, rather than rounding (q - z) * scale to x's dtype first: one
multiply per output per K block, more accurate than dequantize-then-matmul, and the
dequantized weight exists only as the [BLOCK_N, BLOCK_K] register tile. K needs no masking
(K % G == 0).
"""

from __future__ import annotations

import torch

# Absolute import: the resource report loads this file by path, outside the package.
from fastattn._triton.quant_common import (
    check_activation,
    check_bias,
    check_same_device,
    launch_weight_only,
    linear_config,
    new_output,
    store_linear,
    tile_coords,
)
from torch.library import triton_op, wrap_triton

import triton
import triton.language as tl

OP = "fastattn::int4_weight_linear_triton"
GROUP_SIZES = (32, 64, 128)


@triton.jit
def _int4_linear(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K, K_SPLIT,
                 GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr):
    """Program (tile, chunk): out tile = x[rows, chunk] @ w[cols, chunk]^T, w dequantized per
    K block in registers. x (M, K); packed uint8 (N, K/2); scale / zero (N, K/GROUP_SIZE);
    out (M, N) in x's dtype, or with PARTIAL the float32 (SPLIT, M, N) workspace."""
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    rb = tl.arange(0, BLOCK_K // 2)  # [BLOCK_K / 2] bytes of a K block
    groups = K // GROUP_SIZE
    k_start = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K  # [BLOCK_M, 1]
    p_rows = packed_ptr + rn.to(tl.int64)[:, None] * (K // 2)  # [BLOCK_N, 1]
    g_rows = rn.to(tl.int64) * groups  # [BLOCK_N]
    m_ok = (rm < M)[:, None]
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        a = tl.load(x_rows + (k0 + rk)[None, :], mask=m_ok, other=0.0)  # [BM, BK]
        b = tl.load(p_rows + (k0 // 2 + rb)[None, :], mask=n_ok[:, None], other=0)  # [BN, BK/2]
        q = tl.join(b & 0xF, b >> 4).reshape(BLOCK_N, BLOCK_K)  # [BN, BK] uint8, k order
        g = k0 // GROUP_SIZE
        z = tl.load(zero_ptr + g_rows + g, mask=n_ok, other=0)  # [BN] uint8
        s = tl.load(scale_ptr + g_rows + g, mask=n_ok, other=0.0)  # [BN] float32
        w = q.to(a.dtype) - z.to(a.dtype)[:, None]  # exact: integers in [-15, 15]
        if a.dtype == tl.float32:
            part = tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            part = tl.dot(a, tl.trans(w))
        acc += part * s[None, :]
    store_linear(acc, rm, rn, bias_ptr, out_ptr, M, N, HAS_BIAS, PARTIAL)


@triton_op("fastattn::int4_weight_linear_triton", mutates_args=())
def int4_weight_linear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                              zero: torch.Tensor, group_size: int,
                              bias: torch.Tensor | None) -> torch.Tensor:
    """Triton twin of fastattn::int4_weight_linear: x (M, K) @ w^T + bias -> (M, N) in x's
    dtype, w the group-wise dequantized (N, K) int4 weight (never materialized)."""
    x = check_activation(OP, x)
    M, K = x.shape
    torch._check(group_size in GROUP_SIZES,
                 lambda: f"{OP}: group_size must be 32, 64 or 128, got {group_size}")
    torch._check(K % group_size == 0,
                 lambda: f"{OP}: K = x.size(1) = {K} must be a multiple of group_size {group_size}")
    check_same_device(OP, "packed", packed, x)
    torch._check(packed.dtype == torch.uint8, lambda: f"{OP}: packed must be uint8, got {packed.dtype}")
    torch._check(packed.dim() == 2 and packed.shape[1] == K // 2,
                 lambda: f"{OP}: packed must have shape (N, {K // 2}) (two 4-bit values per byte), "
                         f"got {list(packed.shape)}")
    packed = packed.contiguous()
    N = packed.shape[0]
    groups = K // group_size
    for name, t, dtype in (("scale", scale, torch.float32), ("zero", zero, torch.uint8)):
        check_same_device(OP, name, t, x)
        torch._check(t.dim() == 2 and t.shape[0] == N and t.shape[1] == groups,
                     lambda name=name, t=t: f"{OP}: {name} must have shape ({N}, {groups}) "
                                            f"(N, K / group_size), got {list(t.shape)}")
        torch._check(t.dtype == dtype, lambda name=name, t=t, dtype=dtype:
                     f"{OP}: {name} must be {dtype}, got {t.dtype}")
    scale, zero = scale.contiguous(), zero.contiguous()
    bias = check_bias(OP, bias, x, N, x.dtype)
    out = new_output((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    cfg = linear_config(M, N, K, x.dtype, x.device, group_size)
    return launch_weight_only(wrap_triton(_int4_linear), x, (packed, scale, zero), bias, out,
                              M, N, K, cfg, GROUP_SIZE=group_size)
