"""The one tolerance table. A fast kernel passes when, against the float64 reference,

    max |kernel - ref|  <=  RATIO * max |torch - ref|  +  ulps * FLOOR[dtype] * max(1, max |ref|)

where `torch` is what PyTorch itself computes for the same math in the same dtype. The floor
is one ulp of the dtype at the magnitude of the result (probabilities are at most 1; gradients
can be larger): PyTorch's own max error over a small tensor is sometimes far below an ulp by
luck of rounding, and a result that is merely rounded differently must not fail. Real defects
(a wrong mask, index or scale) are off by 1e-2..1, far above it. `ulps` is 1 for a forward
result (rounded once) and 2 for a gradient (computed from the rounded forward output, then
rounded itself).
"""

import torch

RATIO = 2.0
FLOOR = {  # torch.finfo(dtype).eps: one ulp at 1.0
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,  # 1.2e-7
    torch.float16: 2.0**-10,  # 9.8e-4
    torch.bfloat16: 2.0**-7,  # 7.8e-3
}
# The Triton interpreter (TRITON_INTERPRET=1, CPU tensors) converts float32 to bfloat16 by
# truncation, not round-to-nearest (seen with Triton 3.8: half of all values differ by one
# ulp from torch's conversion), so interpreted bf16 results get two ulps. GPU runs use FLOOR.
INTERPRETED_BF16_FLOOR = 2.0**-6


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in float64; NaN anywhere in out counts as infinite error."""
    diff = (out.double() - ref.double()).abs()
    return float("inf") if torch.isnan(out).any() else (diff.max().item() if diff.numel() else 0.0)


def assert_within_torch_error(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor,
                              what: str, *, dtype: torch.dtype | None = None,
                              interpreted: bool = False, ulps: int = 1) -> None:
    """out and torch_out: same dtype; ref: float64 reference. torch_out may hold NaN where torch
    itself breaks down (fully masked rows); those elements are compared against ref as 0.
    dtype: the precision the computation ran in (default out.dtype; e.g. the gradient of a
    float32 mask added to bfloat16 scores is only bfloat16-accurate). interpreted: out came
    from the Triton interpreter."""
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = max_abs_err(out, ref)
    torch_err = max_abs_err(torch.nan_to_num(torch_out, nan=0.0), ref)
    base = INTERPRETED_BF16_FLOOR if interpreted and dtype == torch.bfloat16 else FLOOR[dtype]
    floor = ulps * base * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    bound = RATIO * torch_err + floor
    assert err <= bound, (f"{what}: max error {err:.3g} > bound {bound:.3g} "
                          f"({RATIO}x PyTorch's {torch_err:.3g} + {floor:.3g}), dtype {dtype}")

# Quantized linears: signal-to-quantization-noise ratio (dB) of a layer's output against the
# unquantized float32 layer, on Gaussian weights and activations (fastattn.quant_formats.sqnr_db).
# Expected from the step sizes: int8 per-channel over K = 512 Gaussians, max ~3.3 sigma ->
# ~42 dB; W8A8 adds the same noise on the activations -> ~39 dB; int4 groups of 128 (range
# ~5 sigma over 15 steps) -> ~20 dB, smaller groups a little better.
SQNR_DB = {"int8": 35.0, "w8a8": 30.0, ("int4", 32): 20.0, ("int4", 64): 19.0,
           ("int4", 128): 18.0}


def sqnr_threshold(fmt: str, group_size: int | None = None, layers_in_series: int = 1) -> float:
    """SQNR_DB for one layer; `layers_in_series` quantized layers add about equal, independent
    noise powers, so the bar drops by 10 log10(layers) dB (2 layers: 3 dB)."""
    import math
    one = SQNR_DB[(fmt, group_size)] if fmt == "int4" else SQNR_DB[fmt]
    return one - 10 * math.log10(layers_in_series)
