"""Shared by the Triton quantized-linear operators (int8_linear.py, int4_linear.py, w8a8.py):
argument checks mirroring kernels/include/fastattn/quant_host.h (same messages, with the
Triton operator's name), the NaN-poisoned output allocator, the launch configurations of the
weight-only GEMM / split-K GEMV and of the W8A8 GEMM, and the deterministic split-K reduction
kernel.

Weight-only launch plan (linear_config); programs walk (m, n) output tiles in groups of
GROUP_M tile rows (tile_coords) for L2 reuse:
- M > SPLITK_MAX_M: a tiled GEMM, grid (M tiles * N tiles, 1), epilogue (scale, bias, cast)
  in the kernel;
- M <= SPLITK_MAX_M (decode / GEMV): BLOCK_M = 16 (tl.dot's smallest tile) and the K range cut
  into SPLIT contiguous chunks of whole BLOCK_K blocks, grid (N tiles, SPLIT), SPLIT chosen so
  about GPU_PROGRAMS_PER_SM programs run per SM. With SPLIT > 1 each program writes its
  float32 partial sums (already multiplied by the weight scales) to a (SPLIT, M, N) workspace
  and _splitk_reduce adds the SPLIT partials of each output in split order (no atomics:
  bit-reproducible), adds the bias and casts.
On a GPU the configurations are fixed (no autotuning yet) per (dtype class, M regime, K
alignment) in CONFIGS, every one compiled ahead of time by tools/quant_plans.py; under the
interpreter (TRITON_INTERPRET=1, CPU tensors) small tiles run, and M <= 16 still takes the
split-K path (up to INTERPRET_SPLIT chunks) so it is tested.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.library import wrap_triton

import triton
import triton.language as tl

SPLITK_MAX_M = 16  # M at or below this takes the split-K GEMV path
GPU_PROGRAMS_PER_SM = 2  # split-K aims at this many programs per SM
INTERPRET_SPLIT = 4  # at most this many K chunks under the interpreter
REDUCE_BLOCK = 256  # outputs per _splitk_reduce program
REDUCE_WARPS = 4
QUANT_MIN_BLOCK = 128  # smallest BLOCK_K of quantize_per_token_int8 (fewer compiled variants)
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, filled with NaN when FASTATTN_POISON_OUTPUTS is set (tests: an element the
    kernel forgets to write fails). Integer outputs are not poisoned (no NaN)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point and os.environ.get("FASTATTN_POISON_OUTPUTS", "0") not in ("", "0"):
        out.fill_(float("nan"))
    return out


# ---- argument checks (mirror kernels/include/fastattn/quant_host.h) ----------------------------

def check_same_device(op: str, name: str, t: torch.Tensor, x: torch.Tensor, x_name: str = "x"):
    torch._check(t.device == x.device,
                 lambda: f"{op}: {name} is on {t.device} but {x_name} is on {x.device}")


def check_activation(op: str, x: torch.Tensor) -> torch.Tensor:
    """x: (M, K) float activation; returned contiguous."""
    torch._check(x.dtype in ACTIVATION_DTYPES,
                 lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-d (M, K), got shape {list(x.shape)}")
    torch._check(x.shape[1] >= 1,
                 lambda: f"{op}: x must have K >= 1 columns, got shape {list(x.shape)}")
    return x.contiguous()


def check_channel_vector(op: str, name: str, t: torch.Tensor, x: torch.Tensor, n: int,
                         dtype: torch.dtype) -> torch.Tensor:
    check_same_device(op, name, t, x)
    torch._check(t.dim() == 1 and t.shape[0] == n,
                 lambda: f"{op}: {name} must have shape ({n},), got {list(t.shape)}")
    torch._check(t.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {t.dtype}")
    return t.contiguous()


def check_bias(op: str, bias: torch.Tensor | None, x: torch.Tensor, n: int,
               dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else check_channel_vector(op, "bias", bias, x, n, dtype)


def check_int8_weight(op: str, w: torch.Tensor, x: torch.Tensor, K: int) -> torch.Tensor:
    check_same_device(op, "weight", w, x)
    torch._check(w.dtype == torch.int8, lambda: f"{op}: weight must be int8, got {w.dtype}")
    torch._check(w.dim() == 2 and w.shape[1] == K,
                 lambda: f"{op}: weight must have shape (N, {K}) (K = x.size(1)), got "
                         f"{list(w.shape)}")
    return w.contiguous()


# ---- launch configurations ---------------------------------------------------------------------

@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def compiled_launch(device: torch.device) -> bool:
    """True when kernels are compiled for a GPU (GPU configs), False under the interpreter."""
    return device.type == "cuda" and not interpreting()


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per (kernel, dtype class, regime,
# aligned). "16": fp16 / bf16 tensor-core dots; "32": float32 FMA dots (input_precision
# "ieee"). aligned: K % 16 == 0, so Triton's launcher marks K divisible and rows are 16-byte
# aligned (vectorized, cp.async-pipelined loads); otherwise each element is its own load with
# its own 64-bit address and mask, and only smaller tiles stay free of spills. Every entry was
# checked with tools/resource_report.py (sm_80 and sm_90, no spills); int4's K is always
# aligned (a multiple of the group size), and its BLOCK_K is capped by the group size.
CONFIGS = {
    ("int8", "16", "gemv", True): (16, 64, 128, 4, 4),
    ("int8", "16", "gemm64", True): (64, 128, 64, 8, 3),
    ("int8", "16", "gemm", True): (128, 128, 64, 8, 3),
    ("int8", "32", "gemv", True): (16, 64, 32, 4, 3),
    ("int8", "32", "gemm64", True): (32, 64, 32, 4, 2),
    ("int8", "32", "gemm", True): (32, 64, 32, 4, 2),
    ("int8", "16", "gemv", False): (16, 64, 32, 4, 3),
    ("int8", "16", "gemm64", False): (64, 64, 32, 4, 2),
    ("int8", "16", "gemm", False): (64, 64, 32, 4, 2),
    ("int8", "32", "gemv", False): (16, 64, 32, 4, 2),
    ("int8", "32", "gemm64", False): (32, 64, 32, 4, 1),
    ("int8", "32", "gemm", False): (32, 64, 32, 4, 1),
    ("int4", "16", "gemv", True): (16, 64, 128, 4, 4),
    ("int4", "16", "gemm64", True): (64, 128, 64, 4, 3),
    ("int4", "16", "gemm", True): (64, 128, 64, 4, 3),
    ("int4", "32", "gemv", True): (16, 64, 32, 4, 3),
    ("int4", "32", "gemm64", True): (32, 64, 32, 4, 2),
    ("int4", "32", "gemm", True): (32, 64, 32, 4, 2),
    # int8 x int8 (W8A8): the dtype is the output's and does not change the main loop
    ("w8a8", "any", "gemv", True): (16, 64, 128, 4, 4),
    ("w8a8", "any", "gemm64", True): (64, 128, 128, 4, 3),
    ("w8a8", "any", "gemm", True): (128, 128, 128, 8, 3),
    ("w8a8", "any", "gemv", False): (16, 64, 64, 4, 2),
    ("w8a8", "any", "gemm64", False): (64, 64, 32, 4, 2),
    ("w8a8", "any", "gemm", False): (64, 64, 32, 4, 2),
}
INTERPRET_CONFIG = (16, 32, 32, 4, 1)  # small tiles: the interpreter's cost is per element
ALIGN = 16  # Triton's divisibility hint


def dtype_class(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def regime(M: int) -> str:
    return "gemv" if M <= SPLITK_MAX_M else "gemm64" if M <= 64 else "gemm"


def _tiles(kind: str, dclass: str, M: int, K: int, device: torch.device) -> tuple:
    if not compiled_launch(device):
        return INTERPRET_CONFIG
    return CONFIGS[(kind, dclass, regime(M), K % ALIGN == 0)]


def _with_split(M: int, N: int, K: int, tiles: tuple, device: torch.device) -> dict:
    """The launch dict of tiles plus SPLIT (K chunks; 1 = one GEMM launch with the epilogue in
    the kernel) and K_SPLIT (K elements per chunk, whole BLOCK_K blocks). M <= SPLITK_MAX_M on
    a GPU: enough chunks for about GPU_PROGRAMS_PER_SM programs per SM (at most one per K
    block); under the interpreter up to INTERPRET_SPLIT; never an empty chunk."""
    bm, bn, bk, warps, stages = tiles
    k_blocks = triton.cdiv(K, bk)
    split = 1
    if M <= SPLITK_MAX_M:
        if not compiled_launch(device):
            split = min(INTERPRET_SPLIT, k_blocks)
        else:
            n_blocks = triton.cdiv(N, bn)
            split = max(1, min(k_blocks, GPU_PROGRAMS_PER_SM * sm_count(device) // n_blocks))
        split = triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))  # no empty chunk
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps,
            "num_stages": stages, "SPLIT": split, "K_SPLIT": triton.cdiv(k_blocks, split) * bk}


def linear_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                  group_size: int = 0) -> dict:
    """Launch parameters of the weight-only kernels (_with_split). int4 (group_size > 0):
    BLOCK_K divides the group size, so a K block lies in one group (one scale and zero per
    output channel)."""
    bm, bn, bk, warps, stages = _tiles("int4" if group_size else "int8", dtype_class(dtype), M,
                                       K, device)
    if group_size:
        bk = min(bk, group_size)
    return _with_split(M, N, K, (bm, bn, bk, warps, stages), device)


def w8a8_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Launch parameters of the int8 x int8 GEMM (_with_split; M <= 16 splits K too)."""
    return _with_split(M, N, K, _tiles("w8a8", "any", M, K, device), device)


def quantize_config(K: int) -> dict:
    """quantize_per_token_int8: one program per row, BLOCK_K columns per step."""
    block = max(QUANT_MIN_BLOCK, min(triton.next_power_of_2(K), 1024 if interpreting() else 4096))
    return {"BLOCK_K": block, "num_warps": 4 if block <= 1024 else 8}


GROUP_M = 8  # tile rows per group in the GEMM program order


# ---- kernels shared by the weight-only operators -------------------------------------------------

@triton.jit
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """(pid_m, pid_n) of program_id(0): groups of GROUP tile rows walked column by column, so
    consecutive programs share weight tiles and x rows (L2 reuse)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    rows = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def store_linear(acc, rm, rn, bias_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr,
                 PARTIAL: tl.constexpr):
    """Store an fp32 [BLOCK_M, BLOCK_N] tile (weight scales applied). PARTIAL: raw into the
    float32 (SPLIT, M, N) workspace at chunk program_id(1); else + bias, cast to out's dtype."""
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if PARTIAL:
        base = tl.program_id(1).to(tl.int64) * M * N
        tl.store(out_ptr + base + offs, acc, mask=ok)
    else:
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc = acc + b[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _splitk_reduce(ws_ptr, bias_ptr, out_ptr, total, N, SPLIT, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """out[i] = sum over s = 0..SPLIT-1 (in that order) of ws[s, i] (+ bias[i % N]), for the
    total = M * N outputs; ws float32 (SPLIT, M, N)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < total
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + tl.cast(s, tl.int64) * total + idx, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + idx % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)


def launch_weight_only(kernel, x, weights: tuple, bias, out, M: int, N: int, K: int, cfg: dict,
                       **constexprs):
    """Run a weight-only kernel (wrap_triton'd; arguments x, *weights, bias, out, M, N, K,
    K_SPLIT, plus the given constexprs) with cfg: one GEMM launch, or with cfg["SPLIT"] > 1 the chunk programs into a
    float32 (SPLIT, M, N) workspace, then the fixed-order reduction into out."""
    split = cfg["SPLIT"]
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    meta = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
            "GROUP": GROUP_M, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], **constexprs}
    bias_arg = x if bias is None else bias  # never read without HAS_BIAS
    if split == 1:
        kernel[(tiles, 1)](x, *weights, bias_arg, out, M, N, K, cfg["K_SPLIT"],
                           HAS_BIAS=bias is not None, PARTIAL=False, **meta)
        return out
    ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    kernel[(tiles, split)](x, *weights, bias_arg, ws, M, N, K, cfg["K_SPLIT"],
                           HAS_BIAS=False, PARTIAL=True, **meta)
    total = M * N
    wrap_triton(_splitk_reduce)[(triton.cdiv(total, REDUCE_BLOCK),)](
        ws, bias_arg, out, total, N, split, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK,
        num_warps=REDUCE_WARPS)
    return out
