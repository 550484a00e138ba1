"""Test setup: without a GPU, the Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton compiles anything, so it is set here, before the
tests import the kernels. On a machine with CUDA the real kernels run on CUDA tensors instead.

Rules every test follows (CONTRIBUTING.md, "Tests"), so the suite passes on any CPU (AMD or Intel
BLAS kernels, any thread count, ATEN_CPU_CAPABILITY=default or avx2):

- Exact comparisons only between results of the same arithmetic: the same code path, the same
  chunking and batching, the same thread count (a test process and the subprocesses it starts
  must agree: the fixture below restores torch's thread count after every test).
- Different code paths (batched vs whole, chunked vs not, torch vs extension, fused vs plain) are
  compared within a tolerance derived from the reference's own error.
- Derived discrete results (rankings, argmax, top-k, recall, accuracy, thresholds) are compared
  exactly only when both sides come from the same features, or on fixtures built without
  near-ties (margins far above the tolerance of the features).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = _triton_ok()
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
# Backends that can run here, each with the device its tensors live on.
BACKENDS = [("torch", "cpu")] + ([("triton", TRITON_DEVICE)] if HAS_TRITON else [])

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_threads():
    """A test (or a benchmark run in-process) that sets torch's thread count must not change the
    arithmetic of later tests, nor make it differ from the subprocesses they start."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
