"""Triton softmax kernels and their operators fastattn::softmax_triton and
fastattn::softmax_backward_triton (same contract as fastattn::softmax / softmax_backward).

Forward: a program owns ROWS rows. A row of N <= MAX_SINGLE_PASS columns is loaded once as a
[ROWS, BLOCK_N] tile (x read once, out written once); longer rows take the online path: one
read keeps a running max and rescaled sum per lane, a second read writes the probabilities.
The mask is addressed through the (B, H, M, N) strides the launcher computes, like the C++
kernels (kernels/include/fastattn/softmax_host.h); causal keeps columns j <= row % M.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

MAX_SINGLE_PASS = 8192  # longest row (columns) held in one tile
ONLINE_BLOCK = 2048  # columns per step on the online path
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


@triton.jit
def _row_logits(x_ptr, mask_ptr, rows, cols, n_rows, N, M, H, msb, msh, msm, scale,
                MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """Logits scale * x + mask of a [ROWS, BLOCK] tile (-inf where masked or out of range)."""
    m_idx = rows % M  # [ROWS] row index inside dim -2
    length = tl.where(rows < n_rows, N, 0)
    if CAUSAL:
        length = tl.minimum(length, m_idx + 1)
    keep = cols[None, :] < length[:, None]  # [ROWS, BLOCK]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=keep, other=0.0)
    z = x.to(tl.float32) * scale
    if MASK_KIND != 0:
        bh = rows // M
        mrow = (bh // H).to(tl.int64) * msb + (bh % H).to(tl.int64) * msh + m_idx.to(tl.int64) * msm
        mv = tl.load(mask_ptr + mrow[:, None] + cols[None, :], mask=keep, other=0)
        if MASK_KIND == 1:
            keep = keep & (mv != 0)
        else:
            z = z + mv.to(tl.float32)
    return tl.where(keep, z, float("-inf"))


@triton.jit
def _softmax_fwd_tile(x_ptr, mask_ptr, out_ptr, n_rows, N, M, H, msb, msh, msm, scale,
                      MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                      ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    z = _row_logits(x_ptr, mask_ptr, rows, cols, n_rows, N, M, H, msb, msh, msm, scale,
                    MASK_KIND, CAUSAL)
    row_max = tl.max(z, axis=1)  # [ROWS]
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # fully masked rows -> all 0
    e = tl.exp(z - row_max[:, None])
    total = tl.sum(e, axis=1)
    inv = 1.0 / tl.where(total == 0, 1.0, total)  # fully masked rows: e = 0, so out = 0
    out = e * inv[:, None]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < N))


@triton.jit
def _softmax_fwd_online(x_ptr, mask_ptr, out_ptr, n_rows, N, M, H, msb, msh, msm, scale,
                        MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) + tl.arange(0, 1)  # [1]
    run_max = tl.full([1, BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([1, BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        z = _row_logits(x_ptr, mask_ptr, rows, cols, n_rows, N, M, H, msb, msh, msm, scale,
                        MASK_KIND, CAUSAL)
        new_max = tl.maximum(run_max, z)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(z - safe)
        run_max = new_max
    row_max = tl.max(run_max, axis=1)  # [1]
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(run_sum * tl.exp(run_max - row_max[:, None]), axis=1)
    inv = 1.0 / tl.where(total == 0, 1.0, total)  # fully masked rows: e = 0, so out = 0
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        z = _row_logits(x_ptr, mask_ptr, rows, cols, n_rows, N, M, H, msb, msh, msm, scale,
                        MASK_KIND, CAUSAL)
        out = tl.exp(z - row_max[:, None]) * inv[:, None]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=cols[None, :] < N)


@triton.jit
def _softmax_bwd_tile(dy_ptr, y_ptr, dx_ptr, n_rows, N, scale, BLOCK_N: tl.constexpr,
                      ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dot = tl.sum(y * dy, axis=1)
    dx = scale * y * (dy - dot[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_bwd_loop(dy_ptr, y_ptr, dx_ptr, n_rows, N, scale, BLOCK_N: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        y = tl.load(y_ptr + base + cols, mask=cols < N, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += y * dy
    dot = tl.sum(acc, axis=0)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        y = tl.load(y_ptr + base + cols, mask=cols < N, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(dx_ptr + base + cols, (scale * y * (dy - dot)).to(dx_ptr.dtype.element_ty),
                 mask=cols < N)


# ---- launch configuration ---------------------------------------------------------------------

def tile_config(N: int) -> dict:
    """Launch parameters for a row of N columns: BLOCK_N, ROWS per program (single-pass path,
    about 4K elements per program) or ROWS=0 for the online path, and num_warps."""
    if N > MAX_SINGLE_PASS:
        return {"BLOCK_N": ONLINE_BLOCK, "ROWS": 0, "num_warps": 8}
    block = triton.next_power_of_2(max(N, 1))
    rows = max(1, min(64, 4096 // block))
    elems = block * rows
    return {"BLOCK_N": block, "ROWS": rows, "num_warps": 4 if elems <= 2048 else 8 if elems <= 4096 else 16}


def _new_output(like: torch.Tensor) -> torch.Tensor:
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if os.environ.get("FASTATTN_POISON_OUTPUTS", "0") not in ("", "0"):
        out.fill_(float("nan"))  # tests: an element the kernel forgets to write fails
    return out


def _geometry(x: torch.Tensor, mask: torch.Tensor | None):
    """(N, M, H, rows) of x viewed as (B, H, M, N), and the mask as a (B, H, M, N) view with
    unit last stride (a copy only for broadcast patterns whose dims do not merge)."""
    torch._check(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"fastattn.softmax_triton: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: "fastattn.softmax_triton: x must have at least 1 dim")
    shape = x.shape
    N = shape[-1]
    M = shape[-2] if x.dim() >= 2 else 1
    H = shape[-3] if x.dim() >= 3 else 1
    rows = x.numel() // N if N else 0
    if mask is None:
        return N, M, H, rows, None
    torch._check(mask.dtype in (torch.bool, x.dtype, torch.float32),
                 lambda: f"fastattn.softmax_triton: mask must be bool, float32 or {x.dtype}, got {mask.dtype}")
    B = rows // (M * H) if M * H else 0
    m4 = mask.expand(shape).reshape(B, H, M, N)
    if N > 1 and m4.stride(3) != 1:
        m4 = m4.contiguous()
    return N, M, H, rows, m4


@triton_op("fastattn::softmax_triton", mutates_args=())
def softmax_triton(x: torch.Tensor, mask: torch.Tensor | None, scale: float,
                   causal: bool) -> torch.Tensor:
    """Triton twin of fastattn::softmax: x (..., N) -> softmax(scale * x + mask) over N."""
    N, M, H, rows, m4 = _geometry(x, mask)
    x = x.contiguous()
    out = _new_output(x)
    if rows == 0:
        return out
    if m4 is None:
        mask_arg, kind, strides = x, MASK_NONE, (0, 0, 0)
    else:
        mask_arg, strides = m4, (m4.stride(0), m4.stride(1), m4.stride(2))
        kind = MASK_BOOL if m4.dtype == torch.bool else MASK_ADD
    cfg = tile_config(N)
    args = (x, mask_arg, out, rows, N, M, H, *strides, scale)
    if cfg["ROWS"]:
        grid = (triton.cdiv(rows, cfg["ROWS"]),)
        wrap_triton(_softmax_fwd_tile)[grid](*args, MASK_KIND=kind, CAUSAL=causal,
                                             BLOCK_N=cfg["BLOCK_N"], ROWS=cfg["ROWS"],
                                             num_warps=cfg["num_warps"])
    else:
        wrap_triton(_softmax_fwd_online)[(rows,)](*args, MASK_KIND=kind, CAUSAL=causal,
                                                  BLOCK_N=cfg["BLOCK_N"],
                                                  num_warps=cfg["num_warps"])
    return out


@triton_op("fastattn::softmax_backward_triton", mutates_args=())
def softmax_backward_triton(grad_out: torch.Tensor, out: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Triton twin of fastattn::softmax_backward: scale * out * (grad_out - sum(grad_out * out))."""
    torch._check(grad_out.shape == out.shape and grad_out.dtype == out.dtype,
                 lambda: "fastattn.softmax_backward_triton: grad_out must match out in shape and dtype")
    dy, y = grad_out.contiguous(), out.contiguous()
    dx = _new_output(y)
    N = y.shape[-1]
    rows = y.numel() // N if N else 0
    if rows == 0:
        return dx
    cfg = tile_config(N)
    if cfg["ROWS"]:
        wrap_triton(_softmax_bwd_tile)[(triton.cdiv(rows, cfg["ROWS"]),)](
            dy, y, dx, rows, N, scale, BLOCK_N=cfg["BLOCK_N"], ROWS=cfg["ROWS"],
            num_warps=cfg["num_warps"])
    else:
        wrap_triton(_softmax_bwd_loop)[(rows,)](dy, y, dx, rows, N, scale,
                                                BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return dx
