"""Triton fused scaled dot-product attention: the operators fastattn::sdpa_triton and
fastattn::sdpa_backward_triton (same contract as the C++ fastattn::sdpa / sdpa_backward;
schemas in kernels/registration.cpp, checks mirrored from
kernels/include/fastattn/attention_host.h), their launch configurations and launchers. The
kernels live in attention_fwd.py (forward, dropout Philox) and attention_bwd.py (backward).

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
import math
import os

import torch
from torch.library import triton_op, wrap_triton

import triton

try:  # a package import; the resource report loads this file by path
    from .attention_bwd import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
    from .attention_fwd import MASK_ADD, MASK_BOOL, MASK_NONE, _attn_fwd
except ImportError:
    from fastattn._triton.attention_bwd import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
    from fastattn._triton.attention_fwd import MASK_ADD, MASK_BOOL, MASK_NONE, _attn_fwd

MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535
FP32_CHUNK = 32  # BLOCK_K of float32 inputs on a GPU (16 under the interpreter)
FP32_COLUMNS = {"fwd": 64, "dq": 64, "dkdv": 16}  # output columns per float32 program
MAX_BLOCK_ROWS = 256  # more rows than any BLOCK_M / BLOCK_N (for the 32-bit offset bound)
ROW_OFFSET_LIMIT = 2**31
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


def _new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FASTATTN_POISON_OUTPUTS", "0") not in ("", "0"):
        out.fill_(float("nan"))  # tests: an element the kernel forgets to write fails
    return out


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


# ---- argument checks (mirror kernels/include/fastattn/attention_host.h) ------------------------

def _dense_last(t: torch.Tensor) -> torch.Tensor:
    """t with stride(-1) == 1 (a contiguous copy otherwise)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check_inputs(op: str, q, k, v, mask, scale: float, is_causal: bool, dropout_p: float):
    """Checked q, k, v, mask with stride(-1) == 1 (and small enough row strides), the mask kind
    and the mask's readable columns per row (_aligned_rows)."""
    dt = q.dtype
    torch._check(dt in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"{op}: query must be float32, float16 or bfloat16, got {dt}")
    torch._check(k.dtype == dt and v.dtype == dt,
                 lambda: f"{op}: key and value must have query's dtype {dt}, got {k.dtype} and "
                         f"{v.dtype}")
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"{op}: the operator takes 4-d query (B, Hq, L, E), key (B, Hkv, S, E) "
                         f"and value (B, Hkv, S, Ev), got {list(q.shape)}, {list(k.shape)} and "
                         f"{list(v.shape)}")
    torch._check(k.device == q.device and v.device == q.device,
                 lambda: f"{op}: query, key and value must be on one device, got {q.device}, "
                         f"{k.device} and {v.device}")
    B, Hq, L, E = q.shape
    _, Hkv, S, Ev = v.shape
    torch._check(k.shape[0] == B and v.shape[0] == B,
                 lambda: f"{op}: batch sizes differ: query {B}, key {k.shape[0]}, value "
                         f"{v.shape[0]}")
    torch._check(k.shape[1] == Hkv and k.shape[2] == S,
                 lambda: f"{op}: key {list(k.shape)} and value {list(v.shape)} must agree in "
                         f"heads and length")
    torch._check(k.shape[3] == E,
                 lambda: f"{op}: key's last dim {k.shape[3]} must equal query's {E}")
    torch._check(Hq % Hkv == 0 if Hkv > 0 else Hq == 0,
                 lambda: f"{op}: query heads {Hq} must be a multiple of key/value heads {Hkv}")
    torch._check(1 <= E <= MAX_HEAD_DIM and 1 <= Ev <= MAX_HEAD_DIM,
                 lambda: f"{op}: the Triton kernels take head dims 1..{MAX_HEAD_DIM}, got "
                         f"E={E} (query/key) and Ev={Ev} (value)")
    torch._check(math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}")
    torch._check(0.0 <= dropout_p < 1.0,
                 lambda: f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    kind, m_cols = MASK_NONE, 0
    if mask is not None:
        torch._check(not is_causal, lambda: f"{op}: pass either a mask or is_causal, not both")
        torch._check(mask.device == q.device,
                     lambda: f"{op}: mask is on {mask.device} but query is on {q.device}")
        torch._check(mask.dtype in (torch.bool, dt, torch.float32),
                     lambda: f"{op}: mask must be bool, float32 or query's dtype {dt}, got "
                             f"{mask.dtype}")
        torch._check(mask.dim() == 4 and tuple(mask.shape) == (B, Hq, L, S),
                     lambda: f"{op}: the operator takes a mask of shape (B, Hq, L, S) = "
                             f"{(B, Hq, L, S)} (broadcast dims as stride 0), got "
                             f"{list(mask.shape)}")
        mask, m_cols = _aligned_rows(_rows_fit(_dense_last(mask)))
        torch._check(mask.stride(2) * MAX_BLOCK_ROWS < ROW_OFFSET_LIMIT,
                     lambda: f"{op}: mask rows of {mask.stride(2)} elements are too long for "
                             f"the Triton kernels' 32-bit block offsets")
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
    return (_rows_fit(_dense_last(q)), _rows_fit(_dense_last(k)), _rows_fit(_dense_last(v)),
            mask, kind, m_cols)


def _aligned_rows(m: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mask, m_cols): the mask, or when its row stride or S is not a multiple of 16 a copy of
    its distinct elements in rows padded to a multiple of 16 (broadcast dims keep stride 0),
    viewed back as (B, Hq, L, S); m_cols: the columns a kernel may read in each row (S, or the
    padded length, a multiple of 16: the padding is read on the last key block and discarded).
    Unaligned rows or a per-column bound that is no multiple of 16 make the mask loads scalar,
    and the largest tiles then spill (seen with tools/resource_report.py)."""
    B, H, L, S = m.shape
    if (m.stride(2) % 16 == 0 and S % 16 == 0) or m.numel() == 0:
        return m, S
    cols = -(-S // 16) * 16
    distinct = m[tuple(slice(0, 1) if m.stride(d) == 0 else slice(None) for d in range(3))]
    rows = torch.zeros((*distinct.shape[:3], cols), dtype=m.dtype, device=m.device)
    rows[..., :S].copy_(distinct)  # (zero padding: finite scores for the keys past S)
    return rows[..., :S].expand(B, H, L, S), cols


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


def _rows_fit(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when its row stride (dim 2) times a block's rows could overflow
    the kernels' 32-bit in-block offsets (strides of 2**31 and more arrive as 64-bit)."""
    s = t.stride(2)
    return t.contiguous() if ROW_OFFSET_LIMIT <= s * MAX_BLOCK_ROWS and s < 2**31 else t


# ---- sequences and score modifiers (mirror prepare_attention's AttnOptions checks) -----------

class _Geometry:
    """The per-sequence launch sizes and modifiers: B sequences of at most L queries and S
    keys (dense: the tensors' B, L, S; varlen: len(cu) - 1 and max_seqlen_q / max_seqlen_k),
    the kernels' tensor arguments and scalars, and the constexpr flags."""

    def __init__(self, q, k, cu_q, cu_k, L, S, left, right, bottom_right, alibi, softcap):
        self.varlen = cu_q is not None
        self.B = cu_q.shape[0] - 1 if self.varlen else q.shape[0]
        self.L, self.S = L, S
        self.cu_q, self.cu_k, self.alibi = cu_q, cu_k, alibi
        self.left, self.right, self.bottom_right = left, right, bool(bottom_right)
        self.window = left >= 0 or right >= 0
        self.softcap = softcap

    def tensors(self, dummy):
        """(cu_q, cu_k, alibi) pointers (dummy where absent: never read)."""
        return tuple(t if t is not None else dummy for t in (self.cu_q, self.cu_k, self.alibi))

    def scalars(self):
        """(window_left, window_right, bottom_right, alibi_sb, softcap)."""
        sb = self.alibi.shape[1] if self.alibi is not None and self.alibi.dim() == 2 else 0
        return self.left, self.right, int(self.bottom_right), sb, float(self.softcap)


def _check_cu_seqlens(op: str, name: str, cu, q, total: int, max_len: int):
    """cu_seqlens: int32 (B + 1,) on q's device; on the CPU also its values (0 first,
    non-decreasing, steps <= max_len, last == total)."""
    torch._check(cu.dtype == torch.int32 and cu.dim() == 1 and cu.shape[0] >= 1,
                 lambda: f"{op}: {name} must be a 1-d int32 tensor of B + 1 offsets, got "
                         f"{cu.dtype} {list(cu.shape)}")
    torch._check(cu.device == q.device,
                 lambda: f"{op}: {name} is on {cu.device} but query is on {q.device}")
    cu = cu.contiguous()
    if cu.device.type == "cpu":
        v = cu.tolist()
        torch._check(v[0] == 0, lambda: f"{op}: {name}[0] must be 0, got {v[0]}")
        down = next((b for b in range(1, len(v)) if v[b] < v[b - 1]), None)
        torch._check(down is None,
                     lambda: f"{op}: {name} must be non-decreasing, but entry {down} "
                             f"({v[down]}) < entry {down - 1} ({v[down - 1]})")
        long = next((b for b in range(1, len(v)) if v[b] - v[b - 1] > max_len), None)
        torch._check(long is None,
                     lambda: f"{op}: sequence {long - 1} of {name} has "
                             f"{v[long] - v[long - 1]} tokens, more than max_seqlen {max_len}")
        torch._check(v[-1] == total, lambda: f"{op}: {name}[-1] = {v[-1]} must equal the "
                                             f"packed token count {total}")
    return cu


def _check_options(op: str, q, k, mask, is_causal: bool, cu_q, cu_k, max_q: int, max_k: int,
                   left: int, right: int, bottom_right: bool, alibi, softcap: float):
    """The trailing sdpa arguments (AttnOptions in attention_host.h) -> _Geometry."""
    torch._check(left >= -1 and right >= -1,
                 lambda: f"{op}: window sizes must be >= 0 (or -1: unbounded), got "
                         f"({left}, {right})")
    if is_causal:
        right = 0
    torch._check(math.isfinite(softcap) and softcap >= 0.0,
                 lambda: f"{op}: softcap must be a finite number >= 0 (0: none), got {softcap}")
    varlen = cu_q is not None
    torch._check(varlen == (cu_k is not None),
                 lambda: f"{op}: pass both cu_seqlens_q and cu_seqlens_k or neither")
    L, S = q.shape[2], k.shape[2]
    if varlen:
        torch._check(q.shape[0] == 1,
                     lambda: f"{op}: with cu_seqlens the operator takes packed tensors with "
                             f"batch dim 1, query (1, Hq, total_q, E), got {list(q.shape)}")
        torch._check(mask is None, lambda: f"{op}: a mask cannot be combined with cu_seqlens "
                                           f"(use the window, causal or ALiBi)")
        torch._check(max_q >= 0 and max_k >= 0,
                     lambda: f"{op}: max_seqlen_q/max_seqlen_k must be >= 0")
        cu_q = _check_cu_seqlens(op, "cu_seqlens_q", cu_q, q, L, max_q)
        cu_k = _check_cu_seqlens(op, "cu_seqlens_k", cu_k, q, S, max_k)
        torch._check(cu_q.shape[0] == cu_k.shape[0],
                     lambda: f"{op}: cu_seqlens_q has {cu_q.shape[0]} entries and cu_seqlens_k "
                             f"{cu_k.shape[0]}; both must be B + 1")
        L, S = max_q, max_k
        torch._check(max(L, S) * MAX_BLOCK_ROWS < ROW_OFFSET_LIMIT,
                     lambda: f"{op}: max_seqlen ({L}, {S}) too large")
    B = cu_q.shape[0] - 1 if varlen else q.shape[0]
    Hq = q.shape[1]
    if alibi is not None:
        torch._check(alibi.dtype == torch.float32,
                     lambda: f"{op}: alibi_slopes must be float32, got {alibi.dtype}")
        torch._check(alibi.device == q.device,
                     lambda: f"{op}: alibi_slopes is on {alibi.device} but query is on "
                             f"{q.device}")
        torch._check((alibi.dim() == 1 and alibi.shape[0] == Hq) or
                     (alibi.dim() == 2 and tuple(alibi.shape) == (B, Hq)),
                     lambda: f"{op}: alibi_slopes must have shape (Hq,) = ({Hq},) or (B, Hq) = "
                             f"({B}, {Hq}), got {list(alibi.shape)}")
        alibi = alibi.contiguous()
    return _Geometry(q, k, cu_q, cu_k, L, S, left, right, bottom_right, alibi, softcap)


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


def _check_backward(op: str, grad_out, out, lse, q, Ev: int):
    Bt, Hq, Lt = q.shape[0], q.shape[1], q.shape[2]
    torch._check(tuple(grad_out.shape) == (Bt, Hq, Lt, Ev) and grad_out.shape == out.shape,
                 lambda: f"{op}: grad_out {list(grad_out.shape)} and out {list(out.shape)} must "
                         f"have shape (Bt, Hq, Lt, Ev) = {(Bt, Hq, Lt, Ev)}")
    torch._check(grad_out.dtype == q.dtype and out.dtype == q.dtype,
                 lambda: f"{op}: grad_out and out must have query's dtype {q.dtype}, got "
                         f"{grad_out.dtype} and {out.dtype}")
    torch._check(lse.dtype == torch.float32 and tuple(lse.shape) == (Bt, Hq, Lt),
                 lambda: f"{op}: lse must be float32 of shape (Bt, Hq, Lt) = {(Bt, Hq, Lt)}, "
                         f"got {lse.dtype} {list(lse.shape)}")
    torch._check(grad_out.device == q.device and out.device == q.device and
                 lse.device == q.device,
                 lambda: f"{op}: grad_out, out and lse must be on query's device {q.device}")
    return _rows_fit(_dense_last(grad_out)), _rows_fit(_dense_last(out)), lse.contiguous()


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
