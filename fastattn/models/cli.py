"""`fastattn train` and `fastattn generate` (registered by fastattn/cli.py), and the op ->
kernel table that `fastattn info` prints."""

from __future__ import annotations

import argparse
import math
import os
import sys

TASK_ARCH = {"lm": "decoder", "mlm": "encoder", "classify": "encoder", "seq2seq": "seq2seq"}


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train / fine-tune a fastattn.models transformer")
    t.add_argument("--task", default="lm", choices=sorted(TASK_ARCH),
                   help="lm: causal LM; mlm: masked LM; classify: text+label JSONL/CSV; "
                        "seq2seq: source/target JSONL (default lm)")
    t.add_argument("--data", nargs="+", metavar="FILE",
                   help="lm/mlm: text files (default: the Python stdlib sources); classify: a "
                        "JSONL/CSV with text,label; seq2seq: a JSONL/CSV with source,target")
    t.add_argument("--preset", default="small", help="model preset (tiny, small, gpt2-small, 1b)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=128, help="lm/mlm window length")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=None, help="default: min(100, steps // 10)")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--save-every", type=int, default=0)
    t.add_argument("--corpus-bytes", type=int, default=4_000_000,
                   help="bytes of the default stdlib corpus (default 4 MB)")
    t.add_argument("--out", default="checkpoints/run", metavar="DIR")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--init-from", metavar="DIR",
                   help="start from this checkpoint's weights (e.g. an MLM encoder to fine-tune "
                        "for classify); missing heads keep their fresh init")
    t.add_argument("--backend", choices=["reference", "cpu", "cuda", "triton"],
                   help="force one fastattn backend for every op")
    t.add_argument("--activation-checkpointing", action="store_true")
    t.add_argument("--eval-quantized", nargs="+", choices=["int8", "int4", "w8a8"],
                   metavar="FORMAT", help="after training, report the validation loss of the "
                   "model quantized to each FORMAT (int8, int4, w8a8) next to the float one")
    t.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    t.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text with a trained fastattn.models checkpoint")
    g.add_argument("--checkpoint", required=True, metavar="DIR")
    g.add_argument("--prompt", default="", help="decoder: the text to continue")
    g.add_argument("--source", help="seq2seq: the encoder input text")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quantize", choices=["int8", "int4", "w8a8"],
                   help="quantize the linears before generating")
    g.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    g.add_argument("--threads", type=int, metavar="N")
    g.set_defaults(func=cmd_generate)


def _device(name: str):
    """cpu / cuda; under torchrun each process takes the GPU of its LOCAL_RANK."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def build_task(args, max_seq_len: int):
    """The data.*Task for args.task / args.data."""
    from . import data
    if args.task in ("lm", "mlm"):
        raw = data.read_text_files(args.data) if args.data else data.default_corpus(
            args.corpus_bytes)
        tr, va = data.split_tokens(raw)
        cls = data.LMTask if args.task == "lm" else data.MLMTask
        return cls(tr, va, min(args.seq_len, max_seq_len))
    if not args.data:
        raise SystemExit(f"fastattn train --task {args.task}: --data FILE is required")
    if args.task == "classify":
        return data.ClassifyTask(data.read_examples(args.data[0], ("text", "label")),
                                 max_len=max_seq_len)
    return data.Seq2SeqTask(data.read_examples(args.data[0], ("source", "target")),
                            max_len=max_seq_len)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig
    from .io import CONFIG, build_model, load_weights
    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = _device(args.device)
    if args.resume:
        if not os.path.exists(os.path.join(args.out, CONFIG)):
            raise SystemExit(f"fastattn train --resume: no checkpoint in {args.out}")
        cfg = ModelConfig.from_json(os.path.join(args.out, CONFIG))
    else:
        cfg = ModelConfig.preset(args.preset, arch=TASK_ARCH[args.task])
    task = build_task(args, cfg.max_seq_len)
    if args.task == "classify" and not args.resume:
        cfg = cfg.replace(num_labels=task.num_labels)
    if args.backend:
        cfg = cfg.replace(backend=args.backend)
    model = build_model(cfg).to(device)
    if args.init_from and not args.resume:
        missing, unexpected = load_weights(model, args.init_from, strict=False)
        print(f"initialised from {args.init_from} (kept fresh: {missing or 'none'}; not "
              f"used: {unexpected or 'none'})")
    warmup = args.warmup if args.warmup is not None else min(100, args.steps // 10)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     lr=args.lr, min_lr=args.lr / 10, warmup=max(warmup, 1),
                     eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                     activation_checkpointing=args.activation_checkpointing,
                     progress=not args.no_progress)
    what = f"checkpoint {args.out}" if args.resume else f"preset '{args.preset}'"
    print(f"fastattn train: {args.task} on {cfg.arch} {what} "
          f"({model.num_parameters() / 1e6:.2f}M parameters), {device}, "
          f"{torch.get_num_threads()} threads, {args.steps} steps -> {args.out}", flush=True)
    h = train(model, task, tc, out=args.out, resume=args.out if args.resume else None)
    import torch.distributed as dist
    if dist.is_initialized():  # torchrun: train() joined the group; rank 0 reports
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    if h["val_loss"]:
        val = h["val_loss"][-1]
        tps = sum(h["tokens_per_s"]) / max(len(h["tokens_per_s"]), 1)
        extra = f", perplexity {math.exp(val):.2f}" if args.task in ("lm", "mlm") else ""
        print(f"final: train loss {h['loss'][-1]:.4f}, val loss {val:.4f}{extra}, "
              f"{tps:,.0f} tokens/s (mean of logged intervals)")
    if args.task == "classify":
        print(f"val accuracy {classify_accuracy(model, task):.3f}")
    if args.eval_quantized:
        from .train import evaluate_quantized
        losses = evaluate_quantized(model.eval(), task, tc, args.eval_quantized)
        for fmt, loss in losses.items():
            delta = "" if fmt == "float" else f" ({loss - losses['float']:+.4f} vs float)"
            ppl = f", perplexity {math.exp(loss):.3f}" if args.task in ("lm", "mlm") else ""
            print(f"quantized {fmt}: val loss {loss:.4f}{delta}{ppl}")
    print(f"saved {args.out}")
    return 0


def classify_accuracy(model, task) -> float:
    import torch
    model.eval()
    right = n = 0
    with torch.no_grad():
        for b in task.eval_batches(64, 1 << 30):
            pred = model.classify(b["ids"], b["lengths"]).argmax(-1)
            right += int((pred == b["labels"]).sum())
            n += len(b["lengths"])
    return right / max(n, 1)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import fastattn

    from .data import TOKENIZER
    from .generate import generate
    from .io import load_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_pretrained(args.checkpoint, device=_device(args.device)).eval()
    if model.config.arch == "encoder":
        raise SystemExit("fastattn generate: the checkpoint is an encoder; it does not generate")
    if args.quantize:
        from .train import int4_group_size
        report = fastattn.quantize(model, args.quantize,
                                   group_size=int4_group_size(model.config))
        print(f"quantized {len(report.replaced)} linears to {args.quantize} "
              f"({len(report.skipped)} skipped)", file=sys.stderr)
    if model.config.arch == "seq2seq":
        if args.source is None:
            raise SystemExit("fastattn generate: a seq2seq checkpoint needs --source TEXT")
        prompt, sources = [TOKENIZER.BOS] + TOKENIZER.encode(args.prompt), \
            [TOKENIZER.encode(args.source, bos=True)]
    else:
        prompt, sources = TOKENIZER.encode(args.prompt, bos=True), None
    room = model.config.max_seq_len - len(prompt)
    if room < 1:
        raise SystemExit(f"fastattn generate: the prompt is longer than max_seq_len "
                         f"{model.config.max_seq_len}")
    out = generate(model, [prompt], min(args.max_new_tokens, room), sources=sources,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   stop_tokens=[TOKENIZER.EOS],
                   generator=torch.Generator().manual_seed(args.seed))
    print(args.prompt + TOKENIZER.decode(out[0]))
    return 0


def kernel_table(device: str) -> list[tuple[str, str]]:
    """(op, fastattn.explain line) for each op on small tensors of `device` (float32)."""
    import torch

    import fastattn
    from fastattn.quant_formats import quantize_int4_weight, quantize_int8_weight

    d = torch.device(device)
    x = torch.randn(4, 128, device=d)
    w = torch.ones(128, device=d)
    q = torch.randn(1, 4, 16, 64, device=d)
    qa = torch.randn(1, 16, 4, 64, device=d)
    kc = torch.zeros(1, 32, 4, 64, device=d)
    lens = torch.tensor([16], dtype=torch.int32, device=d)
    wf = torch.randn(128, 128, device=d)
    w8, s8 = quantize_int8_weight(wf)
    p4, s4, z4 = quantize_int4_weight(wf, 128)
    calls = {
        "softmax": (x,), "layer_norm": (x, (128,), w), "rms_norm": (x, (128,), w),
        "add_layer_norm": (x, x, (128,), w), "add_rms_norm": (x, x, (128,), w),
        "sdpa": (q, q, q), "attention": (qa, qa, qa), "decode_attention": (qa[:, :1], kc, kc, lens),
        "int8_linear": (x, w8, s8), "int4_linear": (x, p4, s4, z4, 128), "w8a8_linear": (x, w8, s8),
    }
    out = []
    for op, a in calls.items():
        try:
            out.append((op, fastattn.explain(op, *a)))
        except Exception as e:  # noqa: BLE001 - report it: the op cannot plan such a call here
            out.append((op, f"{op}: cannot plan ({type(e).__name__}: {e})"))
    return out
