"""The benchmark harness runs end to end (quick CPU cases; speed itself is never asserted),
and the fused rows it reports stay within the test tolerance of the float64 reference."""

import pytest
import torch

from fastattn.benchmarks import bench_softmax, common
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
    paths = common.write_results(rows, common.collect_meta("cpu"), tmp_path, "smoke")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
