"""fastattn.sdpa on every backend that runs here against the float64 reference, forward and
backward (q, k, v and a float mask), within 2x of PyTorch's own error (tests/tolerances.py):
shapes, masks and their broadcasts, causal with L != S, GQA, E != Ev, scale, non-contiguous
views, fully masked rows, degenerate sizes and dropout with a replayed mask."""

import random

import pytest
import torch
import torch.nn.functional as F

import fastattn
from conftest import RUN_SEED, backend_params
from sdpa_cases import Case, check, make_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The C++ CPU kernel: broad coverage (it runs at full speed here).
CPU_CASES = [
    Case(),
    Case(batch=(), Hq=1, Hkv=1, L=1, S=1, E=1, Ev=1),
    Case(batch=(1,), Hq=1, Hkv=1, L=1, S=300, E=64, Ev=64),  # decode-like
    Case(batch=(2,), Hq=2, Hkv=2, L=65, S=64, E=80, Ev=80),
    Case(batch=(1,), Hq=2, Hkv=2, L=130, S=257, E=128, Ev=128, mask="causal"),
    Case(batch=(1,), Hq=1, Hkv=1, L=40, S=9, E=7, Ev=5, mask="causal"),  # L > S: empty rows
    Case(batch=(2,), Hq=4, Hkv=2, L=33, S=70, E=32, Ev=32, mask="causal"),  # GQA
    Case(batch=(2,), Hq=4, Hkv=1, L=20, S=31, E=16, Ev=24, mask="bool", mask_shape=(2, 1, 1, 31)),
    Case(batch=(2, 3), Hq=2, Hkv=2, L=9, S=12, E=8, Ev=8, mask="float", mask_shape=(3, 1, 9, 12)),
    Case(mask="bool", masked_rows=True),
    Case(mask="float", mask_shape=(17, 23), masked_rows=True),
    Case(mask="float-grad", mask_shape=(2, 1, 17, 23)),
    Case(mask="float-grad", layout="blhe", scale=0.3),
    Case(batch=(3,), Hq=4, Hkv=4, L=64, S=64, E=256, Ev=256, layout="blhe"),
    Case(mask="bool", mask_shape=(17, 1)),  # broadcast along the keys
]

# The Triton interpreter: fewer and smaller (seconds per call), fp32/fp16 (its bf16 tl.dot is
# broken in Triton 3.8; bf16 is covered on a GPU).
TRITON_CASES = [
    Case(batch=(1,), Hq=2, Hkv=2, L=5, S=17, E=16, Ev=16),
    Case(batch=(1,), Hq=2, Hkv=1, L=17, S=9, E=8, Ev=24, mask="causal"),
    Case(batch=(2,), Hq=1, Hkv=1, L=9, S=33, E=40, Ev=40, mask="bool", mask_shape=(2, 1, 1, 33),
         masked_rows=True),
    Case(batch=(1,), Hq=2, Hkv=2, L=7, S=11, E=16, Ev=16, mask="float-grad", layout="blhe"),
]


def _interp(backend, device):
    return backend == "triton" and device == "cpu"


def _cases(backend, device):
    return TRITON_CASES if _interp(backend, device) else CPU_CASES


def _dtypes(backend, device):
    if _interp(backend, device):
        return [torch.float32, torch.float16]
    if backend == "cuda":
        return [torch.float16, torch.bfloat16]
    return DTYPES


def _params():
    out = []
    for p in backend_params():
        backend, device = p.values
        for case in _cases(backend, device):
            for dtype in _dtypes(backend, device):
                out.append(pytest.param(backend, device, case, dtype, marks=p.marks,
                                        id=f"{p.id}-{case.id}-{str(dtype)[6:]}"))
    return out


def _skip_unsupported(backend, case, dtype):
    if backend == "cuda" and (case.E != case.Ev or case.E not in (32, 64, 96, 128, 256)):
        pytest.skip("the CUDA kernels take E == Ev in {32, 64, 96, 128, 256}")


@pytest.mark.parametrize("backend, device, case, dtype", _params())
def test_sdpa_forward(backend, device, case, dtype):
    _skip_unsupported(backend, case, dtype)
    check(case, backend, device, dtype, backward=False, interpreted=_interp(backend, device))


@pytest.mark.parametrize("backend, device, case, dtype", _params())
def test_sdpa_backward(backend, device, case, dtype):
    _skip_unsupported(backend, case, dtype)
    check(case, backend, device, dtype, backward=True, interpreted=_interp(backend, device))


def _random_cases(n: int, seed: int) -> list[Case]:
    """A randomized sweep (different every run; FASTATTN_TEST_SEED replays it)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        hkv = rng.choice([1, 2, 3])
        hq = hkv * rng.choice([1, 2])
        mask = rng.choice(["none", "causal", "bool", "float", "float-grad"])
        batch = rng.choice([(), (1,), (2,), (2, 2)])
        L, S = rng.randint(1, 70), rng.randint(1, 90)
        shape = None
        if mask not in ("none", "causal"):  # a random broadcast of the score shape
            full = (*batch, hq, L, S)
            shape = tuple(d if rng.random() < 0.5 else 1 for d in full)[rng.randint(0, 2):]
            if mask == "float-grad":
                # keep the key dim: the gradient of a mask broadcast over every score is a sum
                # of dz whose exact value is ~0, so comparing it measures rounding noise only
                shape = shape[:-1] + (S,)
        E = rng.choice([1, 8, 13, 32, 64, 72])
        cases.append(Case(batch=batch, Hq=hq, Hkv=hkv, L=L, S=S, E=E, Ev=rng.choice([E, 16]),
                          mask=mask, mask_shape=shape, layout=rng.choice(["bhle", "blhe"]),
                          scale=rng.choice([None, 0.05, 1.0]), masked_rows=rng.random() < 0.3))
    return cases


@pytest.mark.parametrize("case", _random_cases(12, RUN_SEED), ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_sdpa_random_sweep_cpu(case, dtype):
    check(case, "cpu", "cpu", dtype, backward=True)


@pytest.mark.parametrize("backend, device", backend_params())
def test_fully_masked_rows_give_zeros_and_zero_gradients(backend, device):
    dtype = torch.float32 if _interp(backend, device) else torch.float16
    if backend == "cpu":
        dtype = torch.float32
    case = Case(batch=(1,), Hq=2, Hkv=2, L=6, S=5, E=32, Ev=32, mask="bool")
    q, k, v, _ = make_inputs(case, dtype, device, requires_grad=True)
    keep = torch.ones(6, 5, dtype=torch.bool, device=device)
    keep[[1, 4]] = False
    out = fastattn.sdpa(q, k, v, attn_mask=keep, backend=backend)
    assert torch.equal(out[:, :, [1, 4]], torch.zeros_like(out[:, :, [1, 4]]))
    assert not out.isnan().any()
    (gq,) = torch.autograd.grad(out.float().square().sum(), [q])
    assert torch.equal(gq[:, :, [1, 4]], torch.zeros_like(gq[:, :, [1, 4]]))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # torch 2.14: zeros too
    assert torch.equal(expected[:, :, [1, 4]], out[:, :, [1, 4]])


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("shape", [(0, 2, 4, 5, 8), (1, 2, 0, 5, 8), (1, 2, 4, 0, 8),
                                   (1, 0, 4, 5, 8)], ids=["B0", "L0", "S0", "H0"])
def test_degenerate_sizes(backend, device, shape):
    B, H, L, S, E = shape
    dtype = torch.float32
    q = torch.randn(B, H, L, E, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, S, E, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, S, E, device=device, dtype=dtype, requires_grad=True)
    out = fastattn.sdpa(q, k, v, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == expected.shape and torch.equal(out, expected)  # S == 0: zeros
    grads = torch.autograd.grad(out.sum(), [q, k, v], allow_unused=True)
    for g, t in zip(grads, (q, k, v)):
        assert g is None or (g.shape == t.shape and not g.isnan().any() and (g == 0).all())


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("p, causal", [(0.1, False), (0.5, True)])
def test_dropout_matches_the_replayed_mask(backend, device, p, causal):
    """With dropout_seed fixed, the kernel's dropout mask is reference.dropout_keep's: outputs
    and gradients equal the reference computed with that mask."""
    dtype = torch.float32
    B, H, L, S, E = (1, 2, 9, 33, 16) if _interp(backend, device) else (2, 3, 37, 70, 32)
    seed, offset = random.Random(RUN_SEED).getrandbits(64) - 2**63, 12345
    q, k, v = (torch.randn(B, H, n, E, device=device, dtype=dtype, requires_grad=True)
               for n in (L, S, S))
    out = fastattn.sdpa(q, k, v, dropout_p=p, is_causal=causal, backend=backend,
                        dropout_seed=(seed, offset))
    keep = fastattn.reference.dropout_keep(seed, offset, (B, H, L, S), p, device)
    d64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = fastattn.reference.sdpa(*d64, dropout_p=p, is_causal=causal, dropout_mask=keep)
    assert (out.double() - ref).abs().max().item() < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], g)
    want = torch.autograd.grad(ref, d64, g.double())
    for name, a, b in zip("qkv", got, want):
        assert (a.double() - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("backend, device", backend_params())
def test_dropout_keeps_the_expected_fraction(backend, device):
    """Uniform attention (q = 0) over S one-hot values: out[i, j] = keep_ij / (S (1 - p)), so the
    kept fraction is read off the output. 1 - p within 5 standard deviations."""
    p, L, S = 0.3, (16 if _interp(backend, device) else 128), 64
    q = torch.zeros(1, 1, L, 16, device=device)
    k = torch.randn(1, 1, S, 16, device=device)
    v = torch.eye(S, device=device)[None, None]  # (1, 1, S, S)
    out = fastattn.sdpa(q, k, v, dropout_p=p, backend=backend)
    kept = out * S * (1 - p)  # 1 where kept, 0 where dropped
    assert torch.allclose(kept, kept.round(), atol=1e-4)
    frac = kept.round().mean().item()
    n = L * S
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, frac


def test_dropout_is_reproducible_under_manual_seed():
    q, k, v = (torch.randn(2, 2, 20, 16) for _ in range(3))
    torch.manual_seed(7)
    a = fastattn.sdpa(q, k, v, dropout_p=0.2)
    torch.manual_seed(7)
    b = fastattn.sdpa(q, k, v, dropout_p=0.2)
    c = fastattn.sdpa(q, k, v, dropout_p=0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
