"""`fastattn train` / `fastattn generate` / `fastattn info` in subprocesses (tiny preset, a few
steps): checkpoints are written, resumed, loaded, quantized and generate text."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastattn.cli", *args], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


COMMON = ("--preset", "tiny", "--batch-size", "4", "--threads", "1", "--no-progress")


def test_train_lm_resume_generate(tmp_path):
    out = str(tmp_path / "lm")
    log = _run("train", "--task", "lm", "--steps", "6", "--seq-len", "32", "--corpus-bytes",
               "50000", "--out", out, "--eval-quantized", "int8", "int4", *COMMON)
    assert "val loss" in log
    for fmt in ("float", "int8", "int4"):
        assert f"quantized {fmt}: val loss" in log, log
    assert json.loads((tmp_path / "lm" / "train_state.json").read_text())["step"] == 6
    _run("train", "--task", "lm", "--steps", "8", "--seq-len", "32", "--corpus-bytes", "50000",
         "--out", out, "--resume", *COMMON)
    assert json.loads((tmp_path / "lm" / "train_state.json").read_text())["step"] == 8
    text = _run("generate", "--checkpoint", out, "--prompt", "def f(", "--max-new-tokens", "12",
                "--temperature", "0", "--threads", "1")
    assert text.startswith("def f(")
    text = _run("generate", "--checkpoint", out, "--prompt", "import", "--max-new-tokens", "8",
                "--quantize", "int4", "--top-k", "5", "--top-p", "0.9", "--threads", "1")
    assert text.startswith("import")


@pytest.mark.parametrize("task", ["classify", "seq2seq"])
def test_train_from_files(task, tmp_path):
    if task == "classify":
        data = tmp_path / "d.csv"
        data.write_text("text,label\n" + "".join(f"ab{i}c,1\nabcd,0\n" for i in range(10)))
    else:
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps({"source": f"ab{i}", "target": f"{i}ba"}) + "\n"
                                for i in range(20)))
    out = str(tmp_path / task)
    log = _run("train", "--task", task, "--data", str(data), "--steps", "4", "--out", out,
               *COMMON)
    assert "val loss" in log and (tmp_path / task / "model.safetensors").exists()
    if task == "classify":
        assert "val accuracy" in log
    else:
        text = _run("generate", "--checkpoint", out, "--source", "ab3", "--max-new-tokens",
                    "5", "--threads", "1")
        assert isinstance(text, str)


def test_info_lists_kernels():
    text = _run("info")
    assert "kernel each op runs by default on cpu" in text
    for op in ("attention:", "decode_attention:", "rms_norm:", "int4_linear:"):
        assert op in text
