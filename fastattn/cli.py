"""The `fastattn` command line: `fastattn bench | train | generate | info`.

    fastattn bench [--ops softmax norm attention ...] [--device cpu|cuda|auto] [--quick]
                   [--threads N] [--out DIR] [--stem NAME] [--no-save]
    fastattn train [--task lm|mlm|classify|seq2seq] [--data FILE ...] [--preset small]
                   [--steps N] [--out DIR] [--resume] ...        (fastattn/models/cli.py)
    fastattn generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
                   [--top-k K] [--top-p P] [--quantize int8|int4]
    fastattn info
    python -m fastattn.cli bench --device cpu --quick --no-save

Benchmarks live in the package fastattn.benchmarks (benchmarks/ in the repository, one
bench_<op>.py per op, each with run(device, quick) -> list[Row]; an op may also be named by
an alias, BENCH_ALIASES: `--ops sdpa` runs bench_attention). Run from a checkout without
installing (PYTHONPATH=<repo>), they are imported as the top-level package `benchmarks`.
Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import sys
import time
from types import ModuleType


def _benchmarks_package() -> ModuleType:
    """fastattn.benchmarks when installed, else the repository's benchmarks/ package."""
    try:
        return importlib.import_module("fastattn.benchmarks")
    except ModuleNotFoundError as e:
        if e.name != "fastattn.benchmarks":
            raise
    try:
        return importlib.import_module("benchmarks")
    except ModuleNotFoundError:
        raise SystemExit("fastattn bench: cannot find the benchmarks (neither the installed "
                         "fastattn.benchmarks nor a benchmarks/ package on sys.path; run from "
                         "the repository root with PYTHONPATH=.)") from None


# Other names `fastattn bench --ops` accepts for an op's benchmark module bench_<op>.
BENCH_ALIASES = {"sdpa": "attention"}


def _bench_ops(pkg: ModuleType) -> list[str]:
    """Ops with a bench_<op> module in the benchmarks package."""
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__)]
    return sorted(n.removeprefix("bench_") for n in names if n.startswith("bench_"))


def _split(values: list[str]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def cmd_bench(args: argparse.Namespace) -> int:
    """Run each op's benchmark, print the table, save <stem>.json / <stem>.md."""
    import torch

    pkg = _benchmarks_package()
    common = importlib.import_module(pkg.__name__ + ".common")
    report = importlib.import_module(pkg.__name__ + ".report")
    known = _bench_ops(pkg)
    ops = [BENCH_ALIASES.get(op, op) for op in _split(args.ops)] if args.ops else known
    ops = list(dict.fromkeys(ops))  # `--ops attention sdpa` runs it once
    unknown = [op for op in ops if op not in known]
    if unknown:
        aliases = ", ".join(f"{a} = {o}" for a, o in BENCH_ALIASES.items())
        print(f"fastattn bench: no benchmark for {unknown}; known ops: {known} (aliases: "
              f"{aliases})", file=sys.stderr)
        return 2
    device = common.resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastattn bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads:
        common.set_threads(args.threads)

    allocator = common.steady_cpu_allocator() if device.type == "cpu" else None
    start = time.perf_counter()
    meta = report.collect_meta(device)  # measures the copy bandwidth
    meta["cpu_allocator"] = allocator
    meta["command"] = "fastattn " + " ".join(args.argv)
    _warn_if_contended(meta.get("contention_at_start"), "start")
    th = meta["threads"]
    print(f"fastattn bench: {', '.join(ops)} on {meta['hardware']} ({device}), "
          f"{th['num_threads']} threads, commit {meta['commit']}, "
          f"copy bandwidth {meta['copy_bandwidth_gbs']:.1f} GB/s"
          + (" [quick]" if args.quick else ""), flush=True)
    rows = []
    for op in ops:
        mod = importlib.import_module(f"{pkg.__name__}.bench_{op}")
        rows += mod.run(device=device, quick=args.quick)
    elapsed = time.perf_counter() - start
    meta["elapsed_s"] = round(elapsed, 1)
    meta["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if device.type == "cpu":
        meta["contention_at_end"] = common.cpu_contention()
        _warn_if_contended(meta["contention_at_end"], "end")
    meta["quick"] = args.quick
    report.print_table(rows)
    print()
    for line in report.summarize(rows):
        print(line)
    print(f"\n{len(rows)} rows in {elapsed:.0f} s")
    if not args.no_save:
        for path in report.write_results(rows, meta, args.out, args.stem):
            print(f"wrote {path}")
    return 0


def _warn_if_contended(probe: dict | None, when: str) -> None:
    if probe and probe["contended"]:
        print(f"WARNING: CPU contention at the {when} of the run: a {probe['threads']}-thread "
              f"fill took {probe['fill_ms']} ms vs {probe['fill_ms_1_thread']} ms on 1 thread. "
              "Another process is using the CPUs, so multi-threaded timings are stalled by "
              "descheduled threads; rerun on an idle machine or with --threads 1 (recorded in "
              "the report).", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, CPU capability, CUDA availability and the usable backends."""
    import torch

    import fastattn

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from fastattn import _library

    print(f"fastattn {fastattn.__version__}  torch {torch.__version__} (CUDA "
          f"{torch.version.cuda})  triton {triton_version}  python {platform.python_version()}")
    print(f"fastattn._C: {_library.load_error() or 'loaded'}")
    common = importlib.import_module(_benchmarks_package().__name__ + ".common")
    print(f"CPU: {common.cpu_model()}; capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"CUDA: available, {len(names)} device(s): {', '.join(names)}")
    else:
        print("CUDA: not available")
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available()
    for op in ("softmax", "layer_norm", "rms_norm", "sdpa"):  # add_*: their norm's backends
        for dev in devices:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                names = fastattn.available_backends(op, dev, dtype)
                print(f"{op} backends on {dev} {str(dtype).removeprefix('torch.')}: "
                      f"{', '.join(names)}")
    from .models.cli import kernel_table
    for dev in devices:
        print(f"kernel each op runs by default on {dev} float32:")
        for _, line in kernel_table(dev):
            print(f"  {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `fastattn` command."""
    parser = argparse.ArgumentParser(prog="fastattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{bench,train,generate,info}")

    bench = sub.add_parser("bench", help="benchmark ops against PyTorch baselines")
    bench.add_argument("--ops", nargs="+", metavar="OP",
                       help="ops to benchmark, space or comma separated (default: all; "
                            "sdpa = attention)")
    bench.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"],
                       help="auto = cuda when a GPU is visible, else cpu (default)")
    bench.add_argument("--quick", action="store_true", help="a small subset of the cases")
    bench.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N)")
    bench.add_argument("--out", default="benchmarks/results", metavar="DIR",
                       help="where results go (default: benchmarks/results)")
    bench.add_argument("--stem", metavar="NAME",
                       help="result file name stem (default: <device-slug>-<YYYY-MM-DD>)")
    bench.add_argument("--no-save", action="store_true", help="print only; write no files")
    bench.set_defaults(func=cmd_bench)

    from .models.cli import add_parsers  # train, generate (light: imports nothing heavy)
    add_parsers(sub)

    info = sub.add_parser("info", help="versions, CPU/GPU capabilities, available backends")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastattn` console script; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
