"""Input builders shared by the softmax tests: masks of each kind and what PyTorch users
write today for the same math (the "PyTorch's own error" side of the tolerance rule)."""

import torch

import fastattn

MASK_KINDS = ("none", "bool", "add_f32", "add_same")


def make_mask(kind: str, x: torch.Tensor, *, requires_grad: bool = False):
    """A mask broadcastable to x (..., M, N): (M, N) when x has 2+ dims, else (N,)."""
    if kind == "none":
        return None
    shape = tuple(x.shape[-2:]) if x.dim() >= 2 else tuple(x.shape)
    if kind == "bool":
        return torch.rand(shape, device=x.device) < 0.8
    dtype = torch.float32 if kind == "add_f32" else x.dtype
    add = torch.randn(shape, device=x.device)
    add = add.masked_fill(torch.rand(shape, device=x.device) < 0.1, float("-inf"))
    return add.to(dtype).requires_grad_(requires_grad)


def torch_softmax(x, scale, mask, causal):
    """PyTorch's composition of the same math, in x's dtype."""
    z = x * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(x.dtype)
    if causal:
        keep = fastattn.reference.causal_keep(z.shape[-2], z.shape[-1], z.device)
        z = z.masked_fill(~keep, float("-inf"))
    return torch.softmax(z, -1)


def reference64(x, scale, mask, causal):
    """The float64 reference (differentiable w.r.t. x and an additive mask)."""
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    return fastattn.reference.softmax(x.double(), scale=scale, mask=m64, causal=causal)
