"""Benchmark of fastattn.models end to end: the same model on fastattn's fused kernels
(config backend None) vs backend="reference" (plain PyTorch math for every attention, norm
and softmax; identical weights), and torch.compile of the reference where it works.

One case = (preset, mode, batch B, length). Modes:
  train     one optimizer step of the causal LM: forward, F.cross_entropy, backward, AdamW
            step, on (B, L) token windows. tokens/s = B * L / time. peak MiB: the most
            allocated at once during a step (common.peak_memory_bytes).
  prefill   the packed causal forward of B prompts of L tokens filling fresh KV caches and
            returning the last logits. tokens/s = B * L / time.
  decode    one new token per sequence against KV caches holding L tokens (the cache lengths
            are rewound after each call, so every call sees the same context).
            tokens/s = B / time.
Rows per case: "fastattn", "reference" (the baseline of the ratio column), for prefill and
decode "fastattn+int8" / "fastattn+int4" (fastattn.quantize of the same weights, int4 group
size 128 or the largest of 64 / 32 dividing the widths; their max err is the quantization's own
logit error), and, for train /
prefill of the CPU "tiny" cases (not in `quick`) and on GPU, "reference+compile"
(torch.compile of the reference model; the compile time is excluded and reported in the note).
The note gives tokens/s.
Max err: the largest |logit| difference of the row against the reference on the same input.

Cases. CPU (float32): presets tiny and small, train B=8 L=128, prefill B=4 L=128, decode
B=1/4 at L=128; `quick`: the tiny preset only. GPU (bfloat16): gpt2-small and 1b, train B=8
L=1024 (1b: B=4), prefill B=1/8 L=1024, decode B=1/8 at L=1024.

As a script: `python -m fastattn.cli bench --ops model`.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

import fastattn
from fastattn.models import ModelConfig, build_model, lm_loss
from fastattn.models.train import int4_group_size

from .common import peak_memory_bytes, resolve_device, time_interleaved
from .report import Row

QUANT_FORMATS = ("int8", "int4")


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    mode: str  # train | prefill | decode
    B: int
    L: int
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        return f"{self.preset} B={self.B} L={self.L}"


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        bf = torch.bfloat16
        out = []
        for p, bt in (("gpt2-small", 8), ("1b", 4)):
            out += [Case(p, "train", bt, 1024, bf), Case(p, "prefill", 1, 1024, bf),
                    Case(p, "prefill", 8, 1024, bf), Case(p, "decode", 1, 1024, bf),
                    Case(p, "decode", 8, 1024, bf)]
        return out
    presets = ("tiny",) if quick else ("tiny", "small")
    return [c for p in presets for c in (Case(p, "train", 8, 128), Case(p, "prefill", 4, 128),
                                         Case(p, "decode", 1, 128), Case(p, "decode", 4, 128))]


def _models(case: Case, device, compile_ref: bool):
    torch.manual_seed(0)
    cfg = ModelConfig.preset(case.preset, max_seq_len=max(case.L + 1, 16))
    fast = build_model(cfg).to(device, case.dtype)
    ref = build_model(cfg.replace(backend="reference")).to(device, case.dtype)
    ref.load_state_dict(fast.state_dict())
    models = {"fastattn": fast, "reference": ref}
    if case.mode != "train":  # quantized linears are inference-only
        group = int4_group_size(cfg)
        for fmt in QUANT_FORMATS:
            q = build_model(cfg).to(device, case.dtype)
            q.load_state_dict(fast.state_dict())
            fastattn.quantize(q, fmt, group_size=group)
            models[f"fastattn+{fmt}"] = q
    if compile_ref:
        models["reference+compile"] = ref  # compiled per mode below
    return models


def _train_fn(model, ids, compiled: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    fwd = torch.compile(model) if compiled else model

    def step():
        loss = lm_loss(fwd(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _prefill_fn(model, ids, L, compiled: bool):
    fwd = torch.compile(model.prefill) if compiled else model.prefill
    B = ids.shape[0]

    def step():
        with torch.no_grad():
            return fwd(ids, [L] * B, model.new_caches(B, L + 1))
    return step


def _decode_fn(model, ids, L):
    B = ids.shape[0]
    caches = model.new_caches(B, L + 1)
    with torch.no_grad():
        model.prefill(ids, [L] * B, caches)
    tok = ids[:, -1]

    def step():
        with torch.no_grad():
            out = model.decode(tok, caches)
        for c in caches:  # rewind: every call attends to the same L tokens
            c._set_lengths([L] * B)
        return out
    return step


def run_case(case: Case, device: torch.device, compile_ref: bool | None = None,
             warmup=None, rep=None) -> list[Row]:
    """The rows of one case; compile_ref None: compile where the module doc says."""
    if compile_ref is None:
        compile_ref = case.mode != "decode" and (device.type == "cuda" or case.preset == "tiny")
    models = _models(case, device, compile_ref)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (case.B, case.L), generator=g).to(device)
    fns, notes, errs = {}, {}, {}
    with torch.no_grad():
        want = models["reference"](ids)
    for name, model in models.items():
        compiled = name.endswith("+compile")
        try:
            if case.mode == "train":
                fn = _train_fn(model, ids, compiled)
            elif case.mode == "prefill":
                fn = _prefill_fn(model, ids, case.L, compiled)
            else:
                fn = _decode_fn(model, ids, case.L)
            t0 = time.perf_counter()
            fn()  # first call: compiles where compiled
            if compiled:
                notes[name] = f"compile {time.perf_counter() - t0:.0f} s"
        except Exception as e:  # noqa: BLE001 - report, keep the other rows
            print(f"model {case.label} {case.mode} {name}: failed: {type(e).__name__}: "
                  f"{str(e)[:200]}", file=sys.stderr)
            continue
        fns[name] = fn
        if case.mode != "train" and name != "reference+compile":
            with torch.no_grad():
                errs[name] = (model(ids) - want).abs().max().item()
    if case.mode == "train":  # the train steps changed the weights: errors of a forward only
        errs = {}
    times = time_interleaved(fns, device=device, warmup=warmup, rep=rep)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    base = times.get("reference", {}).get("median_ms")
    tokens = case.B * (case.L if case.mode != "decode" else 1)
    rows = []
    for name, t in times.items():
        peak = peak_memory_bytes(fns[name], device) if case.mode == "train" else None
        tps = tokens / (t["median_ms"] / 1e3)
        note = "; ".join(x for x in (f"{tps:,.0f} tok/s", notes.get(name, "")) if x)
        rows.append(Row(op=f"model {case.mode}", shape=case.label,
                        dtype=str(case.dtype).removeprefix("torch."), mask="causal", impl=name,
                        median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                        ratios={} if name == "reference" or base is None else
                        {"reference": base / t["median_ms"]},
                        max_err=errs.get(name), threads=threads, device=str(device), note=note,
                        peak_mib=None if peak is None else peak / 2**20))
    return rows


def run(device: str | torch.device = "cpu", quick: bool = False) -> list[Row]:
    """Benchmark every case of `cases(device, quick)`."""
    device = resolve_device(device)
    warmup, rep = (20, 100) if quick and device.type == "cpu" else (None, None)
    rows: list[Row] = []
    for case in cases(device, quick):
        # quick CPU runs skip torch.compile (it takes 25-80 s per case on this machine)
        compile_ref = False if quick and device.type == "cpu" else None
        rows += run_case(case, device, compile_ref, warmup=warmup, rep=rep)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
