"""Ahead-of-time compile plans of the quantized-linear Triton kernels for
tools/resource_report.py (which loads this file by path and adds plans(variant) to PLANS):
kernels/triton/quant_common.py (_splitk_reduce), int8_linear.py, int4_linear.py, w8a8.py.
Each plan lists every launch configuration the launchers can pick on a GPU
(quant_common.CONFIGS, quantize_config) in every dtype the configuration serves.

Int params: Triton's launcher adds a divisible-by-16 hint to ints that are multiples of 16.
K_SPLIT always is (a multiple of BLOCK_K >= 32). An aligned config (K % 16 == 0; int4 always)
is compiled with K divisible and N divisible or not; an unaligned one with neither K nor N
divisible, and with N divisible.
"""

from __future__ import annotations

import importlib
import itertools

FLOAT_DTYPES = ("fp32", "fp16", "bf16")
CLASS_DTYPES = {"16": ("fp16", "bf16"), "32": ("fp32",), "any": FLOAT_DTYPES}


def _common():
    """kernels/triton/quant_common.py as the kernel modules import it (configs live there)."""
    return importlib.import_module("fastattn._triton.quant_common")


def _hints(aligned: bool, k_split: bool = True) -> list[tuple[str, ...]]:
    """The divisible int params of the variants compiled for an aligned / unaligned config."""
    extra = ("K_SPLIT",) if k_split else ()
    return [("K", "N") + extra, ("K",) + extra] if aligned else [extra, ("N",) + extra]


def _configs(kind: str):
    """(dtype, regime, aligned, tiles) of every CONFIGS entry of one kernel kind."""
    for (k, dclass, regime, aligned), tiles in _common().CONFIGS.items():
        if k == kind:
            for x in CLASS_DTYPES[dclass]:
                yield x, regime, aligned, tiles


def _weight_only(kernel, kind, types_of, int4_groups, variant) -> list[dict]:
    """Every CONFIGS entry of `kind` x its dtypes (x int4 group sizes) x hints; GEMV configs
    also as split-K partials (float32 workspace out, no bias)."""
    qc = _common()
    out = []
    for x, regime, aligned, (bm, bn, bk, warps, stages) in _configs(kind):
        for group, partial, divisible in itertools.product(
                int4_groups or (0,), (False, True) if regime == "gemv" else (False,),
                _hints(aligned)):
            c = {"HAS_BIAS": not partial, "PARTIAL": partial, "BLOCK_M": bm, "BLOCK_N": bn,
                 "BLOCK_K": min(bk, group) if group else bk, "GROUP": qc.GROUP_M}
            if group:
                c["GROUP_SIZE"] = group
            out.append(variant(kernel, types_of(x, partial), c, warps, stages,
                               divisible=divisible))
    return out


def quant_common_plan(module, variant) -> list[dict]:
    """_splitk_reduce into every output dtype, with a bias."""
    return [variant(module._splitk_reduce,
                    {"ws_ptr": "*fp32", "bias_ptr": f"*{x}", "out_ptr": f"*{x}"},
                    {"HAS_BIAS": True, "BLOCK": module.REDUCE_BLOCK}, module.REDUCE_WARPS)
            for x in FLOAT_DTYPES]


def int8_linear_plan(module, variant) -> list[dict]:
    def types(x, partial):
        return {"x_ptr": f"*{x}", "w_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": f"*{x}",
                "out_ptr": "*fp32" if partial else f"*{x}"}
    return _weight_only(module._int8_linear, "int8", types, (), variant)


def int4_linear_plan(module, variant) -> list[dict]:
    def types(x, partial):
        return {"x_ptr": f"*{x}", "packed_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*u8",
                "bias_ptr": f"*{x}", "out_ptr": "*fp32" if partial else f"*{x}"}
    return _weight_only(module._int4_linear, "int4", types, module.GROUP_SIZES, variant)


def w8a8_plan(module, variant) -> list[dict]:
    """_quantize_rows at every quantize_config block (K = 1 .. 2 * 4096 reaches each) in every
    dtype; _int8_scaled_mm at every CONFIGS entry into every out dtype (GEMV configs also as
    split-K int32 partials) and _w8a8_reduce into every out dtype."""
    qc = _common()
    out = []
    blocks = sorted({tuple(qc.quantize_config(2**i).items()) for i in range(14)})
    for cfg, x in itertools.product((dict(b) for b in blocks), FLOAT_DTYPES):
        out.append(variant(module._quantize_rows, {"x_ptr": f"*{x}", "xq_ptr": "*i8",
                                                   "scale_ptr": "*fp32"},
                           {"BLOCK_K": cfg["BLOCK_K"], "INTERPRET": False}, cfg["num_warps"]))
    for (x, regime, aligned, (bm, bn, bk, warps, stages)), partial in (
            (c, p) for c in _configs("w8a8") for p in ((False, True) if c[1] == "gemv" else (False,))):
        for divisible in _hints(aligned):
            types = {"xq_ptr": "*i8", "w_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32",
                     "bias_ptr": f"*{x}", "out_ptr": "*i32" if partial else f"*{x}"}
            consts = {"HAS_BIAS": not partial, "PARTIAL": partial, "BLOCK_M": bm,
                      "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": qc.GROUP_M}
            out.append(variant(module._int8_scaled_mm, types, consts, warps, stages,
                               divisible=divisible))
    for x in FLOAT_DTYPES:
        out.append(variant(module._w8a8_reduce, {"part_ptr": "*i32", "xs_ptr": "*fp32",
                                                 "ws_ptr": "*fp32", "bias_ptr": f"*{x}",
                                                 "out_ptr": f"*{x}"},
                           {"HAS_BIAS": True, "BLOCK": qc.REDUCE_BLOCK}, qc.REDUCE_WARPS))
    return out


def plans(variant) -> dict:
    """PLANS entries (kernels/triton/<name>.py -> its variants), given resource_report.variant."""
    return {name: (lambda module, fn=fn: fn(module, variant)) for name, fn in (
        ("quant_common", quant_common_plan), ("int8_linear", int8_linear_plan),
        ("int4_linear", int4_linear_plan), ("w8a8", w8a8_plan))}
