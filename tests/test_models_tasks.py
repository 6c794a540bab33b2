"""fastattn.models learns small synthetic tasks: classification fine-tune (does a string
contain a digit) to >= 95% validation accuracy, and seq2seq string reversal to >= 90% exact
greedy matches (cached generation). Tiny models, one CPU thread, a few seconds each."""

import pytest
import torch

from fastattn.models import ModelConfig, build_model, generate
from fastattn.models.cli import classify_accuracy
from fastattn.models.data import TOKENIZER, ClassifyTask, Seq2SeqTask, digit_task, reverse_task
from fastattn.models.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


def test_classify_contains_digit():
    torch.manual_seed(0)
    task = ClassifyTask(digit_task(2000), val_fraction=0.1)
    model = build_model(ModelConfig.preset("tiny", arch="encoder", num_labels=2, max_seq_len=32))
    train(model, task, TrainConfig(steps=100, batch_size=32, lr=3e-3, min_lr=3e-4, warmup=10,
                                   log_every=25, progress=False))
    assert classify_accuracy(model, task) >= 0.95


def test_seq2seq_reverse():
    torch.manual_seed(0)
    task = Seq2SeqTask(reverse_task(3000), val_fraction=0.05)
    model = build_model(ModelConfig.preset("tiny", arch="seq2seq", max_seq_len=32))
    h = train(model, task, TrainConfig(steps=300, batch_size=32, lr=3e-3, min_lr=3e-4,
                                       warmup=20, log_every=50, progress=False))
    assert h["val_loss"][-1] < 0.1, h
    val = task.val_ex[:64]
    out = generate(model, [[TOKENIZER.BOS]] * len(val), 12,
                   sources=[TOKENIZER.encode(s, bos=True) for s, _ in val],
                   stop_tokens=[TOKENIZER.EOS])
    exact = sum(o[-1:] == [TOKENIZER.EOS] and TOKENIZER.decode(o) == t
                for o, (_, t) in zip(out, val))
    assert exact >= 0.9 * len(val), [TOKENIZER.decode(o) for o in out[:8]]
