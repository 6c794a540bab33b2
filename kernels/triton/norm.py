"""Triton LayerNorm / RMSNorm (the kernels are in norm_kernels.py): the operators
fastattn::layer_norm_triton, rms_norm_triton, layer_norm_backward_triton and
rms_norm_backward_triton (same contracts as the C++ operators fastattn::layer_norm, rms_norm,
layer_norm_backward, rms_norm_backward; schemas and semantics in kernels/registration.cpp,
checks in kernels/include/fastattn/norm_host.h).

Normalization is over the last dim N; rows = numel // N. All math is float32 whatever the
storage type. With a residual, s = x + residual is rounded to x's dtype, stored as
residual_out, and that rounded value is what gets normalized.

Forward: rows of N <= MAX_TILE_N columns are held in registers as [ROWS, BLOCK_N] tiles
(several rows per program for short rows); longer rows take the loop kernel, one program per
row, which reads the row once per pass (LayerNorm: mean, deviations, output; RMSNorm: sum of
squares, output). The variance is a second pass over the values, sum((s - mean)^2), with the
mean corrected by the deviations' own mean (so rows like 1e4 + tiny noise stay accurate).

Backward: grad_input per row as usual; grad_weight / grad_bias (sums over rows) are reduced
deterministically in two stages without atomics: P programs each own a contiguous range of
rows and write their fp32 column partials to a (P, N) buffer (partials_count picks P from rows
and the device: 2 programs per SM on a GPU, CPU_PARTIALS under the interpreter), then
_norm_bwd_reduce sums the P partials of each column in a fixed order. Tile path: the stage-1
program keeps the partials in registers. Loop path: _norm_bwd_coef computes the per-row
coefficients mean(g) and mean(g * xhat) (g = grad_out * weight), then _norm_bwd_loop runs on a
(P, column chunks) grid, walking its rows for one chunk of columns, so its partials stay in
registers too. The backward tile path holds rows up to MAX_TILE_N_BWD (x, dy, weight and two
accumulators live per column); norm_config's choices were checked for spills with
tools/resource_report.py.

Under the interpreter (TRITON_INTERPRET=1, CPU tensors) fp32 -> bf16 conversions truncate
instead of rounding to nearest even, so bf16 outputs there are off by up to one more ulp.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.library import triton_op, wrap_triton

import triton

try:  # a package import; the resource report loads this file by path
    from .norm_kernels import (_norm_bwd_coef, _norm_bwd_loop, _norm_bwd_reduce, _norm_bwd_tile,
                               _norm_fwd_loop, _norm_fwd_tile)
except ImportError:
    from fastattn._triton.norm_kernels import (_norm_bwd_coef, _norm_bwd_loop, _norm_bwd_reduce,
                                               _norm_bwd_tile, _norm_fwd_loop, _norm_fwd_tile)

MAX_TILE_N = 8192  # longest row (columns) held in registers by the forward tile kernel
MAX_TILE_N_BWD = 4096  # the same for the backward tile kernel (more live values per column)
LOOP_BLOCK = 2048  # columns per step on the loop path
TILE_ELEMS = 2048  # elements per program on the tile path (ROWS * BLOCK_N for short rows)
# (ROWS, num_warps) of backward tiles where the rule in norm_config makes ptxas spill (a few
# bytes at ~80-110 registers; seen with the AOT compile in tools/resource_report.py)
BWD_TILE_OVERRIDES = {256: (4, 4)}
CPU_PARTIALS = 4  # stage-1 programs (partial rows) of the backward under the interpreter
REDUCE_BLOCK_P = 32  # partials summed per step by _norm_bwd_reduce
REDUCE_BLOCK_C = 64  # columns per _norm_bwd_reduce program
REDUCE_WARPS = 4


# ---- launch configuration ---------------------------------------------------------------------

def norm_config(N: int, backward: bool = False) -> dict:
    """Launch parameters for rows of N columns: BLOCK_N, ROWS per program (tile path, about
    TILE_ELEMS elements per program, so about 8 per thread: more makes the register count
    jump, as the row stride N has no alignment hint when N % 16 != 0) or ROWS=0 for the loop
    path, and num_warps. The forward holds rows up to MAX_TILE_N in registers, the backward
    (x, dy, weight and two column accumulators live) up to MAX_TILE_N_BWD."""
    if N > (MAX_TILE_N_BWD if backward else MAX_TILE_N):
        return {"BLOCK_N": LOOP_BLOCK, "ROWS": 0, "num_warps": 8}
    block = triton.next_power_of_2(max(N, 1))
    if backward and block in BWD_TILE_OVERRIDES:
        rows, warps = BWD_TILE_OVERRIDES[block]
        return {"BLOCK_N": block, "ROWS": rows, "num_warps": warps}
    rows = max(1, min(64, TILE_ELEMS // block))
    elems = block * rows
    warps = 4 if elems <= 1024 else 8 if elems <= (2048 if backward else 4096) else 16
    return {"BLOCK_N": block, "ROWS": rows, "num_warps": warps}


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def partials_count(rows: int, device: torch.device, rows_step: int = 1,
                   col_chunks: int = 1) -> tuple[int, int]:
    """(P, rows_per_prog) of the backward's first stage: about 2 programs per SM on a GPU
    (CPU_PARTIALS under the interpreter), divided by the column chunks each row range is
    split into (loop path; keeps the (P, N) buffers small for long rows), each owning a
    contiguous range of rows_per_prog rows, a multiple of rows_step (the tile kernel's ROWS);
    P = cdiv(rows, rows_per_prog). A fixed function of rows, N and the device, so the
    reduction order is fixed too."""
    target = 2 * _sm_count(device.index if device.index is not None
                           else torch.cuda.current_device()) if device.type == "cuda" \
        else CPU_PARTIALS
    target = max(2, target // col_chunks)
    per_prog = triton.cdiv(triton.cdiv(rows, target), rows_step) * rows_step
    return triton.cdiv(rows, per_prog), per_prog


def _new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FASTATTN_POISON_OUTPUTS", "0") not in ("", "0"):
        out.fill_(float("nan"))  # tests: an element the kernel forgets to write fails
    return out


# ---- argument checks (mirror kernels/include/fastattn/norm_host.h) -----------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _param(op: str, name: str, p: torch.Tensor | None, x: torch.Tensor, N: int):
    if p is None:
        return None
    torch._check(p.device == x.device,
                 lambda: f"{op}: {name} is on {p.device} but x is on {x.device}")
    torch._check(p.dim() == 1 and p.shape[0] == N,
                 lambda: f"{op}: {name} must have shape ({N},) (the size of x's last dim), "
                         f"got {list(p.shape)}")
    torch._check(p.dtype == x.dtype or p.dtype == torch.float32,
                 lambda: f"{op}: {name} must be float32 or x's dtype {x.dtype}, got {p.dtype}")
    return p.contiguous()


def _check_forward(op: str, x, residual, weight, bias, eps):
    torch._check(x.dtype in _FLOATS,
                 lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dim, got a 0-dim tensor")
    torch._check(eps > 0 and eps != float("inf"),  # NaN fails eps > 0
                 lambda: f"{op}: eps must be a finite number > 0, got {eps}")
    N = x.shape[-1]
    if residual is not None:
        torch._check(residual.device == x.device,
                     lambda: f"{op}: residual is on {residual.device} but x is on {x.device}")
        torch._check(residual.shape == x.shape,
                     lambda: f"{op}: residual must have x's shape {list(x.shape)}, "
                             f"got {list(residual.shape)}")
        torch._check(residual.dtype == x.dtype,
                     lambda: f"{op}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
        residual = residual.contiguous()
    weight = _param(op, "weight", weight, x, N)
    bias = _param(op, "bias", bias, x, N)
    torch._check(weight is None or bias is None or weight.dtype == bias.dtype,
                 lambda: f"{op}: weight and bias must have the same dtype, got {weight.dtype} "
                         f"and {bias.dtype}")
    return x.contiguous(), residual, weight, bias, N


def _forward(op: str, rms: bool, x, residual, weight, bias, eps: float):
    """(out, residual_out, mean or None, rstd) of layer_norm (rms=False) or rms_norm."""
    x, residual, weight, bias, N = _check_forward(op, x, residual, weight, bias, eps)
    rows = x.numel() // N if N else 0
    out = _new_output(x.shape, x.dtype, x.device)
    res_out = _new_output(x.shape, x.dtype, x.device) if residual is not None else \
        torch.empty((0,), dtype=x.dtype, device=x.device)
    mean = None if rms else _new_output((rows,), torch.float32, x.device)
    rstd = _new_output((rows,), torch.float32, x.device)
    if rows == 0:
        return out, res_out, mean, rstd
    args = (x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, out, res_out if residual is not None else out,
            rstd if rms else mean, rstd, rows, N, eps)
    flags = {"RMS": rms, "HAS_RES": residual is not None, "HAS_W": weight is not None,
             "HAS_B": bias is not None}
    cfg = norm_config(N)
    if cfg["ROWS"]:
        wrap_triton(_norm_fwd_tile)[(triton.cdiv(rows, cfg["ROWS"]),)](
            *args, **flags, BLOCK_N=cfg["BLOCK_N"], ROWS=cfg["ROWS"],
            num_warps=cfg["num_warps"])
    else:
        wrap_triton(_norm_fwd_loop)[(rows,)](*args, **flags, BLOCK_N=cfg["BLOCK_N"],
                                             num_warps=cfg["num_warps"])
    return out, res_out, mean, rstd


def _check_backward(op: str, grad_out, grad_residual_out, input, weight, mean, rstd):
    torch._check(input.dtype in _FLOATS,
                 lambda: f"{op}: input must be float32, float16 or bfloat16, got {input.dtype}")
    torch._check(input.dim() >= 1, lambda: f"{op}: input must have at least 1 dim")

    def same_as_input(t, name):
        torch._check(t.shape == input.shape,
                     lambda: f"{op}: {name} shape {list(t.shape)} must match input shape "
                             f"{list(input.shape)}")
        torch._check(t.dtype == input.dtype,
                     lambda: f"{op}: {name} dtype {t.dtype} must match input dtype {input.dtype}")
        torch._check(t.device == input.device,
                     lambda: f"{op}: {name} is on {t.device} but input is on {input.device}")
        return t.contiguous()

    grad_out = same_as_input(grad_out, "grad_out")
    if grad_residual_out is not None:
        grad_residual_out = same_as_input(grad_residual_out, "grad_residual_out")
    N = input.shape[-1]
    rows = input.numel() // N if N else 0
    weight = _param(op, "weight", weight, input, N)

    def stat(t, name):
        torch._check(t.dtype == torch.float32 and t.numel() == rows and t.device == input.device,
                     lambda: f"{op}: {name} must be float32 with {rows} elements (one per row) "
                             f"on {input.device}, got {t.dtype} {list(t.shape)} on {t.device}")
        return t.contiguous()

    mean = stat(mean, "mean") if mean is not None else None
    return grad_out, grad_residual_out, input.contiguous(), weight, mean, stat(rstd, "rstd"), \
        N, rows


def _backward(op: str, rms: bool, grad_out, grad_residual_out, input, weight, mean, rstd,
              has_bias: bool):
    """(grad_input, grad_weight, grad_bias) of layer_norm (rms=False) or rms_norm."""
    dy, dres, x, weight, mean, rstd, N, rows = _check_backward(
        op, grad_out, grad_residual_out, input, weight, mean, rstd)
    dev = x.device
    pdtype = weight.dtype if weight is not None else x.dtype
    dx = _new_output(x.shape, x.dtype, dev)
    dw = _new_output((N,), pdtype, dev) if weight is not None else \
        torch.empty((0,), dtype=pdtype, device=dev)
    db = _new_output((N,), pdtype, dev) if has_bias else torch.empty((0,), dtype=pdtype,
                                                                      device=dev)
    if rows == 0:
        dw.zero_()
        db.zero_()
        return dx, dw, db
    has_w = weight is not None
    cfg = norm_config(N, backward=True)
    chunks = 1 if cfg["ROWS"] else triton.cdiv(N, cfg["BLOCK_N"])
    P, per_prog = partials_count(rows, dev, max(cfg["ROWS"], 1), chunks)
    # unused pointer arguments get a buffer of this op (never an input: no store reaches it)
    spare = torch.empty((1,), dtype=torch.float32, device=dev) if not (has_w and has_bias) \
        else None
    dw_part = torch.empty((P, N), dtype=torch.float32, device=dev) if has_w else spare
    db_part = torch.empty((P, N), dtype=torch.float32, device=dev) if has_bias else spare
    w_arg = weight if has_w else x
    mean_arg = mean if mean is not None else rstd
    flags = {"RMS": rms, "HAS_DRES": dres is not None, "HAS_W": has_w, "HAS_DB": has_bias}
    dres_arg = dres if dres is not None else dy
    if cfg["ROWS"]:
        wrap_triton(_norm_bwd_tile)[(P,)](
            dy, dres_arg, x, w_arg, mean_arg, rstd, dx, dw_part, db_part, rows, N, per_prog,
            **flags, BLOCK_N=cfg["BLOCK_N"], ROWS=cfg["ROWS"], num_warps=cfg["num_warps"])
    else:
        coef = torch.empty((rows, 2), dtype=torch.float32, device=dev)
        wrap_triton(_norm_bwd_coef)[(rows,)](
            dy, x, w_arg, mean_arg, rstd, coef, N, RMS=rms, HAS_W=has_w,
            BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
        wrap_triton(_norm_bwd_loop)[(P, chunks)](
            dy, dres_arg, x, w_arg, mean_arg, rstd, coef, dx, dw_part, db_part, rows, N,
            per_prog, **flags, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    if has_w or has_bias:
        wrap_triton(_norm_bwd_reduce)[(triton.cdiv(N, REDUCE_BLOCK_C),)](
            dw_part, db_part, dw if has_w else db, db if has_bias else dw, P, N,
            HAS_DW=has_w, HAS_DB=has_bias, BLOCK_P=REDUCE_BLOCK_P, BLOCK_C=REDUCE_BLOCK_C,
            num_warps=REDUCE_WARPS)
    return dx, dw, db


# ---- operators --------------------------------------------------------------------------------

@triton_op("fastattn::layer_norm_triton", mutates_args=())
def layer_norm_triton(x: torch.Tensor, residual: torch.Tensor | None,
                      weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of fastattn::layer_norm -> (out, residual_out, mean, rstd)."""
    return _forward("fastattn.layer_norm_triton", False, x, residual, weight, bias, eps)


@triton_op("fastattn::rms_norm_triton", mutates_args=())
def rms_norm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of fastattn::rms_norm -> (out, residual_out, rstd)."""
    out, res_out, _, rstd = _forward("fastattn.rms_norm_triton", True, x, residual, weight,
                                     None, eps)
    return out, res_out, rstd


@triton_op("fastattn::layer_norm_backward_triton", mutates_args=())
def layer_norm_backward_triton(grad_out: torch.Tensor, grad_residual_out: torch.Tensor | None,
                               input: torch.Tensor, weight: torch.Tensor | None,
                               mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of fastattn::layer_norm_backward -> (grad_input, grad_weight, grad_bias)."""
    return _backward("fastattn.layer_norm_backward_triton", False, grad_out, grad_residual_out,
                     input, weight, mean, rstd, has_bias)


@triton_op("fastattn::rms_norm_backward_triton", mutates_args=())
def rms_norm_backward_triton(grad_out: torch.Tensor, grad_residual_out: torch.Tensor | None,
                             input: torch.Tensor, weight: torch.Tensor | None,
                             rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of fastattn::rms_norm_backward -> (grad_input, grad_weight)."""
    dx, dw, _ = _backward("fastattn.rms_norm_backward_triton", True, grad_out,
                          grad_residual_out, input, weight, None, rstd, False)
    return dx, dw
