"""fastattn.models: encoder, decoder and encoder-decoder transformers built on fastattn ops.

    from fastattn.models import ModelConfig, build_model, generate
    model = build_model(ModelConfig.preset("tiny"))           # DecoderLM
    logits = model(ids, lengths)                              # (B, L, V); ragged via packing
    out = generate(model, [[257, 72, 105], [257, 65]], max_new_tokens=20, temperature=0.8,
                   top_p=0.9, generator=torch.Generator().manual_seed(0))

Every attention (fastattn.attention, KVCache / decode_attention), norm (fused with the
residual add) and, in sampling, softmax is a fastattn op; ModelConfig(backend="reference")
runs the identical model on plain PyTorch math.
"""

from .config import PRESETS, ModelConfig
from .decoder import DecoderLM, lm_loss
from .encoder import Encoder
from .generate import generate, sample_next
from .io import build_model, load_pretrained, load_weights, save_pretrained
from .packing import Packing
from .seq2seq import Seq2Seq

__all__ = [
           "PRESETS",
           "DecoderLM",
           "Encoder",
           "ModelConfig",
           "Packing",
           "Seq2Seq",
           "build_model",
           "generate",
           "lm_loss",
           "load_pretrained",
           "load_weights",
           "sample_next",
           "save_pretrained",
]
