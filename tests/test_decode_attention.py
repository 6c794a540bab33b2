"""fastattn.decode_attention on every backend that runs here: against full attention over
each sequence's whole history in float64 (within 2x of eager PyTorch's error in the same
dtype), contiguous == paged (randomly permuted pages) == full, the in-place append, split
counts, window / ALiBi / softcap, GQA, Lq > 1; bad arguments raise before anything is
written; forward only."""

import pytest
import torch

import fastattn
from conftest import backend_params
from fastattn.ops._quant import InferenceOnlyError
from tolerances import assert_within_torch_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _interp(backend, device):
    return backend == "triton" and device == "cpu"


def _params(cases):
    out = []
    for p in backend_params():
        backend, device = p.values
        dtypes = ([torch.float32, torch.float16] if _interp(backend, device) else
                  [torch.float16, torch.bfloat16] if backend == "cuda" else DTYPES)
        for case in cases(backend, device):
            for dtype in dtypes:
                cid = "-".join(f"{k}{v}" for k, v in case.items())
                out.append(pytest.param(backend, device, case, dtype, marks=p.marks,
                                        id=f"{p.id}-{cid}-{str(dtype)[6:]}"))
    return out


def _cases(backend, device):
    if _interp(backend, device):
        return [dict(lens=(0, 5, 40), Lq=1, E=16, splits=3, page=16),
                dict(lens=(2, 33), Lq=3, E=16, splits=0, page=8, window=(9, 0), alibi=1,
                     softcap=5.0)]
    E = 64 if backend == "cuda" else 32
    return [dict(lens=(1, 37, 200), Lq=1, E=E, splits=0, page=16),
            dict(lens=(0, 1, 37, 200), Lq=1, E=E, splits=1, page=16),
            dict(lens=(5, 300), Lq=3, E=E, splits=4, page=32),
            dict(lens=(2, 130), Lq=3, E=E, splits=0, page=16, causal=False),
            dict(lens=(50, 129, 7), Lq=1, E=E, splits=5, page=16, window=(20, 0), alibi=1),
            dict(lens=(64, 100), Lq=2, E=E, splits=2, page=64, softcap=10.0, alibi=2),
            dict(lens=(1000,), Lq=1, E=128 if backend != "triton" else E, splits=0, page=128)]


def _history(case, dtype, device, Hq=4, Hkv=2):
    """Each sequence's whole history (len_b tokens, the last Lq of them the queries')."""
    E = case["E"]
    ks = [torch.randn(n, Hkv, E, device=device).to(dtype) for n in case["lens"]]
    vs = [torch.randn(n, Hkv, E, device=device).to(dtype) for n in case["lens"]]
    q = torch.randn(len(ks), case["Lq"], Hq, E, device=device).to(dtype)
    return q, ks, vs


def _contiguous(ks, vs, capacity, upto):
    """(B, capacity, H, E) caches holding the first upto[b] tokens (the rest random junk)."""
    B, H, E = len(ks), ks[0].shape[1], ks[0].shape[2]
    kc = torch.randn(B, capacity, H, E, device=ks[0].device).to(ks[0].dtype)
    vc = torch.randn(B, capacity, H, E, device=ks[0].device).to(ks[0].dtype)
    for b, n in enumerate(upto):
        kc[b, :n], vc[b, :n] = ks[b][:n], vs[b][:n]
    return kc, vc


def _paged(kc, vc, page, generator):
    """The same caches as randomly permuted pages, plus two spare pages: (P, page, H, E)."""
    B, cap = kc.shape[:2]
    per = cap // page
    perm = torch.randperm(B * per + 2, generator=generator)
    table = perm[:B * per].reshape(B, per).to(torch.int32).to(kc.device)
    kp = torch.randn(B * per + 2, page, *kc.shape[2:], device=kc.device).to(kc.dtype)
    vp = torch.randn_like(kp)
    kp[table.long()] = kc.reshape(B, per, page, *kc.shape[2:])
    vp[table.long()] = vc.reshape(B, per, page, *vc.shape[2:])
    return kp, vp, table


def _full(q, ks, vs, case, compute_dtype):
    """Full attention of each sequence's queries over its history (the reference)."""
    outs = []
    slopes = _slopes(case, q.shape[2], len(ks), q.device)
    for b in range(len(ks)):
        s = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b:b + 1])
        cast = (lambda t: t.double()) if compute_dtype == torch.float64 else (lambda t: t)
        outs.append(fastattn.reference.attention(
            cast(q[b:b + 1]), cast(ks[b])[None], cast(vs[b])[None],
            causal=case.get("causal", True), window=case.get("window"), alibi_slopes=s,
            softcap=case.get("softcap"), compute_dtype=compute_dtype)[0])
    return torch.stack(outs)


def _slopes(case, Hq, B, device):
    if not case.get("alibi"):
        return None
    s = torch.tensor([2.0 ** (-(h + 1)) for h in range(Hq)], device=device)
    return s if case["alibi"] == 1 else s[None] * torch.linspace(0.5, 2, B, device=device)[:, None]


@pytest.mark.parametrize("backend, device, case, dtype", _params(_cases))
def test_decode_matches_full_attention(backend, device, case, dtype):
    """Append the queries' own keys into a contiguous and a paged cache, attend: both equal
    full attention over the history, and the append wrote exactly those slots."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    q, ks, vs = _history(case, dtype, device)
    Lq, page = case["Lq"], case["page"]
    lens = case["lens"]
    capacity = page * (-(-max(lens) // page) + 1)
    before = [max(n - Lq, 0) for n in lens]
    new = [(ks[b][before[b]:], vs[b][before[b]:]) for b in range(len(lens))]
    kw = dict(window=case.get("window"), softcap=case.get("softcap"),
              alibi_slopes=_slopes(case, q.shape[2], len(lens), device),
              causal=case.get("causal", True), num_splits=case["splits"], backend=backend)
    kc, vc = _contiguous(ks, vs, capacity, lens)  # the cache already holds the queries' tokens
    kp, vp, table = _paged(kc, vc, page, gen)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    got_c = fastattn.decode_attention(q, kc, vc, seqlens, **kw)
    got_p = fastattn.decode_attention(q, kp, vp, seqlens, block_table=table, **kw)
    ref = _full(q, ks, vs, case, torch.float64)
    eager = _full(q, ks, vs, case, dtype)
    what = f"decode {backend} {dtype} {case}"
    interp = _interp(backend, device)
    assert_within_torch_error(got_c, ref, eager, what + " contiguous", interpreted=interp, ulps=2)
    assert_within_torch_error(got_p, ref, eager, what + " paged", interpreted=interp, ulps=2)
    torch.testing.assert_close(got_p, got_c, rtol=0, atol=2 * torch.finfo(dtype).eps)

    # the append path: caches holding `before` tokens, the queries' keys passed as k_new
    if all(lens[b] - before[b] == Lq for b in range(len(lens))):
        kc2, vc2 = _contiguous(ks, vs, capacity, before)
        untouched = kc2.clone()
        k_new = torch.stack([n[0] for n in new])
        v_new = torch.stack([n[1] for n in new])
        got_a = fastattn.decode_attention(q, kc2, vc2, torch.tensor(before, dtype=torch.int32,
                                                                    device=device),
                                          k_new=k_new, v_new=v_new, **kw)
        torch.testing.assert_close(got_a, got_c, rtol=0, atol=0)
        for b, n in enumerate(before):
            assert torch.equal(kc2[b, n:n + Lq], k_new[b]) and torch.equal(vc2[b, n:n + Lq],
                                                                           v_new[b])
            assert torch.equal(kc2[b, :n], untouched[b, :n])
            assert torch.equal(kc2[b, n + Lq:], untouched[b, n + Lq:])


def test_split_counts_agree():
    q, ks, vs = _history(dict(lens=(700, 33), Lq=1, E=32), torch.float32, "cpu")
    kc, vc = _contiguous(ks, vs, 704, (700, 33))
    lens = torch.tensor([700, 33], dtype=torch.int32)
    outs = [fastattn.decode_attention(q, kc, vc, lens, num_splits=s) for s in (1, 2, 7, 0)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def _small():
    q = torch.randn(2, 1, 4, 8)
    kc, vc = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)  # 6 pages of 4 tokens
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    return q, kc, vc, table


def test_overflowing_append_raises_and_writes_nothing():
    q, kc, vc, table = _small()
    before = kc.clone()
    k_new = torch.ones(2, 1, 2, 8)
    with pytest.raises(ValueError, match="needs 13 slots but the cache holds 12"):
        fastattn.decode_attention(q, kc, vc, torch.tensor([3, 12], dtype=torch.int32),
                                  k_new=k_new, v_new=k_new, block_table=table)
    assert torch.equal(kc, before)
    with pytest.raises(ValueError, match="holds -1 tokens"):
        fastattn.decode_attention(q, kc, vc, torch.tensor([-1, 0], dtype=torch.int32),
                                  block_table=table)


def test_block_table_out_of_range_raises_and_writes_nothing():
    q, kc, vc, table = _small()
    table[1, 1] = 6
    before = kc.clone()
    k_new = torch.ones(2, 1, 2, 8)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 6 is not a page index"):
        fastattn.decode_attention(q, kc, vc, torch.tensor([1, 4], dtype=torch.int32),
                                  k_new=k_new, v_new=k_new, block_table=table)
    assert torch.equal(kc, before)
    # the raw operator checks too (the C++ host code)
    with pytest.raises(RuntimeError, match="not a page index"):
        torch.ops.fastattn.decode_attention(q, kc, vc, torch.tensor([1, 6], dtype=torch.int32),
                                            table, None, 1.0, -1, 0, 0.0, 6, 0)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fastattn.decode_attention(q, kc, vc, torch.tensor([1, 9], dtype=torch.int32),
                                            table, None, 1.0, -1, 0, 0.0, 6, 0)


@pytest.mark.parametrize("change, match", [
    (dict(cache_seqlens=torch.tensor([1.0, 2.0])), "cache_seqlens must be an int32"),
    (dict(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), "shape \\(B,\\)"),
    (dict(k_cache=torch.zeros(6, 4, 3, 8)), "must agree|multiple"),
    (dict(block_table=torch.zeros(3, 3, dtype=torch.int32)), "block_table must be"),
    (dict(num_splits=-1), "num_splits"),
    (dict(window=(1, 2, 3)), "window"),
    (dict(k_new=torch.ones(2, 1, 2, 8)), "both k_new and v_new"),
])
def test_bad_arguments_raise(change, match):
    q, kc, vc, table = _small()
    kw = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=torch.tensor([1, 2], dtype=torch.int32),
              block_table=table)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        fastattn.decode_attention(**kw)


def test_forward_only():
    q, kc, vc, table = _small()
    q.requires_grad_(True)
    out = fastattn.decode_attention(q, kc, vc, torch.tensor([1, 2], dtype=torch.int32),
                                    block_table=table)
    with pytest.raises(InferenceOnlyError, match="forward-only"):
        out.sum().backward()
