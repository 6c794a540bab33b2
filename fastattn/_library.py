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


_has_kernel: dict[tuple[str, str], bool] = {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastattn::<op> has a kernel registered for `dispatch_key` ("CPU", "CUDA").
    Op modules call it for their keys at import, so inside torch.compile it is a lookup in a
    filled dict (the registry query itself would break the graph)."""
    key = (op, dispatch_key)
    if key not in _has_kernel:
        try:
            _has_kernel[key] = load_error() is None and \
                torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", dispatch_key)
        except RuntimeError:  # a fastattn._C built before this op existed: no such schema
            _has_kernel[key] = False
    return _has_kernel[key]


def call_without_autograd(op, *args):
    """op(*args) dispatched below the autograd layer. The autograd kernels that
    torch.library.register_autograd installs run in Python (about 4 us a call); callers use this
    when no input needs a gradient. Inside torch.compile the plain call is traced instead."""
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
