"""Tiny random models and comparison helpers shared by tests/test_patch_*.py."""

from __future__ import annotations

import copy

import torch
from tolerances import assert_within_torch_error

VOCAB, HIDDEN, HEADS, LAYERS, FF = 100, 32, 4, 2, 64


def hf_model(family: str, **over):
    """A tiny randomly initialised HF model of `family` (nothing downloaded), dropout 0."""
    import transformers as tr

    if family == "llama":
        cfg = tr.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_key_value_heads=2, max_position_embeddings=64, **over)
        model = tr.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tr.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                            n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=1, eos_token_id=2, **over)
        model = tr.GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = tr.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, intermediate_size=FF,
                            max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, **over)
        model = tr.BertModel(cfg)
    elif family == "t5":
        cfg = tr.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FF, num_layers=LAYERS,
                          num_heads=HEADS, dropout_rate=0.0, decoder_start_token_id=0,
                          pad_token_id=0, eos_token_id=1, **over)
        model = tr.T5ForConditionalGeneration(cfg)
    elif family == "mistral":  # sliding window
        cfg = tr.MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               num_key_value_heads=2, max_position_embeddings=64,
                               sliding_window=4, **over)
        model = tr.MistralForCausalLM(cfg)
    elif family == "gemma2":  # softcapping: not supported
        cfg = tr.Gemma2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              **over)
        model = tr.Gemma2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model


def hf_inputs(family: str, batch: int = 2, length: int = 9, left_pad: bool = True):
    """kwargs for model(**kw): token ids and a padding mask with padded positions (left
    padding for decoders, right padding for encoders)."""
    ids = torch.randint(3, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        if left_pad and family in ("llama", "gpt2", "mistral", "gemma2"):
            mask[1, :3] = 0
        else:
            mask[1, -3:] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        kw["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5))
    return kw


def first_output(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") and \
        getattr(out, "logits", None) is None else out.logits


def assert_close_to_torch(patched_out, torch_out, ref64, what: str, ulps: int = 4) -> None:
    """The house rule (tests/tolerances.py) over a whole model: the patched float32 output's
    error against the unpatched model in float64 is within 2x of the unpatched float32
    model's own error, plus `ulps` ulps (several ops in sequence each round once)."""
    assert_within_torch_error(patched_out.detach(), ref64.detach(), torch_out.detach(), what,
                              dtype=torch.float32, ulps=ulps)


def double_copy(model):
    return copy.deepcopy(model).double()
