"""Packing: right-padded (B, L) batches <-> packed (T, ...) tokens with cu_seqlens.

Every model runs on packed tokens: padding never enters attention (fastattn.attention's
cu_seqlens keep sequences apart), so no mask is built and pads cost nothing.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Packing:
    """Where the T real tokens of a right-padded (B, L) batch live.

    lengths: host list of B sequence lengths; cu: int32 (B + 1,) prefix sums; max_len: the
    longest; positions: long (T,) position of each token in its sequence; index: long (T,)
    flat index of each token in the (B * L) padded layout; decode: one new token per sequence
    whose positions continue KV caches (positions = the caches' lengths); end: one past the
    largest position (host int, so bounds checks need no device sync)."""

    lengths: list[int]
    cu: torch.Tensor
    max_len: int
    positions: torch.Tensor
    index: torch.Tensor | None
    L: int
    decode: bool = False
    end: int = 0

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return int(self.cu[-1]) if self.index is None else self.index.numel()

    @classmethod
    def from_lengths(cls, lengths, L: int, device) -> Packing:
        """A right-padded (B, L) batch whose sequence b holds lengths[b] tokens."""
        lengths = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
        if any(not 0 <= n <= L for n in lengths):
            raise ValueError(f"Packing: lengths must be in [0, {L}], got {lengths}")
        B = len(lengths)
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
        if all(n == L for n in lengths):  # dense: packing is a reshape
            index = None
            positions = torch.arange(L, device=device).repeat(B)
        else:
            keep = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
            index = keep.reshape(-1).nonzero().squeeze(1).to(device)
            positions = index % L
        longest = max(lengths, default=0)
        return cls(lengths, cu.to(device), longest, positions, index, L, end=longest)

    @classmethod
    def for_decode(cls, past_lengths: list[int], device) -> Packing:
        """One new token per sequence, at positions past_lengths."""
        B = len(past_lengths)
        return cls([1] * B, torch.arange(B + 1, dtype=torch.int32, device=device), 1,
                   torch.tensor(past_lengths, dtype=torch.long, device=device), None, 1,
                   decode=True, end=max(past_lengths, default=-1) + 1)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (T, ...)."""
        flat = x.reshape(self.batch_size * self.L, *x.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, L, ...), zeros at the padding."""
        if self.index is not None:
            x = x.new_zeros(self.batch_size * self.L, *x.shape[1:]).index_copy(0, self.index, x)
        return x.reshape(self.batch_size, self.L, *x.shape[1:])

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, ...): each sequence's last token (sequences must be non-empty)."""
        return x.index_select(0, (self.cu[1:] - 1).long())


def lengths_of(input_ids: torch.Tensor, lengths=None) -> list[int]:
    """lengths as a host list (default: every sequence fills the L columns)."""
    B, L = input_ids.shape
    if lengths is None:
        return [L] * B
    out = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if len(out) != B:
        raise ValueError(f"lengths must have one entry per sequence ({B}), got {len(out)}")
    return out
