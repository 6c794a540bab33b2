"""fastattn.nn.LayerNorm: torch.nn.LayerNorm running fastattn.layer_norm."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """Drop-in for torch.nn.LayerNorm: the same constructor arguments, parameters (`weight`,
    `bias`) and state_dict keys (a torch.nn.LayerNorm state_dict loads unchanged, and vice
    versa); forward runs fastattn.layer_norm.

    forward(x: (..., *normalized_shape)) -> (..., *normalized_shape), x's dtype.
    `backend` forces a fastattn backend (default: chosen per call, see fastattn.backends).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device,
                         dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                          backend=self.backend)

    @classmethod
    def from_torch(cls, module: nn.LayerNorm, *, backend: str | None = None) -> LayerNorm:
        """A fastattn LayerNorm with `module`'s configuration that shares its parameters
        (the same Parameter objects, so optimizers and tied weights keep working)."""
        if not isinstance(module, nn.LayerNorm):
            raise TypeError(f"LayerNorm.from_torch: module must be a torch.nn.LayerNorm, got "
                            f"{type(module).__name__}")
        new = cls(module.normalized_shape, module.eps, elementwise_affine=False, backend=backend)
        new.elementwise_affine = module.elementwise_affine
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
