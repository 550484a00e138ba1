"""Data path throughput: shard reading, and decoded + augmented samples/s per worker at 224 px.

What runs (one process, one torch thread: what one DataLoader worker does):

- ``read``: the tar walk of llm2clip.data.shards on a page-cached local shard of realistic JPEGs
  (full read, a quarter of the images as a worker of 4 reads them, the header-only sample count),
  beside webdataset's own streaming ``tar_file_iterator`` (full read, a quarter through its
  member selection) and the same shard streamed through ``pipe:cat`` (our URL path).
- ``decode``: per sample, what ShardImageDataset does to an image (decode, random-resized crop
  with scale (0.9, 1.0) to 224 x 224 bicubic, uint8 tensor), for each decode path:
      pil     decode the whole JPEG, crop + resample (the path before draft mode)
      draft   the same crop box, the JPEG decoded at 1/2-1/8 scale by libjpeg first (PIL draft)
      nvjpeg  torchvision.io.decode_jpeg(device="cuda") on batches of 256, crop + resize on the
              GPU (only with CUDA and torchvision; images/s of the whole batch path)
  plus the pixel difference draft vs pil (mean |diff|, PSNR, max |diff|) over the same crops.

Images: photographs (matplotlib's grace_hopper.jpg and, when installed, the Tux Paint stamp
photos), randomly cropped and re-encoded as JPEG (quality 90) with the shorter side at each
--sizes value (img2dataset's keep_ratio resize: 512 is the common choice for CC3M/CC12M).

    python bench/data_throughput.py                 # read + decode at shorter sides 400,512,600
    python bench/data_throughput.py --quick         # fewer images, ~30 s
    python bench/data_throughput.py --only decode --sizes 512

Writes a table to stdout and data_throughput-<device>-<time>.json into --out.
Target (issue #16): draft >= 2x pil samples/s per core at 224 px from ~500 px JPEGs.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as bench/data_throughput.py
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402


def photographs(limit: int = 40) -> list:
    """RGB PIL images of real photographs available offline."""
    from PIL import Image

    paths = []
    try:
        import matplotlib

        paths.append(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    except ImportError:
        pass
    stamps = sorted(glob.glob("/usr/share/tuxpaint/stamps/**/*.png", recursive=True))
    random.Random(0).shuffle(stamps)
    paths += stamps[:limit]
    out = []
    for p in paths:
        try:
            img = Image.open(p)
            img.load()
        except OSError:
            continue
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        if min(img.size) >= 200:
            out.append(img.convert("RGB"))
    if not out:
        raise SystemExit("no photograph found: pip install matplotlib (grace_hopper.jpg)")
    return out


def make_jpegs(n: int, short_side: int, seed: int = 0) -> list[bytes]:
    """n JPEGs (quality 90) with the given shorter side, aspect 1:1 to 3:2, from photographs."""
    from PIL import Image

    rng = random.Random(seed)
    photos = photographs()
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        aspect = rng.choice([1.0, 4 / 3, 3 / 2]) ** (1 if rng.random() < 0.5 else -1)
        size = (round(short_side * max(aspect, 1)), round(short_side * max(1 / aspect, 1)))
        img = src.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(fn, items: int, repeats: int) -> float:
    """Best items/s over `repeats` runs of fn() (the machine's least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return items / best


# ----------------------------------------------------------------------------- read


def bench_read(args) -> list[dict]:
    from webdataset.tariterators import tar_file_iterator

    from llm2clip.data.shards import count_samples, walk_samples, write_shard

    jpegs = make_jpegs(args.read_samples, 512)
    tmp = tempfile.mkdtemp(prefix="data_throughput-")
    path = os.path.join(tmp, "00000.tar")
    samples = [
        {"__key__": f"{i:09d}", "jpg": d, "txt": f"caption {i}", "json": "{}"} for i, d in enumerate(jpegs)
    ]
    write_shard(path, samples)
    mb = os.path.getsize(path) / 1e6
    n = len(samples)
    quarter = lambda i, f: i % 4 == 0 and f == "jpg"  # noqa: E731
    cases = {
        "ours: full read": lambda: sum(1 for _ in walk_samples(path)),
        "ours: 1/4 of the images": lambda: sum(1 for _ in walk_samples(path, quarter)),
        "ours: count (headers)": lambda: count_samples([path]),
        "ours: pipe:cat full read": lambda: sum(1 for _ in walk_samples(f"pipe:cat {path}")),
        "webdataset tar_file_iterator: full": lambda: _wds_walk(tar_file_iterator, path, None),
        "webdataset tar_file_iterator: 1/4": lambda: _wds_walk(
            tar_file_iterator, path, lambda name: name.endswith(".jpg") and int(name[:9]) % 4 == 0
        ),
    }
    rows = []
    full = None
    for name, fn in cases.items():
        fn()  # page cache warm
        r = rate(fn, n, args.repeats)
        full = full or r
        rows.append(
            {"case": name, "samples_per_s": r, "ms_per_shard": n / r * 1e3, "vs_full": full / r, "mb": mb}
        )
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    print(f"\nread: one local shard, {n} samples, {mb:.1f} MB (page-cached), best of {args.repeats}")
    print(f"{'case':40} {'ms/shard':>9} {'samples/s':>10} {'x full':>7}")
    for r in rows:
        print(f"{r['case']:40} {r['ms_per_shard']:9.1f} {r['samples_per_s']:10.0f} {r['vs_full']:7.2f}")
    return rows


def _wds_walk(tar_file_iterator, path, select):
    with open(path, "rb") as f:
        return sum(1 for _ in tar_file_iterator(f, select_files=select))


# ----------------------------------------------------------------------------- decode


def pixel_difference(jpegs: list[bytes], size: int) -> dict:
    """draft vs pil on the same crops: worst-image mean |diff| and PSNR, overall max |diff|."""
    import numpy as np

    from llm2clip.data.images import decode_image, train_transform

    tf = train_transform(size)
    maes, psnrs, worst, reduced = [], [], 0.0, 0
    for i, d in enumerate(jpegs):
        a = tf(decode_image(d), random.Random(i)).numpy().astype(np.float64)
        b = tf.from_bytes(d, random.Random(i), draft=True).numpy().astype(np.float64)
        diff = np.abs(a - b)
        if diff.max() == 0:
            continue
        reduced += 1
        maes.append(diff.mean())
        psnrs.append(10 * np.log10(255**2 / (diff**2).mean()))
        worst = max(worst, float(diff.max()))
    return {
        "reduced_fraction": reduced / len(jpegs),
        "mean_abs_worst": max(maes, default=0.0),
        "mean_abs_mean": statistics.fmean(maes) if maes else 0.0,
        "psnr_min": min(psnrs, default=float("inf")),
        "max_abs": worst,
    }


def bench_decode(args) -> list[dict]:
    import torch

    from llm2clip.data.images import decode_image, train_transform

    torch.set_num_threads(1)
    tf = train_transform(224)
    rows = []
    for side in args.sizes:
        jpegs = make_jpegs(args.images, side, seed=side)
        paths = {
            "pil": lambda js=jpegs: [tf(decode_image(d), random.Random(i)) for i, d in enumerate(js)],
            "draft": lambda js=jpegs: [
                tf.from_bytes(d, random.Random(i), draft=True) for i, d in enumerate(js)
            ],
        }
        got = {name: rate(fn, len(jpegs), args.repeats) for name, fn in paths.items()}
        diff = pixel_difference(jpegs, 224)
        row = {"short_side": side, "images": len(jpegs), "pil_per_s": got["pil"], "draft_per_s": got["draft"],
               "draft_speedup": got["draft"] / got["pil"], **diff}  # fmt: skip
        if args.gpu:
            row["nvjpeg_per_s"] = bench_nvjpeg(jpegs, tf)
        rows.append(row)
    print(f"\ndecode + random-resized crop to 224 (scale 0.9-1.0), one core, best of {args.repeats}")
    head = f"{'short side':>10} {'pil/s':>8} {'draft/s':>8} {'x':>5} {'reduced':>8} {'MAE max':>8}"
    head += f" {'PSNR min':>9} {'max|d|':>7}"
    print(head + (f" {'nvjpeg/s':>9}" if args.gpu else ""))
    for r in rows:
        line = (
            f"{r['short_side']:10d} {r['pil_per_s']:8.0f} {r['draft_per_s']:8.0f} {r['draft_speedup']:5.2f}"
        )
        line += f" {r['reduced_fraction']:8.0%} {r['mean_abs_worst']:8.2f}"
        line += f" {r['psnr_min']:9.1f} {r['max_abs']:7.0f}"
        print(line + (f" {r['nvjpeg_per_s']:9.0f}" if args.gpu else ""))
    return rows


def bench_nvjpeg(jpegs: list[bytes], tf, batch: int = 256) -> float:
    """Images/s of GPU decoding (nvJPEG through torchvision) + crop + resize on the GPU."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    from llm2clip.data.images import decode_image

    sizes = [decode_image(d).size for d in jpegs]
    data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    data = (data * (batch // len(data) + 1))[:batch]
    sizes = (sizes * (batch // len(sizes) + 1))[:batch]
    boxes = [tf.crop_box(w, h, random.Random(i)) for i, (w, h) in enumerate(sizes)]

    def run():
        imgs = decode_jpeg(data, device="cuda")
        out = torch.empty((batch, 3, 224, 224), dtype=torch.uint8, device="cuda")
        for i, (img, (left, top, cw, ch)) in enumerate(zip(imgs, boxes)):
            crop = img[:, top : top + ch, left : left + cw].unsqueeze(0).float()
            out[i] = F.interpolate(crop, size=(224, 224), mode="bicubic", antialias=True).clamp_(0, 255)[0]
        torch.cuda.synchronize()

    run()
    return rate(run, batch, 5)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("read", "decode"), default=None)
    p.add_argument("--quick", action="store_true", help="fewer images and repeats (~30 s)")
    p.add_argument("--sizes", type=common.int_list, default=(400, 512, 600), help="JPEG shorter sides")
    p.add_argument("--images", type=int, default=200, help="JPEGs per size (decode)")
    p.add_argument("--read-samples", type=int, default=1000, help="samples in the read benchmark's shard")
    p.add_argument("--repeats", type=int, default=5)
    common.add_output_args(p, "folder for the JSON result", plot=False)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.read_samples, args.repeats = 60, 300, 3
    import torch

    args.gpu = False
    if torch.cuda.is_available():
        try:
            import torchvision  # noqa: F401

            args.gpu = True
        except ImportError:
            print("CUDA is available but torchvision is not: no nvJPEG row (pip install torchvision)")
    result = {"meta": {**common.git_meta(), "cpu": common.cpu_name(), "loadavg": common.loadavg(),
                       "time": common.utc_timestamp(), "torch": torch.__version__}}  # fmt: skip
    if args.gpu:
        result["meta"]["gpu"] = torch.cuda.get_device_name(0)
    if args.only in (None, "read"):
        result["read"] = bench_read(args)
    if args.only in (None, "decode"):
        result["decode"] = bench_decode(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{common.result_stem('data_throughput', 'cuda' if args.gpu else 'cpu', args.tag)}.json"
    common.write_json_atomic(path, result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
