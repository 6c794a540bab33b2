"""Timing, devices/threads and byte/FLOP formulas shared by every op's benchmark
(benchmarks/bench_<op>.py). Rows, tables, metadata and result files: benchmarks/report.py.

Conventions:
  * Times are medians over repeated calls (`time_fn`); GPU through `triton.testing.do_bench`
    (CUDA events when Triton is missing), CPU through `time.perf_counter`.
  * Achieved bandwidth GB/s = minimal bytes the op must move / median time (formulas below, in
    10^9 bytes per second). Compute-bound ops report TFLOP/s = FLOPs / median time instead.
  * `peak_bandwidth_gbs` measures a large `dst.copy_(src)` in the same run: the machine's
    practical memory ceiling; rows report their GB/s as a percentage of it.
  * A ratio vs a baseline is baseline_time / impl_time: > 1 means the impl is faster.
  * Errors are max |out - ref| against a float64 reference computed from the same inputs.
  * Peak memory (`peak_memory_bytes`): the most allocated at once during one call beyond what
    was allocated before it (CUDA allocator stats; on CPU PyTorch's allocator events).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

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


def norm_bytes(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> int:
    """Minimal bytes moved by a LayerNorm / RMSNorm forward over x's last dim (inference: the
    per-row statistics need not be stored):
    x read + out written (2 * x.numel*itemsize)
    [+ residual read + residual_out = x + residual written (2 * x.numel*itemsize), add_*]
    + weight and bias read once (numel*itemsize each; 0 when None)."""
    acts = 2 * nbytes(x) + (2 * nbytes(x) if residual is not None else 0)
    return acts + nbytes(weight) + nbytes(bias)


def norm_fwd_bwd_bytes(x: torch.Tensor, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                       stats: int = 2) -> int:
    """Minimal bytes moved by a LayerNorm / RMSNorm forward + backward over x's last dim
    (training: the forward stores `stats` float32 per row, 2 for LayerNorm (mean, rstd),
    1 for RMSNorm (rstd); rows = x.numel / x.shape[-1]):
    norm_bytes(...)                                  the forward
    + stats * 4 * rows                               statistics written by the forward
    + 2 * x.numel*itemsize                           backward reads the normalized input (x, or
                                                     residual_out for add_*) and grad_out
    [+ x.numel*itemsize, add_*]                      ... and grad_residual_out
    + stats * 4 * rows                               ... and the statistics
    + nbytes(weight)                                 ... and weight
    + x.numel*itemsize                               grad_input written (once: x and residual
                                                     of add_* get the same gradient)
    + nbytes(weight) + nbytes(bias)                  grad_weight, grad_bias written.
    So 5 (plain) or 8 (add_*) activation-sized tensors, plus small terms."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stat_bytes = 2 * stats * 4 * rows
    backward = (3 + (residual is not None)) * nbytes(x) + 2 * nbytes(weight) + nbytes(bias)
    return norm_bytes(x, weight, bias, residual) + stat_bytes + backward


def copy_bytes(src: torch.Tensor) -> int:
    """bytes of dst.copy_(src) = src read + dst written = 2 * src.numel * itemsize."""
    return 2 * nbytes(src)


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) @ (k, n) matmul: 2*m*n*k (one multiply + one add per term)."""
    return 2 * m * n * k


def attention_flops(B: int, H: int, L: int, S: int, E: int, Ev: int, causal: bool = False,
                    mode: str = "fwd") -> int:
    """FLOPs of scaled dot-product attention with B batches, H query heads, L queries, S keys,
    head dims E (q, k) and Ev (v); GQA counts the query heads (H = Hq).

    forward  = 2 * B * H * P * (E + Ev): Q K^T (2 * E per score) and P V (2 * Ev per score),
               over P score pairs (i, j); softmax, scale and mask are not counted.
               P = L * S without causal masking; masks (float or bool) count as dense, as a
               kernel computes every score of a masked row.
               causal (top-left aligned: key j attends query i when j <= i):
                 L == S: P = L * S / 2 (half, the convention of FlashAttention's and PyTorch's
                         benchmarks; the exact count L (L + 1) / 2 is larger by 1 / L);
                 L != S: P = the exact number of unmasked pairs, sum_i min(i + 1, S) =
                         L (L + 1) / 2 when L <= S, S (S + 1) / 2 + (L - S) S when L > S.
    fwd+bwd  = forward * 3.5: the backward is 2.5 forwards (recompute Q K^T, then dV = P^T dO,
               dP = dO V^T, dQ = dS K, dK = dS^T Q: five matmuls of the forward's size, 2.5x),
               rounded down to an integer.
    mode: "fwd" or "fwd+bwd"."""
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"attention_flops: mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    if not causal:
        pairs2 = 2 * L * S  # twice the number of score pairs (keeps L * S / 2 an integer)
    elif L == S:
        pairs2 = L * S
    elif L <= S:
        pairs2 = L * (L + 1)
    else:
        pairs2 = S * (S + 1) + 2 * (L - S) * S
    fwd = B * H * pairs2 * (E + Ev)
    return fwd if mode == "fwd" else 7 * fwd // 2


def attention_scores_bytes(B: int, H: int, L: int, S: int, itemsize: int = 4) -> int:
    """Bytes of one materialized (B, H, L, S) score / probability matrix: B*H*L*S*itemsize.
    An unfused attention holds at least one (usually two: scores and probabilities, and the
    probabilities again for backward); a fused kernel holds none."""
    return B * H * L * S * itemsize


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


def run_cases(device: str | torch.device, quick: bool, cases: Callable[..., list],
              run_case: Callable[..., list], *, with_peak: bool = True) -> list:
    """The driver each bench_<op>.run shares: resolves `device`, measures the copy ceiling
    first (with_peak), then calls run_case(case, device, peak_gbs or None, warmup_ms, rep_ms)
    for every case of cases(device, quick) -- short CPU budgets (25 / 100 ms) when quick,
    the timing defaults otherwise -- freeing the CUDA cache between cases. Returns the rows of
    all cases in order."""
    device = resolve_device(device)
    peak = peak_bandwidth_gbs(device) if with_peak else None
    warmup, rep = (25, 100) if quick and device.type == "cpu" else (None, None)
    rows: list = []
    for case in cases(device, quick):
        rows += run_case(case, device, peak, warmup, rep)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- memory -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null inside the block (the profiler's C++ start/stop
    log lines cannot be turned off from Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # stable: same-time events keep order
        current += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, current)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: str | torch.device) -> int | None:
    """Peak extra memory while one `fn()` call runs, in bytes: the most that was allocated at
    any moment beyond what was allocated before the call (outputs, gradients, tensors saved for
    backward and freed temporaries all count; fn's result is dropped before returning).

    CUDA: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() before the call
          (peak stats reset first): every allocation through PyTorch's caching allocator.
    CPU:  the running sum of the allocation and free events of PyTorch's CPU allocator that
          torch.profiler records with profile_memory=True, in time order, and its maximum.
          It sees every tensor (torch.empty / at::empty / Inductor's buffers, any thread the
          profiler follows) but not scratch a kernel takes from malloc or the stack directly
          (std::vector, thread-local buffers): a lower bound for such kernels. None when the
          profiler cannot record memory here. The call runs under the profiler: only its
          memory is read, never its time."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        return _cpu_peak_bytes(fn)
    except (RuntimeError, AttributeError):  # profiler without memory events / kineto results
        return None
