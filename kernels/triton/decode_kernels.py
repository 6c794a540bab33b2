"""Triton kernels of fastattn's decode attention (launched by decode.py): split-K
("flash-decoding") attention of Lq new query tokens per sequence against a KV cache, paged
through a block table or contiguous. Contract: DecodeArgs in
kernels/include/fastattn/attention_args.h.

_decode_split: one program per (split s, batch * kv head, block of query rows). Its rows are
  the (Hq / Hkv) * Lq queries of one kv head (row r: query head hk * group + r // Lq, token
  r % Lq), padded to BLOCK_R >= 16 for tl.dot, so each K / V element is read once per
  (sequence, kv head, row block). Keys [s * split_len, min((s + 1) * split_len, seqlen)) are
  walked in tiles of BLOCK_N, each key gathered through the block table (page
  block_table[b, t // page_size], slot t % page_size; BLOCK_N need not divide page_size), with
  an online softmax in float32. Query row i sits at position p_i = seqlen - Lq + i; key t is
  visible iff t < seqlen and inside the window around p_i (window_right = 0: causal).
  SPLIT=False (one split): writes out (B, Lq, Hq, Ev) and lse (B, Hq, Lq) directly (+inf and
  zeros for a row with no visible key). SPLIT=True: writes the split's normalised output and
  log-sum-exp (-inf, zeros: no visible key) to ws_out (B, Hq, Lq, splits, Ev) and ws_lse
  (B, Hq, Lq, splits), float32, every element.
_decode_reduce: one program per (b, h, i) row: lse = log sum_s exp(lse_s), out = sum_s
  exp(lse_s - lse) out_s, over the splits in chunks of BLOCK_S in a fixed order
  (deterministic).
BLOCK_K < BLOCK_E (float32): the score product runs over the head dim in chunks (float32 FMA
dots hold their reduction dim per thread; see attention_fwd.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # a package import; the resource report loads this file by path
    from .attention_fwd import _tanh
except ImportError:
    from fastattn._triton.attention_fwd import _tanh


@triton.jit
def _decode_split(q_ptr, k_ptr, v_ptr, seqlens_ptr, bt_ptr, alibi_ptr, out_ptr, lse_ptr,
                  ws_out_ptr, ws_lse_ptr, bh0, Lq, Hq, Hkv, group, E, Ev, q_sb, q_sl, q_sh, k_sp,
                  k_ss, k_sh, v_sp, v_ss, v_sh, bt_sb, page_size, alibi_sb, scale, softcap,
                  window_left, window_right, num_splits, split_len, PAGED: tl.constexpr,
                  ALIBI: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                  SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Program (split, bh0 + y = b * Hkv + kv head, row block): see the file header."""
    s = tl.program_id(0)
    bhk = bh0 + tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    b64 = b.to(tl.int64)
    n = tl.load(seqlens_ptr + b)  # tokens in the cache, the queries' included
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    r_ok = offs_r < group * Lq
    i = offs_r % Lq
    h = hk * group + offs_r // Lq  # [BLOCK_R] query heads
    pos = n - Lq + i  # [BLOCK_R] the queries' positions
    q_row = b64 * q_sb + i.to(tl.int64) * q_sl + h.to(tl.int64) * q_sh  # [BLOCK_R]
    if ALIBI:
        slope = tl.load(alibi_ptr + b64 * alibi_sb + h, mask=r_ok, other=0.0)  # [BLOCK_R]
    start = s * split_len
    end = tl.minimum(start + split_len, n)
    lo = start
    if WINDOW:  # the first key any row sees: p_0 - window_left (the rows' right ends >= n)
        lo = tl.where(window_left >= 0, tl.maximum(start, n - Lq - window_left), start)
    offs_nl = tl.arange(0, BLOCK_N)
    offs_ev = tl.arange(0, BLOCK_EV)
    acc = tl.zeros([BLOCK_R, BLOCK_EV], tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for j0 in range(lo, end, BLOCK_N):
        t = j0 + offs_nl  # [BLOCK_N] key positions
        t_ok = t < end
        if PAGED:
            page = tl.load(bt_ptr + b64 * bt_sb + t // page_size, mask=t_ok, other=0)
            slot = t % page_size
        else:
            page = b + t * 0
            slot = t
        page64 = page.to(tl.int64)
        k_row = page64 * k_sp + slot.to(tl.int64) * k_ss + hk.to(tl.int64) * k_sh  # [BLOCK_N]
        v_row = page64 * v_sp + slot.to(tl.int64) * v_ss + hk.to(tl.int64) * v_sh
        z = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for d0 in tl.static_range(0, BLOCK_E, BLOCK_K):
            offs_d = d0 + tl.arange(0, BLOCK_K)
            d_ok = offs_d < E
            qc = tl.load(q_ptr + (q_row[:, None] + offs_d[None, :]),
                         mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
            kc = tl.load(k_ptr + (k_row[None, :] + offs_d[:, None]),
                         mask=t_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
            z += tl.dot(qc, kc, input_precision=PRECISION)
        z = z * scale
        if SOFTCAP:
            z = softcap * _tanh(z / softcap, PRECISION == "ieee")  # (accurate: float32)
        if ALIBI:
            z = z - slope[:, None] * tl.abs(pos[:, None] - t[None, :]).to(tl.float32)
        ok = t_ok[None, :]
        if WINDOW:
            ok = ok & ((window_left < 0) | (t[None, :] >= pos[:, None] - window_left))
            ok = ok & ((window_right < 0) | (t[None, :] <= pos[:, None] + window_right))
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: p = 0
        alpha = tl.math.exp2((m_i - m_use) * 1.4426950408889634)
        p = tl.math.exp2((z - m_use[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (v_row[:, None] + offs_ev[None, :]),
                    mask=t_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # [BLOCK_N, BLOCK_EV]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    has = l_i > 0.0
    o = acc * tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)[:, None]
    lse = m_i + tl.log(tl.where(has, l_i, 1.0))
    ev_ok = r_ok[:, None] & (offs_ev[None, :] < Ev)
    if SPLIT:
        w_row = ((b64 * Hq + h) * Lq + i) * num_splits + s  # [BLOCK_R]
        tl.store(ws_out_ptr + (w_row[:, None] * Ev + offs_ev[None, :]), o, mask=ev_ok)
        tl.store(ws_lse_ptr + w_row, tl.where(has, lse, float("-inf")), mask=r_ok)
    else:
        o_row = (b64 * Lq + i) * Hq + h  # [BLOCK_R] rows of out (B, Lq, Hq, Ev)
        tl.store(out_ptr + (o_row[:, None] * Ev + offs_ev[None, :]),
                 o.to(out_ptr.dtype.element_ty), mask=ev_ok)
        tl.store(lse_ptr + (b64 * Hq + h) * Lq + i, tl.where(has, lse, float("inf")), mask=r_ok)


@triton.jit
def _decode_reduce(ws_out_ptr, ws_lse_ptr, out_ptr, lse_ptr, Lq, Hq, Ev, num_splits,
                   BLOCK_S: tl.constexpr, BLOCK_EV: tl.constexpr):
    """Program row = (b * Hq + h) * Lq + i: combines its num_splits partials (see the file
    header) into out (B, Lq, Hq, Ev) and lse (B, Hq, Lq)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // (Hq * Lq)
    h = (row // Lq) % Hq
    i = row % Lq
    offs_s = tl.arange(0, BLOCK_S)
    offs_ev = tl.arange(0, BLOCK_EV)
    ev_ok = offs_ev < Ev
    lse_row = ws_lse_ptr + row * num_splits
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m = tl.maximum(m, tl.load(lse_row + s0 + offs_s, mask=s0 + offs_s < num_splits,
                                  other=float("-inf")))
    m_all = tl.max(m, 0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    tot = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_EV], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        w = tl.math.exp2((tl.load(lse_row + s0 + offs_s, mask=s_ok, other=float("-inf"))
                          - m_use) * 1.4426950408889634)  # [BLOCK_S]
        o = tl.load(ws_out_ptr + (row * num_splits + s0 + offs_s)[:, None] * Ev
                    + offs_ev[None, :], mask=s_ok[:, None] & ev_ok[None, :], other=0.0)
        tot += w
        acc += w[:, None] * o
    total = tl.sum(tot, 0)
    has = total > 0.0
    out = tl.sum(acc, 0) * tl.where(has, 1.0 / tl.where(has, total, 1.0), 0.0)  # [BLOCK_EV]
    tl.store(out_ptr + ((b * Lq + i) * Hq + h) * Ev + offs_ev, out.to(out_ptr.dtype.element_ty),
             mask=ev_ok)
    tl.store(lse_ptr + (b * Hq + h) * Lq + i,
             tl.where(has, m_use + tl.log(tl.where(has, total, 1.0)), float("inf")))
