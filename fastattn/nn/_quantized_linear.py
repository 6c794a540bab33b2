"""What fastattn's quantized linears share: the packed weight buffers, their save/load checks,
device moves that never change a scale's dtype, and construction from an nn.Linear.
Formats: fastattn/quant_formats.py."""

from __future__ import annotations

import torch
from torch import nn

from ..quant_formats import FORMAT_VERSION

# Buffers that hold float32 scales: model.half() / .to(bfloat16) must not round them.
_FLOAT32_BUFFERS = ("scale",)


class QuantizedLinear(nn.Module):
    """Base of Int8Linear, Int4Linear and W8A8Linear (inference only, no parameters).

    Buffers (all in state_dict, so torch.save and safetensors keep them):
      the packed weight and its float32 `scale` (format-specific), `bias` (out_features,) or
      None, and `qformat` int32 (2,) = (FORMAT_VERSION, group_size or 0): checked on load, so a
      checkpoint written in another layout fails with a clear error instead of loading garbage.
    """

    FORMAT = ""  # "int8" | "int4" | "w8a8"

    def __init__(self, in_features: int, out_features: int, group_size: int = 0, *,
                 backend: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.backend = backend
        self.register_buffer("qformat", torch.tensor([FORMAT_VERSION, group_size],
                                                     dtype=torch.int32))

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        self.register_buffer("bias", None if bias is None else bias.detach())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = state_dict.get(prefix + "qformat")
        if saved is not None:
            version, group = (int(v) for v in saved.tolist())
            if version != FORMAT_VERSION:
                raise RuntimeError(
                    f"{type(self).__name__} at '{prefix[:-1]}': checkpoint uses fastattn "
                    f"{self.FORMAT} format version {version}; this fastattn reads version "
                    f"{FORMAT_VERSION}")
            if group != self.group_size:
                raise RuntimeError(
                    f"{type(self).__name__} at '{prefix[:-1]}': checkpoint has group_size "
                    f"{group}, this module {self.group_size}; quantize with the same group_size")
        if (prefix + "bias") in state_dict and self.bias is None:
            self.register_buffer("bias", torch.empty_like(state_dict[prefix + "bias"]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        kept = {n: getattr(self, n) for n in _FLOAT32_BUFFERS if getattr(self, n, None) is not None}
        super()._apply(fn, recurse)
        for name, t in kept.items():  # follow the device move, keep float32
            self._buffers[name] = t.to(fn(t).device)
        return self

    @staticmethod
    def _check_linear(linear: nn.Module, where: str) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: linear must be a torch.nn.Linear, got "
                            f"{type(linear).__name__}")

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{group}")
