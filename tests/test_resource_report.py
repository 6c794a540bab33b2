"""tools/resource_report.py: every Triton kernel compiles ahead of time for sm_80 and sm_90
without spilling, and the CUDA kernels in fastattn._C are built for both archs without local
memory. The script runs in a subprocess whose environment lacks TRITON_INTERPRET (which
conftest.py sets here, and under which @triton.jit makes interpreter functions)."""

import ast
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "resource_report.py"
SOFTMAX = ROOT / "kernels" / "triton" / "softmax.py"
ARCHS = ("sm_80", "sm_90")
SM80_SMEM = 163 * 1024
SMEM = {"sm_80": SM80_SMEM, "sm_90": 227 * 1024}  # bytes of shared memory a block may use


def run_report(tmp_path, *args):
    """(exit code, output, JSON report) of the script run in a clean subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc.returncode, proc.stdout + proc.stderr, report


def jit_kernels(path: Path) -> set[str]:
    """@triton.jit functions of a file that no other one calls (callees are inlined helpers)."""
    tree = ast.parse(path.read_text())
    jit = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)
           and any("jit" in ast.unparse(d) for d in f.decorator_list)}
    called = {n.func.id for f in jit.values() for n in ast.walk(f)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in jit}
    return set(jit) - called


def load_script():
    spec = importlib.util.spec_from_file_location("resource_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def triton_report(tmp_path_factory):
    """The Triton part's report, compiled once for the tests below."""
    code, output, report = run_report(tmp_path_factory.mktemp("triton"), "--triton")
    assert code == 0, output
    return report["triton"]


QUANT_GEMM_MODULES = ("int8_linear", "int4_linear", "w8a8")


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_and_sm90(triton_report):
    kernels = jit_kernels(SOFTMAX)
    assert kernels >= {"_softmax_fwd_tile", "_softmax_fwd_online", "_softmax_bwd_tile",
                       "_softmax_bwd_loop"}
    for kernel in kernels:
        for arch in ARCHS:
            mine = [r for r in triton_report if r["kernel"] == kernel and r["arch"] == arch]
            assert mine, f"{kernel} not compiled for {arch}"
            assert {d for r in mine for d in r["dtypes"].values()} >= {"fp32", "fp16", "bf16"}
    for r in triton_report:
        where = f"{r['kernel']} {r['arch']} {r['constexprs']} {r['dtypes']}"
        assert "error" not in r, where
        assert r["registers"] > 0, where
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, where
        assert r["shared"] <= SMEM[r["arch"]], where
        if r["module"] in ("softmax", "norm"):
            assert r["wgmma"] is False, where  # softmax and the norms have no matmul
    quant_gemms_sm90 = [r for r in triton_report if r["module"] in QUANT_GEMM_MODULES
                        and r["arch"] == "sm_90" and r["constexprs"].get("BLOCK_M", 0) >= 64]
    assert quant_gemms_sm90 and all(r["wgmma"] for r in quant_gemms_sm90)


@pytest.mark.slow
def test_every_softmax_launch_config_is_compiled(triton_report):
    """tile_config's choice for lengths that reach each branch is among the compiled configs
    of the kernels that run it (single-pass tiles, or the online / loop kernels)."""
    from fastattn._triton.softmax import tile_config  # host code: fine when interpreted
    seen = {(r["kernel"], r["arch"], r["constexprs"]["BLOCK_N"], r["constexprs"].get("ROWS", 0),
             r["num_warps"]) for r in triton_report if r["module"] == "softmax"}
    for n in (1, 7, 64, 257, 1024, 4097, 8192, 9000, 65536):
        cfg = tile_config(n)
        names = ("_softmax_fwd_tile", "_softmax_bwd_tile") if cfg["ROWS"] else \
            ("_softmax_fwd_online", "_softmax_bwd_loop")
        for name, arch in itertools.product(names, ARCHS):
            assert (name, arch, cfg["BLOCK_N"], cfg["ROWS"], cfg["num_warps"]) in seen, (n, cfg)


def test_cuda_kernels_are_built_for_sm80_and_sm90(tmp_path):
    code, output, report = run_report(tmp_path, "--cuda")
    cuda = report["cuda"]
    if not cuda["kernels"]:
        pytest.skip(f"{cuda['so']} has no CUDA kernels (a CPU-only build) {cuda.get('error', '')}")
    assert code == 0, output
    assert set(ARCHS) <= set(cuda["elf_archs"]), cuda["elf_archs"]
    softmax = [r for r in cuda["kernels"] if re.match(r"softmax_(fwd|bwd)_", r["base"])]
    assert {r["base"].split("_")[1] for r in softmax} == {"fwd", "bwd"}
    for name in {r["kernel"] for r in softmax}:
        assert {r["arch"] for r in softmax if r["kernel"] == name} >= set(ARCHS), name
    for r in softmax:
        assert r["registers"] > 0 and r["local"] == 0 and r["stack"] == 0, r


def test_require_cuda_fails_on_a_binary_without_device_code(tmp_path):
    code, output, report = run_report(tmp_path, "--cuda", "--require-cuda", "--so",
                                      sys.executable)
    assert code == 1, output
    assert report["cuda"]["kernels"] == []
    assert any("no CUDA kernels for sm_80" in f for f in report["failures"]), output


def test_ptxas_log_parsing():
    tool = load_script()
    name = "_ZN8fastattn4cuda12_GLOBAL__N_14kernIfLi4EEEvPT_i"
    log = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{name}' for 'sm_90a'
ptxas info    : Function properties for {name}
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]
"""
    usage = tool.parse_ptxas_log(log)[(name, "sm_90")]
    assert usage == {"registers": 255, "shared": 2048, "stack": 16, "spill_stores": 8,
                     "spill_loads": 4}
    assert tool.spill_reason({**usage, "local": 0}) == "spill_stores=8, stack=16"
    assert tool.spill_reason({"spill_stores": 0, "stack": 0, "local": 0}) is None
    assert tool.itanium_base(name) == "kern"
    assert tool.max_threads(64) == 1024 and tool.max_threads(104) == 608


@pytest.mark.slow
def test_every_norm_launch_config_is_compiled(triton_report):
    """norm_config's forward and backward choices for lengths that reach each branch are among
    the compiled configs of the kernels that run them."""
    from fastattn._triton.norm import norm_config  # host code: fine when interpreted
    seen = {(r["kernel"], r["arch"], r["constexprs"].get("BLOCK_N"), r["constexprs"].get("ROWS", 0),
             r["num_warps"]) for r in triton_report if r["module"] == "norm"}
    for n, backward in itertools.product((1, 7, 64, 256, 1000, 4097, 8192, 9000, 65536),
                                         (False, True)):
        cfg = norm_config(n, backward)
        if cfg["ROWS"]:
            names = ("_norm_bwd_tile",) if backward else ("_norm_fwd_tile",)
        else:
            names = ("_norm_bwd_loop",) if backward else ("_norm_fwd_loop",)
        for name, arch in itertools.product(names, ARCHS):
            key = (name, arch, cfg["BLOCK_N"], cfg["ROWS"], cfg["num_warps"])
            assert key in seen, (n, backward, cfg)


@pytest.mark.slow
def test_every_attention_launch_config_is_compiled(triton_report):
    """Every config the attention autotuners choose among (attn_configs, for each kernel,
    dtype, head dims and dropout) is compiled for both archs at head dims at least as large as
    the ones it serves (with dropout when it serves dropout), and the delta kernel at every
    head dim; the sm_90 builds of the 16-bit forward with BLOCK_M >= 64 use wgmma."""
    import torch
    from fastattn._triton.attention import attn_configs, delta_block, head_block
    recs = [r for r in triton_report if r["module"] == "attention"]
    seen = {}  # (kernel, arch, BLOCK_M, BLOCK_N, warps, stages, fp32 data, dropout) -> BLOCK_E
    for r in recs:
        c = r["constexprs"]
        if r["kernel"] == "_attn_bwd_delta":
            continue
        key = (r["kernel"], r["arch"], c["BLOCK_M"], c["BLOCK_N"], r["num_warps"],
               r["num_stages"], r["dtypes"]["q"] == "fp32", c["DROPOUT"])
        seen[key] = max(seen.get(key, 0), c["BLOCK_E"])  # the plan compiles E = Ev
    names = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    heads = ((8, 8), (40, 24), (64, 64), (80, 96), (128, 128), (64, 256), (256, 256))
    for (kernel, name), dtype, (E, Ev), dropout, arch in itertools.product(
            names.items(), dtypes, heads, (False, True), ARCHS):
        need = max(head_block(E), head_block(Ev))
        for cfg in attn_configs(kernel, dtype, E, Ev, dropout):
            built = [seen.get((name, arch, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"],
                               cfg["num_stages"], dtype == torch.float32, d), 0)
                     for d in ((True,) if dropout else (False, True))]
            assert max(built) >= need, (kernel, dtype, E, Ev, dropout, arch, cfg)
    delta = {(r["arch"], r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_EV"])
             for r in recs if r["kernel"] == "_attn_bwd_delta"}
    for Ev, arch in itertools.product((1, 16, 40, 64, 100, 128, 256), ARCHS):
        assert (arch, delta_block(Ev), head_block(Ev)) in delta, (Ev, arch)
    hopper_fwd = [r for r in recs if r["kernel"] == "_attn_fwd" and r["arch"] == "sm_90"
                  and r["dtypes"]["q"] in ("fp16", "bf16") and r["constexprs"]["BLOCK_M"] >= 64]
    assert hopper_fwd and all(r["wgmma"] for r in hopper_fwd)
