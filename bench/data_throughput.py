"""Data path throughput: shard reading, and decoded + augmented samples/s per worker at 224 px.

One process, one torch thread: what one DataLoader worker does. ``read``: our tar walk beside
webdataset's; ``decode``: the pil and draft paths per core and, on a GPU, nvjpeg (the trainer's
``--decode device``) on JPEGs re-encoded from photographs. Target: draft >= 2x pil per core from
512 px JPEGs. Details: bench/README.md; :func:`worker_rate` feeds bench/train_throughput.py's breakdown.

    python bench/data_throughput.py                 # read + decode at shorter sides 400,512,600
    python bench/data_throughput.py --quick         # fewer images, ~30 s
    python bench/data_throughput.py --only decode --sizes 512 --quick    # the GPU check
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import random
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as bench/data_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

TARGET_SIZE, TARGET_SPEEDUP = 512, 2.0  # draft >= 2x pil per core from 512 px JPEGs
QUICK = {"images": 60, "read_samples": 300, "repeats": 3}
# fmt: off
OPTIONS = [
    ("--only", ("read", "decode"), None, "one part only (default both)"),
    ("--sizes", common.int_list, (400, 512, 600), "JPEG shorter sides (default 400,512,600)"),
    ("--images", int, 200, "JPEGs per size (decode; --quick 60)"),
    ("--read-samples", int, 1000, "samples in the read benchmark's shard (--quick 300)"),
]
# fmt: on


def photographs(limit: int = 40) -> list:
    """RGB PIL images of real photographs available offline."""
    from PIL import Image

    paths = []
    with contextlib.suppress(ImportError):
        import matplotlib

        paths.append(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    stamps = sorted(glob.glob("/usr/share/tuxpaint/stamps/**/*.png", recursive=True))
    random.Random(0).shuffle(stamps)
    out = []
    for p in paths + stamps[:limit]:
        try:
            img = Image.open(p)
            img.load()
        except OSError:
            continue
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        if min(img.size) >= 200:
            out.append(img.convert("RGB"))
    if not out:
        raise RuntimeError("no photograph found: pip install matplotlib (grace_hopper.jpg)")
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
    return items / min(common.timings(fn, repeats, warm=False))


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as in a DataLoader worker; the caller's count restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def read_cases(args, tmp: str):
    from webdataset.tariterators import tar_file_iterator

    from llm2clip.data.shards import count_samples, walk_samples, write_shard

    path = os.path.join(tmp, "00000.tar")
    jpegs = make_jpegs(args.read_samples, 512)
    write_shard(
        path,
        [{"__key__": f"{i:09d}", "jpg": d, "txt": f"caption {i}", "json": "{}"} for i, d in enumerate(jpegs)],
    )

    def wds(select):
        with open(path, "rb") as f:
            return sum(1 for _ in tar_file_iterator(f, select_files=select))

    quarter = lambda i, f: i % 4 == 0 and f == "jpg"
    wds_quarter = lambda name: name.endswith(".jpg") and int(name[:9]) % 4 == 0
    cases = {
        "ours: full read": lambda: sum(1 for _ in walk_samples(path)),
        "ours: 1/4 of the images": lambda: sum(1 for _ in walk_samples(path, quarter)),
        "ours: count (headers)": lambda: count_samples([path]),
        "ours: pipe:cat full read": lambda: sum(1 for _ in walk_samples(f"pipe:cat {path}")),
        "webdataset tar_file_iterator: full": partial(wds, None),
        "webdataset tar_file_iterator: 1/4": partial(wds, wds_quarter),
    }
    mb, n = os.path.getsize(path) / 1e6, len(jpegs)
    for name, fn in cases.items():

        def measure(fn=fn):
            fn()  # page cache warm
            r = rate(fn, n, args.repeats)
            return {"samples_per_s": r, "ms_per_shard": n / r * 1e3, "mb": mb}

        yield common.Case({"part": "read", "case": name}, measure)


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


def decode_rates(jpegs: list[bytes], repeats: int) -> dict:
    """Best samples/s of one worker (one thread) on the pil and draft paths."""
    from llm2clip.data.images import decode_image, train_transform

    tf = train_transform(224)
    paths = {
        "pil": lambda: [tf(decode_image(d), random.Random(i)) for i, d in enumerate(jpegs)],
        "draft": lambda: [tf.from_bytes(d, random.Random(i), draft=True) for i, d in enumerate(jpegs)],
    }
    with one_thread():
        return {name: rate(fn, len(jpegs), repeats) for name, fn in paths.items()}


def nvjpeg_case(jpegs: list[bytes], batch: int = 256, device: str = "cuda") -> dict:
    """The trainer's decode="device" path, as its main process runs it (llm2clip.data.device_decode
    .finish_batch: one nvJPEG call per batch on a GPU, then crop + resize per image): images/s, and
    the pixel difference to the pil path on the same crops. device="cpu" runs the same code with
    libjpeg-turbo (the smoke test)."""
    import torch

    from llm2clip.data.device_decode import deferred_batch, finish_batch
    from llm2clip.data.images import decode_image, train_transform

    tf, dev = train_transform(224), torch.device(device)
    item = deferred_batch(jpegs, 224, batch)

    def run():
        out = finish_batch(dict(item), dev)["images"]  # a copy: finish_batch takes "deferred" out
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = run().cpu()
    maes, psnrs = [], []
    for i, data in enumerate(jpegs[:batch]):
        d = out[i].double() - tf(decode_image(data), random.Random(i)).double()
        maes.append(float(d.abs().mean()))
        psnrs.append(10 * math.log10(255**2 / max(float((d**2).mean()), 1e-12)))
    return {"nvjpeg_per_s": rate(run, batch, 5), "nvjpeg_mae_worst": max(maes), "nvjpeg_psnr_min": min(psnrs)}


def decode_case(side: int, args) -> dict:
    jpegs = make_jpegs(args.images, side, seed=side)
    got = decode_rates(jpegs, args.repeats)
    row = {
        "images": len(jpegs),
        "pil_per_s": got["pil"],
        "draft_per_s": got["draft"],
        "draft_speedup": got["draft"] / got["pil"],
        **pixel_difference(jpegs, 224),
    }
    if args.nvjpeg:
        row.update(nvjpeg_case(jpegs))
    return row


def worker_rate(source: str = "measure", size: int = TARGET_SIZE) -> dict:
    """One DataLoader worker's decoded + augmented samples/s on the trainer's CPU path (draft)
    from `size` px JPEGs to 224 px: measured now (the --quick settings, one thread), read from a
    data_throughput JSON (its decode row with the nearest shorter side; with the GPU's nvjpeg_per_s
    when the row has it), or given as a number."""
    if source == "measure":
        r = decode_rates(make_jpegs(QUICK["images"], size, seed=size), QUICK["repeats"])["draft"]
        return {"samples_per_s": r, "short_side": size, "source": "measured in this run (draft path)"}
    with contextlib.suppress(ValueError):
        return {"samples_per_s": float(source), "short_side": None, "source": "given (--decode-rate)"}
    rows = [r for r in json.loads(Path(source).read_text())["rows"] if r.get("part") == "decode"]
    if not any(r.get("draft_per_s") for r in rows):
        raise ValueError(f"{source}: no decode row with draft_per_s")
    row = min((r for r in rows if r.get("draft_per_s")), key=lambda r: abs(r["short_side"] - size))
    out = {"samples_per_s": row["draft_per_s"], "short_side": row["short_side"], "source": source}
    if row.get("nvjpeg_per_s"):
        out["nvjpeg_per_s"] = row["nvjpeg_per_s"]  # the main process's rate on --decode device
    return out


# fmt: off
READ_COLUMNS = [
    ("case", "case", ""), ("ms/shard", "ms_per_shard", ".1f"), ("samples/s", "samples_per_s", ".0f"),
    ("x full", "vs_full", ".2f"), ("note", common.note, ""),
]
# fmt: on
# fmt: off
DECODE_COLUMNS = [
    ("short side", "short_side", "d"), ("pil/s", "pil_per_s", ".0f"), ("draft/s", "draft_per_s", ".0f"),
    ("x", "draft_speedup", ".2f"), ("reduced", "reduced_fraction", ".0%"),
    ("MAE max", "mean_abs_worst", ".2f"), ("PSNR min", "psnr_min", ".1f"), ("max|d|", "max_abs", ".0f"),
    ("nvjpeg/s", "nvjpeg_per_s", ".0f"), ("nvjpeg MAE", "nvjpeg_mae_worst", ".2f"),
    ("nvjpeg PSNR", "nvjpeg_psnr_min", ".1f"), ("note", common.note, ""),
]
# fmt: on


def main(argv=None) -> int:
    p = common.parser(
        __doc__, OPTIONS, ("device", "quick", "repeats"), plot=False, repeats=(5, "best of (5)")
    )
    args = common.parse(p, argv)
    if args.quick:
        vars(args).update(QUICK)
    args.nvjpeg = False
    if args.device == "cuda":
        import torch

        from llm2clip.data.device_decode import device_decode_available

        args.nvjpeg = device_decode_available(torch.device("cuda"))
        if not args.nvjpeg:
            print("CUDA is available but no JPEG decoder runs on it: no nvJPEG column (torchcodec)")
    run = common.Run("data_throughput", args, argv)
    parts = ("read", "decode") if args.only is None else (args.only,)
    with run, tempfile.TemporaryDirectory(prefix="data_throughput-") as tmp:
        if "read" in parts:
            run.sweep(read_cases(args, tmp))
        if "decode" in parts:
            run.sweep(
                common.Case({"part": "decode", "short_side": s}, partial(decode_case, s, args))
                for s in args.sizes
            )
    read = [r for r in run.rows if r["part"] == "read"]
    for r in read:
        if read[0].get("samples_per_s") and r.get("samples_per_s"):
            r["vs_full"] = read[0]["samples_per_s"] / r["samples_per_s"]
    decode = [r for r in run.rows if r["part"] == "decode"]
    for r in decode:
        if r["short_side"] == TARGET_SIZE and r.get("draft_speedup"):
            run.target(
                f"draft >= {TARGET_SPEEDUP:g}x pil samples/s per core at 224 px from {TARGET_SIZE} px JPEGs",
                r["draft_speedup"],
                r["draft_speedup"] >= TARGET_SPEEDUP,
            )
    text = []
    if read:
        text += [
            f"read: one local shard, {args.read_samples} samples, {read[0].get('mb', 0):.1f} MB "
            f"(page-cached), best of {args.repeats}",
            common.table(read, READ_COLUMNS),
        ]
    if decode:
        text += [
            f"decode + random-resized crop to 224 (scale 0.9-1.0), one core, best of {args.repeats}",
            common.table(decode, DECODE_COLUMNS),
        ]
    return run.finish("\n\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
