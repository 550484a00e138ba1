"""JPEG decoding on the training device (llm2clip.data.device_decode, decode="device").

On this CPU-only machine the device is the CPU: TorchCodec's decode_jpeg (libjpeg-turbo, as PIL
uses) in the main process, then torch's crop and antialiased bicubic resize. Every
piece of the GPU path runs except nvJPEG itself; test_cuda_decode_matches_the_cpu_path checks that
on a GPU. Images: tests/photo_fixtures.py and small synthetic ones in every colour mode.
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip.cache import EmbeddingCache
from llm2clip.data import device_decode
from llm2clip.data.device_decode import DeferredImages, finish_batch, jpeg_decoder, resample, resolve_decode
from llm2clip.data.images import ResamplePlan, decode_image, eval_transform, train_transform
from llm2clip.data.shards import write_shard
from llm2clip.data.skips import SkipCounts
from llm2clip.data.stream import ShardImageDataset
from tests.photo_fixtures import photo_jpegs, pixel_diff
from tests.train_fixtures import make_data

try:
    jpeg_decoder()
except ImportError:
    pytest.skip("decode='device' needs torchcodec or torchvision", allow_module_level=True)

# Against the pil path, per image. The JPEG decode is the same (libjpeg-turbo); torch's bicubic
# kernel (a = -0.75) is not PIL's (a = -0.5). Measured worst on photographs: 0.36 / 42.6 dB when
# upscaling 64 px to 224, 0.21 / 54.4 dB downscaling 256-1024 px.
MAE_BOUND = 0.5  # of 255
PSNR_BOUND = 40.0  # dB
CPU = torch.device("cpu")


def _decode_on_device(data: bytes, plan, device: torch.device = CPU) -> torch.Tensor:
    deferred = DeferredImages()
    deferred.add(0, data, plan)
    no_images = torch.empty((0, 3, 224, 224), dtype=torch.uint8)  # the workers decoded none
    batch = {"images": no_images, "rows": torch.zeros(1, dtype=torch.int64), "deferred": deferred.pack()}
    return finish_batch(batch, device)["images"][0]


@pytest.mark.parametrize("side", [64, 256, 600])
def test_the_same_crops_and_pixels_within_the_bound(side):
    tf, ev = train_transform(224), eval_transform(224)
    for i, data in enumerate(photo_jpegs(side, 8)):
        full_rng, plan_rng = random.Random(i), random.Random(i)
        full = tf(decode_image(data), full_rng)
        size = Image.open(io.BytesIO(data)).size
        plan = tf.plan(*size, plan_rng)
        assert full_rng.getstate() == plan_rng.getstate()  # the same draws: the same crop box
        for a, b in (
            (full, _decode_on_device(data, plan)),
            (ev(decode_image(data)), _decode_on_device(data, ev.plan(*size))),
        ):
            mae, psnr = pixel_diff(a, b)
            assert mae <= MAE_BOUND and psnr >= PSNR_BOUND, (side, i, mae, psnr)


def test_resample_follows_the_plan_exactly():
    """An identity plan returns the pixels; a window cuts exactly where the plan says."""
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    same = ResamplePlan((10, 5, 42, 37), (32, 32), (0, 0))
    assert torch.equal(resample(image, same, 32), image[:, 5:37, 10:42])
    window = ResamplePlan((0, 0, 50, 40), (50, 40), (7, 3))
    assert torch.equal(resample(image, window, 16), image[:, 3:19, 7:23])


def _encode(image: Image.Image, fmt: str, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    image.convert(mode).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def mixed_shard(tmp_path):
    """One shard whose images (photographs, 64-96 px) cover every route: RGB, grey and progressive
    JPEGs (deferred), a PNG and a CMYK JPEG (decoded by the workers), a JPEG cut after its header
    (deferred, then dropped) and one cut inside it (dropped by the worker)."""
    shards, cache = make_data(tmp_path / "data", shards=1, per_shard=8)
    photos = [Image.open(io.BytesIO(d)) for d in photo_jpegs(64, 6)]
    good = _encode(photos[0], "JPEG")
    images = [
        ("jpg", good),
        ("png", _encode(photos[1], "PNG")),
        ("jpg", _encode(photos[2], "JPEG", "CMYK")),
        ("jpg", _encode(photos[3], "JPEG", "L")),
        ("jpg", good[: len(good) - 200]),  # header intact, scan data cut
        ("jpg", _encode(photos[4], "JPEG", progressive=True)),
        ("jpg", good[:40]),  # header cut
        ("jpg", _encode(photos[5], "JPEG", quality=60)),
    ]
    samples = [{"__key__": f"{k:05d}", member: data} for k, (member, data) in enumerate(images)]
    write_shard(shards[0], samples)
    return shards, EmbeddingCache.open(cache)


def _first_batch(shards, cache, decode: str, workers: int = 0, augment: bool = True) -> dict:
    ds = ShardImageDataset(shards, cache, ["short", "dense"], 8, 24, decode=decode, augment=augment)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return next(iter(loader))


@pytest.mark.parametrize("augment", [True, False])
def test_dataset_batches_equal_the_cpu_paths(mixed_shard, augment):
    shards, cache = mixed_shard
    pil = _first_batch(shards, cache, "pil", augment=augment)
    draft = _first_batch(shards, cache, "draft", augment=augment)
    raw = _first_batch(shards, cache, "device", workers=2, augment=augment)  # through worker IPC
    assert sorted(raw["keys"]) == sorted([*pil["keys"], "00004"])  # the scan cut is still in
    deferred = sorted(raw["keys"][p] for p in raw["deferred"]["positions"].tolist())
    assert deferred == ["00000", "00003", "00004", "00005", "00007"]  # RGB, grey, progressive JPEGs
    assert raw["skipped"].reasons["corrupt_image"] == 1  # the header cut: found by the worker
    assert raw["images"].shape[0] == len(raw["keys"]) - 5  # only the workers' images travel
    device = finish_batch(raw, CPU)
    assert "deferred" not in device
    assert device["keys"] == pil["keys"] and device["fields"] == pil["fields"]
    assert torch.equal(device["rows"], pil["rows"]) and device["shards"] == pil["shards"]
    assert device["skipped"] == pil["skipped"]  # the scan cut: dropped in the main process
    assert device["skipped"].reasons["corrupt_image"] == 2
    for i, key in enumerate(device["keys"]):
        if key in ("00001", "00002"):  # PNG, CMYK: the workers' draft path, bit for bit
            assert torch.equal(device["images"][i], draft["images"][i]), key
        else:
            mae, psnr = pixel_diff(device["images"][i], pil["images"][i])
            assert mae <= MAE_BOUND and psnr >= PSNR_BOUND, (key, mae, psnr)


def test_a_batch_without_deferred_images_is_returned_as_it_is(mixed_shard):
    shards, cache = mixed_shard
    batch = _first_batch(shards, cache, "draft")
    images = batch["images"]
    out = finish_batch(batch, CPU)
    assert out is batch and out["images"] is images and "deferred" not in out


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu(monkeypatch):
    """The batched call fails, the device refuses one JPEG: it comes from the CPU decoder, the others
    from the device, and a JPEG nobody decodes is dropped and counted."""
    real = jpeg_decoder()
    jpegs = photo_jpegs(64, 3)
    refused = jpegs[1]
    jpegs.append(jpegs[0][:-200])  # scan data cut: undecodable anywhere
    stand_in = torch.device("cpu", 0)  # plays the GPU: a device other than torch.device("cpu")
    calls = []

    def decode(data, device):
        calls.append((len(data), str(device)))
        if device == stand_in and any(bytes(d.numpy()) == refused for d in data):
            raise RuntimeError("refused by the stand-in device")
        return real(data, device)

    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: decode)
    item = device_decode.deferred_batch(jpegs, 32, 4)
    item.update(
        skipped=SkipCounts.of(["corrupt_image"]), shards=["s"] * 4, keys=list("abcd"), fields=["f"] * 4
    )
    out = finish_batch(dict(item), stand_in)
    assert out["keys"] == ["a", "b", "c"] and out["skipped"].reasons["corrupt_image"] == 1
    assert calls[0] == (4, "cpu:0") and (1, "cpu") in calls  # the batch, then the retry on the CPU
    plain = finish_batch(dict(device_decode.deferred_batch(jpegs[:3], 32, 3)), CPU)["images"]
    assert torch.equal(out["images"], plain)


def test_resolve_decode(monkeypatch):
    assert resolve_decode("auto", CPU) == ("draft", "auto: no JPEG decoder on the device")
    assert resolve_decode("pil", CPU)[0] == "pil" and resolve_decode("device", CPU)[0] == "device"
    # On a GPU, auto compares the measured rates: the device's against the workers' draft decoding.
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(device_decode, "device_decode_available", lambda device: True)
    monkeypatch.setattr(device_decode, "decode_rates", lambda device, size: (300.0, 2000.0))
    assert resolve_decode("auto", cuda, workers=4)[0] == "device"  # 2000/s > 4 x 300/s
    used, why = resolve_decode("auto", cuda, workers=8)  # 8 x 300/s > 2000/s
    assert used == "draft" and why == "auto: cuda:0 2000 samples/s vs 8 x 300 on the CPU"


def test_decode_rates_measure_both_paths():
    """What auto measures, run with the CPU's decoder standing in for the GPU's."""
    cpu_rate, device_rate = device_decode.decode_rates(CPU, 24, n=8)
    assert cpu_rate > 0 and device_rate > 0


def test_torchvision_is_the_fallback_decoder(monkeypatch):
    data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in photo_jpegs(64, 2)]
    preferred = jpeg_decoder()(data, CPU)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # torchcodec missing
    pytest.importorskip("torchvision", reason="the fallback decoder")
    for a, b in zip(preferred, jpeg_decoder()(data, CPU)):
        assert torch.equal(a, b)  # libjpeg-turbo both
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # neither
    with pytest.raises(ImportError, match="decode='device' needs torchcodec"):
        resolve_decode("device", CPU)  # fails at the start, not at the first batch


def test_no_device_decode_without_cuda():
    assert not device_decode.device_decode_available(CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_cuda_decode_matches_the_cpu_path(tmp_path):
    assert device_decode.device_decode_available(torch.device("cuda"))
    tf = train_transform(224)
    for i, data in enumerate(photo_jpegs(512, 8)):
        plan = tf.plan(*Image.open(io.BytesIO(data)).size, random.Random(i))
        gpu = _decode_on_device(data, plan, torch.device("cuda")).cpu()
        mae, psnr = pixel_diff(gpu, _decode_on_device(data, plan))
        assert mae <= 3.5 and psnr >= 27.0, (i, mae, psnr)  # the draft path's bound: IDCTs differ


def test_trainer_runs_with_device_decode(tmp_path):
    """--decode device through the trainer (2 workers): the same samples as --decode pil, losses
    within what the resize kernels' difference moves them."""
    from llm2clip.apps.train import main
    from tests.test_train import args, losses

    shards, cache = make_data(tmp_path / "data", fmt="jpg")
    data = {"shards": str(Path(shards[0]).parent / "train-{0000..0003}.tar"), "cache": str(cache)}
    runs = {}
    for decode in ("device", "pil"):
        out = tmp_path / decode
        metrics = main(args(data, out, "--decode", decode, "--workers", "2", "--steps", "3"))
        assert metrics["finished"]
        runs[decode] = out
    recorded = json.loads((runs["device"] / "config.json").read_text())["decode"]
    assert recorded == {"used": "device", "why": "as given"}
    a, b = losses(runs["device"]), losses(runs["pil"])
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-3 * abs(y) for x, y in zip(a, b)), (a, b)  # measured 1e-5
    kept = lambda out: [(r["batch"], r["skipped"]) for r in map(json.loads, (out / "log.jsonl").open())]  # noqa: E731
    assert kept(runs["device"]) == kept(runs["pil"])
