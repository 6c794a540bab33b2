"""Rows and reports of the benchmarks: the Row every bench_<op>.py returns, plain-text and
markdown tables, the per-op summary lines, the run's metadata (hardware, versions, commit,
threads, load, copy bandwidth) and the <stem>.json / <stem>.md result files.

Timing, devices/threads and the byte/FLOP formulas live in benchmarks/common.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from .common import cpu_contention, cpu_model, cpu_threads, device_name, peak_bandwidth_gbs

# ---- rows and tables ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One measured implementation of one case. ratios: baseline name -> baseline_time /
    this row's time (> 1: this row is faster); empty on baseline rows. median_ms is None
    when the impl could not run (note says why)."""

    op: str
    shape: str
    dtype: str
    mask: str
    impl: str
    median_ms: float | None
    gbs: float | None = None
    pct_of_peak: float | None = None
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    max_err: float | None = None
    threads: int | None = None
    device: str = "cpu"
    tflops: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    note: str = ""
    mask_header: str = "mask"  # the mask column's title in tables ("params" for norm rows)
    peak_mib: float | None = None  # peak extra memory of one call, MiB (common.peak_memory_bytes)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _columns(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    baselines = list(dict.fromkeys(k for r in rows for k in r.ratios))
    show_tflops = any(r.tflops is not None for r in rows)
    show_gbs = any(r.gbs is not None for r in rows) or not show_tflops  # compute-bound: FLOP/s
    show_peak_mem = any(r.peak_mib is not None for r in rows)
    show_note = any(r.note for r in rows)
    # Row.tflops is always in TFLOP/s; tables of CPU rows show it as GFLOP/s (x 1000)
    giga = show_tflops and all(r.device == "cpu" for r in rows if r.tflops is not None)
    titles = {r.mask_header for r in rows}
    head = ["shape", "dtype", titles.pop() if len(titles) == 1 else "mask", "impl", "median ms"]
    head += ["GB/s", "% peak"] * show_gbs
    head += ["GFLOP/s" if giga else "TFLOP/s"] * show_tflops + [f"vs {b}" for b in baselines]
    head += ["max err"] + ["peak MiB"] * show_peak_mem + ["threads"] + ["note"] * show_note
    body = []
    for r in rows:
        cells = [r.shape, r.dtype, r.mask, r.impl, _fmt(r.median_ms, ".4f")]
        cells += [_fmt(r.gbs, ".1f"), _fmt(r.pct_of_peak, ".0f")] * show_gbs
        if show_tflops:
            cells.append(_fmt(None if r.tflops is None else r.tflops * 1e3, ".1f") if giga
                         else _fmt(r.tflops, ".2f"))
        cells += [_fmt(r.ratios.get(b), ".2f") for b in baselines]
        cells += [_fmt(r.max_err, ".1e")] + [_fmt(r.peak_mib, ".1f")] * show_peak_mem
        cells += [_fmt(r.threads, "d")] + [r.note] * show_note
        body.append(cells)
    return head, body


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """Rows as an aligned plain-text table, or a markdown table when markdown=True."""
    head, body = _columns(rows)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(rows: list[Row]) -> None:
    """Print one plain-text table per op."""
    for op in dict.fromkeys(r.op for r in rows):
        print(f"\n== {op} ==")
        print(format_table([r for r in rows if r.op == op]))


def summarize(rows: list[Row]) -> list[str]:
    """One line per (op, fastattn impl, baseline): the range and median of the speed ratios
    over the cases that both ran, and in how many fastattn was at least as fast."""
    lines = []
    for op in dict.fromkeys(r.op for r in rows):
        for impl in dict.fromkeys(r.impl for r in rows if r.op == op and r.ratios):
            mine = [r for r in rows if r.op == op and r.impl == impl]
            for base in dict.fromkeys(b for r in mine for b in r.ratios):
                ratios = sorted(r.ratios[base] for r in mine if r.ratios.get(base))
                if not ratios:
                    continue
                wins = sum(q >= 1 for q in ratios)
                lines.append(f"{op}: {impl} vs {base}: {ratios[0]:.2f}x to {ratios[-1]:.2f}x "
                             f"(median {statistics.median(ratios):.2f}x), at least as fast in "
                             f"{wins} of {len(ratios)} cases")
    return lines


# ---- metadata and result files ------------------------------------------------------------------

# Environment variables that change what a benchmark measures; recorded with every result.
ENV_RECORDED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS",
                "MKL_NUM_THREADS", "FASTATTN_POISON_OUTPUTS", "TRITON_INTERPRET")


def slug(text: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-xeon-processor'."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def default_stem(device: torch.device) -> str:
    """Result file stem: <device-name-slug>-<YYYY-MM-DD>."""
    return f"{slug(device_name(device))}-{datetime.date.today().isoformat()}"


def git_commit(repo: str | Path | None = None) -> str:
    """`git rev-parse --short HEAD` of the checkout (+ "-dirty" when it has uncommitted
    changes); "unknown" outside a git checkout or before the first commit."""
    git = ["git", "-C", str(repo or Path(__file__).resolve().parents[1])]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return "unknown" if head.returncode else head.stdout.strip() + ("-dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def collect_meta(device: str | torch.device) -> dict:
    """Hardware, date, software versions, commit, threads, load, the CPU contention probe and
    the measured copy bandwidth. The CLI adds command, elapsed_s and the *_at_end entries."""
    device = torch.device(device)
    return {
        "device": str(device), "hardware": device_name(device), "cpu": cpu_model(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": _version("triton"),
        "fastattn": _version("fastattn"), "commit": git_commit(), "threads": cpu_threads(),
        "copy_bandwidth_gbs": peak_bandwidth_gbs(device),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "contention_at_start": cpu_contention() if device.type == "cpu" else None,
        "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def _probe(p: dict | None) -> str:
    if not p:
        return "-"
    return (f"fill {p['fill_ms']} ms on {p['threads']} threads vs {p['fill_ms_1_thread']} ms on 1"
            + (" (CONTENDED: multi-threaded rows are unreliable)" if p["contended"] else ""))


def _markdown(rows: list[Row], meta: dict) -> str:
    th, get = meta["threads"], meta.get
    lines = [
        f"# fastattn benchmarks: {meta['hardware']}", "",
        f"- hardware: {meta['hardware']} ({meta['device']}); CPU: {meta['cpu']}, "
        f"{th['cpu_count']} logical CPUs, capability {th['capability']}",
        f"- date: {meta['date']}",
        f"- versions: torch {meta['torch']} (CUDA {meta['torch_cuda']}), triton "
        f"{meta['triton']}, python {meta['python']}, fastattn {meta['fastattn']}",
        f"- commit: {meta['commit']}",
        f"- threads: {th['num_threads']} intra-op, {th['interop_threads']} inter-op",
        f"- 1-min load average at start / end: {get('loadavg_1m_at_start')} / "
        f"{get('loadavg_1m_at_end')}; CPU contention probe at start: "
        f"{_probe(get('contention_at_start'))}; at end: {_probe(get('contention_at_end'))}",
        f"- measured copy bandwidth (dst.copy_(src), read + write): "
        f"{meta['copy_bandwidth_gbs']:.1f} GB/s (the '% peak' column is relative to this)",
        f"- command: `{meta['command']}`" + (f"; environment: {meta['env']}" if get("env") else ""),
    ] + ([f"- CPU allocator: {meta['cpu_allocator']}"] if get("cpu_allocator") else []) + [
        "", "Time: median per call (CPU: the lower of 2 interleaved passes). vs X: X's time / "
        "this time (> 1: faster than X). max err: max |out - float64 reference| (fwd+bwd rows: "
        "over the outputs and the gradients). GB/s: minimal "
        "bytes moved / time (formulas: benchmarks/common.py); % peak > 100: the working set "
        "stayed in cache.",
    ] + (["",  # only where some row measured memory (attention)
        "TFLOP/s (GFLOP/s in CPU tables): FLOPs of the op's formula (common.attention_flops) / "
        "time. peak MiB: the most memory allocated at once during one call beyond what was "
        "allocated before it (common.peak_memory_bytes: CUDA max_memory_allocated; CPU the "
        "PyTorch CPU allocator's events under torch.profiler, which miss scratch a kernel "
        "takes from malloc directly)."] if any(r.peak_mib is not None for r in rows) else [])
    lines += ["", "Summary (speed ratios, > 1: fastattn faster):", ""]
    lines += [f"- {line}" for line in summarize(rows)]
    for op in dict.fromkeys(r.op for r in rows):
        lines += ["", f"## {op}", "", format_table([r for r in rows if r.op == op], markdown=True)]
    return "\n".join(lines) + "\n"


def write_results(rows: list[Row], meta: dict, out_dir: str | Path = "benchmarks/results",
                  stem: str | None = None) -> tuple[Path, Path]:
    """Write <out_dir>/<stem>.json (meta + rows) and <stem>.md (a report); return both paths.
    stem defaults to <device-name-slug>-<YYYY-MM-DD>."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(torch.device(meta["device"]))
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    safe = [{k: str(v) if isinstance(v, float) and not math.isfinite(v) else v  # NaN -> "nan"
             for k, v in dataclasses.asdict(r).items()} for r in rows]
    payload = {"meta": meta, "rows": safe}
    json_path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    md_path.write_text(_markdown(rows, meta))
    return json_path, md_path
