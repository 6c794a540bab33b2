"""The benchmark harness runs end to end (quick CPU cases; speed itself is never asserted),
and the fused rows it reports stay within the test tolerance of the float64 reference."""

import pytest
import torch

from fastattn.benchmarks import bench_attention, bench_norm, bench_softmax, report
from fastattn.benchmarks.common import attention_flops
from tolerances import FLOOR, RATIO


@pytest.mark.slow
def test_softmax_benchmark_quick_rows(tmp_path):
    rows = bench_softmax.run("cpu", quick=True, backends=["cpu"],
                             baselines=("eager", "torch.softmax"))
    fused = [r for r in rows if r.impl == "fastattn:cpu"]
    assert len(fused) == len(bench_softmax.cases("cpu", quick=True))
    by_case = {}
    for r in rows:
        by_case.setdefault((r.shape, r.dtype, r.mask), {})[r.impl] = r
    for r in fused:
        assert r.median_ms > 0 and r.gbs > 0 and set(r.ratios) == {"eager", "torch.softmax"}
        eager = by_case[(r.shape, r.dtype, r.mask)]["eager"]
        dtype = getattr(torch, r.dtype.removeprefix("torch."))
        assert r.max_err <= RATIO * eager.max_err + FLOOR[dtype], (r, eager)
    paths = report.write_results(rows, report.collect_meta("cpu"), tmp_path, "smoke")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_norm_benchmark_quick_cases_cover_every_op():
    quick = bench_norm.cases("cpu", quick=True)
    assert {c.op for c in quick} >= {"layer_norm", "rms_norm", "add_rms_norm"}
    assert len({c.id for c in bench_norm.cases("cpu")}) == len(bench_norm.cases("cpu"))
    assert {c.op for c in bench_norm.cases("cpu")} == set(bench_norm.OPS)


@pytest.mark.parametrize("case", [bench_norm.Case("add_layer_norm", (64, 256), torch.float32),
                                  bench_norm.Case("rms_norm", (32, 1000), torch.bfloat16)],
                         ids=lambda c: c.id)
def test_norm_benchmark_rows(case, tmp_path):
    """One small case per norm, both modes, with tiny time budgets (no compile: seconds)."""
    rows = bench_norm.run_case(case, torch.device("cpu"), backends=["cpu"], baselines=("eager",),
                               warmup=1, rep=2)
    assert [(r.op, r.impl) for r in rows] == [(f"{case.op} {m}", impl) for m in bench_norm.MODES
                                              for impl in ("fastattn:cpu", "eager")]
    inputs = bench_norm.make_inputs(case, "cpu")
    for mode, fused, eager in zip(bench_norm.MODES, rows[::2], rows[1::2]):
        assert fused.median_ms > 0 and fused.gbs > 0 and set(fused.ratios) == {"eager"}
        assert eager.median_ms > 0 and not eager.ratios
        grads = bench_norm.make_grads(case, "cpu") if mode == "fwd+bwd" else None
        ref = bench_norm.reference64(case, inputs, grads)
        scale = max(1.0, max(t.abs().max().item() for t in ref.values()))
        ulps = 1 if mode == "fwd" else 2  # as tolerances.py: gradients get two ulps
        assert fused.max_err <= RATIO * eager.max_err + ulps * FLOOR[case.dtype] * scale, (
            fused, eager)
    paths = report.write_results(rows, report.collect_meta("cpu"), tmp_path, "smoke")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_attention_flops_formula():
    """forward 2*B*H*P*(E + Ev) over P score pairs; causal: half when L == S, the exact
    count of unmasked (top-left) pairs otherwise; fwd+bwd 3.5x forward."""
    assert attention_flops(2, 3, 5, 7, 11, 13, False, "fwd") == 2 * 2 * 3 * 5 * 7 * 24
    assert attention_flops(1, 1, 8, 8, 4, 4, True, "fwd") == 2 * 32 * 8
    assert attention_flops(1, 1, 3, 5, 1, 1, True, "fwd") == 2 * (1 + 2 + 3) * 2  # L < S
    assert attention_flops(1, 1, 5, 3, 1, 1, True, "fwd") == 2 * (1 + 2 + 3 + 3 + 3) * 2  # L > S
    assert attention_flops(1, 2, 1, 2048, 64, 64, False, "fwd+bwd") == (
        7 * attention_flops(1, 2, 1, 2048, 64, 64, False, "fwd") // 2)


def test_attention_benchmark_cases():
    full, quick = bench_attention.cases("cpu"), bench_attention.cases("cpu", quick=True)
    assert len({c.id for c in full}) == len(full)
    for cs in (full, quick):
        assert {c.mask for c in cs} == set(bench_attention.MASKS)
        assert any(c.gqa for c in cs) and any(c.L == 1 for c in cs)
    assert {c.dtype for c in full} == {torch.float32, torch.bfloat16}
    assert len({c.id for c in bench_attention.cases("cuda")}) == len(bench_attention.cases("cuda"))


@pytest.mark.parametrize("case", [
    bench_attention.Case(1, 4, 64, 64, 32, torch.float32, "causal"),
    bench_attention.Case(2, 4, 48, 40, 16, torch.bfloat16, "float", kv_heads=2)],
    ids=lambda c: c.id)
def test_attention_benchmark_rows(case, tmp_path):
    """One small case per dtype, both modes, tiny time budgets (no compile: seconds). The
    fastattn rows are whatever fused_backends picks here (the reference math until a fused
    CPU kernel is built)."""
    cpu = torch.device("cpu")
    fused = [f"fastattn:{b}" for b in bench_attention.fused_backends(cpu, case.dtype)]
    rows = bench_attention.run_case(case, cpu, baselines=("eager",), warmup=1, rep=2)
    assert [(r.op, r.impl) for r in rows] == [(f"attention {m}", impl)
                                              for m in bench_attention.MODES
                                              for impl in fused + ["eager"]]
    inputs = bench_attention.make_inputs(case, "cpu")
    chunks = bench_attention.reference64(case, inputs, bench_attention.make_grad_out(case, "cpu"))
    for mode in bench_attention.MODES:
        mine = {r.impl: r for r in rows if r.op == f"attention {mode}"}
        eager = mine.pop("eager")
        assert eager.median_ms > 0 and eager.tflops > 0 and not eager.ratios
        names = ["out"] if mode == "fwd" else ["out", "grad_q", "grad_k", "grad_v"]
        scale = max(1.0, max(c[n].abs().max().item() for c in chunks for n in names))
        ulps = 1 if mode == "fwd" else 2  # as tolerances.py: gradients get two ulps
        for r in mine.values():
            assert r.median_ms > 0 and r.tflops > 0 and set(r.ratios) == {"eager"}
            assert r.peak_mib is not None and r.peak_mib >= 0
            assert r.max_err <= RATIO * eager.max_err + ulps * FLOOR[case.dtype] * scale, (
                r, eager)
    paths = report.write_results(rows, report.collect_meta("cpu"), tmp_path, "smoke")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert "peak MiB" in paths[1].read_text()


def test_quant_benchmark_rows(tmp_path):
    """One tiny case: a table per format with the fastattn row and the F.linear row of the same
    run; errors within rounding of the quantized math; SQNR noted."""
    from fastattn.benchmarks import bench_quant
    case = bench_quant.Case(3, 256, 96, torch.float32)
    rows = bench_quant.run_case(case, torch.device("cpu"), backends=["cpu"], warmup=1, rep=2)
    assert [(r.op, r.impl) for r in rows] == [(bench_quant.TABLE[f], impl)
                                              for f in bench_quant.FORMATS
                                              for impl in ("fastattn:cpu", "F.linear")]
    for fused in rows[::2]:
        assert fused.median_ms > 0 and fused.gbs > 0 and set(fused.ratios) == {"F.linear"}
        assert fused.max_err < 1e-5 and fused.note.startswith("SQNR")
    paths = report.write_results(rows, report.collect_meta("cpu"), tmp_path, "smoke")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_decode_benchmark_rows(tmp_path):
    """One small decode case (tiny time budget): every row timed, GB/s counted, the fused rows
    within the test tolerance of the float64 reference (as torch SDPA's error bounds them)."""
    from fastattn.benchmarks import bench_decode

    case = bench_decode.Case(2, 300, torch.float32)
    rows = bench_decode.run_case(case, torch.device("cpu"), backends=["cpu"], warmup=1, rep=2)
    by_impl = {r.impl: r for r in rows}
    assert set(by_impl) == {"torch SDPA", "fastattn:cpu", "fastattn:cpu paged"}
    base = by_impl["torch SDPA"]
    for name in ("fastattn:cpu", "fastattn:cpu paged"):
        r = by_impl[name]
        assert r.median_ms > 0 and r.gbs > 0 and set(r.ratios) == {"torch SDPA"}
        assert r.max_err <= RATIO * base.max_err + FLOOR[torch.float32], (r, base)
    paths = report.write_results(rows, report.collect_meta("cpu"), tmp_path, "smoke")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
