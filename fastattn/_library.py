"""Loads the compiled operator library fastattn._C (its TORCH_LIBRARY registrations define the
schemas of every fastattn op and the CPU/CUDA kernels)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def load_error() -> str | None:
    """None once fastattn._C is loaded, else why it could not be."""
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return (f"fastattn._C is not built or does not load ({e}); build it with "
                "`pip install --no-build-isolation -e .`")
    return None


@torch.compiler.assume_constant_result  # fixed once _C is loaded; torch.compile folds it
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastattn::<op> has a kernel registered for `dispatch_key` ("CPU", "CUDA")."""
    return load_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastattn::{op}", dispatch_key)
