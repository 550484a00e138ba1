"""Load the demo's trained models as bundles and encode held-out images and captions with them.

    python -m llm2clip.apps.demo.bundle_check --bundles demo_out/stage2/stage1_llm/final \\
        --shards demo_out/data/heldout --images 8 --out demo_out/bundle_check.json

A run's ``final/`` is a bundle (``llm2clip.bundle``): the tower, the adapter and the recipe of the
frozen LLM it was trained against. This step does what a user does with it, the three lines the
report shows (``SNIPPET``)::

    import llm2clip
    model = llm2clip.load("demo_out/stage2/stage1_llm/final")
    image_feats, text_feats = model.encode_image(images), model.encode_text(captions)

on the first ``--images`` held-out samples (PIL images and their English captions, read from the
held-out shards), and fails unless every bundle loads (its LLM rebuilt from local files and
probe-checked) and returns finite, L2-normalised features of one width for both. It records the
load time, the width, the cosine of each image with its own caption against the mean with the
others, and how many images rank their own caption first among the ``--images`` captions (beside
chance, 1 / images), in ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

SNIPPET = """import llm2clip
model = llm2clip.load("{bundle}")  # the tower, the adapter and the recorded LLM (probe-checked)
image_feats, text_feats = model.encode_image(pil_images), model.encode_text(["{caption}"])"""


def heldout_samples(shards: Path, n: int) -> list[tuple[str, bytes, str]]:
    """(key, image bytes, caption) of the first n samples with an image and a caption, shard by
    shard in name order."""
    out: list[tuple[str, bytes, str]] = []
    for shard in sorted(shards.glob("*.tar")) if shards.is_dir() else [shards]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, field = m.name.partition(".")
                if m.isfile():
                    members.setdefault(key, {})[field] = tar.extractfile(m).read()
        for key, fields in members.items():
            image = next((fields[f] for f in ("png", "jpg", "jpeg") if f in fields), None)
            if image is not None and fields.get("txt"):
                out.append((f"{shard.name}/{key}", image, fields["txt"].decode("utf-8")))
            if len(out) == n:
                return out
    return out


def check_bundle(path: str, samples: Sequence[tuple[str, bytes, str]], device: str = "cpu") -> dict:
    """Load one bundle and encode the samples; the checks' results (``ok`` False when one fails)."""
    import torch
    from PIL import Image

    import llm2clip

    t0 = time.perf_counter()
    model = llm2clip.load(path, device)
    load_s = time.perf_counter() - t0
    images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data, _ in samples]
    captions = [c for _, _, c in samples]
    t1 = time.perf_counter()
    with torch.no_grad():
        img, txt = model.encode_image(images).float().cpu(), model.encode_text(captions).float().cpu()
    encode_s = time.perf_counter() - t1
    n = len(samples)
    problems = []
    if img.shape[0] != n or txt.shape[0] != n or img.shape[1] != txt.shape[1]:
        problems.append(f"shapes: images {tuple(img.shape)}, captions {tuple(txt.shape)} for {n} samples")
    if not (torch.isfinite(img).all() and torch.isfinite(txt).all()):
        problems.append("non-finite features")
    norms = torch.cat([img.norm(dim=1), txt.norm(dim=1)])
    if problems == [] and float((norms - 1).abs().max()) > 1e-3:
        problems.append(
            f"features not L2-normalised (norms {float(norms.min()):.4f}..{float(norms.max()):.4f})"
        )
    result = {
        "bundle": str(path),
        "ok": not problems,
        "problems": problems,
        "load_s": round(load_s, 2),
        "encode_s": round(encode_s, 2),
        "images": n,
        "dim": int(img.shape[1]),
        "llm": (model.info.recipe or {}).get("model"),
        "snippet": SNIPPET.format(bundle=path, caption=captions[0] if captions else "a photo of a cat"),
    }
    if not problems and n > 1:
        sim = img @ txt.T
        diag = sim.diagonal()
        off = (sim.sum() - diag.sum()) / (n * n - n)
        result.update(
            own_caption_cosine=round(float(diag.mean()), 4),
            other_caption_cosine=round(float(off), 4),
            own_caption_first=int((sim.argmax(dim=1) == torch.arange(n)).sum()),
            chance_own_caption_first=round(1 / n, 4),
            examples=[{"key": k, "caption": c} for k, _, c in samples[:3]],
        )
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m llm2clip.apps.demo.bundle_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bundles", nargs="+", required=True, help="bundle folders (a run's final/)")
    p.add_argument("--shards", required=True, help="held-out shards (a folder of .tar or one .tar)")
    p.add_argument("--images", type=int, default=8, help="held-out samples to encode")
    p.add_argument("--device", default="cpu", help="device of the loaded models")
    p.add_argument("--out", required=True, help="write the results here (JSON)")
    args = p.parse_args(argv)
    samples = heldout_samples(Path(args.shards), args.images)
    if not samples:
        raise SystemExit(f"no held-out sample with an image and a caption in {args.shards}")
    results = []
    for bundle in args.bundles:
        r = check_bundle(bundle, samples, args.device)
        results.append(r)
        if r["ok"]:
            print(
                f"{bundle}: loaded in {r['load_s']} s; {r['images']} images and captions -> {r['dim']}-d "
                f"unit features; own caption first for {r.get('own_caption_first')} of {r['images']} "
                f"(chance {r['images'] * r.get('chance_own_caption_first', 0):.0f}); cosine own "
                f"{r.get('own_caption_cosine')} vs others {r.get('other_caption_cosine')}",
                flush=True,
            )
        else:
            print(f"{bundle}: FAILED: {'; '.join(r['problems'])}", flush=True)
    out = {"samples": len(samples), "bundles": results, "ok": all(r["ok"] for r in results)}
    if out["ok"]:  # written only when every check passed: the demo's done-marker
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
