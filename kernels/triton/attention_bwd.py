"""Triton kernels of fastattn's fused attention backward (launched by attention.py),
FlashAttention-2 algebra with p recomputed from the forward's lse (no (L, S) buffer):

    p_ij = 2^(log2e (z_ij - lse_i))   (0 where masked, and on rows with lse = +inf)
    Z_ij = keep_ij / (1 - dropout_p)  (1 without dropout; keep from dropout_keep)
    D_i = sum_e dO_ie * O_ie
    dV_j = sum_i p_ij Z_ij dO_i;  dP_ij = (dO_i . v_j) Z_ij;  dz_ij = p_ij (dP_ij - D_i)
    dQ_i = scale * sum_j dz_ij k_j;  dK_j = scale * sum_i dz_ij q_i

_attn_bwd_delta: D (B, Hq, L) float32, one program per (query block, batch * head).
_attn_bwd_dkdv: one program per (key block, sequence * kv head); dK, dV of its keys in
  float32 registers, summed over the group's Hq / Hkv query heads and all query blocks in a
  fixed order (deterministic, no atomics). Scores are computed transposed (keys x queries), so
  neither accumulation needs a transpose of the probabilities. Query blocks that see no key of
  the block (window / causal) are skipped; only those partly inside the window mask per
  element (_query_range).
_attn_bwd_dq: one program per (query block, sequence * query head); dQ over the key blocks in
  the forward's three phases (_key_range), and, when WANT_DZ (dense batches), dz (B, Hq, L, S)
  float32 for the mask's gradient, every element written (zeros outside the window).
Sequences, tensor coordinates and modifiers as in the forward (attention_fwd.py). Softcap:
the gradient w.r.t. scale * q.k is dz * (1 - (s / softcap)^2), s the capped score; dz itself
(the mask's gradient) is not scaled.
BLOCK_K > 0 (float32 inputs): the products over the head dims run in chunks (_rows_dot), as in
the forward, and the key / query blocks are re-read per step instead of staying resident.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # a package import; the resource report loads this file by path
    from .attention_fwd import _key_range, _modify, _rows_dot, _scores_mask, _seq, dropout_keep
except ImportError:
    from fastattn._triton.attention_fwd import (
        _key_range,
        _modify,
        _rows_dot,
        _scores_mask,
        _seq,
        dropout_keep,
    )


@triton.jit
def _attn_bwd_delta(o_ptr, do_ptr, delta_ptr, bh0, Hq, L, Ev, o_sb, o_sh, o_sl, do_sb, do_sh,
                    do_sl, BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr):
    """D = rowsum(dO * O) of BLOCK_M query rows of head bh0 + y, float32 (B, Hq, L)."""
    bh = bh0 + tl.program_id(1)
    b, h = (bh // Hq).to(tl.int64), (bh % Hq).to(tl.int64)
    i0 = tl.program_id(0) * BLOCK_M
    i64 = tl.cast(i0, tl.int64)
    offs_ml = tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    m_ok = i0 + offs_ml < L
    ok = m_ok[:, None] & (offs_ev < Ev)[None, :]
    o = tl.load(o_ptr + b * o_sb + h * o_sh + i64 * o_sl + (offs_ml[:, None] * o_sl
                                                            + offs_ev[None, :]),
                mask=ok, other=0.0)
    do = tl.load(do_ptr + b * do_sb + h * do_sh + i64 * do_sl + (offs_ml[:, None] * do_sl
                                                                 + offs_ev[None, :]),
                 mask=ok, other=0.0)
    d = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(delta_ptr + bh.to(tl.int64) * L + i64 + offs_ml, d, mask=m_ok)


# ---- dK / dV ----------------------------------------------------------------------------------

@triton.jit
def _dkdv_steps(dk, dv, k, v, k_blk, v_blk, q_base, do_base, mask_blk, lse_base, delta_base,
                offs_n, n_ok, idx_base, lo, hi, lo2, hi2, L_b, diag, slope, softcap, left, right,
                E, Ev,
                q_sl, k_ss, v_ss, do_sl, m_sl, m_cols, St, scale, dropout_p, out_scale, seed_lo,
                seed_hi, off_lo, off_hi, offs_ce, offs_cv, MASKED: tl.constexpr,
                MASK_KIND: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr,
                SOFTCAP: tl.constexpr,
                DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr):
    """Query blocks [lo, hi) and [lo2, hi2) (sequence-local) of one head against one key
    block: updates dk
    [BLOCK_N, BLOCK_CE] and dv [BLOCK_N, BLOCK_CV] (float32, dk not yet scaled; columns offs_ce
    / offs_cv). MASKED: mask the keys outside each query's window (partly visible blocks).
    Rows past L_b read lse = +inf (p = 0)."""
    offs_ml = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    n1 = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)  # blocks [lo, hi), then [lo2, hi2)
    n2 = tl.cdiv(tl.maximum(hi2 - lo2, 0), BLOCK_M)
    for n in range(n1 + n2):
        i0 = tl.multiple_of(tl.where(n < n1, lo + n * BLOCK_M, lo2 + (n - n1) * BLOCK_M),
                           BLOCK_M)  # (block starts: vector loads)
        i64 = tl.cast(i0, tl.int64)  # (the interpreter gives a Python int)
        offs_m = i0 + offs_ml  # [BLOCK_M]
        m_ok = offs_m < L_b
        q_blk = q_base + i64 * q_sl
        do_blk = do_base + i64 * do_sl
        if BLOCK_K == 0:
            # [BLOCK_E, BLOCK_M]
            qt = tl.load(q_blk + (offs_ml[None, :] * q_sl + offs_e[:, None]),
                         mask=m_ok[None, :] & (offs_e[:, None] < E), other=0.0)
            zt = tl.dot(k, qt, input_precision=PRECISION)
        else:
            zt = _rows_dot(k_blk, k_ss, n_ok, q_blk, q_sl, m_ok, E, BLOCK_N, BLOCK_M, BLOCK_E,
                           BLOCK_K, PRECISION)
        zt = zt * scale  # [BLOCK_N, BLOCK_M]
        st = zt
        if SOFTCAP or ALIBI or MASKED:
            st, zt = _modify(zt, offs_m, offs_n, diag, slope, softcap, n_ok, left, right, ALIBI,
                             SOFTCAP, MASKED, WINDOW, True, BLOCK_K > 0)
        if MASK_KIND != 0:
            zt = _scores_mask(zt, mask_blk + i64 * m_sl, m_sl, offs_n < m_cols, m_ok, BLOCK_N,
                              BLOCK_M, MASK_KIND, True, True)
        lse = tl.load(lse_base + i64 + offs_ml, mask=m_ok, other=float("inf"))
        pt = tl.math.exp2((zt - lse[None, :]) * 1.4426950408889634)  # 0 where lse = +inf
        if BLOCK_K == 0:
            # [BLOCK_M, BLOCK_EV]
            do = tl.load(do_blk + (offs_ml[:, None] * do_sl + offs_ev[None, :]),
                         mask=m_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        else:
            dpt = _rows_dot(v_blk, v_ss, n_ok, do_blk, do_sl, m_ok, Ev, BLOCK_N, BLOCK_M,
                            BLOCK_EV, BLOCK_K, PRECISION)
            # [BLOCK_M, BLOCK_CV]
            do = tl.load(do_blk + (offs_ml[:, None] * do_sl + offs_cv[None, :]),
                         mask=m_ok[:, None] & (offs_cv[None, :] < Ev), other=0.0)
        di = tl.load(delta_base + i64 + offs_ml, mask=m_ok, other=0.0)  # [BLOCK_M]
        if DROPOUT:
            keep = dropout_keep((idx_base + (i64 + offs_ml) * St)[None, :], offs_n[:, None],
                                dropout_p, seed_lo, seed_hi, off_lo, off_hi)
            pdt = tl.where(keep, pt * out_scale, 0.0).to(do.dtype)
            dpt = tl.where(keep, dpt * out_scale, 0.0)
        else:
            pdt = pt.to(do.dtype)
        dst = pt * (dpt - di[None, :])  # [BLOCK_N, BLOCK_M] dz transposed (pt, dpt die here)
        if SOFTCAP:  # d(capped s) / d(scale q.k) = 1 - (s / softcap)^2
            r = st / softcap
            dst = dst * (1.0 - r * r)
        dv += tl.dot(pdt, do, input_precision=PRECISION)
        if BLOCK_K == 0:
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
        else:
            # [BLOCK_M, BLOCK_CE]
            q = tl.load(q_blk + (offs_ml[:, None] * q_sl + offs_ce[None, :]),
                        mask=m_ok[:, None] & (offs_ce[None, :] < E), other=0.0)
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _query_range(j0, L_b, S_b, diag, left, right, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """Query blocks of the key block [j0, j0 + BLOCK_N) of a sequence: (lo, f0, f1, hi), lo
    and f0 multiples of BLOCK_M: rows [lo, hi) hold every query that may see a key of the
    block, and the query blocks [f0, f1) see all of its keys (no per-element mask). Empty
    (hi = 0) for a block past S_b."""
    j_last = tl.minimum(j0 + BLOCK_N, S_b) - 1
    hi = tl.where(j0 < S_b, L_b, 0)
    lo = j0 * 0
    f0 = j0 * 0
    f1 = hi
    if WINDOW:
        lo = tl.where(right >= 0, tl.maximum(j0 - diag - right, 0) // BLOCK_M * BLOCK_M, 0)
        hi = tl.where(left >= 0, tl.minimum(hi, tl.maximum(j_last - diag + left + 1, 0)), hi)
        u0 = tl.where(right >= 0, tl.cdiv(tl.maximum(j_last - diag - right, 0), BLOCK_M)
                      * BLOCK_M, 0)
        u1 = tl.where(left >= 0, tl.maximum(j0 - diag + left + 1, 0) // BLOCK_M * BLOCK_M, hi)
        f0 = tl.minimum(tl.maximum(u0, lo), hi)
        f1 = tl.maximum(tl.minimum(u1, hi), f0)
    return lo, f0, f1, hi


@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                   cu_q_ptr, cu_k_ptr, alibi_ptr, bh0, Hq, Hkv, group, L, S, Lt, St, E, Ev,
                   q_sb, q_sh, q_sl, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, m_sb, m_sh, m_sl, m_cols,
                   do_sb, do_sh, do_sl, scale, dropout_p, out_scale, seed_lo, seed_hi, off_lo,
                   off_hi, window_left, window_right, bottom_right, alibi_sb, softcap, len_key,
                   MASK_KIND: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
                   ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_EV: tl.constexpr, BLOCK_CE: tl.constexpr, BLOCK_CV: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (key block of sequence b, bh0 + y = b * Hkv + kv head, z): grad_k (Bt, Hkv, St,
    E) and grad_v (Bt, Hkv, St, Ev) rows of its keys, columns [z * BLOCK_CE, ...) and
    [z * BLOCK_CV, ...) (all of the padded head dims but for float32). Sizes and modifiers as
    in _attn_fwd."""
    j0 = tl.program_id(0) * BLOCK_N
    bhk = bh0 + tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    row_q, row_k, L_b, S_b, diag = _seq(cu_q_ptr, cu_k_ptr, b, L, S, bottom_right, VARLEN)
    if VARLEN:
        tb = b * 0
    else:
        tb = b
    offs_nl = tl.arange(0, BLOCK_N)
    offs_n = j0 + offs_nl  # [BLOCK_N] sequence-local keys
    n_ok = offs_n < S_b
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    b64, hk64, tb64 = b.to(tl.int64), hk.to(tl.int64), tb.to(tl.int64)
    c64 = row_k.to(tl.int64) + j0  # first tensor row of the key block
    rq64 = row_q.to(tl.int64)
    k_blk = k_ptr + tb64 * k_sb + hk64 * k_sh + c64 * k_ss
    v_blk = v_ptr + tb64 * v_sb + hk64 * v_sh + c64 * v_ss
    if BLOCK_K == 0:  # the key / value block stays in registers
        k = tl.load(k_blk + (offs_nl[:, None] * k_ss + offs_e[None, :]),
                    mask=n_ok[:, None] & (offs_e[None, :] < E), other=0.0)  # [BLOCK_N, BLOCK_E]
        v = tl.load(v_blk + (offs_nl[:, None] * v_ss + offs_ev[None, :]),
                    mask=n_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [BLOCK_N, BLOCK_EV]
    else:
        k = 0  # read in chunks by _rows_dot
        v = 0
    offs_ce = tl.program_id(2) * BLOCK_CE + tl.arange(0, BLOCK_CE)
    offs_cv = tl.program_id(2) * BLOCK_CV + tl.arange(0, BLOCK_CV)
    dk = tl.zeros([BLOCK_N, BLOCK_CE], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_CV], tl.float32)
    lo, f0, f1, hi = _query_range(j0, L_b, S_b, diag, window_left, window_right, BLOCK_M,
                                  BLOCK_N, WINDOW)
    for g in range(group):  # the group's query heads, in order
        h64 = hk64 * group + g
        bh = tb64 * Hq + h64  # (tensor batch, head) of lse, D and the dropout index
        q_base = q_ptr + tb64 * q_sb + h64 * q_sh + rq64 * q_sl
        do_base = do_ptr + tb64 * do_sb + h64 * do_sh + rq64 * do_sl
        mask_blk = mask_ptr + b64 * m_sb + h64 * m_sh + j0  # dense only
        lse_base = lse_ptr + bh * Lt + rq64
        delta_base = delta_ptr + bh * Lt + rq64
        idx_base = (bh * Lt + rq64) * St + row_k  # dropout index of (i, j): + i * St + j
        if ALIBI:
            slope = tl.load(alibi_ptr + b64 * alibi_sb + h64)
        else:
            slope = 0.0
        # query blocks seeing every key of the block, then those seeing some (one loop)
        dk, dv = _dkdv_steps(
            dk, dv, k, v, k_blk, v_blk, q_base, do_base, mask_blk, lse_base, delta_base,
            offs_n, n_ok, idx_base, f0, f1, f1, f1, L_b, diag, slope, softcap, window_left,
            window_right, E, Ev, q_sl, k_ss, v_ss, do_sl, m_sl, m_cols, St, scale,
            dropout_p, out_scale, seed_lo, seed_hi, off_lo, off_hi, offs_ce, offs_cv, False,
            MASK_KIND, WINDOW, ALIBI, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_E,
            BLOCK_EV, BLOCK_K, PRECISION)
        if WINDOW:
            dk, dv = _dkdv_steps(
                dk, dv, k, v, k_blk, v_blk, q_base, do_base, mask_blk, lse_base, delta_base,
                offs_n, n_ok, idx_base, lo, f0, f1, hi, L_b, diag, slope, softcap, window_left,
                window_right, E, Ev, q_sl, k_ss, v_ss, do_sl, m_sl, m_cols, St, scale,
                dropout_p, out_scale, seed_lo, seed_hi, off_lo, off_hi, offs_ce, offs_cv, True,
                MASK_KIND, WINDOW, ALIBI, SOFTCAP, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_E,
                BLOCK_EV, BLOCK_K, PRECISION)
    row0 = (tb64 * Hkv + hk64) * St + c64  # first row of the block in the gradients
    tl.store(dk_ptr + row0 * E + (offs_nl[:, None] * E + offs_ce[None, :]),
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=n_ok[:, None] & (offs_ce[None, :] < E))
    tl.store(dv_ptr + row0 * Ev + (offs_nl[:, None] * Ev + offs_cv[None, :]),
             dv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None] & (offs_cv[None, :] < Ev))


# ---- dQ (and dz) ------------------------------------------------------------------------------

@triton.jit
def _dq_steps(dq, q, do, lse, di, q_blk, do_blk, k_base, v_base, mask_blk, dz_blk, offs_m, m_ok,
              row_idx, lo, hi, lo2, hi2, S_b, diag, slope, softcap, left, right, E, Ev, q_sl, do_sl,
              k_ss,
              v_ss, m_sl, m_cols, S, scale, dropout_p, out_scale, seed_lo, seed_hi, off_lo,
              off_hi, offs_ce, MASKED: tl.constexpr, MASK_KIND: tl.constexpr,
              WINDOW: tl.constexpr, ALIBI: tl.constexpr, SOFTCAP: tl.constexpr,
              DROPOUT: tl.constexpr,
              WANT_DZ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    """Key blocks [lo, hi) and [lo2, hi2) (sequence-local) of one query block: updates dq
    [BLOCK_M, BLOCK_CE]
    (float32, not yet scaled; columns offs_ce) and stores dz (rows of S) when WANT_DZ (by the
    programs of column block 0). MASKED: mask keys >= S_b and those outside the window."""
    offs_nl = tl.arange(0, BLOCK_N)
    offs_ml = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    n1 = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)  # blocks [lo, hi), then [lo2, hi2)
    n2 = tl.cdiv(tl.maximum(hi2 - lo2, 0), BLOCK_N)
    for n in range(n1 + n2):
        j0 = tl.multiple_of(tl.where(n < n1, lo + n * BLOCK_N, lo2 + (n - n1) * BLOCK_N),
                           BLOCK_N)  # (block starts: vector loads)
        j64 = tl.cast(j0, tl.int64)  # (the interpreter gives a Python int)
        offs_n = j0 + offs_nl
        n_ok = offs_n < S_b
        k_blk = k_base + j64 * k_ss
        v_blk = v_base + j64 * v_ss
        if BLOCK_K == 0:
            # [BLOCK_E, BLOCK_N]
            kt = tl.load(k_blk + (offs_nl[None, :] * k_ss + offs_e[:, None]),
                         mask=n_ok[None, :] & (offs_e[:, None] < E), other=0.0)
            # [BLOCK_EV, BLOCK_N]
            vt = tl.load(v_blk + (offs_nl[None, :] * v_ss + offs_ev[:, None]),
                         mask=n_ok[None, :] & (offs_ev[:, None] < Ev), other=0.0)
            z = tl.dot(q, kt, input_precision=PRECISION)
            dp = tl.dot(do, vt, input_precision=PRECISION)
        else:
            z = _rows_dot(q_blk, q_sl, m_ok, k_blk, k_ss, n_ok, E, BLOCK_M, BLOCK_N, BLOCK_E,
                          BLOCK_K, PRECISION)
            dp = _rows_dot(do_blk, do_sl, m_ok, v_blk, v_ss, n_ok, Ev, BLOCK_M, BLOCK_N,
                           BLOCK_EV, BLOCK_K, PRECISION)
        z = z * scale  # [BLOCK_M, BLOCK_N]
        s = z
        if SOFTCAP or ALIBI or MASKED:
            s, z = _modify(z, offs_m, offs_n, diag, slope, softcap, n_ok, left, right, ALIBI,
                           SOFTCAP, MASKED, WINDOW, False, BLOCK_K > 0)
        if MASK_KIND != 0:
            z = _scores_mask(z, mask_blk + j64, m_sl, m_ok, offs_n < m_cols, BLOCK_M, BLOCK_N,
                             MASK_KIND, False, MASKED)
        p = tl.math.exp2((z - lse[:, None]) * 1.4426950408889634)  # [BLOCK_M, BLOCK_N]
        if DROPOUT:
            keep_d = dropout_keep(row_idx[:, None], offs_n[None, :], dropout_p, seed_lo,
                                  seed_hi, off_lo, off_hi)
            dp = tl.where(keep_d, dp * out_scale, 0.0)
        ds = p * (dp - di[:, None])
        if WANT_DZ:  # (unmasked blocks: no per-column predicate, so the stores vectorize)
            dz_ok = m_ok[:, None] & (tl.program_id(2) == 0)
            if MASKED:
                dz_ok = dz_ok & n_ok[None, :]
            tl.store(dz_blk + j64 + (offs_ml[:, None] * S + offs_nl[None, :]), ds, mask=dz_ok)
        if SOFTCAP:  # d(capped s) / d(scale q.k) = 1 - (s / softcap)^2
            r = s / softcap
            ds = ds * (1.0 - r * r)
        if BLOCK_K == 0:
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
        else:
            # [BLOCK_N, BLOCK_CE]
            k = tl.load(k_blk + (offs_nl[:, None] * k_ss + offs_ce[None, :]),
                        mask=n_ok[:, None] & (offs_ce[None, :] < E), other=0.0)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dz_ptr,
                 cu_q_ptr, cu_k_ptr, alibi_ptr, bh0, Hq, group, L, S, Lt, St, E, Ev, q_sb, q_sh,
                 q_sl, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, m_sb, m_sh, m_sl, m_cols, do_sb, do_sh,
                 do_sl, scale, dropout_p, out_scale, seed_lo, seed_hi, off_lo, off_hi,
                 window_left, window_right, bottom_right, alibi_sb, softcap, len_key,
                 MASK_KIND: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr,
                 ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                 WANT_DZ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_CE: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query block of sequence b, bh0 + y = b * Hq + h, z): grad_q (Bt, Hq, Lt, E)
    rows of its queries, columns [z * BLOCK_CE, (z + 1) * BLOCK_CE) (all of the padded E but
    for float32), and (z = 0) their rows of dz (B, Hq, L, S) when WANT_DZ (dense batches only),
    every element written (zeros outside the window). Sizes and modifiers as in _attn_fwd."""
    i0 = tl.program_id(0) * BLOCK_M
    bh = bh0 + tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    row_q, row_k, L_b, S_b, diag = _seq(cu_q_ptr, cu_k_ptr, b, L, S, bottom_right, VARLEN)
    if VARLEN:
        tb = b * 0
    else:
        tb = b
    offs_ml = tl.arange(0, BLOCK_M)
    offs_m = i0 + offs_ml
    m_ok = offs_m < L_b
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    b64, h64, hk64, tb64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64), tb.to(tl.int64)
    r64 = row_q.to(tl.int64) + i0
    q_blk = q_ptr + tb64 * q_sb + h64 * q_sh + r64 * q_sl
    do_blk = do_ptr + tb64 * do_sb + h64 * do_sh + r64 * do_sl
    if BLOCK_K == 0:  # the query and output-gradient blocks stay in registers
        q = tl.load(q_blk + (offs_ml[:, None] * q_sl + offs_e[None, :]),
                    mask=m_ok[:, None] & (offs_e[None, :] < E), other=0.0)  # [BLOCK_M, BLOCK_E]
        do = tl.load(do_blk + (offs_ml[:, None] * do_sl + offs_ev[None, :]),
                     mask=m_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [BLOCK_M, BLOCK_EV]
    else:
        q = 0  # read in chunks by _rows_dot
        do = 0
    row0 = (tb64 * Hq + h64) * Lt + r64  # first row of the block in lse, D and dq
    lse = tl.load(lse_ptr + row0 + offs_ml, mask=m_ok, other=float("inf"))
    di = tl.load(delta_ptr + row0 + offs_ml, mask=m_ok, other=0.0)
    k_base = k_ptr + tb64 * k_sb + hk64 * k_sh + row_k.to(tl.int64) * k_ss
    v_base = v_ptr + tb64 * v_sb + hk64 * v_sh + row_k.to(tl.int64) * v_ss
    mask_blk = mask_ptr + b64 * m_sb + h64 * m_sh + tl.cast(i0, tl.int64) * m_sl  # dense only
    dz_blk = dz_ptr + ((b64 * Hq + h64) * L + i0) * S  # dense only
    row_idx = (row0 + offs_ml) * St + row_k  # [BLOCK_M] dropout index of (i, 0)
    if ALIBI:
        slope = tl.load(alibi_ptr + b64 * alibi_sb + h64)
    else:
        slope = 0.0
    offs_ce = tl.program_id(2) * BLOCK_CE + tl.arange(0, BLOCK_CE)
    dq = tl.zeros([BLOCK_M, BLOCK_CE], tl.float32)
    lo, f0, f1, hi = _key_range(i0, L_b, S_b, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                WINDOW)
    # the blocks visible to every row, then those partly visible (one loop: fewer registers)
    dq = _dq_steps(dq, q, do, lse, di, q_blk, do_blk, k_base, v_base, mask_blk, dz_blk,
                   offs_m, m_ok, row_idx, f0, f1, f1, f1, S_b, diag, slope, softcap, window_left,
                   window_right, E, Ev, q_sl, do_sl, k_ss, v_ss, m_sl, m_cols, S, scale,
                   dropout_p, out_scale, seed_lo, seed_hi, off_lo, off_hi, offs_ce, False,
                   MASK_KIND, WINDOW, ALIBI, SOFTCAP, DROPOUT, WANT_DZ, BLOCK_M, BLOCK_N, BLOCK_E,
                   BLOCK_EV, BLOCK_K, PRECISION)
    dq = _dq_steps(dq, q, do, lse, di, q_blk, do_blk, k_base, v_base, mask_blk, dz_blk,
                   offs_m, m_ok, row_idx, lo, f0, f1, hi, S_b, diag, slope, softcap, window_left,
                   window_right, E, Ev, q_sl, do_sl, k_ss, v_ss, m_sl, m_cols, S, scale,
                   dropout_p, out_scale, seed_lo, seed_hi, off_lo, off_hi, offs_ce, True,
                   MASK_KIND, WINDOW, ALIBI, SOFTCAP, DROPOUT, WANT_DZ, BLOCK_M, BLOCK_N, BLOCK_E,
                   BLOCK_EV, BLOCK_K, PRECISION)
    if WANT_DZ and WINDOW:  # noqa: SIM102 (constexpr, then run-time) keys outside the window:
        if tl.program_id(2) == 0:  # dz = 0 there
            offs_nl = tl.arange(0, BLOCK_N)
            zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            seen = hi > lo
            vis_lo = tl.where(seen, tl.minimum(lo, S_b), S_b)
            vis_end = tl.where(seen, tl.cdiv(hi, BLOCK_N) * BLOCK_N, S_b)
            for j0 in range(0, vis_lo, BLOCK_N):
                tl.store(dz_blk + tl.cast(j0, tl.int64)
                         + (offs_ml[:, None] * S + offs_nl[None, :]), zeros,
                         mask=m_ok[:, None] & (j0 + offs_nl < tl.minimum(vis_lo, S_b))[None, :])
            for j0 in range(vis_end, S_b, BLOCK_N):
                tl.store(dz_blk + tl.cast(j0, tl.int64)
                         + (offs_ml[:, None] * S + offs_nl[None, :]), zeros,
                         mask=m_ok[:, None] & (j0 + offs_nl < S_b)[None, :])
    tl.store(dq_ptr + row0 * E + (offs_ml[:, None] * E + offs_ce[None, :]),
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_ce[None, :] < E))
