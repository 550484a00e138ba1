"""JPEG decoding on the training device: nvJPEG on a GPU, through TorchCodec (or torchvision).

    mode, why = resolve_decode("auto", device, workers=8)   # the faster of device and 8 x draft
    ds = ShardImageDataset(..., decode=mode)        # workers: bytes + ResamplePlan, no pixels
    batch = finish_batch(next(loader), device)      # main process: decode, crop, resize on `device`

With ``decode="device"`` the data workers read a JPEG's header only: they draw its crop exactly as
the CPU paths do (the same random draws, the same box: a ResamplePlan) and ship the compressed
bytes. The main process decodes the batch's JPEGs in one decode_jpeg call on the device
(torchcodec.decoders, else torchvision.io), crops and resamples each (bicubic, antialiased:
torch.nn.functional.interpolate) and writes it into the batch. Other images (PNG, WebP, CMYK
JPEGs) are decoded by the workers as with ``draft``. A JPEG the device cannot decode is retried on
the CPU (libjpeg-turbo); one that fails there too is dropped from the batch and counted as
corrupt_image, as the CPU paths do.

Pixels differ slightly from ``pil``: torch's bicubic kernel (a = -0.75) is not PIL's (a = -0.5),
and nvJPEG's IDCT is not libjpeg's. tests/test_device_decode.py bounds the difference on the CPU
(docs/data.md); bench/data_throughput.py measures it, and the rate, on a GPU.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from llm2clip.data.images import ResamplePlan, _open, train_transform

__all__ = [
    "DEVICE_JPEG_MODES",
    "DeferredImages",
    "device_decode_available",
    "decode_rates",
    "deferred_batch",
    "finish_batch",
    "jpeg_decoder",
    "resample",
    "resolve_decode",
]

DEVICE_JPEG_MODES = ("RGB", "L")
"""JPEG colour modes (PIL's names) left to the device; CMYK and others are decoded by the workers."""

log = logging.getLogger(__name__)


def jpeg_decoder() -> Callable:
    """decode(list of 1-D uint8 CPU tensors, device) -> list of (3, H, W) uint8 RGB tensors on
    `device`: TorchCodec's decode_jpeg (the maintained one), else torchvision's (deprecated since
    torchvision 0.29). Both use nvJPEG on a CUDA device and libjpeg-turbo on the CPU."""
    try:
        from torchcodec.decoders import decode_jpeg

        return lambda data, device: decode_jpeg(data, mode="RGB", device=device)
    except ImportError:
        pass
    try:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg
    except ImportError as e:
        raise ImportError(
            "decode='device' needs torchcodec (or torchvision) to decode JPEGs: pip install "
            "'llm2clip[gpu-decode]', or use --decode draft"
        ) from e
    return lambda data, device: tv_decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def device_decode_available(device: torch.device) -> bool:
    """True when `device` is a CUDA device that jpeg_decoder() decodes JPEGs on (nvJPEG)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        jpeg_decoder()([_tiny_jpeg()], device)
    except (ImportError, RuntimeError) as e:
        log.info("JPEG decoding on %s is not available: %s", device, e)
        return False
    return True


def _tiny_jpeg() -> Tensor:
    """An 8x8 JPEG's bytes (to probe a device's decoder)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buf, "JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def resolve_decode(
    mode: str, device: torch.device, workers: int = 0, image_size: int = 224
) -> tuple[str, str]:
    """(the decode path a run uses, why). "auto" on a CUDA device that jpeg_decoder() decodes on
    measures both paths now (decode_rates) and picks the one with the higher samples/s for this
    run: the device's, or one CPU core's times the data workers; else "draft", the fastest CPU path.
    Other modes stay as given."""
    if mode == "device":
        jpeg_decoder()  # a missing decoder fails here, not at the first batch
    if mode != "auto":
        return mode, "as given"
    if not device_decode_available(device):
        return "draft", "auto: no JPEG decoder on the device"
    cpu, dev = decode_rates(device, image_size)
    decoders = max(workers, 1)  # workers=0: the main process decodes
    choice = "device" if dev > decoders * cpu else "draft"
    return choice, f"auto: {device} {dev:.0f} samples/s vs {decoders} x {cpu:.0f} on the CPU"


def decode_rates(device: torch.device, image_size: int = 224, n: int = 64) -> tuple[float, float]:
    """(draft samples/s on one CPU core, device-path samples/s), measured on n crops of a 512x384
    JPEG photograph-like image: what "auto" compares."""
    data, tf = _probe_jpeg(), train_transform(image_size)
    t0 = time.perf_counter()
    for i in range(n):
        tf.from_bytes(data, random.Random(i), draft=True)
    cpu = n / (time.perf_counter() - t0)
    item = deferred_batch([data], image_size, n)
    finish_batch(dict(item), device)  # warm-up: the decoder's first call initialises it
    _sync(device)
    t0 = time.perf_counter()
    finish_batch(dict(item), device)  # a copy: finish_batch takes "deferred" out of its batch
    _sync(device)
    return cpu, n / (time.perf_counter() - t0)


def deferred_batch(jpegs: Sequence[bytes], image_size: int, n: int) -> dict:
    """A stream item of n JPEGs (`jpegs` cycled; sample i's random-resized crop drawn from
    Random(i)) as the workers of decode="device" send it, for finish_batch: the auto probe's and
    the benchmark's batch."""
    tf, deferred = train_transform(image_size), DeferredImages()
    for i in range(n):
        data = jpegs[i % len(jpegs)]
        deferred.add(i, data, tf.plan(*_open(data).size, random.Random(i)))
    empty = torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)  # the workers decoded none
    return {"images": empty, "rows": torch.zeros(n, dtype=torch.int64), "deferred": deferred.pack()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe_jpeg() -> bytes:
    """A 512x384 JPEG (quality 90) with a photograph's mix of smooth areas and edges."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 384), torch.linspace(0, 1, 512), indexing="ij")
    g = torch.Generator().manual_seed(0)
    rgb = torch.stack([x, y, (x * 7).sin() * (y * 5).cos() * 0.5 + 0.5]) * 200
    rgb = rgb + 25 * torch.rand((3, 384, 512), generator=g) * (x > 0.5)  # textured right half
    buf = io.BytesIO()
    Image.fromarray(rgb.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class DeferredImages:
    """A data worker's JPEGs left for the main process: their bytes, batch positions and plans,
    packed as four tensors (one shared-memory handle each, whatever the batch size)."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.chunks: list[bytes] = []
        self.plans: list[ResamplePlan] = []

    def add(self, position: int, data: bytes, plan: ResamplePlan) -> None:
        self.positions.append(position)
        self.chunks.append(data)
        self.plans.append(plan)

    def pack(self) -> dict[str, Tensor]:
        sizes = torch.tensor([0] + [len(c) for c in self.chunks], dtype=torch.int64)
        flat = bytearray(b"".join(self.chunks))
        return {
            "data": torch.frombuffer(flat, dtype=torch.uint8) if flat else torch.empty(0, dtype=torch.uint8),
            "offsets": torch.cumsum(sizes, 0),
            "positions": torch.tensor(self.positions, dtype=torch.int64),
            "plans": torch.tensor(
                [[*p.box, *p.size, *p.offset] for p in self.plans], dtype=torch.int64
            ).reshape(-1, 8),
        }


def resample(image: Tensor, plan: ResamplePlan, out_size: int) -> Tensor:
    """(3, H, W) uint8 -> (3, S, S) uint8 on the image's device: crop, bicubic antialiased resize,
    window (the plan's three steps)."""
    left, top, right, bottom = plan.box
    crop = image[:, top:bottom, left:right].unsqueeze(0).float()
    width, height = plan.size
    x = F.interpolate(crop, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    ox, oy = plan.offset
    x = x[0, :, oy : oy + out_size, ox : ox + out_size]
    return x.round_().clamp_(0, 255).to(torch.uint8)


def finish_batch(batch: dict, device: torch.device) -> dict:
    """A stream item of decode="device" made whole on `device`: its deferred JPEGs decoded, cropped
    and resized there, between the images the workers decoded. Samples whose JPEG cannot be decoded
    are dropped from every per-sample entry and counted in batch["skipped"] as corrupt_image. Any
    other batch is returned as it is (the step uploads its images, overlapped with the gather)."""
    deferred = batch.pop("deferred", None)
    if deferred is None:
        return batch
    images = batch["images"].to(device, non_blocking=True)
    n, size = batch["rows"].shape[0], images.shape[-1]
    slots = deferred["positions"].tolist()
    full = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    others = sorted(set(range(n)) - set(slots))
    full[torch.tensor(others, dtype=torch.int64, device=device)] = images
    offsets = deferred["offsets"].tolist()
    data = [deferred["data"][a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    failed = []
    for pos, image, row in zip(slots, _decode(data, device), deferred["plans"].tolist()):
        if image is None:
            failed.append(pos)
            continue
        full[pos] = resample(image, ResamplePlan(tuple(row[:4]), tuple(row[4:6]), tuple(row[6:])), size)
    batch["images"] = full
    if failed:
        _drop(batch, failed)
    return batch


def _decode(data: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """Decode every JPEG on `device` in one call; when that call fails, one by one, each failure
    retried on the CPU; None where the CPU fails too."""
    if not data:
        return []
    decode = jpeg_decoder()
    try:
        return list(decode(data, device))
    except RuntimeError:
        pass  # at least one image is bad: find which
    out: list[Tensor | None] = []
    for d in data:
        image = None
        for where in dict.fromkeys((device, torch.device("cpu"))):
            try:
                image = decode([d], where)[0].to(device)
                break
            except RuntimeError as e:
                log.debug("JPEG of %d bytes not decoded on %s: %s", d.numel(), where, e)
        out.append(image)
    return out


def _drop(batch: dict, positions: list[int]) -> None:
    """Remove the samples at `positions` from the batch's per-sample entries, counting them."""
    bad = set(positions)
    keep = [i for i in range(batch["images"].shape[0]) if i not in bad]
    for i in positions:
        batch["skipped"].add("corrupt_image", batch["shards"][i])
    index = torch.tensor(keep, dtype=torch.int64)
    batch["images"] = batch["images"][index.to(batch["images"].device)]
    batch["rows"] = batch["rows"][index]
    for name in ("shards", "keys", "fields"):
        batch[name] = [batch[name][i] for i in keep]
