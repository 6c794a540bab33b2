"""Triton fused scaled dot-product attention: the operators fastattn::sdpa_triton and
fastattn::sdpa_backward_triton (same contract as the C++ fastattn::sdpa / sdpa_backward;
schemas in kernels/registration.cpp, checks mirrored from
kernels/include/fastattn/attention_host.h, in attention_checks.py), their launch
configurations and launchers. The kernels live in attention_fwd.py (forward, dropout Philox)
and attention_bwd.py (backward).

Canonical layout: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) with any strides
(stride 0 included) but stride(-1) == 1 (else a copy); mask None or (B, Hq, L, S) with
stride(3) == 1, bool (True = attend) or additive (float32 or q's dtype). The trailing
arguments (AttnGeometry in kernels/include/fastattn/attention_args.h): varlen batches
(cu_seqlens_q / cu_seqlens_k, packed tensors (1, H, total, E); programs over (query or key
blocks of max_seqlen, sequences * heads), blocks past a sequence's length do nothing), a
window (window_left / window_right, is_causal = right 0; bottom_right moves the diagonal to
S_b - L_b; key / query blocks outside it are skipped), ALiBi slopes and softcap. Each
modifier is a constexpr flag (WINDOW, VARLEN, ALIBI, SOFTCAP): off, it costs nothing.

Launch configurations: on a GPU each kernel is a triton.autotune over a short list of
(BLOCK_M, BLOCK_N, num_warps, num_stages) picked by dtype class (16-bit / float32), head-dim
bucket (max(BLOCK_E, BLOCK_EV) in 64 / 128 / 256) and dropout (Philox state makes the score
tile costlier in registers), keyed on (E, Ev, length bucket, mask kind, dropout[, dz], the
modifier flags)
and the tensors' dtypes. Every listed config was checked free of spills and within shared
memory on sm_80 and sm_90 with tools/resource_report.py (attention_plan). Under the
interpreter (CPU tensors, TRITON_INTERPRET=1) one small fixed config runs. Grid: (query or key
blocks, batch * heads in launches of at most 65535, column blocks); the last is 1 but for
float32, whose FMA dots keep the output columns of a program few (FP32_COLUMNS; each such
program recomputes the block's scores: float32 is the accurate path, not the fast one).
"""

from __future__ import annotations

import functools

import torch
from torch.library import triton_op, wrap_triton

import triton

try:  # a package import; the resource report loads this file by path
    from .attention_bwd import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
    from .attention_checks import (MAX_BLOCK_ROWS, ROW_OFFSET_LIMIT, _check_backward,
                                   _check_inputs, _check_options, _new_output)
    from .attention_fwd import MASK_NONE, _attn_fwd
except ImportError:
    from fastattn._triton.attention_bwd import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
    from fastattn._triton.attention_checks import (MAX_BLOCK_ROWS, ROW_OFFSET_LIMIT,
                                                   _check_backward, _check_inputs,
                                                   _check_options, _new_output)
    from fastattn._triton.attention_fwd import MASK_NONE, _attn_fwd

MAX_GRID_Y = 65535
FP32_CHUNK = 32  # BLOCK_K of float32 inputs on a GPU (16 under the interpreter)
FP32_COLUMNS = {"fwd": 64, "dq": 64, "dkdv": 16}  # output columns per float32 program
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
DELTA_ELEMS = 4096  # elements of dO (and O) per _attn_bwd_delta program
DELTA_WARPS = 4

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, dtype class ("16": fp16 / bf16, "32":
# float32 with full-precision FMA dots), head bucket (max(BLOCK_E, BLOCK_EV)) and dropout (the
# "dropout" lists also serve ALiBi, softcap and a mask with a window: _heavy).
# Chosen with tools/resource_report.py (sm_80 and sm_90; an additive float32 mask with dq
# writing dz, and is_causal; lengths not multiples of 16): the larger tiles among those that
# neither spill nor exceed shared memory. Dropout's Philox state (four words per score) needs
# smaller score tiles; float32 FMA dots need small ones throughout. One config where no second
# one passed.
_FP32 = {"fwd": [(32, 32, 4, 1), (32, 16, 4, 2)], "dkdv": [(32, 32, 4, 1)],
         "dq": [(16, 32, 4, 2), (64, 32, 8, 2)]}
_CONFIGS = {
    ("fwd", "16", 64, False): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("fwd", "16", 128, False): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("fwd", "16", 256, False): [(64, 64, 8, 2), (64, 32, 8, 2)],
    ("fwd", "16", 64, True): [(64, 32, 8, 3), (64, 64, 8, 3)],
    ("fwd", "16", 128, True): [(64, 32, 8, 3), (64, 64, 8, 3)],
    ("fwd", "16", 256, True): [(64, 32, 8, 2), (32, 32, 4, 2)],
    ("dkdv", "16", 64, False): [(16, 128, 8, 2), (16, 64, 4, 2)],
    ("dkdv", "16", 128, False): [(16, 64, 8, 2), (32, 32, 8, 2)],
    ("dkdv", "16", 256, False): [(16, 32, 8, 2)],
    ("dkdv", "16", 64, True): [(32, 32, 8, 2), (16, 32, 8, 2)],
    ("dkdv", "16", 128, True): [(32, 32, 8, 2), (16, 32, 8, 2)],
    ("dkdv", "16", 256, True): [(16, 16, 8, 2)],
    ("dq", "16", 64, False): [(64, 32, 4, 2), (128, 32, 8, 2)],
    ("dq", "16", 128, False): [(64, 32, 8, 2)],
    ("dq", "16", 256, False): [(32, 32, 4, 2)],
    ("dq", "16", 64, True): [(64, 32, 8, 2)],
    ("dq", "16", 128, True): [(64, 32, 8, 2)],
    ("dq", "16", 256, True): [(32, 32, 8, 2), (16, 32, 8, 2)],
    **{(kernel, "32", bucket, dropout): cfgs for kernel, cfgs in _FP32.items()
       for bucket in (64, 128, 256) for dropout in (False, True)},
}
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_MODIFIER_KEYS = ["WINDOW", "VARLEN", "ALIBI", "SOFTCAP"]
_TUNE_KEYS = {"fwd": ["E", "Ev", "len_key", "MASK_KIND", "DROPOUT", *_MODIFIER_KEYS],
              "dkdv": ["E", "Ev", "len_key", "MASK_KIND", "DROPOUT", *_MODIFIER_KEYS],
              "dq": ["E", "Ev", "len_key", "MASK_KIND", "DROPOUT", "WANT_DZ", *_MODIFIER_KEYS]}


def head_block(d: int) -> int:
    """Padded head dim of a tile: a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(d))


def head_bucket(E: int, Ev: int) -> int:
    """Which config list serves head dims E, Ev: 64, 128 or 256."""
    return max(64, head_block(E), head_block(Ev))


def dtype_class(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def attn_configs(kernel: str, dtype: torch.dtype, E: int, Ev: int, dropout: bool) -> list[dict]:
    """Launch configs the autotuner chooses among for one kernel ("fwd", "dkdv", "dq")."""
    return [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s} for m, n, w, s in
            _CONFIGS[(kernel, dtype_class(dtype), head_bucket(E, Ev), bool(dropout))]]


@functools.cache
def _tuner(kernel: str, dclass: str, bucket: int, dropout: bool):
    """triton.autotune over _CONFIGS[kernel, dclass, bucket, dropout] of that kernel."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _CONFIGS[(kernel, dclass, bucket, dropout)]]
    return triton.autotune(configs=configs, key=_TUNE_KEYS[kernel])(_KERNELS[kernel])


def delta_block(Ev: int) -> int:
    """Rows per _attn_bwd_delta program."""
    return max(1, DELTA_ELEMS // head_block(Ev))


def _len_key(L: int, S: int) -> int:
    """The autotuners' sequence-length bucket: a power of two in [16, 65536]."""
    return min(65536, max(16, triton.next_power_of_2(max(L, S))))


def _i32(x: int) -> int:
    """A 32-bit pattern as a signed int (the kernels' int32 arguments)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _seed_args(seed: int, offset: int) -> tuple[int, int, int, int]:
    """(lo32(seed), hi32(seed), lo32(offset), hi32(offset)) of the uint64 reinterpretations."""
    s, o = seed % (1 << 64), offset % (1 << 64)
    return _i32(s), _i32(s >> 32), _i32(o), _i32(o >> 32)


def _grid(length: int, block: str, n: int, nz: int):
    """The autotuned launches' grid: (cdiv(length, meta[block]), n, nz)."""
    return lambda meta: (triton.cdiv(length, meta[block]), n, nz)


def _y_chunks(n: int):
    """(first, count) of the launches that cover n programs along grid dim y."""
    for start in range(0, n, MAX_GRID_Y):
        yield start, min(MAX_GRID_Y, n - start)


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def chunk_k(dtype: torch.dtype, E: int, Ev: int, interpreted: bool = False) -> int:
    """BLOCK_K: the head-dim chunk of the float32 (FMA) score products; 0 (no chunking, the
    operand blocks resident in registers) for fp16 / bf16."""
    if dtype != torch.float32:
        return 0
    return min(16 if interpreted else FP32_CHUNK, head_block(E), head_block(Ev))


def column_block(kernel: str, dtype: torch.dtype, d: int, interpreted: bool = False) -> int:
    """Output columns (of a head dim d) per program: all of them (padded) for fp16 / bf16;
    float32 splits them (FP32_COLUMNS of the kernel; 16 under the interpreter)."""
    if dtype != torch.float32:
        return head_block(d)
    return min(16 if interpreted else FP32_COLUMNS[kernel], head_block(d))


def _flags(q, Ev: int, kind: int, dropout_p: float, geo) -> dict:
    E = q.shape[3]
    return {"MASK_KIND": kind, "DROPOUT": dropout_p > 0.0, "WINDOW": geo.window,
            "VARLEN": geo.varlen, "ALIBI": geo.alibi is not None, "SOFTCAP": geo.softcap > 0.0,
            "BLOCK_E": head_block(E), "BLOCK_EV": head_block(Ev),
            "BLOCK_K": chunk_k(q.dtype, E, Ev, q.device.type != "cuda"),
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}


def _heavy(flags: dict) -> bool:
    """Whether the config lists for dropout serve these flags: dropout, ALiBi and softcap all
    add per-score work and live tiles, and so does a mask with a window (the window or varlen
    alone: scalars and a predicate)."""
    return bool(flags["DROPOUT"] or flags["ALIBI"] or flags["SOFTCAP"] or
                (flags["MASK_KIND"] != MASK_NONE and flags["WINDOW"]))


def _columns(kernel: str, q, E: int, Ev: int) -> tuple[dict, int]:
    """The column-block constexprs of a kernel and the number of programs along grid z."""
    interp = q.device.type != "cuda"
    ce, cv = (column_block(kernel, q.dtype, d, interp) for d in (E, Ev))
    if kernel == "fwd":
        return {"BLOCK_CV": cv}, head_block(Ev) // cv
    if kernel == "dq":
        return {"BLOCK_CE": ce}, head_block(E) // ce
    return {"BLOCK_CE": ce, "BLOCK_CV": cv}, max(head_block(E) // ce, head_block(Ev) // cv)


# ---- operators --------------------------------------------------------------------------------

@triton_op("fastattn::sdpa_triton", mutates_args=())
def sdpa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float, is_causal: bool, dropout_p: float, seed: int, offset: int,
                cu_seqlens_q: torch.Tensor | None = None,
                cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0,
                max_seqlen_k: int = 0, window_left: int = -1, window_right: int = -1,
                bottom_right: bool = False, alibi_slopes: torch.Tensor | None = None,
                softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of fastattn::sdpa -> (out (Bt, Hq, Lt, Ev) in q's dtype, lse (Bt, Hq, Lt)
    float32), both contiguous (Bt, Lt: the tensors' batch and length; varlen: 1, total_q)."""
    op = "fastattn.sdpa_triton"
    q, k, v, mask, kind, m_cols = _check_inputs(op, q, k, v, mask, scale, is_causal, dropout_p)
    geo = _check_options(op, q, k, mask, is_causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, window_left, window_right, bottom_right, alibi_slopes,
                         softcap)
    Bt, Hq, Lt, E = q.shape
    Hkv, St, Ev = v.shape[1], v.shape[2], v.shape[3]
    B, L, S = geo.B, geo.L, geo.S
    out = _new_output((Bt, Hq, Lt, Ev), q.dtype, q.device)
    lse = _new_output((Bt, Hq, Lt), torch.float32, q.device)
    if out.numel() == 0 or B * L == 0:
        return out, lse
    flags = _flags(q, Ev, kind, dropout_p, geo)
    del flags["BLOCK_EV"]  # the forward reads value columns in blocks of BLOCK_CV only
    cols, nz = _columns("fwd", q, E, Ev)
    flags.update(cols)
    args = (q, k, v, mask if mask is not None else q, out, lse, *geo.tensors(q))
    tail = (Hq, Hq // Hkv, L, S, Lt, St, E, Ev, *_strides(q), *_strides(k), *_strides(v),
            *_strides(mask), m_cols, scale, 1.0 / (1.0 - dropout_p), dropout_p,
            *_seed_args(seed, offset), *geo.scalars(), _len_key(L, S))
    for bh0, n in _y_chunks(B * Hq):
        if q.device.type != "cuda":  # the interpreter: one small fixed config
            cfg = INTERPRET_CONFIG
            wrap_triton(_attn_fwd)[(triton.cdiv(L, cfg["BLOCK_M"]), n, nz)](
                *args, bh0, *tail, **flags, **cfg)
        else:
            wrap_triton(_tuner("fwd", dtype_class(q.dtype), head_bucket(E, Ev),
                               _heavy(flags)))[
                _grid(L, "BLOCK_M", n, nz)](*args, bh0, *tail, **flags)
    return out, lse


@triton_op("fastattn::sdpa_backward_triton", mutates_args=())
def sdpa_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         mask: torch.Tensor | None, scale: float, is_causal: bool,
                         dropout_p: float, seed: int, offset: int, want_grad_mask: bool,
                         cu_seqlens_q: torch.Tensor | None = None,
                         cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0,
                         max_seqlen_k: int = 0, window_left: int = -1, window_right: int = -1,
                         bottom_right: bool = False, alibi_slopes: torch.Tensor | None = None,
                         softcap: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of fastattn::sdpa_backward -> (grad_q, grad_k, grad_v contiguous in q's
    dtype; grad_mask = dz (B, Hq, L, S) float32 when want_grad_mask (dense batches only: a
    mask cannot be given with cu_seqlens), else empty (0,))."""
    op = "fastattn.sdpa_backward_triton"
    q, k, v, mask, kind, m_cols = _check_inputs(op, q, k, v, mask, scale, is_causal, dropout_p)
    geo = _check_options(op, q, k, mask, is_causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, window_left, window_right, bottom_right, alibi_slopes,
                         softcap)
    Bt, Hq, Lt, E = q.shape
    Hkv, St, Ev = v.shape[1], v.shape[2], v.shape[3]
    B, L, S = geo.B, geo.L, geo.S
    do, out, lse = _check_backward(op, grad_out, out, lse, q, Ev)
    dev = q.device
    dq = _new_output((Bt, Hq, Lt, E), q.dtype, dev)
    dk = _new_output((Bt, Hkv, St, E), q.dtype, dev)
    dv = _new_output((Bt, Hkv, St, Ev), q.dtype, dev)
    torch._check(not (want_grad_mask and geo.varlen),
                 lambda: f"{op}: want_grad_mask needs a mask, which cu_seqlens excludes")
    torch._check(not want_grad_mask or S * MAX_BLOCK_ROWS < ROW_OFFSET_LIMIT,
                 lambda: f"{op}: grad_mask rows of {S} keys are too long for the Triton "
                         f"kernels' 32-bit block offsets")
    dz = _new_output((B, Hq, L, S), torch.float32, dev) if want_grad_mask else \
        torch.empty((0,), dtype=torch.float32, device=dev)
    if B * Hq == 0:
        return dq, dk, dv, dz
    gpu = dev.type == "cuda"
    delta = torch.empty((Bt, Hq, Lt), dtype=torch.float32, device=dev)
    if Lt > 0:
        rows = delta_block(Ev)
        for bh0, n in _y_chunks(Bt * Hq):
            wrap_triton(_attn_bwd_delta)[(triton.cdiv(Lt, rows), n)](
                out, do, delta, bh0, Hq, Lt, Ev, *_strides(out), *_strides(do), BLOCK_M=rows,
                BLOCK_EV=head_block(Ev), num_warps=DELTA_WARPS)
    flags = _flags(q, Ev, kind, dropout_p, geo)
    common = (L, S, Lt, St, E, Ev, *_strides(q), *_strides(k), *_strides(v), *_strides(mask),
              m_cols, *_strides(do), scale, dropout_p, 1.0 / (1.0 - dropout_p),
              *_seed_args(seed, offset), *geo.scalars(), _len_key(L, S))
    mask_arg = mask if mask is not None else q
    key = (dtype_class(q.dtype), head_bucket(E, Ev), _heavy(flags))
    if S > 0:  # dK, dV (with S == 0 there is nothing to write)
        args = (q, k, v, mask_arg, do, lse, delta, dk, dv, *geo.tensors(q))
        cols, nz = _columns("dkdv", q, E, Ev)
        for bh0, n in _y_chunks(B * Hkv):
            if not gpu:
                cfg = INTERPRET_CONFIG
                wrap_triton(_attn_bwd_dkdv)[(triton.cdiv(S, cfg["BLOCK_N"]), n, nz)](
                    *args, bh0, Hq, Hkv, Hq // Hkv, *common, **flags, **cols, **cfg)
            else:
                wrap_triton(_tuner("dkdv", *key))[
                    _grid(S, "BLOCK_N", n, nz)](
                    *args, bh0, Hq, Hkv, Hq // Hkv, *common, **flags, **cols)
    if L > 0:  # dQ (zeros when S == 0) and dz
        args = (q, k, v, mask_arg, do, lse, delta, dq, dz if want_grad_mask else delta,
                *geo.tensors(q))
        cols, nz = _columns("dq", q, E, Ev)
        flags.update(cols, WANT_DZ=bool(want_grad_mask))
        for bh0, n in _y_chunks(B * Hq):
            if not gpu:
                cfg = INTERPRET_CONFIG
                wrap_triton(_attn_bwd_dq)[(triton.cdiv(L, cfg["BLOCK_M"]), n, nz)](
                    *args, bh0, Hq, Hq // Hkv, *common, **flags, **cfg)
            else:
                wrap_triton(_tuner("dq", *key))[
                    _grid(L, "BLOCK_M", n, nz)](
                    *args, bh0, Hq, Hq // Hkv, *common, **flags)
    return dq, dk, dv, dz
