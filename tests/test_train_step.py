"""TrainStep, the stage-2 step the trainer and bench/train_throughput.py share: the order of its
work around the caption gather (checked with the recording CUDA runtime of test_cache_device, no
GPU needed), its equality with the gradient-cache step it wraps, and its finite-weights check."""

import numpy as np
import pytest
import torch
from test_cache_device import StreamRecorder
from test_cache_writer import DIM, build

from llm2clip.cache import DeviceRows, EmbeddingCache
from llm2clip.cache import gather as gather_mod
from llm2clip.distributed import DistInfo
from llm2clip.models.adapter import AdapterConfig
from llm2clip.models.clip_model import ClipModel, ClipModelConfig
from llm2clip.models.vit import ViT, ViTConfig
from llm2clip.training.losses import make_loss
from llm2clip.training.optim import lr_schedule
from llm2clip.training.step import NonFiniteParameters, TrainStep

N = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "fp32"
    build(path, "fp32", n_shards=2)
    return EmbeddingCache.open(path)


def _step(log: list[str] | None, chunk: int, seed: int = 0) -> TrainStep:
    torch.manual_seed(seed)
    tower = ViT(ViTConfig.preset("B/16", width=32, depth=2, heads=2, image_size=16, patch_size=8))
    model = ClipModel(tower, ClipModelConfig(embed_dim=16, adapter=AdapterConfig(DIM, 16, depth=1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def prepare(x):  # what the trainer does: upload the uint8 slice and normalise it
        if log is not None:
            log.append(f"images {x.shape[0]} up and normalised on main")
        return x.float() / 255

    return TrainStep(
        model, model, opt, lr_schedule(opt, 0, 10), make_loss("infonce", fused=False), DistInfo(),
        chunk_size=chunk, grad_clip=1.0, prepare_images=prepare,
    )  # fmt: skip


def _batch(cache):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N, 3, 16, 16), dtype=torch.uint8, generator=g)
    ids = torch.from_numpy(np.random.default_rng(1).choice(cache.num_rows, N, replace=False))
    return images, ids


@pytest.mark.parametrize("chunk", [0, 2])
def test_images_go_up_while_the_rows_are_gathered(cache, monkeypatch, chunk):
    """launch (side stream) -> the first chunk's upload + normalisation (main) -> the main stream
    waits for the gather's event -> the forward passes: the upload overlaps the gather."""
    rec = StreamRecorder()
    real = gather_mod.gather_rows

    def gather_rows(table, scales, index, *args, **kwargs):
        rec.log.append(f"gather of {index.numel()} rows on {rec.active.name}")
        return real(table, scales, index, *args, **kwargs)

    monkeypatch.setattr(gather_mod, "gather_rows", gather_rows)
    rows = DeviceRows(cache, torch.device("cuda"), "gpu", torch.float32, runtime=rec)
    step = _step(rec.log, chunk)
    images, ids = _batch(cache)
    rec.log.clear()
    step(images, ids, rows)
    first = N if chunk == 0 else chunk
    order = [line for line in rec.log if "gather of" in line or "images" in line or "waits" in line]
    assert order[:4] == [
        "side waits for main",
        f"gather of {N} rows on side",
        f"images {first} up and normalised on main",
        "main waits for the gather's event",
    ], rec.log
    if chunk:  # the other chunks go up as the gradient cache reaches them (both passes)
        assert order[4:] == [f"images {chunk} up and normalised on main"] * (2 * N // chunk - 1)


def test_step_equals_the_gradient_cache_step_it_wraps(cache):
    """The prefetched first chunk changes nothing: one step with and without the gradient cache
    gives the same loss up to summation order, and the same arithmetic twice gives equal weights."""
    images, ids = _batch(cache)
    losses, weights = [], []
    for chunk in (0, 2, 2):
        step = _step(None, chunk)
        stats = step(images, ids, DeviceRows(cache, "cpu", dtype=torch.float32))
        losses.append(stats.loss)
        weights.append([p.detach().clone() for p in step.params])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[1] == losses[2] and all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))


def test_non_finite_weights_are_caught_at_the_next_sync(cache):
    """An optimizer step that leaves a weight infinite: check_parameters() names it, and so does the
    next step's sync, before that step's optimizer step."""
    images, ids = _batch(cache)
    step = _step(None, 0)
    rows = DeviceRows(cache, "cpu", dtype=torch.float32)
    step(images, ids, rows)
    step.check_parameters()  # finite: nothing raised
    real = step.optimizer.step

    def poisoned(*a, **kw):
        real(*a, **kw)
        with torch.no_grad():
            dict(step.model.named_parameters())["visual.blocks.1.mlp.fc1.weight"][0, 0] = float("inf")

    step.optimizer.step = poisoned
    step(images, ids, rows)
    with pytest.raises(
        NonFiniteParameters, match=r"parameter visual\.blocks\.1\.mlp\.fc1\.weight NaN or inf"
    ):
        step.check_parameters()
    with pytest.raises(NonFiniteParameters, match="visual.blocks.1.mlp.fc1.weight"):
        step(images, ids, rows)
