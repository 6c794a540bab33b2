#!/usr/bin/env python
"""Resource report of fastattn's GPU kernels, made without a GPU (see --help).

Triton: every kernel a launcher in kernels/triton/*.py starts is compiled ahead of time
(triton.compile(ASTSource(...), GPUTarget("cuda", cc, 32))) in each launch configuration the
launcher can pick, as listed by the module's plan (PLANS); `ptxas -v` on the PTX, with the
flags of Triton's own ptxas step, gives registers, stack frame and spill bytes.
CUDA: `cuobjdump -res-usage` on fastattn/_C*.so gives registers, stack, shared and local
memory per kernel and arch; a `nvcc -Xptxas=-v` build log (--build-log) adds spill bytes.
Exits 1 if a Triton variant fails to compile or exceeds its arch's shared memory, if a
launched kernel has no plan, if --require-cuda finds no CUDA kernels for an arch, or (unless
--no-fail-on-spill) if any kernel spills or uses local memory.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.machinery
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest.mock
from pathlib import Path

TRITON_DIR = Path(__file__).resolve().parents[1] / "kernels" / "triton"
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block


# ---- tools and log parsing ------------------------------------------------------------------

def find_tool(name: str) -> str | None:
    """Path of a CUDA binary tool: the copy Triton ships, else PATH, else $CUDA_HOME/bin."""
    try:
        import triton.knobs
        return getattr(triton.knobs.nvidia, name).path
    except (ImportError, AttributeError, RuntimeError):
        cuda_bin = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)
        return shutil.which(name) or (str(cuda_bin) if cuda_bin.exists() else None)


def parse_ptxas_log(text: str) -> dict:
    """`ptxas -v` output (alone or inside an nvcc build log) -> {(function, arch): {registers,
    shared, stack, spill_stores, spill_loads}}; arch 'sm_90a' is reported as 'sm_90'."""
    usage, arch, entry, props = {}, None, None, None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)a?'", line):
            (entry, arch), props = m.groups(), m.group(1)
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                            r"(\d+) bytes spill loads", line):
            usage.setdefault((props, arch), {}).update(
                stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif m := re.search(r"Used (\d+) registers", line):
            smem = re.search(r"(\d+) bytes smem", line)
            usage.setdefault((entry, arch), {}).update(
                registers=int(m.group(1)), shared=int(smem.group(1)) if smem else 0)
    return usage


def spill_reason(rec: dict) -> str | None:
    """Why a kernel record counts as spilling: spill stores, a stack frame (spills or a
    dynamically indexed array) or local memory; None if it does not."""
    found = [f"{key}={rec[key]}" for key in ("spill_stores", "stack", "local") if rec.get(key)]
    return ", ".join(found) or None


# ---- Triton ---------------------------------------------------------------------------------

@contextlib.contextmanager
def jit_mode():
    """TRITON_INTERPRET unset inside: @triton.jit reads it when decorating, and a kernel
    decorated under it is an interpreter function, which cannot be compiled."""
    with unittest.mock.patch.dict(os.environ):  # restores the environment on exit
        os.environ.pop("TRITON_INTERPRET", None)
        yield


def load_kernel_module(path: Path):
    """Import kernels/triton/<name>.py by path (in jit_mode, in a fresh process)."""
    spec = importlib.util.spec_from_file_location(f"_resource_report_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launched_kernels(path: Path, module) -> list[str]:
    """Kernels a launcher starts, `wrap_triton(k)[grid](...)` or `k[grid](...)`; helpers only
    called from other kernels are inlined into them and not listed."""
    import triton
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "wrap_triton":
            names.update(a.id for a in node.args[:1] if isinstance(a, ast.Name))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            names.add(node.value.id)
    return sorted(n for n in names if isinstance(getattr(module, n, None), triton.JITFunction))


def variant(kernel, types: dict, constexprs: dict, num_warps: int, num_stages: int | None = None,
            divisible: tuple[str, ...] = ()) -> dict:
    """One compile: the Triton type of each pointer and non-i32 scalar param ('*bf16',
    'fp32'), the constexprs the kernel takes, num_warps; optionally num_stages (else Triton's
    default) and the int params given the divisible-by-16 hint Triton's launcher adds for such
    values (e.g. head dims and strides that are multiples of 16)."""
    names = [p.name for p in kernel.params if p.is_constexpr]
    v = {"kernel": kernel, "types": types, "num_warps": num_warps,
         "constexprs": {k: v for k, v in constexprs.items() if k in names}}
    if num_stages is not None:
        v["num_stages"] = num_stages
    if divisible:
        v["divisible"] = tuple(p for p in divisible if p in kernel.arg_names)
    return v


def load_plans(file: str) -> dict:
    """plans(variant) of tools/<file> (loaded by path: tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_{Path(file).stem}",
                                                  Path(__file__).with_name(file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plans(variant)


# kernels/triton/<name>.py -> its variants
PLANS = {**load_plans("op_plans.py"), **load_plans("quant_plans.py")}


def signature(kernel, types: dict) -> dict:
    """Triton signature: 'constexpr' for constexpr params, the plan's types, and 'i32' for
    other scalars (the launchers' ints, below 2**31)."""
    sig = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32")
           for p in kernel.params}
    if untyped := [n for n, t in sig.items() if n.endswith("_ptr") and not t.startswith("*")]:
        raise ValueError(f"{kernel.__name__}: no element type for {', '.join(untyped)}")
    return sig


def compile_variant(module_name: str, v: dict, cc: int) -> dict:
    """Compile one variant for sm_<cc> and measure it; a failure is recorded under 'error'.
    Pointers carry the 16-byte alignment hint that fresh torch tensors give at launch (and so
    do the int params the variant lists as divisible)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource
    kernel = v["kernel"]
    rec = {"part": "triton", "module": module_name, "kernel": kernel.__name__, "arch": f"sm_{cc}",
           "constexprs": v["constexprs"], "num_warps": v["num_warps"],
           "dtypes": {k.removesuffix("_ptr"): t[1:] for k, t in v["types"].items() if t[0] == "*"}}
    attrs = {(kernel.arg_names.index(p),): [["tt.divisibility", 16]]
             for p, t in v["types"].items() if t[0] == "*"}
    attrs.update({(kernel.arg_names.index(p),): [["tt.divisibility", 16]]
                  for p in v.get("divisible", ())})
    if v.get("divisible"):
        rec["divisible"] = list(v["divisible"])
    options = {"num_warps": v["num_warps"]}
    if "num_stages" in v:
        rec["num_stages"] = options["num_stages"] = v["num_stages"]
    start = time.perf_counter()
    try:
        src = ASTSource(fn=kernel, signature=signature(kernel, v["types"]),
                        constexprs=v["constexprs"], attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:  # the flags of Triton's make_cubin
            Path(tmp, "k.ptx").write_text(ptx)
            log = subprocess.run([get_ptxas(cc).path, "-v", "-lineinfo", "--regAllocOptLevel=2",
                                  f"--gpu-name={sm_arch_from_capability(cc)}", "k.ptx", "-o",
                                  "k.cubin"], cwd=tmp, capture_output=True, text=True, check=True)
        usage = parse_ptxas_log(log.stdout + log.stderr)[(compiled.metadata.name, f"sm_{cc}")]
    except Exception as e:  # noqa: BLE001 -- every failure is reported, then fails the run
        rec["error"] = f"{type(e).__name__}: {getattr(e, 'stderr', None) or e}".strip()
        return rec
    rec.update(registers=usage["registers"], shared=compiled.metadata.shared,
               stack=usage["stack"], spill_stores=usage["spill_stores"],
               spill_loads=usage["spill_loads"], wgmma=bool(re.search(r"\bwgmma\.", ptx)),
               compile_s=round(time.perf_counter() - start, 3))
    return rec


def describe(rec: dict) -> str:
    """Constexprs, warps and dtypes of a Triton record in a few words."""
    words = {**{k: int(v) if isinstance(v, bool) else v for k, v in rec["constexprs"].items()},
             "warps": rec["num_warps"],
             **({"stages": rec["num_stages"]} if "num_stages" in rec else {}), **rec["dtypes"]}
    return " ".join(f"{k}={v}" for k, v in words.items())


def triton_report(archs: list[int]) -> tuple[list[dict], list[str]]:
    """Records of every planned variant on every arch, and the failures among them."""
    records, failures = [], []
    with jit_mode():
        for path in sorted(p for p in TRITON_DIR.glob("*.py") if p.name != "__init__.py"):
            module = load_kernel_module(path)
            planned = PLANS[path.stem](module) if path.stem in PLANS else []
            unique = {repr({**v, "kernel": v["kernel"].__name__}): v for v in planned}.values()
            missing = set(launched_kernels(path, module)) - {v["kernel"].__name__ for v in unique}
            if missing:
                failures.append(f"{path.name}: no AOT variants for {', '.join(sorted(missing))}"
                                " (add them to tools/op_plans.py or tools/quant_plans.py)")
            for cc, v in itertools.product(archs, unique):
                rec = compile_variant(path.stem, v, cc)
                records.append(rec)
                name = f"{rec['kernel']} sm_{cc} {describe(rec)}"
                if "error" in rec:
                    failures.append(f"{name}: compile failed: {rec['error']}")
                elif rec["shared"] > SMEM_LIMIT.get(cc, SMEM_LIMIT[80]):
                    failures.append(f"{name}: {rec['shared']} B shared memory > sm_{cc} limit")
    return records, failures


# ---- CUDA -----------------------------------------------------------------------------------

def extension_path() -> Path | None:
    """fastattn/_C*.so, found without importing fastattn and torch."""
    spec = importlib.util.find_spec("fastattn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if Path(folder, "_C" + suffix).exists():
                return Path(folder, "_C" + suffix)
    return None


def itanium_base(mangled: str) -> str:
    """Function name without scope or template arguments, read from an Itanium mangled name:
    the last <length><identifier> of its (nested) name."""
    m = re.match(r"_ZL?N?[rVK]*", mangled)
    pos, base = m.end() if m else len(mangled), mangled
    while m := re.match(r"\d+", mangled[pos:]):
        start = pos + m.end()
        base, pos = mangled[start:start + int(m.group())], start + int(m.group())
    return base


def short_names(mangled: list[str]) -> list[str]:
    """Demangled names without namespaces, return type or parameters (e.g.
    'softmax_fwd_registers<Half, bool, 16>'); the mangled names if c++filt is missing."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not mangled:
        return mangled
    out = subprocess.run([cxxfilt], input="\n".join(mangled), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    names = [re.sub(r"(?:\w+|\(anonymous namespace\))::", "", d) for d in out]
    return [n.split("(")[0].removeprefix("void ") for n in names]


def max_threads(registers: int) -> int:
    """Largest block (whole warps, at most 1024 threads) whose registers fit the 64K register
    file of sm_80 / sm_90 (registers are allocated per warp, in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(1024, 65536 // per_warp * 32) if per_warp else 1024


def cuda_report(so: Path | None, build_log: Path | None) -> dict:
    """Fatbin contents of the extension and resource usage per kernel and arch."""
    cuobjdump = find_tool("cuobjdump")
    report = {"so": str(so), "elf_archs": [], "ptx_archs": [], "kernels": []}
    if so is None or cuobjdump is None:
        return {**report, "error": "cuobjdump not found" if so else "no fastattn/_C*.so"}
    listing = subprocess.run([cuobjdump, "-lelf", "-lptx", str(so)], capture_output=True,
                             text=True).stdout
    for kind, arch in re.findall(r"(ELF|PTX) file\s+\d+: \S*?\.sm_(\d+a?)\.", listing):
        report["elf_archs" if kind == "ELF" else "ptx_archs"].append(
            f"{'sm' if kind == 'ELF' else 'compute'}_{arch}")
    kernels, arch, name = [], None, None
    usage = subprocess.run([cuobjdump, "-res-usage", str(so)], capture_output=True, text=True)
    for line in usage.stdout.splitlines():
        if m := re.match(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
            regs, stack, shared, local = map(int, m.groups())
            kernels.append({"part": "cuda", "mangled": name, "base": itanium_base(name),
                            "arch": arch, "registers": regs, "max_threads": max_threads(regs),
                            "shared": shared, "stack": stack, "local": local})
    log = parse_ptxas_log(build_log.read_text()) if build_log else {}
    for rec, short in zip(kernels, short_names([k["mangled"] for k in kernels])):
        spills = log.get((rec["mangled"], rec["arch"]), {}).items()  # none without a log
        rec.update(kernel=short, **{k: v for k, v in spills if k.startswith("spill_")})
    report["kernels"] = sorted(kernels, key=lambda k: (k["base"], k["kernel"], k["arch"]))
    return {k: sorted(set(v)) if k.endswith("archs") else v for k, v in report.items()}


# ---- output ---------------------------------------------------------------------------------

def tables(report: dict) -> dict[str, tuple[list[str], list[list]]]:
    """Title -> (headers, rows) of each part in the report."""
    out = {}
    if "triton" in report:
        out["Triton (AOT)"] = (
            ["kernel", "arch", "config / dtypes", "regs", "smem", "stack", "spill st/ld",
             "wgmma", "s"],
            [[r["kernel"], r["arch"], describe(r)] + (
                ["FAILED: " + r["error"].splitlines()[-1][:60]] if "error" in r else
                [r["registers"], r["shared"], r["stack"], f"{r['spill_stores']}/"
                 f"{r['spill_loads']}", "yes" if r["wgmma"] else "no", r["compile_s"]])
             for r in report["triton"]])
    if "cuda" in report:
        out["CUDA"] = (
            ["kernel", "arch", "regs", "max thr", "smem", "stack", "local", "spill st/ld"],
            [[r["kernel"], r["arch"], r["registers"], r["max_threads"], r["shared"], r["stack"],
              r["local"], f"{r.get('spill_stores', '-')}/{r.get('spill_loads', '-')}"]
             for r in report["cuda"]["kernels"]])
    return out


def text_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    """Aligned plain-text table, or a markdown one."""
    cells = [headers] + [[str(c) for c in row] + [""] * (len(headers) - len(row)) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(r).replace("<", "\\<") + " |" for r in cells]
        return "\n".join([lines[0], "|" + "---|" * len(headers)] + lines[1:])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def render(report: dict, markdown: bool = False) -> str:
    """The whole report: fatbin contents, tables, timings and failures."""
    head = "## " if markdown else "== "
    parts = ["# fastattn kernel resource report\n"] if markdown else []
    if cuda := report.get("cuda"):
        archs = [", ".join(cuda[k]) or "none" for k in ("elf_archs", "ptx_archs")]
        parts.append(f"{cuda['so']}: ELF {archs[0]}; PTX {archs[1]} {cuda.get('error', '')}\n")
    for title, (headers, rows) in tables(report).items():
        parts += [f"{head}{title}\n", text_table(headers, rows, markdown) + "\n"]
    parts.append("Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings"].items()))
    failures = report["failures"]
    parts += ["\nFAILURES:"] + [f"- {f}" for f in failures] if failures else ["\nNo failures."]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="store_true", help="the Triton part only")
    parser.add_argument("--cuda", action="store_true", help="the CUDA part only")
    parser.add_argument("--archs", default="80,90", help="compute capabilities (default 80,90)")
    parser.add_argument("--json", type=Path, help="write all records as JSON")
    parser.add_argument("--markdown", type=Path, help="write a markdown report")
    parser.add_argument("--build-log", type=Path, help="nvcc -Xptxas=-v log (spill bytes)")
    parser.add_argument("--so", type=Path, help="CUDA binary to read (default fastattn/_C*.so)")
    parser.add_argument("--require-cuda", action="store_true",
                        help="fail if the binary has no CUDA kernels for an arch of --archs")
    parser.add_argument("--fail-on-spill", action=argparse.BooleanOptionalAction, default=True,
                        help="fail if a kernel spills or uses local memory (default on)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    both = not (args.triton or args.cuda)
    report, failures, timings = {}, [], {}
    if args.triton or both:
        start = time.perf_counter()
        report["triton"], failures = triton_report(archs)
        timings["triton"] = time.perf_counter() - start
    if args.cuda or both:
        start = time.perf_counter()
        report["cuda"] = cuda_report(args.so or extension_path(), args.build_log)
        timings["cuda"] = time.perf_counter() - start
        built = {r["arch"] for r in report["cuda"]["kernels"]}
        failures += [f"{report['cuda']['so']} has no CUDA kernels for sm_{cc}" for cc in archs
                     if args.require_cuda and f"sm_{cc}" not in built]
    if args.fail_on_spill:
        for rec in report.get("triton", []) + report.get("cuda", {}).get("kernels", []):
            if reason := spill_reason(rec):
                what = f" {describe(rec)}" if rec["part"] == "triton" else ""
                failures.append(f"{rec['kernel']} {rec['arch']}{what}: spills or uses local "
                                f"memory ({reason})")
    report.update(failures=failures, timings=timings)
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(render(report, markdown=True))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
