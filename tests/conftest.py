"""Test setup. Runs before any fastattn module is imported:
- without a GPU, Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (read when
  @triton.jit decorates, so it must be set first);
- FASTATTN_POISON_OUTPUTS=1 makes every kernel output start as NaN, so an element a kernel
  forgets to write fails the comparison.
"""

import os
import random
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTATTN_POISON_OUTPUTS", "1")

import fastattn  # noqa: E402


def _triton_available() -> bool:
    return fastattn.backends.triton_error() is None


def backend_params():
    """(backend, device) pairs to test: every backend that can run here, GPU ones marked."""
    params = [pytest.param("cpu", "cpu", id="cpu")]
    if _triton_available():
        if HAS_GPU:
            params.append(pytest.param("triton", "cuda", id="triton", marks=pytest.mark.gpu))
        else:
            params.append(pytest.param("triton", "cpu", id="triton-interp", marks=pytest.mark.triton))
    params.append(pytest.param("cuda", "cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")]))
    return params


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


# Fresh random inputs every run; FASTATTN_TEST_SEED=<n> replays a run (the header prints n).
RUN_SEED = int(os.environ.get("FASTATTN_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"fastattn: FASTATTN_TEST_SEED={RUN_SEED} (set it to replay these inputs)"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test's seed: the run's seed mixed with a stable hash of the test id."""
    torch.manual_seed((RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (pytestmark usefixtures): tiny
    shapes gain nothing from more, and on a shared 2-core machine a second thread makes every
    op wait for a descheduled peer (4x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
