"""GPU-only checks of the Triton losses at real sizes (skipped without CUDA; run by bench/gpu_check.sh).

The CPU suite runs the same kernels under the interpreter at small sizes; these add what only a
GPU shows: many row chunks and backward superblocks at production tile sizes, CUDA-graph capture
(no host synchronisation), and peak memory against the issue's bound.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda, requires_triton
from test_contrastive_loss import check_against_reference, make_inputs

from llm2clip_kernels import infonce_loss, sigmoid_loss

pytestmark = [requires_cuda, requires_triton]
LOSSES = {"infonce": infonce_loss, "sigmoid": sigmoid_loss}


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_reference_at_scale(name):
    """b = B = 4133, D = 1024 in bf16 (ragged against every tile) against the fp64 reference."""
    image, text, s, beta = make_inputs(4133, 4133, 1024, torch.bfloat16, "cuda", scale=100.0, bias=-10.0)
    check_against_reference(name, image, text, s, beta, "triton")


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_many_chunks_against_torch_backend(name):
    """b = 16484 spans two forward row chunks plus a short one, and three backward superblocks
    of rows by two of columns (fp32 accumulators); compared with the chunked PyTorch path."""
    b, B, D = 2 * 8192 + 100, 9000, 256
    image, text, s, beta = make_inputs(b, B, D, torch.bfloat16, "cuda", scale=50.0, bias=-8.0)
    text = text[:B]
    pos = torch.randint(0, B, (b,), device="cuda")
    groups = torch.randint(0, 3000, (B,), device="cuda")
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (image, text, s, beta)]
        loss = LOSSES[name](*leaves, positive_index=pos, group_ids=groups, backend=backend)
        results.append([loss.detach()] + list(torch.autograd.grad(loss, leaves)))
    for what, a, c in zip(["loss", "d_image", "d_text", "d_scale", "d_bias"], *results):
        scale = c.double().abs().max().item()
        err = (a.double() - c.double()).abs().max().item()
        print(f"{what}: max |triton - torch| {err:.3e} (max |value| {scale:.3e})")
        # bf16 gradients: a few bf16 ulps of the largest value; statistics and sums: fp32-level.
        limit = 4 * 2**-8 * scale if what in ("d_image", "d_text") else 1e-4 * max(scale, 1e-3)
        assert err <= limit, what


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_cuda_graph_capture(name):
    """Forward + backward capture in a CUDA graph (no .item(), no host sync) and replay correctly."""
    b, D = 3000, 512
    image, text, s, beta = make_inputs(b, b, D, torch.bfloat16, "cuda", scale=30.0, bias=-5.0)
    leaves = [t.clone().requires_grad_() for t in (image, text, s, beta)]

    def step():
        loss = LOSSES[name](*leaves)
        return [loss] + list(torch.autograd.grad(loss, leaves))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # autotuning and compilation happen outside the capture
            eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_image, new_text, _, _ = make_inputs(b, b, D, torch.bfloat16, "cuda")
    with torch.no_grad():  # new values in the same storage, as a training loop would feed them
        for t, new in zip(leaves, (new_image, new_text, s * 2, beta)):
            t.copy_(new)
    graph.replay()
    expected = step()
    for c, e in zip(captured, expected):
        torch.testing.assert_close(c, e)
    assert not torch.equal(captured[0], eager[0]), "the replay must see the new inputs"


def test_peak_memory_within_twice_the_inputs():
    """b = B = 32768, D = 1024, bf16: forward + backward peak extra memory <= 2x the inputs (the
    gradients included), and far below one b x B fp32 logits matrix."""
    b, D = 32768, 1024
    image, text, s, _ = make_inputs(b, b, D, torch.bfloat16, "cuda")
    image.requires_grad_()
    text.requires_grad_()
    s.requires_grad_()
    infonce_loss(image, text, s).backward()  # autotune first: its benchmarking allocates too
    image.grad = text.grad = s.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    infonce_loss(image, text, s).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    inputs = 2 * b * D * 2
    mib = lambda n: f"{n / 2**20:.0f} MiB"
    print(f"peak extra {mib(extra)}, inputs {mib(inputs)}, fp32 logits would be {mib(b * b * 4)}")
    assert extra <= 2 * inputs
    assert extra < b * b * 4 / 4
