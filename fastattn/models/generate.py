"""Generation: ragged prompt batches, KV caches, greedy / temperature / top-k / top-p sampling,
stop tokens; encoder-decoder generation with cross-attention K/V computed once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import fastattn


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) long. temperature 0: greedy (argmax). Otherwise
    fastattn.softmax(logits / temperature) restricted to the top_k tokens and then to the
    smallest set whose probability reaches top_p, sampled with `generator`."""
    if temperature < 0 or (top_k is not None and top_k < 1) or \
            (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"sample_next: need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got "
                         f"{temperature}, {top_k}, {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = fastattn.softmax(logits, scale=1.0 / temperature)  # (B, V)
    if top_p is not None and top_p < 1:
        p, idx = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p >= top_p  # tokens after the set already reaching top_p
        probs = probs.scatter(-1, idx, p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _pad(seqs: Sequence[Sequence[int]], device, pad: int = 0):
    """Right-padded (B, max_len) long tensor and the lengths."""
    lengths = [len(s) for s in seqs]
    out = torch.full((len(seqs), max(lengths, default=0)), pad, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lengths


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sources: Sequence[Sequence[int]] | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
             use_cache: bool = True) -> list[list[int]]:
    """Continues each prompt (token lists, any lengths, batched together) by up to
    max_new_tokens tokens; a sequence stops after emitting one of stop_tokens (which is kept
    in its output). Returns the new tokens of each sequence.

    model: a DecoderLM, or a Seq2Seq with `sources` (the encoder inputs; prompts are then the
    decoder prefixes, e.g. [[BOS]] * B). use_cache=False recomputes the full forward each step
    (the reference the KV-cache path must reproduce)."""
    if not prompts or any(len(p) == 0 for p in prompts) or max_new_tokens < 0:
        raise ValueError("generate: need at least one prompt, every prompt at least one token, "
                         f"and max_new_tokens >= 0 (got {max_new_tokens})")
    seq2seq = model.config.arch == "seq2seq"
    if seq2seq != (sources is not None):
        raise ValueError("generate: pass sources for a seq2seq model, and only for one")
    if model.config.arch == "encoder":
        raise ValueError("generate: an encoder model does not generate")
    cap = max(len(p) for p in prompts) + max_new_tokens
    if cap > model.config.max_seq_len:
        raise ValueError(f"generate: prompt + max_new_tokens = {cap} exceeds max_seq_len "
                         f"{model.config.max_seq_len}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        step = _cached(model, prompts, sources, cap, device) if use_cache else \
            _uncached(model, prompts, sources, device)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stops = {int(t) for t in stop_tokens}
        logits = step(None)
        for i in range(max_new_tokens):
            with model.backend_context():
                nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in stops
            if all(done) or i == max_new_tokens - 1:
                break
            logits = step(nxt)  # finished rows keep decoding (their tokens are dropped)
        return out
    finally:
        model.train(was_training)


def _cached(model, prompts, sources, cap: int, device):
    """step(None) prefills and returns the last logits (B, V); step(tokens) decodes one."""
    ids, lengths = _pad(prompts, device)
    caches = model.new_caches(len(prompts), cap)
    if sources is not None:
        src, src_len = _pad(sources, device)
        memory, pk_src = model.encode(src, src_len)
        cross_kv = model.start(memory, pk_src)

    def step(tokens):
        if sources is None:
            return model.prefill(ids, lengths, caches) if tokens is None else \
                model.decode(tokens, caches)
        if tokens is None:
            return model.prefill(ids, lengths, memory, pk_src, caches, cross_kv)
        return model.decode(tokens, pk_src, caches, cross_kv)
    return step


def _uncached(model, prompts, sources, device):
    """step(tokens): appends tokens (if any), runs the whole forward, returns the last logits."""
    seqs = [list(p) for p in prompts]
    if sources is not None:
        src, src_len = _pad(sources, device)

    def step(tokens):
        if tokens is not None:
            for s, t in zip(seqs, tokens.tolist()):
                s.append(t)
        ids, lengths = _pad(seqs, device)
        logits = model(ids, lengths) if sources is None else model(src, ids, src_len, lengths)
        return logits[torch.arange(len(seqs), device=device),
                      torch.as_tensor(lengths, device=device) - 1]
    return step
