"""Triton int8 weight-only linear: the operator fastattn::int8_weight_linear_triton (same
contract as the C++ fastattn::int8_weight_linear; schema in kernels/registration.cpp, checks
mirrored from kernels/include/fastattn/quant_host.h).

y[m, n] = scale[n] * sum_k x[m, k] * weight[n, k] + bias[n]; x (M, K) float32/float16/bfloat16,
weight int8 (N, K), scale float32 (N,), bias (N,) in x's dtype.

One kernel, _int8_linear, serves both regimes (quant_common.linear_config): each program
loads an x tile [BLOCK_M, BLOCK_K] and the int8 weight tile [BLOCK_K, BLOCK_N], converts the
codes to x's dtype in registers (|q| <= 127 is exact in fp16 and bf16; the dequantized weight
is never stored) and accumulates tl.dot in float32 (float32 x: input_precision "ieee", no
TF32). The per-channel scale is applied once in the epilogue. With SPLIT > 1 (M <= 16) the
program covers one K chunk and writes scaled float32 partials that quant_common._splitk_reduce
sums in a fixed order. K needs no alignment: the last K block is masked.
"""

from __future__ import annotations

import torch

# Absolute import: the resource report loads this file by path, outside the package.
from fastattn._triton.quant_common import (
    check_activation,
    check_bias,
    check_channel_vector,
    check_int8_weight,
    launch_weight_only,
    linear_config,
    new_output,
    store_linear,
    tile_coords,
)
from torch.library import triton_op, wrap_triton

import triton
import triton.language as tl

OP = "fastattn::int8_weight_linear_triton"


@triton.jit
def _int8_linear(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, K_SPLIT,
                 HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """Program (tile, chunk): out tile = x[rows, chunk] @ (weight[cols, chunk] * scale)^T.
    x (M, K), w int8 (N, K) row-major; out (M, N) in x's dtype, or with PARTIAL the float32
    (SPLIT, M, N) workspace."""
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    k_start = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K  # [BLOCK_M, 1]
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * K  # [1, BLOCK_N]
    m_ok = (rm < M)[:, None]
    n_ok = (rn < N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < k_end
        a = tl.load(x_rows + ks[None, :], mask=m_ok & k_ok[None, :], other=0.0)  # [BM, BK]
        q = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & n_ok, other=0)  # [BK, BN] int8
        b = q.to(a.dtype)  # exact: |q| <= 127
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
    store_linear(acc * scale[None, :], rm, rn, bias_ptr, out_ptr, M, N, HAS_BIAS, PARTIAL)


@triton_op("fastattn::int8_weight_linear_triton", mutates_args=())
def int8_weight_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                              bias: torch.Tensor | None) -> torch.Tensor:
    """Triton twin of fastattn::int8_weight_linear: x (M, K) @ (weight int8 (N, K) * scale
    (N,))^T + bias -> (M, N) in x's dtype."""
    x = check_activation(OP, x)
    M, K = x.shape
    weight = check_int8_weight(OP, weight, x, K)
    N = weight.shape[0]
    scale = check_channel_vector(OP, "scale", scale, x, N, torch.float32)
    bias = check_bias(OP, bias, x, N, x.dtype)
    out = new_output((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    cfg = linear_config(M, N, K, x.dtype, x.device)
    return launch_weight_only(wrap_triton(_int8_linear), x, (weight, scale), bias, out, M, N, K, cfg)
