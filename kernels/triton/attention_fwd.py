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

Sequences and modifiers (AttnGeometry in fastattn/attention_args.h): with VARLEN the
program's sequence b reads its rows and lengths from cu_seqlens (_seq); tensors are indexed in
tensor coordinates (row_q + i, row_k + j), modifiers use the local i, j and the diagonal
offset d. Scores: s = scale * q.k, with SOFTCAP s = softcap * tanh(s / softcap) (_tanh), with
ALIBI z = s - slope * |i + d - j|; WINDOW: key j visible iff i + d - left <= j <= i + d + right
(-1: unbounded side; causal is right = 0). The key loop of a query block runs in three phases
(_key_range): key blocks partly left of the window (per-element mask), blocks fully visible to
every row of the block and inside S_b (no mask), then the rest (partial last block, blocks
partly right of the window); blocks outside [i0 + d - left, i_last + d + right] are never
visited. At the end out = acc / l (* 1 / (1 - dropout_p)) and lse = m + ln(l); a row without
any visible key (l == 0) gets out = 0 and lse = +inf.

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



# ---- sequences and score modifiers (AttnGeometry in fastattn/attention_args.h) ----------------

@triton.jit
def _seq(cu_q_ptr, cu_k_ptr, b, L, S, bottom_right, VARLEN: tl.constexpr):
    """(row_q, row_k, L_b, S_b, diag) of sequence b: its first query / key rows in the tensors,
    its lengths and the diagonal offset d_b (S_b - L_b when bottom_right, else 0)."""
    if VARLEN:
        row_q = tl.load(cu_q_ptr + b)
        row_k = tl.load(cu_k_ptr + b)
        L_b = tl.load(cu_q_ptr + b + 1) - row_q
        S_b = tl.load(cu_k_ptr + b + 1) - row_k
    else:
        row_q = b * 0
        row_k = b * 0
        L_b = L + b * 0
        S_b = S + b * 0
    diag = tl.where(bottom_right != 0, S_b - L_b, 0)
    return row_q, row_k, L_b, S_b, diag


@triton.jit
def _tanh(x, ACCURATE: tl.constexpr):
    """tanh in float32 from exp2 (no libdevice: the same code runs in the interpreter).
    ACCURATE (float32 inputs): an odd Taylor polynomial below |x| = 1/4 (where 1 - e^{-2|x|}
    would cancel), else (1 - e) / (1 + e) with e = e^{-2|x|}, within ~2 ulp; else (16-bit
    inputs, whose scores carry far larger errors) 1 - 2 / (e^{2x} + 1): absolute error ~1 ulp
    of 1, one temporary tile (the large tiles of the 16-bit kernels have no registers to spare)."""
    if ACCURATE:
        a = tl.abs(x)
        e = tl.math.exp2(a * -2.8853900817779268)  # e^{-2a}
        big = (1.0 - e) / (1.0 + e)
        x2 = x * x
        poly = 1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
            -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197))))
        return tl.where(a < 0.25, x * poly, tl.where(x < 0, -big, big))
    else:
        return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _modify(z, offs_i, offs_j, diag, slope, softcap, n_ok, left, right, ALIBI: tl.constexpr,
            SOFTCAP: tl.constexpr, VISIBLE: tl.constexpr, WINDOW: tl.constexpr,
            TRANSPOSED: tl.constexpr, ACCURATE: tl.constexpr):
    """Scores z = scale * q.k [R, C] (queries x keys, or keys x queries when TRANSPOSED; local
    rows offs_i, keys offs_j) -> (capped s (softcap, else z), s + alibi with the invisible keys
    at -inf). VISIBLE: apply the key bound n_ok [len(offs_j)] and (WINDOW) the window / causal
    limits (a per-element mask), else every key is visible. ACCURATE: _tanh's."""
    if TRANSPOSED:
        i2 = offs_i[None, :]
        j2 = offs_j[:, None]
        nk = n_ok[:, None]
    else:
        i2 = offs_i[:, None]
        j2 = offs_j[None, :]
        nk = n_ok[None, :]
    if SOFTCAP:
        z = softcap * _tanh(z / softcap, ACCURATE)
    s = z
    pos = i2 + diag  # the query's position among the keys
    if ALIBI:
        z = z - slope * tl.abs(pos - j2).to(tl.float32)
    if VISIBLE:
        if WINDOW:
            ok = nk & ((left < 0) | (j2 >= pos - left)) & ((right < 0) | (j2 <= pos + right))
        else:
            ok = nk
        z = tl.where(ok, z, float("-inf"))
    return s, z


@triton.jit
def _key_range(i0, L_b, S_b, diag, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               WINDOW: tl.constexpr):
    """Key blocks of the query block [i0, i0 + BLOCK_M) of a sequence: (lo, f0, f1, hi), lo and
    f0 multiples of BLOCK_N: keys [lo, hi) hold every key a row of the block may see, and the
    blocks [f0, f1) are visible to every row and inside S_b (no per-element mask). Empty
    (hi = 0) for a block past L_b."""
    i_last = tl.minimum(i0 + BLOCK_M, L_b) - 1
    hi = tl.where(i0 < L_b, S_b, 0)
    full_hi = S_b // BLOCK_N * BLOCK_N
    lo = i0 * 0
    full_lo = i0 * 0
    if WINDOW:
        hi = tl.where(right >= 0, tl.minimum(hi, tl.maximum(i_last + diag + right + 1, 0)), hi)
        full_hi = tl.where(right >= 0, tl.minimum(
            full_hi, tl.maximum(i0 + diag + right + 1, 0) // BLOCK_N * BLOCK_N), full_hi)
        lo = tl.where(left >= 0, tl.maximum(i0 + diag - left, 0) // BLOCK_N * BLOCK_N, 0)
        full_lo = tl.where(left >= 0, tl.cdiv(tl.maximum(i_last + diag - left, 0), BLOCK_N)
                           * BLOCK_N, 0)
    f0 = tl.minimum(tl.maximum(full_lo, lo), hi)
    f1 = tl.maximum(tl.minimum(full_hi, hi), f0)
    return lo, f0, f1, hi


# ---- forward ----------------------------------------------------------------------------------

@triton.jit
def _fwd_steps(acc, l_i, m_i, q, q_blk, k_base, v_base, mask_blk, offs_m, m_ok, offs_cv, row_idx,
               lo, hi, lo2, hi2, S_b, diag, slope, softcap, left, right, E, Ev, q_sl, k_ss, v_ss,
               m_sl,
               m_cols, scale, dropout_p, seed_lo, seed_hi, off_lo, off_hi,
               MASKED: tl.constexpr, MASK_KIND: tl.constexpr, WINDOW: tl.constexpr,
               ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
               BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """Key blocks [lo, hi) and [lo2, hi2) (sequence-local) of one query block (local rows
    offs_m): updates acc
    [BLOCK_M, BLOCK_CV] (value columns offs_cv), l_i and m_i [BLOCK_M]. MASKED: mask keys >=
    S_b and those outside the window (causal included)."""
    offs_nl = tl.arange(0, BLOCK_N)  # [BLOCK_N] key offsets inside a block
    offs_e = tl.arange(0, BLOCK_E)
    n1 = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)  # blocks [lo, hi), then [lo2, hi2)
    n2 = tl.cdiv(tl.maximum(hi2 - lo2, 0), BLOCK_N)
    for n in range(n1 + n2):
        j0 = tl.multiple_of(tl.where(n < n1, lo + n * BLOCK_N, lo2 + (n - n1) * BLOCK_N),
                           BLOCK_N)  # (block starts: vector loads)
        j64 = tl.cast(j0, tl.int64)  # (the interpreter gives a Python int)
        offs_n = j0 + offs_nl  # [BLOCK_N]
        n_ok = offs_n < S_b
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
        if SOFTCAP or ALIBI or MASKED:
            _, z = _modify(z, offs_m, offs_n, diag, slope, softcap, n_ok, left, right, ALIBI,
                           SOFTCAP, MASKED, WINDOW, False, BLOCK_K > 0)
        if MASK_KIND != 0:
            z = _scores_mask(z, mask_blk + j64, m_sl, m_ok, offs_n < m_cols, BLOCK_M, BLOCK_N,
                             MASK_KIND, False, MASKED)
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
def _attn_fwd(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, alibi_ptr,
              bh0, Hq, group, L, S, Lt, St, E, Ev, q_sb, q_sh, q_sl, k_sb, k_sh, k_ss, v_sb, v_sh,
              v_ss, m_sb, m_sh, m_sl, m_cols, scale, out_scale, dropout_p, seed_lo, seed_hi,
              off_lo, off_hi, window_left, window_right, bottom_right, alibi_sb, softcap,
              len_key, MASK_KIND: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
              ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_CV: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query block of sequence b, bh0 + y = b * Hq + h, z): out (Bt, Hq, Lt, Ev)
    columns [z * BLOCK_CV, (z + 1) * BLOCK_CV) of its queries (BLOCK_CV: all of the padded Ev
    but for float32, whose value columns are split over programs that each redo the scores),
    and lse (Bt, Hq, Lt) (z = 0). L, S: the lengths (the largest ones with VARLEN, whose
    sequences come from cu_q / cu_k); Lt, St: the tensors' lengths. WINDOW: window_left /
    window_right (-1: unbounded; causal is right = 0) limit the keys. out_scale = 1 / (1 -
    dropout_p) (1 without dropout); len_key: only the autotuner's key."""
    i0 = tl.program_id(0) * BLOCK_M
    bh = bh0 + tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    row_q, row_k, L_b, S_b, diag = _seq(cu_q_ptr, cu_k_ptr, b, L, S, bottom_right, VARLEN)
    if VARLEN:
        tb = b * 0  # the tensors hold one batch entry
    else:
        tb = b
    offs_ml = tl.arange(0, BLOCK_M)
    offs_m = i0 + offs_ml  # [BLOCK_M] sequence-local rows
    m_ok = offs_m < L_b
    offs_e = tl.arange(0, BLOCK_E)
    offs_cv = tl.program_id(2) * BLOCK_CV + tl.arange(0, BLOCK_CV)
    b64, h64, hk64, tb64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64), tb.to(tl.int64)
    r64 = row_q.to(tl.int64) + i0  # first tensor row of the block
    q_blk = q_ptr + tb64 * q_sb + h64 * q_sh + r64 * q_sl
    k_base = k_ptr + tb64 * k_sb + hk64 * k_sh + row_k.to(tl.int64) * k_ss
    v_base = v_ptr + tb64 * v_sb + hk64 * v_sh + row_k.to(tl.int64) * v_ss
    mask_blk = mask_ptr + b64 * m_sb + h64 * m_sh + tl.cast(i0, tl.int64) * m_sl  # dense only
    if BLOCK_K == 0:  # the query block stays in registers
        q = tl.load(q_blk + (offs_ml[:, None] * q_sl + offs_e[None, :]),
                    mask=m_ok[:, None] & (offs_e[None, :] < E), other=0.0)  # [BLOCK_M, BLOCK_E]
    else:
        q = 0  # read in chunks by _rows_dot
    row0 = (tb64 * Hq + h64) * Lt + r64  # the block's first row in out and lse
    row_idx = (row0 + offs_ml) * St + row_k  # [BLOCK_M] dropout index of (i, 0)
    if ALIBI:
        slope = tl.load(alibi_ptr + b64 * alibi_sb + h64)
    else:
        slope = 0.0

    acc = tl.zeros([BLOCK_M, BLOCK_CV], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lo, f0, f1, hi = _key_range(i0, L_b, S_b, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                WINDOW)
    # the blocks visible to every row, then those partly visible (one loop: fewer registers)
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, q, q_blk, k_base, v_base, mask_blk, offs_m, m_ok, offs_cv, row_idx,
        f0, f1, f1, f1, S_b, diag, slope, softcap, window_left, window_right, E, Ev, q_sl, k_ss,
        v_ss, m_sl, m_cols, scale, dropout_p, seed_lo, seed_hi, off_lo, off_hi, False,
        MASK_KIND, WINDOW, ALIBI, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_K,
        PRECISION)
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, q, q_blk, k_base, v_base, mask_blk, offs_m, m_ok, offs_cv, row_idx,
        lo, f0, f1, hi, S_b, diag, slope, softcap, window_left, window_right, E, Ev, q_sl, k_ss,
        v_ss, m_sl, m_cols, scale, dropout_p, seed_lo, seed_hi, off_lo, off_hi, True,
        MASK_KIND, WINDOW, ALIBI, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_K,
        PRECISION)

    has = l_i > 0.0  # a row without any visible key: out 0, lse +inf
    inv = tl.where(has, out_scale / tl.where(has, l_i, 1.0), 0.0)
    out = acc * inv[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(out_ptr + row0 * Ev + (offs_ml[:, None] * Ev + offs_cv[None, :]),
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_cv[None, :] < Ev))
    tl.store(lse_ptr + row0 + offs_ml, lse, mask=m_ok & (tl.program_id(2) == 0))
