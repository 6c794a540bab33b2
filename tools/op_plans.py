"""Ahead-of-time compile plans of the softmax, norm, attention and decode Triton kernels for
tools/resource_report.py (which loads this file by path and adds plans(variant) to PLANS).
Each plan lists the variants (resource_report.variant: types, constexprs, warps, int hints)
the launcher in kernels/triton/<name>.py can pick on a GPU. The quantized linears' plans are in
tools/quant_plans.py.
"""

from __future__ import annotations

import functools
import itertools

FLOAT_DTYPES = ("fp32", "fp16", "bf16")


def plans(variant) -> dict:
    """kernels/triton/<name>.py stem -> plan(module) -> list of variants."""
    return {name: functools.partial(plan, variant) for name, plan in
            (("softmax", softmax_plan), ("norm", norm_plan), ("attention", attention_plan),
             ("decode", decode_plan))}


def softmax_plan(variant, module) -> list[dict]:
    """Every config tile_config returns (N up to 4 * MAX_SINGLE_PASS reaches each branch and
    block size) for the kernels that run it, with bf16 data and an fp32 additive causal mask;
    plus the dtype x mask x causal sweep at the config with the most elements per thread (the
    register-heaviest) and at the online config."""
    found = {tuple(module.tile_config(n).items()) for n in range(1, 4 * module.MAX_SINGLE_PASS + 1)}
    configs = sorted((dict(c) for c in found), key=lambda c: (c["ROWS"] == 0, c["BLOCK_N"]))
    tile = [c for c in configs if c["ROWS"]]
    online = [c for c in configs if not c["ROWS"]]
    heaviest = max(tile, key=lambda c: (c["BLOCK_N"] * c["ROWS"] / c["num_warps"], c["BLOCK_N"]))

    def fwd(kernel, cfg, x, mask, kind, causal):
        types = {"x_ptr": f"*{x}", "mask_ptr": f"*{mask}", "out_ptr": f"*{x}", "scale": "fp32"}
        return variant(kernel, types, {**cfg, "MASK_KIND": kind, "CAUSAL": causal},
                       cfg["num_warps"])

    def bwd(kernel, cfg, x):
        types = {"dy_ptr": f"*{x}", "y_ptr": f"*{x}", "dx_ptr": f"*{x}", "scale": "fp32"}
        return variant(kernel, types, cfg, cfg["num_warps"])

    def masks(x):  # (MASK_KIND, mask dtype) the launcher passes: none (x itself), bool, additive
        return [(0, x), (1, "i1"), (2, x), (2, "fp32")]

    out = []
    for kernel, cfgs, sweep_at in ((module._softmax_fwd_tile, tile, heaviest),
                                   (module._softmax_fwd_online, online, online[0])):
        out += [fwd(kernel, cfg, "bf16", "fp32", 2, True) for cfg in cfgs]
        out += [fwd(kernel, sweep_at, x, mask, kind, causal) for x in FLOAT_DTYPES
                for (kind, mask), causal in itertools.product(masks(x), (False, True))]
    for kernel, cfgs, sweep_at in ((module._softmax_bwd_tile, tile, heaviest),
                                   (module._softmax_bwd_loop, online, online[0])):
        out += [bwd(kernel, cfg, "bf16") for cfg in cfgs]
        out += [bwd(kernel, sweep_at, x) for x in FLOAT_DTYPES]
    return out


def norm_plan(variant, module) -> list[dict]:
    """Every config norm_config returns, forward and backward (N up to 4 * MAX_TILE_N reaches
    each branch and block size), for the kernels that run it, LayerNorm and RMSNorm, with bf16
    data, fp32 weight and bias and a residual / grad_residual_out; plus the data x parameter
    dtype sweep at the config with the most elements per thread (the register-heaviest) and at
    the loop config, and the stage-2 reduction in every gradient dtype."""
    def configs(backward):  # (tile configs, loop configs, the heaviest tile config)
        found = {tuple(module.norm_config(n, backward).items())
                 for n in range(1, 4 * module.MAX_TILE_N + 1)}
        cfgs = sorted((dict(c) for c in found), key=lambda c: (c["ROWS"] == 0, c["BLOCK_N"]))
        tile = [c for c in cfgs if c["ROWS"]]
        heaviest = max(tile, key=lambda c: (c["BLOCK_N"] * c["ROWS"] / c["num_warps"],
                                            c["BLOCK_N"]))
        return tile, [c for c in cfgs if not c["ROWS"]], heaviest

    def fwd(kernel, cfg, x, p, rms):
        types = {"x_ptr": f"*{x}", "res_ptr": f"*{x}", "w_ptr": f"*{p}", "b_ptr": f"*{p}",
                 "out_ptr": f"*{x}", "res_out_ptr": f"*{x}", "mean_ptr": "*fp32",
                 "rstd_ptr": "*fp32", "eps": "fp32"}
        flags = {"RMS": rms, "HAS_RES": True, "HAS_W": True, "HAS_B": not rms}
        return variant(kernel, types, {**cfg, **flags}, cfg["num_warps"])

    def bwd(kernel, cfg, x, p, rms):
        types = {"dy_ptr": f"*{x}", "dres_ptr": f"*{x}", "x_ptr": f"*{x}", "w_ptr": f"*{p}",
                 "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "coef_ptr": "*fp32",
                 "dx_ptr": f"*{x}", "dw_part_ptr": "*fp32", "db_part_ptr": "*fp32"}
        flags = {"RMS": rms, "HAS_DRES": True, "HAS_W": True, "HAS_DB": not rms}
        types = {k: t for k, t in types.items() if k in kernel.arg_names}  # coef: loop only
        return variant(kernel, types, {**cfg, **flags}, cfg["num_warps"])

    def sweep():  # (x dtype, weight / bias dtype, RMS)
        return [(x, p, rms) for x in FLOAT_DTYPES for p in sorted({x, "fp32"})
                for rms in (False, True)]

    out = []
    (tile, loop, heaviest), (btile, bloop, bheaviest) = configs(False), configs(True)
    for make, kernels in ((fwd, ((module._norm_fwd_tile, tile, heaviest),
                                 (module._norm_fwd_loop, loop, loop[0]))),
                          (bwd, ((module._norm_bwd_tile, btile, bheaviest),
                                 (module._norm_bwd_coef, bloop, bloop[0]),
                                 (module._norm_bwd_loop, bloop, bloop[0])))):
        for kernel, cfgs, sweep_at in kernels:
            out += [make(kernel, cfg, "bf16", "fp32", rms) for cfg in cfgs
                    for rms in (False, True)]
            out += [make(kernel, sweep_at, *args) for args in sweep()]
    for g, (has_dw, has_db) in itertools.product(FLOAT_DTYPES, ((1, 1), (1, 0), (0, 1))):
        types = {"dw_part_ptr": "*fp32", "db_part_ptr": "*fp32", "dw_ptr": f"*{g}",
                 "db_ptr": f"*{g}"}
        out.append(variant(module._norm_bwd_reduce, types,
                           {"HAS_DW": bool(has_dw), "HAS_DB": bool(has_db),
                            "BLOCK_P": module.REDUCE_BLOCK_P, "BLOCK_C": module.REDUCE_BLOCK_C},
                           module.REDUCE_WARPS))
    return out


def attention_plan(variant, module) -> list[dict]:
    """Every launch config of the attention autotuners (module._CONFIGS: kernel x dtype class
    x head-dim bucket x dropout). A 16-bit config is compiled at the largest head dims it
    serves (BLOCK_E = BLOCK_EV = the largest bucket listing it; with dropout when a dropout list
    has it, and also without at a larger bucket of the lists without dropout), in bf16, twice:
    with an additive float32 mask (a float32 tile per score; dq writing dz) and without a mask
    but varlen with a window (dq zero-fills dz); the dropout lists (which also serve ALiBi,
    softcap and a mask with a window: attention._heavy) with ALiBi, softcap and the window on
    too (so with the mask: every modifier at once). A float32 config is
    compiled at every bucket (its head-dim chunk loops make ptxas's register allocation vary
    with the head dims instead of growing with them), with dropout and the float32 mask. Plus
    a bool mask in fp16 and is_causal in float32 at one config per kernel, and
    _attn_bwd_delta at every BLOCK_EV. Head dims and strides carry the divisible-by-16 hint
    Triton's launcher gives them in the common case (head dims 64, 80, 96, 128, ...; the mask
    rows the launcher pads to 16); the lengths L and S do not (any length: the heavier case)."""
    ints = ("E", "Ev", "q_sb", "q_sh", "q_sl", "k_sb", "k_sh", "k_ss", "v_sb", "v_sh", "v_ss",
            "m_sb", "m_sh", "m_sl", "m_cols", "do_sb", "do_sh", "do_sl", "o_sb", "o_sh", "o_sl")

    def make(name, cfg, x, mask, kind, causal, dropout, bucket, varlen=False):
        """causal: a window (causal included). With dropout or float32 (the lists that serve
        ALiBi, softcap and a mask with a window: attention._heavy) ALiBi, softcap and the
        window are on as well, with or without the mask."""
        kernel = module._KERNELS[name]
        data = {p: f"*{x}" for p in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_ptr",
                                     "dk_ptr", "dv_ptr")}
        f32 = {p: "*fp32" for p in ("lse_ptr", "delta_ptr", "dz_ptr", "alibi_ptr")}
        scalars = {p: "fp32" for p in ("scale", "out_scale", "dropout_p", "softcap")}
        types = {k: t for k, t in {**data, **f32, **scalars, "mask_ptr": f"*{mask}",
                                   "cu_q_ptr": "*i32", "cu_k_ptr": "*i32"}.items()
                 if k in kernel.arg_names}
        bm, bn, warps, stages = cfg
        fp32 = x == "fp32"
        heavy = dropout or fp32  # (float32: one list for all)
        consts = {"MASK_KIND": kind, "WINDOW": causal or (heavy and kind != 0),
                  "ALIBI": heavy, "SOFTCAP": heavy,
                  "VARLEN": varlen, "DROPOUT": dropout, "WANT_DZ": True,
                  "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_E": bucket, "BLOCK_EV": bucket,
                  "BLOCK_CE": min(module.FP32_COLUMNS[name], bucket) if fp32 else bucket,
                  "BLOCK_CV": min(module.FP32_COLUMNS[name], bucket) if fp32 else bucket,
                  "BLOCK_K": min(module.FP32_CHUNK, bucket) if fp32 else 0,
                  "PRECISION": "ieee" if fp32 else "tf32"}
        return variant(kernel, types, consts, warps, stages, ints)

    serves = {}  # (kernel, dtype class, config) -> {dropout: the largest bucket listing it}
    out = []
    for (name, dclass, bucket, dropout), cfgs in module._CONFIGS.items():
        for cfg in cfgs:
            if dclass == "32":  # every bucket; with dropout when listed so (heavier)
                if dropout or (name, dclass, bucket, True) not in module._CONFIGS or \
                        cfg not in module._CONFIGS[(name, dclass, bucket, True)]:
                    out.append(make(name, cfg, "fp32", "fp32", 2, True, dropout, bucket))
                continue
            by_dropout = serves.setdefault((name, dclass, cfg), {})
            by_dropout[dropout] = max(by_dropout.get(dropout, 0), bucket)
    for (name, _, cfg), by_dropout in serves.items():
        for dropout, bucket in by_dropout.items():
            if dropout or bucket > by_dropout.get(True, 0):
                out += [make(name, cfg, "bf16", "fp32", 2, False, dropout, bucket),
                        make(name, cfg, "bf16", "bf16", 0, True, dropout, bucket, True)]
    for name in ("fwd", "dkdv", "dq"):
        out += [make(name, module._CONFIGS[(name, "16", 128, False)][0], "fp16", "i1", 1, False,
                     False, 128),
                make(name, module._CONFIGS[(name, "32", 128, False)][0], "fp32", "fp32", 0, True,
                     False, 128, True),
                make(name, module._CONFIGS[(name, "16", 128, False)][0], "bf16", "bf16", 0, False,
                     False, 128)]
    for x, block_ev in itertools.product(FLOAT_DTYPES, (16, 32, 64, 128, 256)):
        out.append(variant(module._attn_bwd_delta, {"o_ptr": f"*{x}", "do_ptr": f"*{x}",
                                                    "delta_ptr": "*fp32"},
                           {"BLOCK_M": module.delta_block(block_ev), "BLOCK_EV": block_ev},
                           module.DELTA_WARPS, divisible=ints))
    return out


def decode_plan(variant, module) -> list[dict]:
    """The split kernel at every dtype x head-dim bucket (64, 128, 256) config of
    module.decode_config, paged (writing the split workspace) and contiguous (writing out / lse
    directly), at the smallest and the largest row block (ROWS_CAP), with every score modifier
    on (ALiBi,
    softcap, window: the heaviest); the reduction at every BLOCK_EV. Head dims and strides
    carry the divisible-by-16 hint (head dims 64, 128, 256)."""
    import torch
    ints = ("E", "Ev", "q_sb", "q_sl", "q_sh", "k_sp", "k_ss", "k_sh", "v_sp", "v_ss", "v_sh")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = []
    for (x, dtype), d, paged, most in itertools.product(dtypes.items(), (64, 128, 256),
                                                        (True, False), (False, True)):
        cfg = module.decode_config(dtype, d, d)
        rows = cfg["ROWS_CAP"] if most else 16
        types = {"q_ptr": f"*{x}", "k_ptr": f"*{x}", "v_ptr": f"*{x}", "out_ptr": f"*{x}",
                 "seqlens_ptr": "*i32", "bt_ptr": "*i32", "alibi_ptr": "*fp32",
                 "lse_ptr": "*fp32", "ws_out_ptr": "*fp32", "ws_lse_ptr": "*fp32",
                 "scale": "fp32", "softcap": "fp32"}
        consts = {**cfg, "PAGED": paged, "ALIBI": True, "SOFTCAP": True, "WINDOW": True,
                  "SPLIT": paged, "BLOCK_R": rows}
        out.append(variant(module._decode_split, types, consts, cfg["num_warps"],
                           cfg["num_stages"], ints))
    for x, block_ev in itertools.product(FLOAT_DTYPES, (16, 32, 64, 128, 256)):
        out.append(variant(module._decode_reduce, {"ws_out_ptr": "*fp32", "ws_lse_ptr": "*fp32",
                                                   "out_ptr": f"*{x}", "lse_ptr": "*fp32"},
                           {"BLOCK_S": module.REDUCE_BLOCK_S, "BLOCK_EV": block_ev},
                           module.REDUCE_WARPS, divisible=("Ev",)))
    return out
