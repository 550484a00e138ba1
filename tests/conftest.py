"""Test setup: without a GPU, the Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton compiles anything, so it is set here, before the
tests import the kernels. On a machine with CUDA the real kernels run on CUDA tensors instead.
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
