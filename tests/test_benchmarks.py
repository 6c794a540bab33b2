"""The benchmark harness runs end to end (quick CPU cases; speed itself is never asserted),
and the fused rows it reports stay within the test tolerance of the float64 reference."""

import pytest
import torch

from fastattn.benchmarks import bench_norm, bench_softmax, report
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
