"""Benchmark of fastattn.patch on Hugging Face models: the same randomly initialised model,
unpatched (transformers' "sdpa" attention and its own norms) vs patched (fastattn attention and
norms), forward and forward + backward, time and peak memory.

Families (tiny-vocabulary random configs, nothing downloaded; sizes from --hidden/--layers):
  bert   BertModel                    LayerNorm, bidirectional attention, right padding
  gpt2   GPT2LMHeadModel              LayerNorm, causal attention, left padding
  llama  LlamaForCausalLM (GQA 2:1)   RMSNorm, causal attention, left padding
  t5     T5ForConditionalGeneration   T5LayerNorm, relative position bias (as a float mask),
                                      encoder length --seq, decoder length --seq // 4
Default mid size: hidden 512, 4 layers, 8 heads, FFN 4x, seq 256, batch 4, float32; one
sequence of the batch padded by a quarter. `--quick`: hidden 128, 2 layers, seq 64, batch 2.

Modes: fwd under torch.no_grad() in eval mode; fwd+bwd in training mode (dropout 0) with
out.float().sum().backward() (every .grad set to None first). Rows: impl "unpatched (sdpa)"
and "fastattn" per family and mode; "vs unpatched" = unpatched time / fastattn time (> 1:
the patched model is faster). max err: max |output - float64 unpatched model output| (fwd,
float32 only). peak MiB: common.peak_memory_bytes of one call.

    python -m benchmarks.bench_patch --threads 1 [--quick] [--families llama,t5] [--out DIR]
    fastattn bench --ops patch [--quick]       (run(device, quick), as every bench_<op>)

Results: benchmarks/results/<device>-<date>-patch.{json,md} unless --no-write.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

import torch

from .common import (
    cpu_contention,
    peak_memory_bytes,
    resolve_device,
    set_threads,
    steady_cpu_allocator,
    time_interleaved,
)
from .report import Row, collect_meta, print_table, write_results

FAMILIES = ("bert", "gpt2", "llama", "t5")
MODES = ("fwd", "fwd+bwd")


def make_model(family: str, hidden: int, layers: int, heads: int, vocab: int = 1000):
    import transformers as tr

    ff, pos = 4 * hidden, 2048
    if family == "bert":
        return tr.BertModel(tr.BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=ff, max_position_embeddings=pos,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if family == "gpt2":
        return tr.GPT2LMHeadModel(tr.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=pos,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))
    if family == "llama":
        return tr.LlamaForCausalLM(tr.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=pos))
    if family == "t5":
        return tr.T5ForConditionalGeneration(tr.T5Config(
            vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=ff, num_layers=layers,
            num_heads=heads, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def make_inputs(family: str, batch: int, seq: int, vocab: int = 1000, device="cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:  # one padded sequence: decoders pad on the left, encoders on the right
        if family in ("gpt2", "llama"):
            mask[-1, : seq // 4] = 0
        else:
            mask[-1, seq - seq // 4:] = 0
    kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if family == "t5":
        kw["decoder_input_ids"] = torch.randint(3, vocab, (batch, max(1, seq // 4)),
                                                generator=g).to(device)
    return kw


def _output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _step(model, kw, mode):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return _output(model(**kw))
        return fwd

    params = [p for p in model.parameters() if p.requires_grad]

    def fwd_bwd():
        for p in params:
            p.grad = None
        _output(model(**kw)).float().sum().backward()
    return fwd_bwd


def run_family(family: str, args: Sizes, device: torch.device) -> list[Row]:
    from fastattn.patch import patch

    torch.manual_seed(0)
    base = make_model(family, args.hidden, args.layers, args.heads).to(device)
    patched, _ = patch(copy.deepcopy(base))
    kw = make_inputs(family, args.batch, args.seq, device=device)
    shape = f"h{args.hidden} L{args.layers} b{args.batch} s{args.seq}"
    rows = []
    ref = None
    if not args.no_error:
        with torch.no_grad():
            ref = _output(copy.deepcopy(base).double().eval()(**kw))
    for mode in MODES:
        models = {"unpatched (sdpa)": base, "fastattn": patched}
        for m in models.values():
            m.train(mode == "fwd+bwd")
        steps = {name: _step(m, kw, mode) for name, m in models.items()}
        times = time_interleaved(steps, device=device, warmup=args.warmup, rep=args.rep)
        for name, m in models.items():
            err = None
            if ref is not None and mode == "fwd":
                err = (steps[name]().double() - ref).abs().max().item()
            peak = peak_memory_bytes(steps[name], device)
            t = times[name]
            ratios = ({"unpatched": times["unpatched (sdpa)"]["median_ms"] / t["median_ms"]}
                      if name == "fastattn" else {})
            rows.append(Row(op=f"patch {family} {mode}", shape=shape, dtype="float32",
                            mask="padded", impl=name, median_ms=t["median_ms"],
                            p20_ms=t.get("p20_ms"), p80_ms=t.get("p80_ms"), ratios=ratios,
                            max_err=err, threads=torch.get_num_threads(), device=device.type,
                            peak_mib=None if peak is None else peak / 2**20, mask_header="mask"))
    return rows


@dataclasses.dataclass
class Sizes:
    """Model and input sizes, timing budgets (ms; None: common.time_fn's defaults)."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    seq: int = 256
    batch: int = 4
    warmup: float | None = None
    rep: float | None = None
    no_error: bool = False

    @classmethod
    def quick(cls) -> Sizes:
        return cls(hidden=128, layers=2, heads=4, seq=64, batch=2)


def run(device: str | torch.device = "cpu", quick: bool = False,
        families: tuple[str, ...] = FAMILIES, sizes: Sizes | None = None) -> list[Row]:
    """Rows for every family (fastattn.cli's `fastattn bench` entry point). Without
    transformers: no rows (a note on stderr)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench_patch: transformers is not installed; no rows", file=sys.stderr)
        return []
    device = resolve_device(device)
    sizes = sizes or (Sizes.quick() if quick else Sizes())
    rows: list[Row] = []
    for family in families:
        rows += run_family(family, sizes, device)
    return rows


def main(argv=None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--quick", action="store_true",
                    help="hidden 128, 2 layers, 4 heads, seq 64, batch 2")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up budget, ms")
    ap.add_argument("--rep", type=float, default=None, help="timing budget, ms")
    ap.add_argument("--no-error", action="store_true", help="skip the float64 reference")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes(args.hidden, args.layers, args.heads,
                                                   args.seq, args.batch)
    sizes.warmup, sizes.rep, sizes.no_error = args.warmup, args.rep, args.no_error
    device = resolve_device(args.device)
    if args.threads:
        set_threads(args.threads)
    start = time.time()
    meta = collect_meta(device)
    if device.type == "cpu":
        meta["cpu_allocator"] = steady_cpu_allocator()
    rows = run(device, families=tuple(f.strip() for f in args.families.split(",")), sizes=sizes)
    print_table(rows)
    if not args.no_write:
        meta["elapsed_s"] = round(time.time() - start, 1)
        meta["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        meta["contention_at_end"] = cpu_contention() if device.type == "cpu" else None
        stem = f"{meta['hardware']}-{meta['date'][:10]}-patch"
        from .report import slug

        paths = write_results(rows, meta, args.out, stem=slug(stem))
        print("\nwrote", *paths)
    return rows


if __name__ == "__main__":
    main()
