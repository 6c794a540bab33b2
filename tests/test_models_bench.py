"""benchmarks/bench_model.py runs end to end on tiny cases (speed is never asserted)."""

import pytest
import torch
from fastattn.benchmarks import bench_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
def test_bench_model_rows(mode):
    case = bench_model.Case("tiny", mode, 2, 16)
    rows = bench_model.run_case(case, torch.device("cpu"), compile_ref=False, warmup=1, rep=2)
    quant = [] if mode == "train" else ["fastattn+int8", "fastattn+int4"]
    assert [r.impl for r in rows] == ["fastattn", "reference", *quant]
    fast, ref = rows[:2]
    assert fast.median_ms > 0 and set(fast.ratios) == {"reference"} and not ref.ratios
    assert "tok/s" in fast.note
    if mode == "train":
        assert fast.peak_mib is None or fast.peak_mib > 0
    else:
        assert fast.max_err < 1e-4 and ref.max_err == 0


def test_bench_model_cases():
    quick = bench_model.cases(torch.device("cpu"), quick=True)
    assert {c.mode for c in quick} == {"train", "prefill", "decode"}
    assert {c.preset for c in bench_model.cases(torch.device("cuda"))} == {"gpt2-small", "1b"}
