"""Data: a byte-level tokenizer, the default corpus (Python standard library sources, nothing
downloaded), user files (text, JSONL, CSV), synthetic tasks, and the batch makers of each
training task. Batches are drawn from a torch.Generator seeded by (seed, step, rank), so a
resumed run sees exactly the batches the uninterrupted run would have."""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus specials PAD 256, BOS 257, EOS 258, MASK 259, SEP 260
    (vocab_size 264: padded to a multiple of 8)."""

    PAD, BOS, EOS, MASK, SEP = 256, 257, 258, 259, 260
    vocab_size = 264

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return [self.BOS] * bos + list(data) + [self.EOS] * eos

    def decode(self, ids) -> str:
        """Bytes to text (invalid UTF-8 replaced); special tokens are dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


TOKENIZER = ByteTokenizer()


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's .py files, sorted by relative path (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def default_corpus(max_bytes: int = 4_000_000) -> bytes:
    """The first max_bytes bytes of the stdlib sources concatenated in sorted order (the same
    bytes on every machine with the same Python version)."""
    out, n = [], 0
    for p in stdlib_files():
        try:
            data = p.read_bytes()
        except OSError:
            continue
        out.append(data)
        n += len(data)
        if n >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def read_text_files(paths) -> bytes:
    return b"\n".join(Path(p).read_bytes() for p in paths)


def split_tokens(data: bytes, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens, deterministic split: the first (1 - val_fraction) for training, the rest
    for validation."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def read_examples(path: str | os.PathLike, fields: tuple[str, str]) -> list[tuple]:
    """(a, b) pairs from a JSONL (one object per line) or CSV (with a header) file, e.g.
    fields ("text", "label") or ("source", "target")."""
    path = Path(path)
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    missing = [i for i, r in enumerate(rows) if not all(k in r for k in fields)]
    if missing:
        raise ValueError(f"{path}: rows {missing[:5]} lack the fields {fields}")
    return [(r[fields[0]], r[fields[1]]) for r in rows]


# ---- synthetic tasks ----------------------------------------------------------------------

def digit_task(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(text, label): lowercase strings of 4..12 letters; half have one digit (label 1)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 12))]
        label = i % 2
        if label:
            s[rng.randrange(len(s))] = rng.choice("0123456789")
        out.append(("".join(s), label))
    return out


def reverse_task(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(source, target): strings of 3..8 letters from a-h and their reversal."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
        out.append((s, s[::-1]))
    return out


# ---- tasks: batches and losses --------------------------------------------------------------

def _pad(seqs: list[list[int]], pad: int = ByteTokenizer.PAD) -> tuple[torch.Tensor, list[int]]:
    lengths = [len(s) for s in seqs]
    out = torch.full((len(seqs), max(lengths)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths


class LMTask:
    """Causal LM on a token stream: random windows of seq_len tokens; loss = next-token CE.
    Eval: the first eval_batches * batch_size disjoint windows of the validation tokens."""

    name = "lm"

    def __init__(self, train: torch.Tensor, val: torch.Tensor, seq_len: int) -> None:
        if len(train) <= seq_len or len(val) <= seq_len:
            raise ValueError(f"LMTask: need more than seq_len = {seq_len} tokens in train "
                             f"({len(train)}) and validation ({len(val)})")
        self.train, self.val, self.seq_len = train, val, seq_len

    def batch(self, batch_size: int, g: torch.Generator) -> dict:
        starts = torch.randint(0, len(self.train) - self.seq_len, (batch_size,), generator=g)
        return {"ids": torch.stack([self.train[s: s + self.seq_len] for s in starts.tolist()])}

    def eval_batches(self, batch_size: int, n: int):
        L = self.seq_len
        windows = min(n * batch_size, len(self.val) // L)
        for i in range(0, windows, batch_size):
            idx = range(i, min(i + batch_size, windows))
            yield {"ids": torch.stack([self.val[j * L: (j + 1) * L] for j in idx])}

    def loss(self, model, b: dict) -> torch.Tensor:
        from .decoder import lm_loss
        return lm_loss(model(b["ids"]), b["ids"])

    @staticmethod
    def tokens(b: dict) -> int:
        return b["ids"].numel()


class MLMTask(LMTask):
    """Masked LM on the same windows: mask_prob of the tokens become MASK; loss = CE on them."""

    name = "mlm"

    def __init__(self, train, val, seq_len: int, mask_prob: float = 0.15) -> None:
        super().__init__(train, val, seq_len)
        self.mask_prob = mask_prob

    def _mask(self, ids: torch.Tensor, g: torch.Generator) -> dict:
        pick = torch.rand(ids.shape, generator=g) < self.mask_prob
        return {"ids": ids.masked_fill(pick, ByteTokenizer.MASK),
                "labels": ids.masked_fill(~pick, -100)}

    def batch(self, batch_size, g):
        return self._mask(super().batch(batch_size, g)["ids"], g)

    def eval_batches(self, batch_size, n):
        g = torch.Generator().manual_seed(1234)
        for b in super().eval_batches(batch_size, n):
            yield self._mask(b["ids"], g)

    def loss(self, model, b):
        logits = model(b["ids"])  # through the (DDP) wrapper's forward
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               b["labels"].reshape(-1), ignore_index=-100)


class _ExampleTask:
    def __init__(self, examples: list[tuple], val_fraction: float = 0.1) -> None:
        cut = max(1, int(len(examples) * (1 - val_fraction)))
        self.train_ex, self.val_ex = examples[:cut], examples[cut:] or examples[:1]

    def batch(self, batch_size, g):
        idx = torch.randint(0, len(self.train_ex), (batch_size,), generator=g).tolist()
        return self._collate([self.train_ex[i] for i in idx])

    def eval_batches(self, batch_size, n):
        ex = self.val_ex[: n * batch_size]
        for i in range(0, len(ex), batch_size):
            yield self._collate(ex[i: i + batch_size])


class ClassifyTask(_ExampleTask):
    """Sequence classification from (text, label) pairs; labels are ints or strings (mapped to
    ints in sorted order: `labels`)."""

    name = "classify"

    def __init__(self, examples, val_fraction: float = 0.1, max_len: int = 128) -> None:
        self.labels = sorted({str(y) for _, y in examples})
        self.max_len = max_len
        as_int = {y: i for i, y in enumerate(self.labels)}
        if all(str(y).lstrip("-").isdigit() for _, y in examples):
            as_int = {y: int(y) for y in self.labels}
        super().__init__([(x, as_int[str(y)]) for x, y in examples], val_fraction)

    @property
    def num_labels(self) -> int:
        return max(max(y for _, y in self.train_ex + self.val_ex) + 1, 2)

    def _collate(self, ex):
        ids, lengths = _pad([TOKENIZER.encode(x, bos=True)[: self.max_len] for x, _ in ex])
        return {"ids": ids, "lengths": lengths, "labels": torch.tensor([y for _, y in ex])}

    def loss(self, model, b):
        return F.cross_entropy(model(b["ids"], b["lengths"], head="classify").float(),
                               b["labels"])

    @staticmethod
    def tokens(b):
        return sum(b["lengths"])


class Seq2SeqTask(_ExampleTask):
    """(source, target) text pairs: the decoder reads BOS + target and predicts target + EOS."""

    name = "seq2seq"

    def __init__(self, examples, val_fraction: float = 0.1, max_len: int = 128) -> None:
        self.max_len = max_len
        super().__init__(examples, val_fraction)

    def _collate(self, ex):
        src, sl = _pad([TOKENIZER.encode(s, bos=True)[: self.max_len] for s, _ in ex])
        tgt, tl = _pad([TOKENIZER.encode(t, bos=True, eos=True)[: self.max_len] for _, t in ex])
        return {"src": src, "src_lengths": sl, "tgt": tgt, "tgt_lengths": tl}

    def loss(self, model, b):
        from .decoder import lm_loss
        logits = model(b["src"], b["tgt"], b["src_lengths"], b["tgt_lengths"])
        return lm_loss(logits, b["tgt"], b["tgt_lengths"])

    @staticmethod
    def tokens(b):
        return sum(b["src_lengths"]) + sum(b["tgt_lengths"])
