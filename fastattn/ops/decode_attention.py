"""fastattn.decode_attention: attention of a few new tokens per sequence against a KV cache,
contiguous (B, S_max, Hkv, E) or paged (pages, page_size, Hkv, E) through a block table, with
the new keys/values appended in place first. Forward only.

Operators (schema and contract: kernels/registration.cpp, kernels/include/fastattn/
attention_args.h DecodeArgs): fastattn::decode_attention (CPU and CUDA, C++) and
fastattn::decode_attention_triton. Both split the cache into chunks processed in parallel
("flash-decoding") and combine them with a deterministic reduction, so a batch of one still
fills the machine.
"""

from __future__ import annotations

import math

import torch

from .. import _library, backends, reference
from .attention import _check_alibi, _number, _window
from ._quant import InferenceOnlyError

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128, 256)  # E == Ev; others run on Triton
TRITON_MAX_HEAD_DIM = 256


def _err(msg: str) -> str:
    return f"fastattn.decode_attention: {msg}"


# ---- operator registrations -------------------------------------------------------------------

def _fake_decode(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scale,
                 window_left, window_right, softcap, max_seqlen, num_splits):
    B, Lq, Hq, _ = q.shape
    return (q.new_empty((B, Lq, Hq, v_cache.shape[3])),  # out (B, Lq, Hq, Ev)
            q.new_empty((B, Hq, Lq), dtype=torch.float32))  # lse (B, Hq, Lq)


def _no_backward(ctx, *grads):
    raise InferenceOnlyError(
        "fastattn.decode_attention is forward-only (inference with a KV cache); train with "
        "fastattn.attention, or run generation under torch.no_grad() / torch.inference_mode()")


def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])


for _key in ("CPU", "CUDA"):
    _library.has_kernel("decode_attention", _key)
if any(_library.has_kernel("decode_attention", key) for key in ("CPU", "CUDA")):
    torch.library.register_fake("fastattn::decode_attention")(_fake_decode)
    torch.library.register_autograd("fastattn::decode_attention", _no_backward,
                                    setup_context=_setup)

_triton_op = None


def _triton_decode():
    """fastattn::decode_attention_triton, imported (and Triton with it) on first use."""
    global _triton_op
    if _triton_op is None:
        from .._triton import decode as kernels

        torch.library.register_autograd("fastattn::decode_attention_triton", _no_backward,
                                        setup_context=_setup)
        _triton_op = kernels.decode_attention_triton
    return _triton_op


# ---- checks -------------------------------------------------------------------------------------

def _check_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(_err(f"{name} must be a floating torch.Tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}"))
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(_err(f"k_cache and v_cache must have q's dtype {q.dtype}, got "
                             f"{k_cache.dtype} and {v_cache.dtype}"))
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(_err(f"q must be (B, Lq, Hq, E) and the caches 4-d (B, S_max, Hkv, E) "
                              f"or (pages, page_size, Hkv, E), got {tuple(q.shape)}, "
                              f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(_err(f"{name} is on {t.device} but q is on {q.device}"))
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != q.shape[3]:
        raise ValueError(_err(f"k_cache {tuple(k_cache.shape)} and v_cache "
                              f"{tuple(v_cache.shape)} must agree but in the last dim, and "
                              f"k_cache's head dim must be q's {q.shape[3]}"))
    B, Hq, Hkv = q.shape[0], q.shape[2], k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(_err(f"q's heads ({Hq}) must be a multiple of the cache's ({Hkv})"))
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (
            torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
        raise TypeError(_err(f"cache_seqlens must be an int32 tensor of shape (B,) = ({B},), "
                             f"got {getattr(cache_seqlens, 'dtype', type(cache_seqlens))} "
                             f"{tuple(getattr(cache_seqlens, 'shape', ()))}"))
    if (k_new is None) != (v_new is None):
        raise ValueError(_err("pass both k_new and v_new, or neither"))
    if k_new is not None:
        want_k = (B, k_new.shape[1] if k_new.dim() == 4 else -1, Hkv, q.shape[3])
        if k_new.dim() != 4 or tuple(k_new.shape) != want_k or v_new.dim() != 4 or \
                tuple(v_new.shape) != want_k[:3] + (v_cache.shape[3],):
            raise ValueError(_err(f"k_new / v_new must be (B, n, Hkv, E|Ev) = ({B}, n, {Hkv}, "
                                  f"{q.shape[3]}|{v_cache.shape[3]}), got "
                                  f"{tuple(k_new.shape)} and {tuple(v_new.shape)}"))
        if k_new.dtype != q.dtype or v_new.dtype != q.dtype or k_new.device != q.device or \
                v_new.device != q.device:
            raise ValueError(_err("k_new and v_new must have q's dtype and device"))
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(_err(f"a contiguous cache (no block_table) must be (B, S_max, Hkv, "
                                  f"E) with B = {B}, got {tuple(k_cache.shape)}"))
    elif not isinstance(block_table, torch.Tensor) or block_table.dtype not in (
            torch.int32, torch.int64) or block_table.dim() != 2 or block_table.shape[0] != B \
            or block_table.device != q.device:
        raise ValueError(_err(f"block_table must be an int32 tensor (B, max_pages) with B = {B} "
                              f"on q's device, got {getattr(block_table, 'dtype', None)} "
                              f"{tuple(getattr(block_table, 'shape', ()))}"))


def capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Tokens one sequence can hold: S_max, or max_pages * page_size for a paged cache."""
    return k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])


def check_lengths(lengths: list[int], n_new: int, cap: int) -> int:
    """Raises unless every sequence fits: 0 <= length and length + n_new <= cap. Returns the
    longest after the append. lengths: host ints (fastattn.KVCache tracks them, so it needs
    no device sync)."""
    for b, n in enumerate(lengths):
        if n < 0 or n + n_new > cap:
            raise ValueError(_err(f"sequence {b} holds {n} tokens; appending {n_new} needs "
                                  f"{n + n_new} slots but the cache holds {cap} per sequence"))
    return max((n + n_new for n in lengths), default=0)


def check_block_table(lengths: list[int], k_cache: torch.Tensor,
                      block_table: torch.Tensor) -> None:
    """Raises unless the pages holding each sequence's first lengths[b] tokens are valid
    indices into the page pool."""
    if not lengths:
        return
    page = k_cache.shape[1]
    needed = torch.tensor([-(-n // page) for n in lengths], device=block_table.device)
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < \
        needed[:, None]
    bad = used & ((block_table < 0) | (block_table >= k_cache.shape[0]))
    if bad.any():
        b, p = (int(x) for x in bad.nonzero()[0])
        raise ValueError(_err(f"block_table[{b}, {p}] = {int(block_table[b, p])} is not a "
                              f"page index in [0, {k_cache.shape[0]})"))


def append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None) -> None:
    """Writes k_new/v_new (B, n, Hkv, E|Ev) into the caches at positions cache_seqlens[b] ..
    + n - 1 of each sequence, in place (one scatter per cache). Arguments already checked."""
    B, n = k_new.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(n, device=k_new.device)  # (B, n)
    if block_table is None:
        rows = torch.arange(B, device=k_new.device)[:, None].expand(B, n)
        k_cache[rows, pos] = k_new
        v_cache[rows, pos] = v_new
    else:
        page = k_cache.shape[1]
        pages = block_table.long().gather(1, pos // page)  # (B, n)
        k_cache[pages, pos % page] = k_new
        v_cache[pages, pos % page] = v_new


# ---- backend choice and the call ------------------------------------------------------------

def _unsupported(name: str, q: torch.Tensor, Ev: int) -> str | None:
    reason = backends.device_error(name, "decode_attention", q.device, q.dtype)
    if reason is not None or name == "reference":
        return reason
    E = q.shape[-1]
    if name == "cuda" and (q.dtype not in CUDA_DTYPES or E != Ev or E not in CUDA_HEAD_DIMS):
        return (f"the CUDA decode kernel takes float16/bfloat16 with E == Ev in "
                f"{CUDA_HEAD_DIMS}, got {q.dtype}, E={E}, Ev={Ev}")
    if name == "triton" and max(E, Ev) > TRITON_MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {E}, {Ev}"
    return None


def choose(q: torch.Tensor, Ev: int, backend: str | None) -> backends.Choice:
    return backends.choose("decode_attention", backend, q.device,
                           lambda name: _unsupported(name, q, Ev), (q.dtype, q.shape[-1], Ev))


def run(choice, q, k_cache, v_cache, seqlens, block_table, slopes, scale, window, softcap,
        max_seqlen, num_splits, causal=True):
    """The decode operator on checked arguments; seqlens (int32, B) include the query tokens.
    Returns (out (B, Lq, Hq, Ev), lse (B, Hq, Lq) or None on the reference backend)."""
    left, right = window
    if causal:
        right = 0
    if choice.backend == "reference":
        out = reference.decode_attention(q, k_cache, v_cache, seqlens, block_table=block_table,
                                         scale=scale, alibi_slopes=slopes, window=(left, right),
                                         softcap=softcap or None, causal=False)
        return out, None
    op = _triton_decode() if choice.backend == "triton" else \
        torch.ops.fastattn.decode_attention.default
    bt = None if block_table is None else block_table.to(torch.int32)
    args = (q, k_cache, v_cache, seqlens.to(torch.int32), bt, slopes, scale, left, right,
            softcap, max_seqlen, num_splits)
    if torch.is_grad_enabled() and q.requires_grad:
        return op(*args)
    return _library.call_without_autograd(op, *args)


def _plan(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, block_table=None,
          scale=None, alibi_slopes=None, window=None, softcap=None, causal=True, num_splits=0,
          backend=None, **_):
    _check_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
    left_right = _window(window, False)
    cap = _number("softcap", softcap, 0.0, low=0.0)
    E = q.shape[-1]
    sc = _number("scale", scale, 1.0 / math.sqrt(E) if E else 1.0, low=-math.inf)
    slopes = _check_alibi(alibi_slopes, q, q.shape[0], "decode_attention")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(_err(f"num_splits must be an int >= 0 (0: automatic), got "
                              f"{num_splits!r}"))
    choice = choose(q, v_cache.shape[-1], backend)
    return choice, (left_right, cap, sc, slopes)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, *, k_new: torch.Tensor | None = None,
                     v_new: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                     scale: float | None = None, alibi_slopes: torch.Tensor | None = None,
                     window: tuple[int, int] | None = None, softcap: float | None = None,
                     causal: bool = True, num_splits: int = 0, return_lse: bool = False,
                     backend: str | None = None):
    """Attention of the newest tokens of each sequence against its KV cache.

    Args:
      q: (B, Lq, Hq, E), the queries of the last Lq tokens of each sequence (Lq = 1 for
        token-by-token decoding; a few for speculative decoding or chunked prefill).
      k_cache, v_cache: contiguous (B, S_max, Hkv, E|Ev), or paged (pages, page_size, Hkv,
        E|Ev) with block_table int32 (B, max_pages): token t of sequence b is in page
        block_table[b, t // page_size], slot t % page_size. Hkv divides Hq (GQA).
      cache_seqlens: int32 (B,): tokens already in each sequence's cache. Not modified.
      k_new, v_new: (B, n, Hkv, E|Ev) written into the caches at cache_seqlens[b] onwards (in
        place) before attending; the sequences then hold cache_seqlens + n tokens. Without
        them the cache must already hold the query tokens.
      causal: query i (at position len_b - Lq + i) sees tokens up to its own position; with
        causal=False all len_b tokens. window (left, right) as fastattn.attention, relative
        to the query's position; alibi_slopes (Hq,) or (B, Hq); softcap as fastattn.attention.
      num_splits: chunks of the cache processed in parallel per (sequence, kv head); 0 picks
        from the machine's parallelism.
      return_lse: also return the log-sum-exp (B, Hq, Lq) float32 (not on the reference
        backend).
      The lengths are checked on the host (one device sync on a GPU; fastattn.KVCache avoids it
      by tracking them): a sequence that would overflow its capacity, or a block_table entry
      outside [0, pages) that the append or the attention would touch, raises ValueError
      before anything is written.

    Returns:
      out (B, Lq, Hq, Ev) in q's dtype (and lse when return_lse). Forward only: asking for a
      gradient raises InferenceOnlyError.
    """
    choice, (window, cap, sc, slopes) = _plan(
        q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, block_table=block_table,
        scale=scale, alibi_slopes=alibi_slopes, window=window, softcap=softcap,
        num_splits=num_splits, backend=backend)
    n_new = 0 if k_new is None else k_new.shape[1]
    lengths = cache_seqlens.tolist()
    max_len = check_lengths(lengths, n_new, capacity(k_cache, block_table))
    if block_table is not None:
        check_block_table([n + n_new for n in lengths], k_cache, block_table)
    if k_new is not None:
        append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    seqlens = (cache_seqlens + n_new).to(torch.int32)
    out, lse = run(choice, q, k_cache, v_cache, seqlens, block_table, slopes, sc, window, cap,
                   max_len, num_splits, causal)
    if not return_lse:
        return out
    if lse is None:
        raise ValueError(_err("return_lse is not available on the reference backend"))
    return out, lse


backends.register_planner("decode_attention", lambda *a, **kw: _plan(*a, **kw)[0])
