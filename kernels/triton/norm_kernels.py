"""The Triton LayerNorm / RMSNorm kernels (forward tile and loop paths, the two-stage
deterministic backward) launched by kernels/triton/norm.py, which holds the algorithm's
description, the launch configurations and the operators.
"""

import triton
import triton.language as tl


# ---- forward ----------------------------------------------------------------------------------

@triton.jit
def _load_sum(x_ptr, res_ptr, res_out_ptr, offs, ok, HAS_RES: tl.constexpr):
    """s = x (+ residual, rounded to x's dtype and stored to residual_out) as float32."""
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + offs, x, mask=ok)
    return x.to(tl.float32)


@triton.jit
def _inv_sqrt(v):
    return tl.div_rn(1.0, tl.sqrt_rn(v))


@triton.jit
def _norm_fwd_tile(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, mean_ptr, rstd_ptr,
                   n_rows, N, eps, RMS: tl.constexpr, HAS_RES: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
                   ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols[None, :] < N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    s = _load_sum(x_ptr, res_ptr, res_out_ptr, offs, ok, HAS_RES)  # [ROWS, BLOCK_N] fp32
    n = N * 1.0  # float32 (N == 1 arrives as a constexpr)
    if RMS:
        rstd = _inv_sqrt(tl.div_rn(tl.sum(s * s, axis=1), n) + eps)
        y = s * rstd[:, None]
    else:
        mean0 = tl.div_rn(tl.sum(s, axis=1), n)
        d = tl.where(ok, s - mean0[:, None], 0.0)  # second pass, over the values in registers
        corr = tl.div_rn(tl.sum(d, axis=1), n)  # the rounded mean0's own error
        var = tl.maximum(tl.div_rn(tl.sum(d * d, axis=1), n) - corr * corr, 0.0)
        rstd = _inv_sqrt(var + eps)
        y = (d - corr[:, None]) * rstd[:, None]
        tl.store(mean_ptr + rows, mean0 + corr, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_fwd_loop(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, mean_ptr, rstd_ptr,
                   n_rows, N, eps, RMS: tl.constexpr, HAS_RES: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    n = N * 1.0  # float32 (N == 1 arrives as a constexpr)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: sum (RMS: sum of squares); residual_out
        cols = start + tl.arange(0, BLOCK_N)
        s = _load_sum(x_ptr, res_ptr, res_out_ptr, base + cols, cols < N, HAS_RES)
        if RMS:
            acc += s * s
        else:
            acc += s
    if HAS_RES:
        tl.debug_barrier()  # residual_out, written above, is read back below
        src_ptr = res_out_ptr
    else:
        src_ptr = x_ptr
    if RMS:
        rstd = _inv_sqrt(tl.div_rn(tl.sum(acc, axis=0), n) + eps)
        mean = 0.0
        corr = 0.0
    else:
        mean = tl.div_rn(tl.sum(acc, axis=0), n)
        acc_d = tl.zeros([BLOCK_N], tl.float32)
        acc_d2 = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):  # pass 2: deviations from the mean
            cols = start + tl.arange(0, BLOCK_N)
            s = tl.load(src_ptr + base + cols, mask=cols < N, other=0.0).to(tl.float32)
            d = tl.where(cols < N, s - mean, 0.0)
            acc_d += d
            acc_d2 += d * d
        corr = tl.div_rn(tl.sum(acc_d, axis=0), n)
        var = tl.maximum(tl.div_rn(tl.sum(acc_d2, axis=0), n) - corr * corr, 0.0)
        rstd = _inv_sqrt(var + eps)
        tl.store(mean_ptr + row, mean + corr)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, N, BLOCK_N):  # last pass: the output
        cols = start + tl.arange(0, BLOCK_N)
        s = tl.load(src_ptr + base + cols, mask=cols < N, other=0.0).to(tl.float32)
        if RMS:
            y = s * rstd
        else:
            y = (s - mean - corr) * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + cols, y.to(out_ptr.dtype.element_ty), mask=cols < N)


# ---- backward ---------------------------------------------------------------------------------

@triton.jit
def _norm_bwd_tile(dy_ptr, dres_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
                   db_part_ptr, n_rows, N, rows_per_prog, RMS: tl.constexpr,
                   HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, HAS_DB: tl.constexpr,
                   BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """Program p: grad_input of rows [p * rows_per_prog, (p + 1) * rows_per_prog) (a multiple
    of ROWS), and their column sums of dy * xhat and dy into row p of the partials."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    n = N * 1.0  # float32 (N == 1 arrives as a constexpr)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([ROWS, BLOCK_N], tl.float32)
    acc_db = tl.zeros([ROWS, BLOCK_N], tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c2 = tl.sum(g * xhat, axis=1) / n
        if RMS:
            dx = (g - xhat * c2[:, None]) * rstd[:, None]
        else:
            c1 = tl.sum(g, axis=1) / n
            dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(dres_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if HAS_W:
            acc_dw += dy * xhat
        if HAS_DB:
            acc_db += dy
    part = pid.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(dw_part_ptr + part, tl.sum(acc_dw, axis=0), mask=col_ok)
    if HAS_DB:
        tl.store(db_part_ptr + part, tl.sum(acc_db, axis=0), mask=col_ok)


@triton.jit
def _norm_bwd_coef(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, coef_ptr, N, RMS: tl.constexpr,
                   HAS_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """Loop path, one program per row: coef[row] = (mean(g), mean(g * xhat))."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    n = N * 1.0  # float32 (N == 1 arrives as a constexpr)
    rstd = tl.load(rstd_ptr + row)
    if RMS:
        mean = 0.0
    else:
        mean = tl.load(mean_ptr + row)
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    acc_gx = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = cols < N
        x = tl.load(x_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (x - mean) * rstd, 0.0)
        acc_g += g
        acc_gx += g * xhat
    tl.store(coef_ptr + 2 * row, tl.sum(acc_g, axis=0) / n)
    tl.store(coef_ptr + 2 * row + 1, tl.sum(acc_gx, axis=0) / n)


@triton.jit
def _norm_bwd_loop(dy_ptr, dres_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, coef_ptr, dx_ptr,
                   dw_part_ptr, db_part_ptr, n_rows, N, rows_per_prog, RMS: tl.constexpr,
                   HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, HAS_DB: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Loop path, program (p, c): grad_input of rows [p * rows_per_prog, ...) in column chunk
    c, and their column sums into row p, chunk c of the partials."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_N], tl.float32)
    acc_db = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    for row in range(row_start, row_end):
        offs = tl.cast(row, tl.int64) * N + cols  # (the interpreter gives a Python int)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        c1 = tl.load(coef_ptr + 2 * row)
        c2 = tl.load(coef_ptr + 2 * row + 1)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(ok, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        if HAS_W:
            g = dy * w
        else:
            g = dy
        if RMS:
            dx = (g - xhat * c2) * rstd
        else:
            dx = (g - c1 - xhat * c2) * rstd
        if HAS_DRES:
            dx += tl.load(dres_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if HAS_W:
            acc_dw += dy * xhat
        if HAS_DB:
            acc_db += dy
    part = pid.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(dw_part_ptr + part, acc_dw, mask=ok)
    if HAS_DB:
        tl.store(db_part_ptr + part, acc_db, mask=ok)


@triton.jit
def _norm_bwd_reduce(dw_part_ptr, db_part_ptr, dw_ptr, db_ptr, P, N, HAS_DW: tl.constexpr,
                     HAS_DB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stage 2: column sums of the (P, N) float32 partials, in a fixed order, stored in the
    gradients' dtype."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    acc_dw = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    acc_db = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        ok = (ps < P)[:, None] & col_ok[None, :]
        offs = ps.to(tl.int64)[:, None] * N + cols[None, :]
        if HAS_DW:
            acc_dw += tl.load(dw_part_ptr + offs, mask=ok, other=0.0)
        if HAS_DB:
            acc_db += tl.load(db_part_ptr + offs, mask=ok, other=0.0)
    if HAS_DW:
        tl.store(dw_ptr + cols, tl.sum(acc_dw, axis=0).to(dw_ptr.dtype.element_ty), mask=col_ok)
    if HAS_DB:
        tl.store(db_ptr + cols, tl.sum(acc_db, axis=0).to(db_ptr.dtype.element_ty), mask=col_ok)
