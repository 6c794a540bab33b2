"""Timing, byte/FLOP formulas and reports shared by every op's benchmark (benchmarks/bench_<op>.py).

Conventions:
  * Times are medians over repeated calls (`time_fn`); GPU through `triton.testing.do_bench`
    (CUDA events when Triton is missing), CPU through `time.perf_counter`.
  * Achieved bandwidth GB/s = minimal bytes the op must move / median time (formulas below, in
    10^9 bytes per second). Compute-bound ops report TFLOP/s = FLOPs / median time instead.
  * `peak_bandwidth_gbs` measures a large `dst.copy_(src)` in the same run: the machine's
    practical memory ceiling; rows report their GB/s as a percentage of it.
  * A ratio vs a baseline is baseline_time / impl_time: > 1 means the impl is faster.
  * Errors are max |out - ref| against a float64 reference computed from the same inputs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import functools
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Environment variables that change what a benchmark measures; recorded with every result.
ENV_RECORDED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS",
                "MKL_NUM_THREADS", "FASTATTN_POISON_OUTPUTS", "TRITON_INTERPRET")

# ---- devices and threads ------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; anything else as torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_threads(n: int) -> None:
    """Pin the intra-op thread count used by CPU kernels (torch.set_num_threads(n), n >= 1)."""
    torch.set_num_threads(max(1, n))


def cpu_threads() -> dict:
    """The CPU threading setup every CPU figure depends on."""
    return {"num_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "interop_threads": torch.get_num_interop_threads(),
            "capability": torch.backends.cpu.get_cpu_capability()}


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    info = Path("/proc/cpuinfo")
    m = re.search(r"^model name\s*:\s*(.+)$", info.read_text(), re.M) if info.exists() else None
    return m.group(1).strip() if m else (platform.processor() or "unknown CPU")


def device_name(device: torch.device) -> str:
    """GPU name for CUDA devices, the CPU model otherwise."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(text: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-xeon-processor'."""
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def default_stem(device: torch.device) -> str:
    """Result file stem: <device-name-slug>-<YYYY-MM-DD>."""
    return f"{slug(device_name(device))}-{datetime.date.today().isoformat()}"


# ---- timing -------------------------------------------------------------------------------------


def _summary(samples_ms: list[float]) -> dict:
    q = statistics.quantiles(samples_ms * 2, n=10, method="inclusive")  # (x2: works for n=1)
    return {"median_ms": statistics.median(samples_ms), "p20_ms": q[1], "p80_ms": q[7],
            "n": len(samples_ms)}


def _time_cpu(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
              min_samples: int = 5, sample_ms: float = 1.0, max_samples: int = 2000) -> dict:
    """Warm up for ~warmup_ms, then take samples until ~rep_ms have been spent (at least
    min_samples). A sample times `inner` back-to-back calls, inner chosen so a sample lasts
    >= sample_ms (keeps perf_counter overhead out of microsecond-sized calls)."""
    start = time.perf_counter()
    calls = 0
    while calls < 2 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        calls += 1
    est_ms = (time.perf_counter() - start) * 1e3 / calls
    inner = max(1, math.ceil(sample_ms / max(est_ms, 1e-6)))
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_samples or (spent < rep_ms and len(samples) < max_samples):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        dt = (time.perf_counter() - t0) * 1e3
        spent += dt
        samples.append(dt / inner)
    return _summary(samples)


def _time_cuda_events(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> dict:
    """CUDA-event timing when Triton is missing: per-call events, median (no L2 flush)."""
    def timed(n: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [begin.elapsed_time(end) for begin, end in events]

    est_ms = max(statistics.median(timed(5)), 1e-3)
    timed(max(1, int(warmup_ms / est_ms)))
    return _summary(timed(max(5, int(rep_ms / est_ms))))


def time_fn(fn: Callable[[], object], *, device: str | torch.device,
            warmup: float | None = None, rep: float | None = None) -> dict:
    """Time `fn()` (no arguments); returns {median_ms, p20_ms, p80_ms, n}.

    warmup / rep are time budgets in milliseconds, as in triton.testing.do_bench
    (defaults: GPU 25 / 100, CPU 50 / 200). CUDA: do_bench's median (it flushes L2 between
    calls); n is None there as do_bench does not report it. CPU: median per-call time of
    samples taken over ~rep ms after ~warmup ms of warm-up; at least 5 samples.
    """
    device = torch.device(device)
    if device.type == "cuda":
        warmup, rep = warmup or 25, rep or 100
        try:
            from triton.testing import do_bench
        except ImportError:
            return _time_cuda_events(fn, warmup, rep)
        med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "n": None}
    return _time_cpu(fn, warmup or 50, rep or 200)


def time_interleaved(fns: dict[str, Callable[[], object]], *, device: str | torch.device,
                     rounds: int | None = None, warmup: float | None = None,
                     rep: float | None = None) -> dict[str, dict]:
    """time_fn for several implementations of one case, in `rounds` interleaved passes
    (A B C, A B C; default 2 on CPU, 1 on GPU) so a slow spell of a shared machine hits all of
    them, not one; each keeps its pass with the lowest median. Returns name -> time_fn dict."""
    rounds = rounds or (1 if torch.device(device).type == "cuda" else 2)
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time_fn(fn, device=device, warmup=warmup, rep=rep)
            if name not in best or t["median_ms"] < best[name]["median_ms"]:
                best[name] = t
    return best


def steady_cpu_allocator() -> str:
    """Keep large CPU allocations in the heap between calls, and say so for the report.

    glibc serves big blocks with fresh mmap pages (above a threshold that moves with what was
    freed before) and trims freed heap tops, so an op that allocates a multi-MiB output can pay
    a page fault per 4 KiB on every call, more or less depending on what ran before it (seen
    here: torch.softmax on (64, 65536) fp32 took 1.5 ms or 4.4 ms by position in the run).
    Turning mmap and trimming off measures the kernels, as a caching allocator does on GPU."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "platform default (not glibc)"
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from malloc.h
    if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1):
        return "glibc: mmap and trimming off (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"
    return "glibc defaults (mallopt refused)"


def cpu_contention(numel: int = 1 << 22) -> dict:
    """Does other work on the machine stall multi-threaded ops? Times a parallel fill_ of
    numel float32 at the current thread count and at 1 thread. On idle CPUs the first is not
    slower; when another process holds a CPU, each OpenMP region waits for a descheduled
    thread (seen on a 2-vCPU VM: ~8 ms per op). contended: n-thread time > 2 x 1-thread."""
    n, buf = torch.get_num_threads(), torch.empty(numel)  # (numel,)
    ms = []
    for threads in (n, 1):
        torch.set_num_threads(threads)
        ms.append(_time_cpu(lambda: buf.fill_(1.0), 5, 30)["median_ms"])
    torch.set_num_threads(n)
    multi, single = ms
    return {"threads": n, "fill_ms": round(multi, 3), "fill_ms_1_thread": round(single, 3),
            "contended": n > 1 and multi > 2 * single}


# ---- byte / FLOP formulas -----------------------------------------------------------------------


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor's own elements: numel * itemsize of the tensor as given (an
    un-broadcast mask counts once; 0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


def softmax_bytes(x: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor) -> int:
    """Minimal bytes moved by a (masked) softmax:
    x.numel*x.itemsize (read) + out.numel*out.itemsize (written)
    + mask.numel*mask.itemsize of the un-broadcast mask (read once; a causal mask is computed
    from indices and costs nothing)."""
    return nbytes(x) + nbytes(out) + nbytes(mask)


def copy_bytes(src: torch.Tensor) -> int:
    """bytes of dst.copy_(src) = src read + dst written = 2 * src.numel * itemsize."""
    return 2 * nbytes(src)


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) @ (k, n) matmul: 2*m*n*k (one multiply + one add per term)."""
    return 2 * m * n * k


def gbs(num_bytes: int, ms: float | None) -> float | None:
    """Achieved bandwidth in GB/s (10^9 bytes/s) for num_bytes moved in ms milliseconds."""
    return None if not ms else num_bytes / (ms * 1e-3) / 1e9


def tflops(flops: int, ms: float | None) -> float | None:
    """Achieved TFLOP/s (10^12 FLOP/s) for flops done in ms milliseconds."""
    return None if not ms else flops / (ms * 1e-3) / 1e12


@functools.cache
def _peak(device: str, threads: int) -> float:
    big = 1 << (30 if device.startswith("cuda") else 28)  # 1 GiB on GPU, 256 MiB on CPU
    src = torch.empty(big, dtype=torch.uint8, device=device).fill_(1)  # (big,)
    dst = torch.empty_like(src)  # (big,)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, device=device)["copy"]
    return gbs(copy_bytes(src), t["median_ms"])


def peak_bandwidth_gbs(device: str | torch.device) -> float:
    """Practical memory ceiling in GB/s: median time of dst.copy_(src) on a 256 MiB (CPU) or
    1 GiB (GPU) buffer (timed as every row is, time_interleaved), bytes = read + write.
    Measured once per (device, thread count)."""
    device = torch.device(device)
    return _peak(str(device), torch.get_num_threads() if device.type == "cpu" else 0)


def max_error(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """max |out - ref64| with out upcast to float64 (NaN if out has a NaN)."""
    return (out.to(torch.float64) - ref64).abs().max().item()


# ---- rows and reports ---------------------------------------------------------------------------


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


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _columns(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    baselines = list(dict.fromkeys(k for r in rows for k in r.ratios))
    show_tflops = any(r.tflops is not None for r in rows)
    show_note = any(r.note for r in rows)
    head = ["shape", "dtype", "mask", "impl", "median ms", "GB/s", "% peak"]
    head += ["TFLOP/s"] * show_tflops + [f"vs {b}" for b in baselines]
    head += ["max err", "threads"] + ["note"] * show_note
    body = []
    for r in rows:
        cells = [r.shape, r.dtype, r.mask, r.impl, _fmt(r.median_ms, ".4f"), _fmt(r.gbs, ".1f"),
                 _fmt(r.pct_of_peak, ".0f")]
        cells += [_fmt(r.tflops, ".2f")] * show_tflops
        cells += [_fmt(r.ratios.get(b), ".2f") for b in baselines]
        cells += [_fmt(r.max_err, ".1e"), _fmt(r.threads, "d")] + [r.note] * show_note
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
        "this time (> 1: faster than X). max err: max |out - float64 reference|. GB/s: minimal "
        "bytes moved / time (formulas: benchmarks/common.py); % peak > 100: the working set "
        "stayed in cache.",
    ]
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
