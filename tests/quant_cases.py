"""Shared by the quantized-linear tests: the raw operator of each backend, and random inputs in
the packed formats (arbitrary codes, scales and zero points, so the kernels are checked on
every bit pattern rather than only on what the quantizers produce)."""

import importlib

import pytest
import torch

import fastattn

OPS = ("int8_weight_linear", "int4_weight_linear", "quantize_per_token_int8", "int8_scaled_mm")
TRITON_MODULES = ("int8_linear", "int4_linear", "w8a8")  # kernels/triton/<name>.py
GROUP_SIZES = (32, 64, 128)


def raw_op(backend: str, name: str):
    """The operator a backend runs: fastattn::<name> (CPU/CUDA keys) or fastattn::<name>_triton."""
    if backend == "triton":
        for module in TRITON_MODULES:
            importlib.import_module(f"fastattn._triton.{module}")
        return getattr(torch.ops.fastattn, f"{name}_triton")
    key = {"cpu": "CPU", "cuda": "CUDA"}[backend]
    assert fastattn._library.has_kernel(name, key), f"fastattn::{name} has no {key} kernel"
    return getattr(torch.ops.fastattn, name)


def device_of(backend: str, device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return device


def activation(M: int, K: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(M, K) activations with a few outlier columns (as real LLM activations have)."""
    x = torch.randn(M, K, device=device)
    if K >= 8:
        x[:, torch.randperm(K)[: max(1, K // 32)]] *= 8
    return x.to(dtype)


def int8_weight(N: int, K: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight int8 (N, K) in [-127, 127], scale float32 (N,) > 0)."""
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    scale = torch.rand(N, device=device) * 0.02 + 1e-3
    return w, scale


def int4_weight(N: int, K: int, group_size: int, device: str):
    """(packed uint8 (N, K/2), scale float32 (N, K/G), zero uint8 (N, K/G) in [0, 15])."""
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device)
    scale = torch.rand(N, K // group_size, device=device) * 0.02 + 1e-3
    zero = torch.randint(0, 16, (N, K // group_size), dtype=torch.uint8, device=device)
    return packed, scale, zero


def bias_of(N: int, dtype: torch.dtype, device: str, with_bias: bool) -> torch.Tensor | None:
    return torch.randn(N, device=device).to(dtype) if with_bias else None
