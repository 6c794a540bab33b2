"""KV caches for generation: plain tensors plus the host-side bookkeeping that spares
fastattn.decode_attention its device sync. One object per attention layer; no global state.

    cache = fastattn.KVCache(batch_size=4, max_seqlen=2048, num_kv_heads=8, head_dim=128,
                             dtype=torch.bfloat16, device="cuda")
    cache.append(k_prompt, v_prompt, lengths=prompt_lengths)   # after the prefill's attention
    out = cache.attend(q, k_new, v_new)                         # each decode step

PagedKVCache keeps the same interface over a pool of fixed-size pages handed out on demand,
so sequences of very different lengths share memory; reorder() (beam search) shares pages
between beams and copies a page only when a beam writes into a shared one (copy-on-write).
"""

from __future__ import annotations

import torch

from . import reference
from .ops.decode_attention import _plan as _plan_decode
from .ops.decode_attention import append_kv, check_lengths
from .ops.decode_attention import run as _run_decode


class _CacheBase:
    """What both caches share: the lengths (host list and int32 device tensor) and the
    append / attend / gather steps. Subclasses provide k, v, block_table, capacity and
    _reserve(n) (make room for n more tokens in every sequence)."""

    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor | None

    def _init_lengths(self, batch_size: int, device) -> None:
        self.lengths = [0] * batch_size  # host mirror of seqlens
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)  # (B,)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def _set_lengths(self, lengths: list[int]) -> None:
        self.lengths = list(lengths)
        self.seqlens = torch.tensor(self.lengths, dtype=torch.int32, device=self.k.device)

    def _check_new(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        want = (self.batch_size, k_new.shape[1] if k_new.dim() == 4 else -1, self.k.shape[2])
        if k_new.dim() != 4 or v_new.dim() != 4 or tuple(k_new.shape[:3]) != want or \
                tuple(v_new.shape[:3]) != want or k_new.shape[3] != self.k.shape[3] or \
                v_new.shape[3] != self.v.shape[3]:
            raise ValueError(f"{type(self).__name__}: new keys/values must be (B, n, Hkv, E|Ev) "
                             f"= ({want[0]}, n, {want[2]}, {self.k.shape[3]}|"
                             f"{self.v.shape[3]}), got {tuple(k_new.shape)} and "
                             f"{tuple(v_new.shape)}")

    def _write(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Room for n tokens per sequence, then the scatter at the current lengths."""
        self._check_new(k_new, v_new)
        self._reserve(k_new.shape[1])
        check_lengths(self.lengths, k_new.shape[1], self.capacity)
        append_kv(self.k, self.v, k_new.to(self.k.dtype), v_new.to(self.v.dtype),
                          self.seqlens, self.block_table)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor,
               lengths: list[int] | None = None) -> None:
        """Appends k_new/v_new (B, n, Hkv, E|Ev) to every sequence (e.g. a prompt after its
        prefill attention). lengths: how many of the n tokens are real per sequence (right
        padding): the rest are written but not counted, and the next append overwrites them."""
        n = k_new.shape[1] if k_new.dim() == 4 else 0
        counts = [n] * self.batch_size if lengths is None else [int(x) for x in lengths]
        if len(counts) != self.batch_size or any(not 0 <= c <= n for c in counts):
            raise ValueError(f"{type(self).__name__}.append: lengths must be {self.batch_size} "
                             f"counts in [0, {n}], got {lengths}")
        self._write(k_new, v_new)
        self._set_lengths([a + c for a, c in zip(self.lengths, counts)])

    def attend(self, q: torch.Tensor, k_new: torch.Tensor | None = None,
               v_new: torch.Tensor | None = None, *, causal: bool = True, scale=None,
               alibi_slopes=None, window=None, softcap=None, num_splits: int = 0,
               backend: str | None = None) -> torch.Tensor:
        """Appends k_new/v_new (B, n, Hkv, E|Ev) if given, then fastattn.decode_attention of
        q (B, Lq, Hq, E) (the last Lq tokens) against the cache, without a device sync.
        Returns (B, Lq, Hq, Ev)."""
        choice, (window, cap, sc, slopes) = _plan_decode(
            q, self.k, self.v, self.seqlens, k_new=k_new, v_new=v_new,
            block_table=self.block_table, scale=scale, alibi_slopes=alibi_slopes, window=window,
            softcap=softcap, num_splits=num_splits, backend=backend)
        if k_new is not None:
            self._write(k_new, v_new)
            n_new = k_new.shape[1]
            self.lengths = [n + n_new for n in self.lengths]
            self.seqlens = self.seqlens + n_new  # on the device: no host-to-device copy per step
        out, _ = _run_decode(choice, q, self.k, self.v, self.seqlens, self.block_table, slopes,
                             sc, window, cap, max(self.lengths, default=0), num_splits, causal)
        return out

    def gather(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence b's keys and values, (len_b, Hkv, E) and (len_b, Hkv, Ev) (copies)."""
        n = self.lengths[b]
        return (reference.gather_kv_cache(self.k, n, b, self.block_table),
                reference.gather_kv_cache(self.v, n, b, self.block_table))


class KVCache(_CacheBase):
    """Contiguous cache of one attention layer: k (B, S_max, Hkv, E), v (B, S_max, Hkv, Ev),
    seqlens int32 (B,) on the device (and `lengths`, the same on the host)."""

    block_table = None

    def __init__(self, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int,
                 head_dim_v: int | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        ev = head_dim if head_dim_v is None else head_dim_v
        self.k = torch.zeros(batch_size, max_seqlen, num_kv_heads, head_dim, dtype=dtype,
                             device=device)
        self.v = torch.zeros(batch_size, max_seqlen, num_kv_heads, ev, dtype=dtype,
                             device=device)
        self._init_lengths(batch_size, self.k.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def _reserve(self, n: int) -> None:
        pass  # check_lengths reports an overflow

    def reorder(self, index: torch.Tensor | list[int]) -> None:
        """Beam search: sequence i becomes old sequence index[i] (the batch may change size)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.k.device)
        self.k = self.k.index_select(0, idx)
        self.v = self.v.index_select(0, idx)
        self._set_lengths([self.lengths[i] for i in idx.tolist()])

    def reset(self) -> None:
        """Empties every sequence (the memory is kept)."""
        self._set_lengths([0] * self.batch_size)


class PagedKVCache(_CacheBase):
    """Paged cache of one attention layer: a pool k (num_pages, page_size, Hkv, E),
    v (num_pages, page_size, Hkv, Ev) and block_table int32 (B, max_pages_per_seq) mapping
    each sequence's i-th page to a pool page. Pages are taken from a free list as sequences
    grow and returned by free(b) / reset(); pages shared after reorder() are reference-counted
    and copied before a write (copy-on-write)."""

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 head_dim_v: int | None = None, *, batch_size: int, max_pages_per_seq: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        ev = head_dim if head_dim_v is None else head_dim_v
        self.k = torch.zeros(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype,
                             device=device)
        self.v = torch.zeros(num_pages, page_size, num_kv_heads, ev, dtype=dtype, device=device)
        self.max_pages = max_pages_per_seq
        self._pages: list[list[int]] = [[] for _ in range(batch_size)]
        self._refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._init_lengths(batch_size, self.k.device)
        self._sync_table()

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.max_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def _sync_table(self) -> None:
        rows = [p + [0] * (self.max_pages - len(p)) for p in self._pages]
        self.block_table = torch.tensor(rows, dtype=torch.int32,
                                        device=self.k.device).reshape(len(rows), self.max_pages)

    def _take(self) -> int:
        if not self._free:
            raise RuntimeError(f"PagedKVCache: all {len(self._refs)} pages are in use; free "
                               f"finished sequences (free(b)) or allocate more pages")
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    def _reserve(self, n: int) -> None:
        changed = False
        for b, pages in enumerate(self._pages):
            end = self.lengths[b] + n
            if end > self.capacity:
                raise ValueError(f"PagedKVCache: sequence {b} would hold {end} tokens, more than "
                                 f"max_pages_per_seq * page_size = {self.capacity}")
            first = self.lengths[b] // self.page_size  # the page the append starts in
            for i in range(first, min(len(pages), -(-end // self.page_size))):
                if self._refs[pages[i]] > 1:  # shared with another beam: copy before writing
                    new = self._take()
                    self.k[new].copy_(self.k[pages[i]])
                    self.v[new].copy_(self.v[pages[i]])
                    self._release(pages[i])
                    pages[i] = new
                    changed = True
            while len(pages) * self.page_size < end:
                pages.append(self._take())
                changed = True
        if changed:
            self._sync_table()

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor,
               lengths: list[int] | None = None) -> None:
        """As KVCache.append; pages that hold only padding past `lengths` go back to the pool."""
        super().append(k_new, v_new, lengths)
        changed = False
        for b, pages in enumerate(self._pages):
            keep = -(-self.lengths[b] // self.page_size)
            while len(pages) > keep:
                self._release(pages.pop())
                changed = True
        if changed:
            self._sync_table()

    def reorder(self, index: torch.Tensor | list[int]) -> None:
        """Beam search: sequence i becomes old sequence index[i]; pages are shared, not
        copied, until one of the sharers writes into them."""
        idx = [int(i) for i in torch.as_tensor(index).tolist()]
        new_pages = [list(self._pages[i]) for i in idx]
        for pages in new_pages:
            for p in pages:
                self._refs[p] += 1
        for pages in self._pages:
            for p in pages:
                self._release(p)
        self._pages = new_pages
        self._set_lengths([self.lengths[i] for i in idx])
        self._sync_table()

    def free(self, b: int) -> None:
        """Returns sequence b's pages to the pool and empties it."""
        for p in self._pages[b]:
            self._release(p)
        self._pages[b] = []
        lengths = list(self.lengths)
        lengths[b] = 0
        self._set_lengths(lengths)
        self._sync_table()

    def reset(self) -> None:
        """Empties every sequence and returns all pages."""
        for b in range(self.batch_size):
            for p in self._pages[b]:
                self._release(p)
            self._pages[b] = []
        self._set_lengths([0] * self.batch_size)
        self._sync_table()
