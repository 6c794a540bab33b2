"""Training loop: AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on
CUDA, optional activation checkpointing, eval loss, safetensors checkpoints with resume, a
tqdm bar (loss, tokens/s), DistributedDataParallel under torchrun (gloo on CPU, NCCL on GPU).

    history = train(model, LMTask(train_tokens, val_tokens, 128), TrainConfig(steps=500),
                    out="ckpt")           # ckpt/: model.safetensors config.json
                                          #        optimizer.safetensors train_state.json
    train(model, task, TrainConfig(steps=1000), out="ckpt", resume="ckpt")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist

from .io import save_pretrained

OPTIMIZER, STATE = "optimizer.safetensors", "train_state.json"


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # per process
    seq_len: int = 128  # LM / MLM windows
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end (when out is given)
    seed: int = 0
    activation_checkpointing: bool = False
    progress: bool = True


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of (0-based) step: linear warmup to lr over `warmup` steps, then cosine
    decay to min_lr at `steps`."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * t))


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2: linears, embeddings), not on norms/biases."""
    params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=tc.lr, betas=(tc.beta1, tc.beta2), foreach=False)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _dist() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_generator(tc: TrainConfig, step: int, rank: int) -> torch.Generator:
    """The generator of one step's batch: a pure function of (seed, step, rank)."""
    return torch.Generator().manual_seed((tc.seed * 1_000_003 + step) * 1009 + rank)


@torch.no_grad()
def evaluate(model, task, tc: TrainConfig) -> float:
    """Mean loss over the task's first eval_batches validation batches."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for b in task.eval_batches(tc.batch_size, tc.eval_batches):
        with _autocast(device):
            total += float(task.loss(model, _to(b, device)))
        n += 1
    model.train(was)
    return total / max(n, 1)


def int4_group_size(cfg) -> int:
    """The largest int4 group size (128, 64, 32) dividing the model's linear input widths."""
    return next((g for g in (128, 64, 32) if cfg.d_model % g == 0 and cfg.d_ff % g == 0), 32)


def evaluate_quantized(model, task, tc: TrainConfig, formats) -> dict[str, float]:
    """Validation loss of the float model ("float") and of a copy quantized with
    fastattn.quantize for each format ("int8", "int4", "w8a8"); model is left unchanged."""
    import copy

    import fastattn

    out = {"float": evaluate(model, task, tc)}
    for fmt in formats:
        q = copy.deepcopy(model)
        fastattn.quantize(q, fmt, group_size=int4_group_size(model.config))
        out[fmt] = evaluate(q, task, tc)
    return out


def _autocast(device: torch.device):
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


def save_checkpoint(out, model, opt, step: int, tc: TrainConfig, history: dict) -> None:
    """model.safetensors + config.json, optimizer tensors in optimizer.safetensors, step,
    train config, history and the optimizer's hyper-parameters in train_state.json."""
    from safetensors.torch import save_file

    save_pretrained(model, out)
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items()
               for k, v in st.items()}
    save_file(tensors, os.path.join(out, OPTIMIZER))
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in sd["param_groups"]]
    state = {"step": step, "train_config": dataclasses.asdict(tc), "history": history,
             "param_groups": groups}
    with open(os.path.join(out, STATE), "w") as f:
        json.dump(state, f, indent=1)


def load_checkpoint(directory, model, opt) -> tuple[int, dict]:
    """Loads weights and optimizer state saved by save_checkpoint into model / opt (no
    unpickling). Returns (step, history)."""
    from safetensors.torch import load_file, load_model

    device = next(model.parameters()).device
    load_model(model, os.path.join(directory, "model.safetensors"), device=str(device))
    with open(os.path.join(directory, STATE)) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(directory, OPTIMIZER), device=str(device))
    per: dict[int, dict] = {}
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        per.setdefault(int(i), {})[name] = t.cpu() if name == "step" else t
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in state["param_groups"]]
    opt.load_state_dict({"state": per, "param_groups": groups})
    return int(state["step"]), state["history"]


def train(model, task, tc: TrainConfig, *, out: str | None = None, resume: str | None = None,
          until: int | None = None) -> dict:
    """Trains model on task (data.LMTask / MLMTask / ClassifyTask / Seq2SeqTask) for tc.steps
    steps (or stops after step `until`, keeping the schedule of tc.steps). Returns the history
    {"step", "loss", "lr", "tokens_per_s", "val_step", "val_loss"}; rank 0 writes checkpoints
    to `out`. Under torchrun each rank draws its own batches and DDP averages the gradients."""
    rank, world = _dist()
    device = next(model.parameters()).device
    model.gradient_checkpointing = tc.activation_checkpointing
    opt = make_optimizer(model, tc)
    step, history = 0, {"step": [], "loss": [], "lr": [], "tokens_per_s": [], "val_step": [],
                        "val_loss": []}
    if resume:
        step, history = load_checkpoint(resume, model, opt)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, find_unused_parameters=model.config.arch != "decoder")
    end = tc.steps if until is None else min(until, tc.steps)
    bar = None
    if tc.progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=step, desc=f"train {task.name}", dynamic_ncols=True)
    model.train()
    t0, tokens, losses = time.perf_counter(), 0, []
    while step < end:
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        b = _to(task.batch(tc.batch_size, batch_generator(tc, step, rank)), device)
        with _autocast(device):
            loss = task.loss(net, b)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.detach())
        tokens += task.tokens(b) * world
        if step % tc.log_every == 0 or step == end:
            mean = torch.stack(losses).float().mean()
            if world > 1:
                dist.all_reduce(mean)
                mean /= world
            tps = tokens / (time.perf_counter() - t0)
            history["step"].append(step)
            history["loss"].append(float(mean))
            history["lr"].append(lr)
            history["tokens_per_s"].append(tps)
            if bar is not None:
                bar.set_postfix(loss=f"{float(mean):.4f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
            t0, tokens, losses = time.perf_counter(), 0, []
        if bar is not None:
            bar.update(1)
        if (tc.eval_every and step % tc.eval_every == 0) or step == end:
            val = evaluate(model, task, tc)
            history["val_step"].append(step)
            history["val_loss"].append(val)
            if rank == 0:
                (bar.write if bar is not None else print)(f"step {step}: val loss {val:.4f}")
        if out and rank == 0 and ((tc.save_every and step % tc.save_every == 0) or step == end):
            save_checkpoint(out, model, opt, step, tc, history)
    if bar is not None:
        bar.close()
    return history
