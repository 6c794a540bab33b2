"""Triton decode attention: the operator fastattn::decode_attention_triton (same contract as
the C++ fastattn::decode_attention; schema in kernels/registration.cpp, DecodeArgs in
kernels/include/fastattn/attention_args.h; checks and split plan mirrored from
kernels/include/fastattn/decode_host.h), its launch configurations and launcher. Kernels:
decode_kernels.py.

q (B, Lq, Hq, E); caches paged (P, page_size, Hkv, E|Ev) through block_table int32
(B, max_pages), or contiguous (B, S_max, Hkv, E|Ev) without one; cache_seqlens int32 (B,)
(the new tokens included). Returns out (B, Lq, Hq, Ev) in q's dtype and lse (B, Hq, Lq)
float32, both contiguous.

Split plan (plan_splits): num_splits == 0 picks enough splits that B * Hkv * splits reaches
2 programs per SM on a GPU (INTERPRET_PROGRAMS under the interpreter), each split at least
MIN_SPLIT keys; splits of split_len keys (a multiple of 16). One split: the split kernel writes
out / lse directly; more: float32 partials and _decode_reduce. Launch config (decode_config):
BLOCK_N keys per tile and the float32 head-dim chunk by dtype and head-dim bucket; rows of a
kv head's queries in blocks of at most MAX_ROWS. Every config is compiled for sm_80 / sm_90 by
tools/resource_report.py (decode_plan in tools/op_plans.py).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.library import triton_op, wrap_triton

import triton

try:  # a package import; the resource report loads this file by path
    from .attention_checks import _dense_last, _new_output
    from .decode_kernels import _decode_reduce, _decode_split
except ImportError:
    from fastattn._triton.attention_checks import _dense_last, _new_output
    from fastattn._triton.decode_kernels import _decode_reduce, _decode_split

MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535
MIN_SPLIT = 64
MAX_SPLITS = 256
INTERPRET_PROGRAMS = 8  # target_programs under the interpreter (any fixed number)
MAX_ROWS = 64  # query rows (Hq / Hkv * Lq) per program, at most (ROWS_CAP: per config)
REDUCE_BLOCK_S = 16  # splits per step of _decode_reduce
REDUCE_WARPS = 4
FP32_CHUNK = 32  # BLOCK_K of float32 on a GPU (16 under the interpreter)
# (dtype class, head bucket) -> (BLOCK_N, num_warps, num_stages, most rows per program):
# checked free of spills on sm_80 / sm_90 at 16 rows and at the most rows (decode_plan).
_CONFIGS = {("16", 64): (64, 4, 2, 64), ("16", 128): (64, 4, 2, 64),
            ("16", 256): (32, 8, 2, 64), ("32", 64): (32, 4, 2, 64),
            ("32", 128): (32, 4, 2, 16), ("32", 256): (32, 4, 2, 16)}
INTERPRET_BLOCK_N = 16


def head_block(d: int) -> int:
    """Padded head dim of a tile: a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(d))


def row_block(rows: int, cap: int = MAX_ROWS) -> int:
    """BLOCK_R: a kv head's query rows per program (>= 16 for tl.dot, at most cap)."""
    return min(cap, max(16, triton.next_power_of_2(rows)))


def decode_config(dtype: torch.dtype, E: int, Ev: int, interpreted: bool = False) -> dict:
    """The split kernel's tile constexprs and launch options for these dtype and head dims,
    and ROWS_CAP: the most query rows per program (BLOCK_R, row_block)."""
    fp32 = dtype == torch.float32
    be, bev = head_block(E), head_block(Ev)
    n, warps, stages, cap = _CONFIGS[("32" if fp32 else "16", max(64, be, bev))]
    chunk = min(16 if interpreted else FP32_CHUNK, be) if fp32 else be
    return {"BLOCK_N": INTERPRET_BLOCK_N if interpreted else n, "BLOCK_E": be, "BLOCK_EV": bev,
            "BLOCK_K": chunk, "PRECISION": "ieee" if fp32 else "tf32", "num_warps": warps,
            "num_stages": 1 if interpreted else stages, "ROWS_CAP": cap}


def plan_splits(B: int, Hkv: int, max_seqlen: int, requested: int, target_programs: int,
                min_split: int = MIN_SPLIT) -> tuple[int, int]:
    """(num_splits, split_len) as plan_decode_splits in decode_host.h: requested > 0 is used
    as given (capped so no split is empty); 0 picks enough splits that B * Hkv * splits
    reaches target_programs, each split at least min_split keys."""
    n = max(max_seqlen, 1)
    splits = requested
    if splits <= 0:
        units = max(B * Hkv, 1)
        splits = -(-target_programs // units)
        splits = min(splits, max(n // max(min_split, 16), 1))
    splits = min(max(splits, 1), MAX_SPLITS)
    length = -(-n // splits)
    length = -(-length // 16) * 16
    return -(-n // length), length


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    return 2 * _sm_count(device.index if device.index is not None else
                         torch.cuda.current_device())


def _check(op, q, k_cache, v_cache, seqlens, block_table, alibi, scale, window_left,
           window_right, softcap, max_seqlen):
    """prepare_decode's checks (decode_host.h); on the CPU the cache contents too."""
    dt = q.dtype
    torch._check(dt in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"{op}: query must be float32, float16 or bfloat16, got {dt}")
    torch._check(k_cache.dtype == dt and v_cache.dtype == dt,
                 lambda: f"{op}: k_cache and v_cache must have query's dtype {dt}, got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    torch._check(q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4,
                 lambda: f"{op}: takes query (B, Lq, Hq, E) and caches (pages, page_size, Hkv, "
                         f"E|Ev), got {list(q.shape)}, {list(k_cache.shape)} and "
                         f"{list(v_cache.shape)}")
    torch._check(k_cache.device == q.device and v_cache.device == q.device and
                 seqlens.device == q.device,
                 lambda: f"{op}: query, caches and cache_seqlens must be on one device")
    B, _, Hq, E = q.shape
    P, page, Hkv, _ = k_cache.shape
    Ev = v_cache.shape[3]
    torch._check(tuple(v_cache.shape[:3]) == (P, page, Hkv),
                 lambda: f"{op}: k_cache {list(k_cache.shape)} and v_cache "
                         f"{list(v_cache.shape)} must agree in all but the last dim")
    torch._check(k_cache.shape[3] == E,
                 lambda: f"{op}: k_cache's head dim {k_cache.shape[3]} must equal query's {E}")
    torch._check(Hkv > 0 and Hq % Hkv == 0,
                 lambda: f"{op}: query heads {Hq} must be a multiple of the cache's heads {Hkv}")
    torch._check(1 <= E <= MAX_HEAD_DIM and 1 <= Ev <= MAX_HEAD_DIM,
                 lambda: f"{op}: the Triton kernels take head dims 1..{MAX_HEAD_DIM}, got "
                         f"E={E} and Ev={Ev}")
    torch._check(seqlens.dtype == torch.int32 and seqlens.dim() == 1 and seqlens.shape[0] == B,
                 lambda: f"{op}: cache_seqlens must be int32 of shape (B,) = ({B},), got "
                         f"{seqlens.dtype} {list(seqlens.shape)}")
    torch._check(math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}")
    torch._check(math.isfinite(softcap) and softcap >= 0.0,
                 lambda: f"{op}: softcap must be finite and >= 0 (0: none), got {softcap}")
    torch._check(window_left >= -1 and window_right >= -1,
                 lambda: f"{op}: window sizes must be >= 0 (or -1: unbounded), got "
                         f"({window_left}, {window_right})")
    torch._check(max_seqlen >= 0, lambda: f"{op}: max_seqlen must be >= 0, got {max_seqlen}")
    capacity = page
    if block_table is not None:
        torch._check(block_table.dtype == torch.int32 and block_table.dim() == 2 and
                     block_table.shape[0] == B,
                     lambda: f"{op}: block_table must be int32 of shape (B, max_pages) with "
                             f"B = {B}, got {block_table.dtype} {list(block_table.shape)}")
        torch._check(block_table.device == q.device,
                     lambda: f"{op}: block_table is on {block_table.device} but query is on "
                             f"{q.device}")
        if block_table.shape[1] > 1 and block_table.stride(1) != 1:
            block_table = block_table.contiguous()
        capacity = block_table.shape[1] * page
    else:
        torch._check(P == B, lambda: f"{op}: a contiguous cache (no block_table) must have "
                                     f"shape (B, S_max, Hkv, E) with B = {B}, got "
                                     f"{list(k_cache.shape)}")
    torch._check(max_seqlen <= capacity,
                 lambda: f"{op}: max_seqlen {max_seqlen} exceeds the cache capacity {capacity}")
    seqlens = seqlens.contiguous()
    if q.device.type == "cpu":
        lens = seqlens.tolist()
        out = next((b for b, n in enumerate(lens) if not 0 <= n <= max_seqlen), None)
        torch._check(out is None,
                     lambda: f"{op}: cache_seqlens[{out}] = {lens[out]} is outside [0, "
                             f"max_seqlen = {max_seqlen}]")
        if block_table is not None:
            pages = torch.arange(block_table.shape[1])[None, :]
            used = pages < (seqlens.long()[:, None] + page - 1) // page  # (B, max_pages)
            bad = (used & ((block_table < 0) | (block_table >= P))).nonzero()
            torch._check(bad.numel() == 0,
                         lambda: f"{op}: block_table[{int(bad[0, 0])}, {int(bad[0, 1])}] = "
                                 f"{int(block_table[bad[0, 0], bad[0, 1]])} is not a page index "
                                 f"in [0, {P})")
    if alibi is not None:
        torch._check(alibi.dtype == torch.float32 and alibi.device == q.device and
                     ((alibi.dim() == 1 and alibi.shape[0] == Hq) or
                      (alibi.dim() == 2 and tuple(alibi.shape) == (B, Hq))),
                     lambda: f"{op}: alibi_slopes must be float32 of shape (Hq,) or (B, Hq) on "
                             f"query's device, got {alibi.dtype} {list(alibi.shape)}")
        alibi = alibi.contiguous()
    return (_dense_last(q), _dense_last(k_cache), _dense_last(v_cache), seqlens, block_table,
            alibi)


@triton_op("fastattn::decode_attention_triton", mutates_args=())
def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, block_table: torch.Tensor | None,
                            alibi_slopes: torch.Tensor | None, scale: float, window_left: int,
                            window_right: int, softcap: float, max_seqlen: int,
                            num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of fastattn::decode_attention -> (out (B, Lq, Hq, Ev) in q's dtype, lse
    (B, Hq, Lq) float32), both contiguous."""
    op = "fastattn.decode_attention_triton"
    q, k, v, seqlens, bt, alibi = _check(op, q, k_cache, v_cache, cache_seqlens, block_table,
                                         alibi_slopes, scale, window_left, window_right,
                                         softcap, max_seqlen)
    B, Lq, Hq, E = q.shape
    _, page, Hkv, _ = k.shape
    Ev = v.shape[3]
    dev = q.device
    out = _new_output((B, Lq, Hq, Ev), q.dtype, dev)
    lse = _new_output((B, Hq, Lq), torch.float32, dev)
    if out.numel() == 0:
        return out, lse
    splits, split_len = plan_splits(B, Hkv, max_seqlen, num_splits, _target_programs(dev))
    cfg = decode_config(q.dtype, E, Ev, dev.type != "cuda")
    group = Hq // Hkv
    block_r = row_block(group * Lq, cfg.pop("ROWS_CAP"))
    if splits > 1:
        ws_out = torch.empty((B, Hq, Lq, splits, Ev), dtype=torch.float32, device=dev)
        ws_lse = torch.empty((B, Hq, Lq, splits), dtype=torch.float32, device=dev)
    else:
        ws_out = ws_lse = lse  # never read
    alibi_sb = Hq if alibi is not None and alibi.dim() == 2 else 0
    args = (q, k, v, seqlens, bt if bt is not None else seqlens,
            alibi if alibi is not None else lse, out, lse, ws_out, ws_lse)
    tail = (Lq, Hq, Hkv, group, E, Ev, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
            k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            bt.stride(0) if bt is not None else 0, page, alibi_sb, scale, softcap, window_left,
            window_right, splits, split_len)
    flags = {"PAGED": bt is not None, "ALIBI": alibi is not None, "SOFTCAP": softcap > 0.0,
             "WINDOW": window_left >= 0 or window_right >= 0, "SPLIT": splits > 1,
             "BLOCK_R": block_r, **cfg}
    rows = triton.cdiv(group * Lq, block_r)
    for bh0 in range(0, B * Hkv, MAX_GRID_Y):
        n = min(MAX_GRID_Y, B * Hkv - bh0)
        wrap_triton(_decode_split)[(splits, n, rows)](*args, bh0, *tail, **flags)
    if splits > 1:
        wrap_triton(_decode_reduce)[(B * Hq * Lq,)](
            ws_out, ws_lse, out, lse, Lq, Hq, Ev, splits, BLOCK_S=REDUCE_BLOCK_S,
            BLOCK_EV=head_block(Ev), num_warps=REDUCE_WARPS)
    return out, lse
