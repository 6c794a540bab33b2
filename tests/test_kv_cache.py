"""fastattn.KVCache / PagedKVCache: a ragged prompt then token-by-token decoding gives full
attention over each sequence's history at every step (both caches, every backend here);
paged == contiguous; pages come from and return to the pool; reorder() for beam search shares
pages and copies on write; overflows raise."""

import pytest
import torch

import fastattn
from conftest import backend_params

B, HQ, HKV, E = 3, 4, 2, 16


def _caches(dtype, device):
    return [fastattn.KVCache(B, 64, HKV, E, dtype=dtype, device=device),
            fastattn.PagedKVCache(40, 8, HKV, E, batch_size=B, max_pages_per_seq=8, dtype=dtype,
                                  device=device)]


def _expected(q, ks, vs):
    """Full attention of each sequence's last query over its whole history (float64)."""
    out = []
    for b in range(len(ks)):
        out.append(fastattn.reference.attention(q[b:b + 1].double(), ks[b][None].double(),
                                                vs[b][None].double(), causal=True)[0])
    return torch.stack(out)


@pytest.mark.parametrize("backend, device", [p.values for p in backend_params()
                                             if p.values[0] != "cuda"])
def test_prompt_then_decode_equals_full_attention(backend, device):
    dtype = torch.float32
    prompt = [5, 1, 11]
    ks = [torch.randn(n, HKV, E, device=device) for n in prompt]
    vs = [torch.randn(n, HKV, E, device=device) for n in prompt]
    caches = _caches(dtype, device)
    k_pad = torch.zeros(B, max(prompt), HKV, E, device=device)
    v_pad = torch.zeros_like(k_pad)
    for b, n in enumerate(prompt):
        k_pad[b, :n], v_pad[b, :n] = ks[b], vs[b]
    for cache in caches:
        cache.append(k_pad, v_pad, lengths=prompt)
        assert cache.lengths == prompt
    for step in range(12 if backend != "triton" else 3):
        q = torch.randn(B, 1, HQ, E, device=device)
        k_new, v_new = torch.randn(B, 1, HKV, E, device=device), torch.randn(B, 1, HKV, E,
                                                                             device=device)
        ks = [torch.cat([k, k_new[b]]) for b, k in enumerate(ks)]
        vs = [torch.cat([v, v_new[b]]) for b, v in enumerate(vs)]
        want = _expected(q, ks, vs)
        outs = [c.attend(q, k_new, v_new, backend=backend) for c in caches]
        for cache, out in zip(caches, outs):
            err = (out.double() - want).abs().max().item()
            assert err < 1e-5, f"{type(cache).__name__} step {step}: error {err}"
            assert torch.equal(cache.seqlens.cpu(), torch.tensor([len(k) for k in ks],
                                                                 dtype=torch.int32))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    for cache in caches:
        for b in range(B):
            k, v = cache.gather(b)
            assert torch.equal(k, ks[b]) and torch.equal(v, vs[b])


def test_paged_pool_allocation_and_free():
    cache = fastattn.PagedKVCache(6, 4, HKV, E, batch_size=2, max_pages_per_seq=3)
    cache.append(torch.randn(2, 5, HKV, E), torch.randn(2, 5, HKV, E), lengths=[5, 2])
    # 5 and 2 real tokens: 2 pages and 1 (the page holding only padding went back)
    assert cache.free_pages == 3
    cache.free(0)
    assert cache.free_pages == 5 and cache.lengths == [0, 2]
    cache.reset()
    assert cache.free_pages == 6
    with pytest.raises(ValueError, match="more than max_pages_per_seq"):
        cache.append(torch.randn(2, 13, HKV, E), torch.randn(2, 13, HKV, E))
    small = fastattn.PagedKVCache(2, 4, HKV, E, batch_size=2, max_pages_per_seq=3)
    with pytest.raises(RuntimeError, match="all 2 pages are in use"):
        small.append(torch.randn(2, 5, HKV, E), torch.randn(2, 5, HKV, E))


def test_contiguous_overflow_raises():
    cache = fastattn.KVCache(2, 4, HKV, E)
    cache.append(torch.randn(2, 3, HKV, E), torch.randn(2, 3, HKV, E))
    with pytest.raises(ValueError, match="needs 5 slots but the cache holds 4"):
        cache.attend(torch.randn(2, 1, HQ, E), torch.randn(2, 2, HKV, E),
                     torch.randn(2, 2, HKV, E))
    assert cache.lengths == [3, 3]


@pytest.mark.parametrize("paged", [False, True])
def test_reorder_for_beam_search(paged):
    if paged:
        cache = fastattn.PagedKVCache(16, 4, HKV, E, batch_size=2, max_pages_per_seq=4)
    else:
        cache = fastattn.KVCache(2, 16, HKV, E)
    cache.append(torch.randn(2, 6, HKV, E), torch.randn(2, 6, HKV, E), lengths=[6, 3])
    old = [cache.gather(b) for b in range(2)]
    cache.reorder([1, 1, 0])  # three beams: two continue sequence 1
    assert cache.lengths == [3, 3, 6]
    for b, src in enumerate([1, 1, 0]):
        assert all(torch.equal(a, o) for a, o in zip(cache.gather(b), old[src]))
    if paged:
        assert cache.free_pages == 16 - 3  # beams 0 and 1 share sequence 1's page
    k_new = torch.randn(3, 1, HKV, E)
    cache.attend(torch.randn(3, 1, HQ, E), k_new, k_new.clone())
    for b, src in enumerate([1, 1, 0]):
        k, _ = cache.gather(b)
        assert torch.equal(k[:-1], old[src][0]) and torch.equal(k[-1], k_new[b, 0])
    if paged:
        assert cache.free_pages == 16 - 4  # one beam copied the shared page before writing
