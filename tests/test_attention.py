"""fastattn.attention on every backend that runs here against the float64 reference, forward
and backward: packed variable-length batches (empty sequences, L > S), sliding windows,
top-left vs bottom-right causal, ALiBi, soft-capping, GQA, E != Ev, non-contiguous views,
dropout with a replayed mask; packed == dense; bad arguments."""

import pytest
import torch

import fastattn
from attention_cases import AttnCase, check, make_inputs
from conftest import backend_params

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RAGGED_Q, RAGGED_K = (0, 1, 17, 5), (3, 0, 33, 5)

CPU_CASES = [
    AttnCase(),
    AttnCase(lens_q=RAGGED_Q, lens_k=RAGGED_K, packed=True),
    AttnCase(lens_q=RAGGED_Q, lens_k=RAGGED_K, packed=True, causal=True),
    AttnCase(lens_q=RAGGED_Q, lens_k=RAGGED_K, packed=True, causal=True, align="top_left"),
    AttnCase(lens_q=(40, 9, 1), lens_k=(9, 40, 1), packed=True, causal=True),  # L > S rows
    AttnCase(lens_q=(3, 70), lens_k=(70, 3), packed=True, window=(5, 5)),
    AttnCase(lens_q=(64,), lens_k=(64,), causal=True, window=(3, 0)),
    AttnCase(lens_q=(2, 2), lens_k=(37, 37), causal=True, window=(7, 0)),
    AttnCase(lens_q=(30, 30), lens_k=(50, 50), window=(0, 2), align="top_left"),
    AttnCase(lens_q=(30,), lens_k=(50,), window=(-1, 4)),
    AttnCase(lens_q=(33, 33), lens_k=(47, 47), alibi="head", causal=True),
    AttnCase(lens_q=RAGGED_Q, lens_k=RAGGED_K, packed=True, alibi="batch"),
    AttnCase(lens_q=(20,), lens_k=(29,), softcap=5.0, scale=1.0),
    AttnCase(lens_q=RAGGED_Q, lens_k=RAGGED_K, packed=True, softcap=5.0, alibi="head",
             causal=True),
    AttnCase(lens_q=(17, 17), lens_k=(23, 23), Hq=3, Hkv=3, E=8, Ev=24, layout="bhle",
             window=(4, 4)),
    AttnCase(lens_q=(130,), lens_k=(257,), Hq=2, Hkv=1, E=64, Ev=64, causal=True,
             window=(100, 0), alibi="head", softcap=30.0),
    AttnCase(lens_q=RAGGED_Q, lens_k=RAGGED_K, packed=True, causal=True, dropout_p=0.3),
]

# The Triton interpreter: few and small (fp32 / fp16; its bf16 tl.dot is broken).
TRITON_CASES = [
    AttnCase(lens_q=(0, 1, 9, 5), lens_k=(3, 0, 20, 5), packed=True, causal=True, E=16),
    AttnCase(lens_q=(9, 9), lens_k=(20, 20), window=(3, 1), alibi="batch", softcap=5.0),
    AttnCase(lens_q=(20, 3), lens_k=(6, 17), packed=True, causal=True, align="top_left",
             dropout_p=0.25),
]


def _interp(backend, device):
    return backend == "triton" and device == "cpu"


def _params():
    out = []
    for p in backend_params():
        backend, device = p.values
        cases = TRITON_CASES if _interp(backend, device) else CPU_CASES
        dtypes = ([torch.float32, torch.float16] if _interp(backend, device) else
                  [torch.float16, torch.bfloat16] if backend == "cuda" else DTYPES)
        for case in cases:
            for dtype in dtypes:
                out.append(pytest.param(backend, device, case, dtype, marks=p.marks,
                                        id=f"{p.id}-{case.id}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("backend, device, case, dtype", _params())
def test_attention_matches_reference(backend, device, case, dtype):
    if backend == "cuda" and (case.E != case.Ev or case.E not in (32, 64, 96, 128, 256)):
        pytest.skip("the CUDA kernels take E == Ev in {32, 64, 96, 128, 256}")
    check(case, backend, device, dtype, backward=True, interpreted=_interp(backend, device))


@pytest.mark.parametrize("backend, device", [p.values for p in backend_params()
                                             if p.values[0] != "cuda"] +
                         [pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_packed_equals_dense(backend, device):
    """Equal-length sequences give the same result packed as in a (B, L, H, E) batch."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dtype = torch.float32 if backend != "cuda" else torch.float16
    case = AttnCase(lens_q=(7, 7, 7), lens_k=(11, 11, 11), causal=True, window=(4, 0),
                    alibi="batch", E=32, Ev=32)
    q, k, v, _, _ = make_inputs(case, dtype, device)
    slopes = torch.rand(3, case.Hq, device=device)
    dense = fastattn.attention(q, k, v, causal=True, window=(4, 0), alibi_slopes=slopes,
                               backend=backend)
    cu_q = torch.arange(0, 22, 7, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, 34, 11, dtype=torch.int32, device=device)
    packed = fastattn.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True,
                                window=(4, 0), alibi_slopes=slopes, cu_seqlens_q=cu_q,
                                cu_seqlens_k=cu_k, backend=backend)
    torch.testing.assert_close(packed.reshape(dense.shape), dense, rtol=1e-5, atol=1e-5)


def test_bottom_right_differs_from_top_left_when_lengths_differ():
    q, k, v = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    br = fastattn.attention(q, k, v, causal=True)
    tl = fastattn.attention(q, k, v, causal=True, causal_align="top_left")
    full = fastattn.attention(q, k, v)
    torch.testing.assert_close(br[:, -1], full[:, -1])  # the last query sees every key
    torch.testing.assert_close(tl[:, 0], v[:, 0].expand_as(tl[:, 0]))  # the first sees key 0
    assert not torch.allclose(br, tl)


def _packed():
    q, k, v = torch.randn(6, 2, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("change, match", [
    (dict(cu_seqlens_q=torch.tensor([0, 4, 2], dtype=torch.int32)), "non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([1, 2, 6], dtype=torch.int32)), "start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32)), r"cu_seqlens_k\[-1\] = 8"),
    (dict(cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)), "B \\+ 1"),
    (dict(cu_seqlens_k=None), "both cu_seqlens_q and cu_seqlens_k"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 2, 6])), "int32"),
    (dict(max_seqlen_q=3), "more than the max_seqlen 3"),
    (dict(window=(2,)), "window must be"),
    (dict(window=(-2, 0)), "window sizes"),
    (dict(softcap=-1.0), "softcap"),
    (dict(causal_align="middle"), "causal_align"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes must be"),
    (dict(dropout_p=1.5), "dropout_p"),
])
def test_bad_arguments_raise(change, match):
    q, k, v, cu_q, cu_k = _packed()
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        fastattn.attention(q, k, v, **kw)


def test_bad_shapes_raise():
    q = torch.randn(2, 5, 4, 8)
    with pytest.raises(ValueError, match="multiple of k/v's heads"):
        fastattn.attention(q, torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8))
    with pytest.raises(ValueError, match="4-d"):
        fastattn.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="head dim"):
        fastattn.attention(q, torch.randn(2, 5, 4, 6), torch.randn(2, 5, 4, 6))
    with pytest.raises(TypeError, match="share a dtype"):
        fastattn.attention(q, q.half(), q)
