"""Triton kernels of fastattn's fused attention forward (launched by attention.py) and the
helpers the backward shares: the dropout random numbers (Philox4x32-10) and _rows_dot.

_attn_fwd, one program per (block of BLOCK_M queries, batch * query head), FlashAttention-2:
keys / values stream in blocks of BLOCK_N with an online softmax:

    z = scale * (q . k_j) (+ mask_ij, or -inf where masked)
    m_new = max(m, max_j z); alpha = 2^(log2e (m - m_new)); p = 2^(log2e (z - m_new))
    l = alpha * l + sum_j p; acc = alpha * acc + (p * keep) . V_blk

The differences z - m are taken in natural units before the scaling by log2(e) (one more
multiply than folding log2(e) into the scale, but the exponent's rounding error is then
relative to z - m, not to z): so a row's lse = m + ln(l) is exactly z for a single key, and the
backward's p = 2^(log2e (z - lse)) is exactly 1 there.

The key loop runs in two phases: key blocks that need no per-element masking (fully inside S
and, under is_causal, fully left of the block's first query), then the rest (the partial last
block and the diagonal blocks; under is_causal key blocks past the block's last query are never
visited). At the end out = acc / l (* 1 / (1 - dropout_p)) and lse = m + ln(l); a row without
any unmasked key (l == 0) gets out = 0 and lse = +inf.

Head dims E, Ev are padded to BLOCK_E, BLOCK_EV (powers of two >= 16) with masked loads.
tl.dot runs in the storage dtype (fp16 / bf16), the query block resident in registers, or for
float32 inputs in full fp32 precision (input_precision="ieee", FMA). Triton's FMA dots hold
their whole reduction dim and wide operand strips per thread, so for float32 (BLOCK_K > 0) the
score products run over the head dim in chunks of BLOCK_K (_rows_dot, operands re-read from
cache, nothing resident), and the output columns are split over programs (BLOCK_CV / BLOCK_CE
of them each; the programs of one block redo its scores).

Addressing: 64-bit scalar bases (batch, head and block starts) plus 32-bit offsets inside a
block; the launcher keeps row strides small enough (attention.py, _rows_fit).
"""

from __future__ import annotations

import triton
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


# ---- dropout: Philox4x32-10 (kernels/include/fastattn/philox.h) -------------------------------

@triton.jit
def _u32(x):
    """A 32-bit scalar argument (passed as a signed int32) as uint32 bits."""
    return tl.cast(x, tl.int32).to(tl.uint32, bitcast=True)


@triton.jit
def dropout_keep(row_idx, col, dropout_p, seed_lo, seed_hi, off_lo, off_hi):
    """True where the score with flat index idx = row_idx + col is kept (row_idx: int64,
    ((b * Hq + h) * L + i) * S; col: int32 j; broadcast against each other): u = (x0 >> 8) *
    2^-24 >= dropout_p, x0 the first word of Philox4x32-10 with counter (lo32(idx), hi32(idx),
    lo32(offset), hi32(offset)) and key (lo32(seed), hi32(seed)). Seed and offset halves arrive
    as int32 bit patterns. The 64-bit add is done on 32-bit halves (no 64-bit tile)."""
    lo = row_idx.to(tl.uint32)  # truncation: the low 32 bits
    hi = (row_idx >> 32).to(tl.uint32)  # row_idx >= 0
    c0 = lo + col.to(tl.uint32)
    c1 = hi + (c0 < lo).to(tl.uint32)  # the carry
    c2 = tl.zeros_like(c0) + _u32(off_lo)
    c3 = tl.zeros_like(c0) + _u32(off_hi)
    k0 = _u32(seed_lo)
    k1 = _u32(seed_hi)
    for _ in tl.static_range(10):
        m0 = tl.full([], 0xD2511F53, tl.uint32)
        m1 = tl.full([], 0xCD9E8D57, tl.uint32)
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + tl.full([], 0x9E3779B9, tl.uint32)
        k1 = k1 + tl.full([], 0xBB67AE85, tl.uint32)
    u = (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= dropout_p


# ---- shared pieces ----------------------------------------------------------------------------

@triton.jit
def _rows_dot(x_blk, x_s, x_ok, y_blk, y_s, y_ok, D, R: tl.constexpr, C: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """[R, C] float32 = X Y^T over the head dim (D valid of BLOCK_D), in chunks of BLOCK_K:
    row r of X at x_blk + r * x_s (zero where not x_ok [R]), row c of Y at y_blk + c * y_s
    (zero where not y_ok [C])."""
    offs_r = tl.arange(0, R)
    offs_c = tl.arange(0, C)
    acc = tl.zeros([R, C], tl.float32)
    for d0 in range(0, BLOCK_D, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K)
        d_ok = offs_d < D
        x = tl.load(x_blk + (offs_r[:, None] * x_s + offs_d[None, :]),
                    mask=x_ok[:, None] & d_ok[None, :], other=0.0)  # [R, BLOCK_K]
        yt = tl.load(y_blk + (offs_c[None, :] * y_s + offs_d[:, None]),
                     mask=y_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_K, C]
        acc += tl.dot(x, yt, input_precision=PRECISION)
    return acc


@triton.jit
def _scores_mask(z, mask_blk, m_sl, row_ok, col_ok, ROWS: tl.constexpr, COLS: tl.constexpr,
                 MASK_KIND: tl.constexpr, TRANSPOSED: tl.constexpr, CHECK_COLS: tl.constexpr):
    """The mask applied to a score tile z [ROWS, COLS] (queries x keys, or keys x queries when
    TRANSPOSED); mask element (query a, key b) of the block at mask_blk + a * m_sl + b.
    CHECK_COLS=False: every column is in range (no per-column predicate, so the loads along
    the keys vectorize whatever S is)."""
    offs_r = tl.arange(0, ROWS)
    offs_c = tl.arange(0, COLS)
    if TRANSPOSED:
        offs = offs_c[None, :] * m_sl + offs_r[:, None]
    else:
        offs = offs_r[:, None] * m_sl + offs_c[None, :]
    if CHECK_COLS:
        ok = row_ok[:, None] & col_ok[None, :]
    else:
        ok = row_ok[:, None]
    mv = tl.load(mask_blk + offs, mask=ok, other=0)
    if MASK_KIND == 1:
        return tl.where(mv != 0, z, float("-inf"))
    return z + mv.to(tl.float32)


# ---- forward ----------------------------------------------------------------------------------

@triton.jit
def _fwd_steps(acc, l_i, m_i, q, q_blk, k_base, v_base, mask_blk, offs_m, m_ok, offs_cv, row_idx,
               lo, hi, S, E, Ev, q_sl, k_ss, v_ss, m_sl, m_cols, scale, dropout_p, seed_lo, seed_hi,
               off_lo, off_hi, MASKED: tl.constexpr, MASK_KIND: tl.constexpr,
               CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """Key blocks [lo, hi) of one query block: updates acc [BLOCK_M, BLOCK_CV] (value columns
    offs_cv), l_i and m_i [BLOCK_M]. MASKED: mask keys >= S and, under CAUSAL, keys past each
    query."""
    offs_nl = tl.arange(0, BLOCK_N)  # [BLOCK_N] key offsets inside a block
    offs_e = tl.arange(0, BLOCK_E)
    for j0 in range(lo, hi, BLOCK_N):
        j64 = tl.cast(j0, tl.int64)  # (the interpreter gives a Python int)
        offs_n = j0 + offs_nl  # [BLOCK_N]
        n_ok = offs_n < S
        k_blk = k_base + j64 * k_ss
        if BLOCK_K == 0:
            # [BLOCK_E, BLOCK_N]
            kt = tl.load(k_blk + (offs_nl[None, :] * k_ss + offs_e[:, None]),
                         mask=n_ok[None, :] & (offs_e[:, None] < E), other=0.0)
            z = tl.dot(q, kt, input_precision=PRECISION)
        else:
            z = _rows_dot(q_blk, q_sl, m_ok, k_blk, k_ss, n_ok, E, BLOCK_M, BLOCK_N, BLOCK_E,
                          BLOCK_K, PRECISION)
        z = z * scale  # [BLOCK_M, BLOCK_N] float32
        if MASK_KIND != 0:
            z = _scores_mask(z, mask_blk + j64, m_sl, m_ok, offs_n < m_cols, BLOCK_M, BLOCK_N,
                             MASK_KIND, False, MASKED)
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing unmasked yet: p = 0
        alpha = tl.math.exp2((m_i - m_use) * 1.4426950408889634)
        p = tl.math.exp2((z - m_use[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep_d = dropout_keep(row_idx[:, None], offs_n[None, :], dropout_p, seed_lo,
                                  seed_hi, off_lo, off_hi)
            p = tl.where(keep_d, p, 0.0)
        v = tl.load(v_base + j64 * v_ss + (offs_nl[:, None] * v_ss + offs_cv[None, :]),
                    mask=n_ok[:, None] & (offs_cv[None, :] < Ev), other=0.0)  # [BLOCK_N, BLOCK_CV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, bh0, Hq, group, L, S, E, Ev,
              q_sb, q_sh, q_sl, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, m_sb, m_sh, m_sl, m_cols,
              scale, out_scale, dropout_p, seed_lo, seed_hi, off_lo, off_hi, len_key,
              MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_CV: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query block, bh0 + y, z): out (B, Hq, L, Ev) columns [z * BLOCK_CV, (z + 1) *
    BLOCK_CV) of its queries (BLOCK_CV: all of the padded Ev but for float32, whose value
    columns are split over programs that each redo the scores), and lse (B, Hq, L) (z = 0).
    out_scale = 1 / (1 - dropout_p) (1 without dropout); len_key: only the autotuner's key (a
    bucket of the sequence lengths)."""
    i0 = tl.program_id(0) * BLOCK_M
    bh = bh0 + tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_ml = tl.arange(0, BLOCK_M)
    offs_m = i0 + offs_ml  # [BLOCK_M]
    m_ok = offs_m < L
    offs_e = tl.arange(0, BLOCK_E)
    offs_cv = tl.program_id(2) * BLOCK_CV + tl.arange(0, BLOCK_CV)
    b64, h64, hk64, i64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64), tl.cast(i0, tl.int64)
    q_blk = q_ptr + b64 * q_sb + h64 * q_sh + i64 * q_sl
    k_base = k_ptr + b64 * k_sb + hk64 * k_sh
    v_base = v_ptr + b64 * v_sb + hk64 * v_sh
    mask_blk = mask_ptr + b64 * m_sb + h64 * m_sh + i64 * m_sl
    if BLOCK_K == 0:  # the query block stays in registers
        q = tl.load(q_blk + (offs_ml[:, None] * q_sl + offs_e[None, :]),
                    mask=m_ok[:, None] & (offs_e[None, :] < E), other=0.0)  # [BLOCK_M, BLOCK_E]
    else:
        q = 0  # read in chunks by _rows_dot
    row_idx = (bh.to(tl.int64) * L + offs_m) * S  # [BLOCK_M] dropout index of (i, 0)

    acc = tl.zeros([BLOCK_M, BLOCK_CV], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if CAUSAL:
        end = tl.minimum(S, i0 + BLOCK_M)  # keys past the last query are never visited
        full = tl.minimum(S, i0 + 1) // BLOCK_N * BLOCK_N  # blocks left of the first query
    else:
        end = S
        full = S // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, q_blk, k_base, v_base, mask_blk, offs_m, m_ok,
                               offs_cv, row_idx, 0, full, S, E, Ev, q_sl, k_ss, v_ss, m_sl, m_cols,
                               scale, dropout_p, seed_lo, seed_hi, off_lo, off_hi, False, MASK_KIND,
                               CAUSAL, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_K, PRECISION)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, q_blk, k_base, v_base, mask_blk, offs_m, m_ok,
                               offs_cv, row_idx, full, end, S, E, Ev, q_sl, k_ss, v_ss, m_sl,
                               m_cols, scale, dropout_p, seed_lo, seed_hi, off_lo, off_hi, True,
                               MASK_KIND, CAUSAL, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_K,
                               PRECISION)

    has = l_i > 0.0  # a row without any unmasked key: out 0, lse +inf
    inv = tl.where(has, out_scale / tl.where(has, l_i, 1.0), 0.0)
    out = acc * inv[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    row0 = bh.to(tl.int64) * L + i0  # first row of the block in the contiguous outputs
    tl.store(out_ptr + row0 * Ev + (offs_ml[:, None] * Ev + offs_cv[None, :]),
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_cv[None, :] < Ev))
    tl.store(lse_ptr + row0 + offs_ml, lse, mask=m_ok & (tl.program_id(2) == 0))
