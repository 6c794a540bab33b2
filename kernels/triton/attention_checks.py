"""Argument checks of the Triton attention operators (kernels/triton/attention.py), mirroring
kernels/include/fastattn/attention_host.h: the core sdpa arguments (_check_inputs), the
trailing varlen / window / ALiBi / softcap arguments into the per-sequence launch geometry
(_check_options, _Geometry), the backward's extra tensors (_check_backward), and the layout
fixes the kernels need (stride(-1) == 1, 32-bit in-block row offsets, 16-aligned mask rows).
Also the output allocation shared with kernels/triton/decode.py (_new_output, _dense_last).
"""

from __future__ import annotations

import math
import os

import torch

try:  # a package import; the resource report loads this file by path
    from .attention_fwd import MASK_ADD, MASK_BOOL, MASK_NONE
except ImportError:
    from fastattn._triton.attention_fwd import MASK_ADD, MASK_BOOL, MASK_NONE

MAX_HEAD_DIM = 256
MAX_BLOCK_ROWS = 256  # more rows than any BLOCK_M / BLOCK_N (for the 32-bit offset bound)
ROW_OFFSET_LIMIT = 2**31


def _new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FASTATTN_POISON_OUTPUTS", "0") not in ("", "0"):
        out.fill_(float("nan"))  # tests: an element the kernel forgets to write fails
    return out


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
