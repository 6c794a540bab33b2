"""fastattn.nn.RMSNorm: torch.nn.RMSNorm running fastattn.rms_norm."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.rms_norm import rms_norm


class RMSNorm(nn.RMSNorm):
    """Drop-in for torch.nn.RMSNorm: the same constructor arguments, parameter (`weight`) and
    state_dict keys (a torch.nn.RMSNorm state_dict loads unchanged, and vice versa); forward
    runs fastattn.rms_norm (eps None: torch's default, float32's machine epsilon).

    forward(x: (..., *normalized_shape)) -> (..., *normalized_shape), x's dtype.
    `backend` forces a fastattn backend (default: chosen per call, see fastattn.backends).
    """

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps, backend=self.backend)

    @classmethod
    def from_torch(cls, module: nn.RMSNorm, *, backend: str | None = None) -> RMSNorm:
        """A fastattn RMSNorm with `module`'s configuration that shares its parameter (the
        same Parameter object, so optimizers and tied weights keep working)."""
        if not isinstance(module, nn.RMSNorm):
            raise TypeError(f"RMSNorm.from_torch: module must be a torch.nn.RMSNorm, got "
                            f"{type(module).__name__}")
        new = cls(module.normalized_shape, module.eps, elementwise_affine=False, backend=backend)
        new.elementwise_affine = module.elementwise_affine
        new.weight = module.weight
        new.train(module.training)
        return new
