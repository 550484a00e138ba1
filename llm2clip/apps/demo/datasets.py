"""The demo's data: image-caption shards from Debian packages, split by caption, and zero-shot shards.

    python -m llm2clip.apps.demo.datasets pairs --source auto --out demo_out/data
    python -m llm2clip.apps.demo.datasets fashion-mnist --out demo_out/data/fashion_mnist --per-class 50

Sources (installed at run time by the demo's setup step; the images are never committed):

- Tux Paint stamps (Debian ``tuxpaint-stamps-default``, GPL-2): the photos outside ``symbols/``
  (``*_mirror`` / ``*_flip`` variants dropped). A stamp's ``.txt`` starts with the English caption;
  the lines after it are translations (``fr.utf8=...``). Images are RGBA: composited on white.
- Noto Color Emoji (Debian ``fonts-noto-color-emoji``): every single code point of the font's cmap
  whose Unicode category is So (regional indicators and skin-tone modifiers dropped), rendered with
  Pillow from the CBDT bitmap font (size 109, the only bitmap strike) in colour; caption from
  ``unicodedata.name``.

Each sample holds the image (``png``, a white-padded square of ``--image-size`` pixels), the English
caption (``txt``) and a ``json`` member with a second phrasing of the same image (``alt``), its
source and origin. The second phrasing is what makes a stage-1 pair (two captions of one image):

- Tux Paint: the stamp's file name and folders, e.g. ``apple_green.png`` in ``food/fruit`` ->
  "apple green (food, fruit)"; a terse label against a sentence ("A green apple."), as a short vs a
  dense caption. (The translations were the other candidate; SmolLM2-135M is English-centric.)
- Emoji: "a picture of <name>, an emoji": the same words in another frame, so stage 1 has to map
  the content words, not the template, onto each other.

Split by caption: samples that share a caption or a second phrasing are joined (union-find) into one
group, and whole groups go to train or held-out per source, so no held-out caption text appears in
train (checked, and recorded in ``summary.json``). Held-out pairs are also written as
``heldout_pairs.jsonl`` (``{"a": txt, "b": alt}``), and a fixed subset of them as
``cra_pairs.jsonl`` for stage 1's CRA.

Translations (cross-lingual evaluation): the held-out Tux Paint stamps are also written in the
Crossmodal-3600 layout that ``python -m llm2clip.eval --xm3600 DIR --languages ...`` reads
(``llm2clip.evaluation.multilingual``), as ``tuxpaint_heldout_translations/``: ``captions.jsonl``
(one line per image: ``"image/key"``, ``"origin"``, ``"en": {"caption": [English]}`` and every
translation of its ``.txt`` under Tux Paint's own locale name, ``"fr"``, ``"ja"``, ``"zh_CN"``, ...)
and ``images/<key>.jpg`` (the same square rendering as the shards, JPEG quality 95). Training only
ever sees the English captions; the translations exist for held-out images only.

Fashion-MNIST (Debian ``dataset-fashion-mnist``, the IDX files in /usr/share/datasets/fashion-mnist):
the first ``--per-class`` test images of each class, inverted to dark-on-white like the stamps and
upscaled, as shards with a ``cls`` member (ASCII class index). Class names come from the label table
of the package's own README; prompt templates from open_clip's ``zero_shot_metadata.py`` (read as a
standalone file, never importing open_clip), else a short generic list (recorded in the output).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import shutil
import struct
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llm2clip.data.shards import write_shard
from llm2clip.files import atomic_write_json

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_README = Path("/usr/share/doc/dataset-fashion-mnist/README.md.gz")
# The only strike of the CBDT bitmap font: other sizes raise "invalid pixel size".
EMOJI_FONT_SIZE = 109
FASHION_CLASSES_FALLBACK = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
TRANSLATIONS_DIR = "tuxpaint_heldout_translations"  # held-out Tux Paint stamps, XM3600 layout
_TRANSLATION_LINE = re.compile(r"^([\w@]+)\.utf8=(.*)$")
# Used only when open_clip's zero_shot_metadata.py can't be had (the demo says so in its report).
GENERIC_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a drawing of a {}.")
SOURCES = ("tuxpaint", "emoji")


@dataclass
class Item:
    """One image with two captions, before it is rendered."""

    source: str
    origin: str  # file path (Tux Paint) or code point (emoji): where the image comes from
    caption: str
    alt: str
    render: Callable[[int], bytes] = field(repr=False)  # image side -> PNG bytes
    translations: dict[str, str] = field(default_factory=dict)  # locale -> caption (Tux Paint only)


# ---------------------------------------------------------------------------------------------
# images


def _square_png(im, size: int) -> bytes:
    """RGBA/RGB image -> RGB PNG of size x size: composited on white, fitted, centred."""
    from PIL import Image

    im = im.convert("RGBA")
    bbox = im.getchannel("A").getbbox()  # trim transparent margins so the object fills the frame
    if bbox:
        im = im.crop(bbox)
    scale = size / max(im.size)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(im, ((size - w) // 2, (size - h) // 2))
    buf = io.BytesIO()
    canvas.convert("RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _render_file(path: Path) -> Callable[[int], bytes]:
    def render(size: int) -> bytes:
        from PIL import Image

        with Image.open(path) as im:
            return _square_png(im, size)

    return render


_FONTS: dict = {}


def _render_emoji(font_path: Path, char: str) -> Callable[[int], bytes]:
    def render(size: int) -> bytes:
        from PIL import Image, ImageDraw, ImageFont

        font = _FONTS.get(font_path)
        if font is None:
            font = _FONTS[font_path] = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE)
        im = Image.new("RGBA", (EMOJI_FONT_SIZE * 2, EMOJI_FONT_SIZE * 2), (0, 0, 0, 0))
        ImageDraw.Draw(im).text((0, 0), char, font=font, embedded_color=True)
        return _square_png(im, size)

    return render


# ---------------------------------------------------------------------------------------------
# sources


def _words(name: str) -> str:
    """'Cherry_Stella2' -> 'cherry stella'; 'grannySmith' -> 'granny smith'."""
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return " ".join(w for w in re.split(r"[^A-Za-z]+", name.lower()) if w)


def tuxpaint_items(root: Path = TUXPAINT_STAMPS) -> list[Item]:
    """The photo stamps outside symbols/ that carry an English caption."""
    items = []
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(root)
        if rel.parts[0] == "symbols" or re.search(r"_(mirror|flip)$", png.stem):
            continue
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        caption, translations = parse_stamp_text(txt.read_text(encoding="utf-8", errors="replace"))
        label = _words(png.stem)
        if not caption or not label:
            continue
        folders = [f for f in rel.parts[:-1] if f not in ("cartoon", "photo")]
        alt = f"{label} ({', '.join(folders)})" if folders else label
        items.append(Item("tuxpaint", str(rel), caption, alt, _render_file(png), translations))
    return items


def parse_stamp_text(text: str) -> tuple[str, dict[str, str]]:
    """A stamp's .txt -> (English caption, {locale: translation}). The English caption is the first
    line that is not a "lang.utf8=..." translation; a locale's first non-empty line wins."""
    caption, translations = "", {}
    for line in text.splitlines():
        m = _TRANSLATION_LINE.match(line.strip())
        if m is None:
            caption = caption or line.strip()
        elif m.group(2).strip():
            translations.setdefault(m.group(1), m.group(2).strip())
    return caption, translations


def emoji_items(font_path: Path = EMOJI_FONT) -> list[Item]:
    """The font's single-code-point pictographs (category So), named by unicodedata."""
    from fontTools.ttLib import TTFont  # ships with matplotlib, which the demo needs anyway

    with TTFont(str(font_path), lazy=True) as font:
        cmap = font.getBestCmap()
    items = []
    for cp in sorted(cmap):
        char = chr(cp)
        name = unicodedata.name(char, "")
        if unicodedata.category(char) != "So" or not name:
            continue
        if name.startswith(("REGIONAL INDICATOR", "EMOJI MODIFIER", "EMOJI COMPONENT")):
            continue
        caption = name.lower()
        alt = f"a picture of {caption}, an emoji"
        items.append(Item("emoji", f"U+{cp:04X}", caption, alt, _render_emoji(font_path, char)))
    return items


def available_sources() -> dict[str, bool]:
    return {"tuxpaint": TUXPAINT_STAMPS.is_dir(), "emoji": EMOJI_FONT.is_file()}


# ---------------------------------------------------------------------------------------------
# split by caption


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def caption_groups(items: Sequence[Item]) -> list[list[int]]:
    """Indices grouped so that items sharing a (normalised) caption or alt text share a group."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, it in enumerate(items):
        for text in (it.caption, it.alt):
            j = owner.setdefault(_norm(text), i)
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def split_by_caption(
    items: Sequence[Item], heldout_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, held-out) item indices. Whole caption groups move (across sources too: an emoji name
    can equal a stamp's label); each source gets ~heldout_fraction of its items held out."""
    groups = caption_groups(items)
    random.Random(f"split/{seed}").shuffle(groups)
    sources = {it.source for it in items}
    target = {s: round(heldout_fraction * sum(it.source == s for it in items)) for s in sources}
    taken = dict.fromkeys(sources, 0)
    heldout: list[int] = []
    train: list[int] = []
    for g in groups:
        src = items[g[0]].source
        if taken[src] < target[src]:
            heldout.extend(g)
            for i in g:
                taken[items[i].source] += 1
        else:
            train.extend(g)
    return sorted(train), sorted(heldout)


def caption_overlap(train: Sequence[Item], heldout: Sequence[Item]) -> int:
    """Held-out caption texts (caption or alt, normalised) that also occur in train: must be 0."""
    seen = {_norm(t) for it in train for t in (it.caption, it.alt)}
    return sum(_norm(t) in seen for it in heldout for t in (it.caption, it.alt))


# ---------------------------------------------------------------------------------------------
# shards


def _write_split(items: Sequence[Item], out: Path, n_shards: int, size: int, split: str, log) -> list[str]:
    """Round-robin into n_shards tars named '<split>-00000.tar': a cache keys rows by the shard's file
    name, so train and held-out shards must not share names (one cache holds both)."""
    out.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, min(n_shards, len(items)))
    paths = []
    done = 0
    t0 = time.perf_counter()
    for s in range(n_shards):
        samples = []
        for i in range(s, len(items), n_shards):  # round-robin: every shard mixes the sources
            it = items[i]
            meta = {"alt": it.alt, "source": it.source, "origin": it.origin}
            samples.append(
                {"__key__": f"{i:05d}", "png": it.render(size), "txt": it.caption, "json": json.dumps(meta)}
            )
            done += 1
            if done % 200 == 0:
                log(f"  {split}: {done}/{len(items)} images ({done / (time.perf_counter() - t0):.0f}/s)")
        path = out / f"{split}-{s:05d}.tar"
        write_shard(str(path), samples)
        paths.append(str(path))
    return paths


def _jpeg(png: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(png)) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_translations(items: Sequence[Item], out: Path, size: int) -> dict:
    """The items that carry translations, in the XM3600 layout (module docstring) under `out`:
    captions.jsonl + images/<key>.jpg, keys as in the held-out shards (the item's index). Returns
    the counts: images, and per language its captions, distinct captions and captions equal to
    the English one (normalised)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    langs: dict[str, dict] = {}
    n = 0
    with open(tmp / "captions.jsonl", "w", encoding="utf-8") as f:
        for i, it in enumerate(items):
            if not it.translations:
                continue
            key = f"{i:05d}"
            (tmp / "images" / f"{key}.jpg").write_bytes(_jpeg(it.render(size)))
            record = {"image/key": key, "origin": it.origin, "en": {"caption": [it.caption]}}
            record.update({lang: {"caption": [text]} for lang, text in sorted(it.translations.items())})
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
            for lang, text in (("en", it.caption), *it.translations.items()):
                c = langs.setdefault(lang, {"captions": 0, "distinct": set(), "same_as_english": 0})
                c["captions"] += 1
                c["distinct"].add(_norm(text))
                c["same_as_english"] += lang != "en" and _norm(text) == _norm(it.caption)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    languages = {lang: {**c, "distinct": len(c["distinct"])} for lang, c in sorted(langs.items())}
    return {"dir": str(out), "images": n, "languages": languages}


def _write_pairs(items: Sequence[Item], path: Path) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"a": it.caption, "b": it.alt}, ensure_ascii=False) + "\n")
    os.replace(f"{path}.tmp", path)


def build_pairs(
    out: Path,
    source: str = "auto",
    image_size: int = 128,
    heldout_fraction: float = 0.2,
    limit: int = 0,
    train_shards: int = 4,
    heldout_shards: int = 2,
    seed: int = 0,
    cra_pairs: int = 200,
    log=print,
) -> dict:
    """Write out/train/*.tar, out/heldout/*.tar, out/heldout_pairs.jsonl, out/cra_pairs.jsonl,
    out/tuxpaint_heldout_translations/ (when held-out stamps carry translations) and
    out/summary.json (written last)."""
    t0 = time.perf_counter()
    have = available_sources()
    wanted = [s for s in SOURCES if have[s]] if source == "auto" else [source]
    missing = [s for s in wanted if not have[s]]
    if missing or not wanted:
        raise SystemExit(
            f"missing data source(s) {missing or list(SOURCES)}: "
            "apt-get install -y --no-install-recommends tuxpaint-stamps-default fonts-noto-color-emoji"
        )
    items: list[Item] = []
    for src in wanted:
        found = tuxpaint_items() if src == "tuxpaint" else emoji_items()
        if limit:
            # A fixed random subset (not the first N: those would all be one folder / block).
            rng = random.Random(f"limit/{seed}")
            found = sorted(rng.sample(found, min(limit, len(found))), key=lambda i: i.origin)
        items += found
    tr, ho = split_by_caption(items, heldout_fraction, seed)
    train = [items[i] for i in tr]
    heldout = [items[i] for i in ho]
    per_source = {}
    for src in wanted:
        n_tr, n_ho = sum(i.source == src for i in train), sum(i.source == src for i in heldout)
        per_source[src] = {"items": n_tr + n_ho, "train": n_tr, "heldout": n_ho}
        log(f"  {src}: {n_tr + n_ho} images -> {n_tr} train, {n_ho} held-out")
    overlap = caption_overlap(train, heldout)
    if overlap:
        raise RuntimeError(f"{overlap} held-out captions occur in train: the split is broken")
    train_paths = _write_split(train, out / "train", train_shards, image_size, "train", log)
    heldout_paths = _write_split(heldout, out / "heldout", heldout_shards, image_size, "heldout", log)
    _write_pairs(heldout, out / "heldout_pairs.jsonl")
    # CRA costs two LLM forwards per pair at every evaluation: a fixed random subset, both sources.
    cra = random.Random(f"cra/{seed}").sample(heldout, min(cra_pairs, len(heldout)))
    _write_pairs(cra, out / "cra_pairs.jsonl")
    translations = None
    if any(it.translations for it in heldout):
        translations = write_translations(heldout, out / TRANSLATIONS_DIR, image_size)
        n_lang = len(translations["languages"])
        log(f"  translations: {translations['images']} held-out stamps in {n_lang} languages")
    summary = {
        "sources": per_source,
        "train": len(train),
        "heldout": len(heldout),
        "train_unique_captions": len({_norm(i.caption) for i in train}),
        "heldout_unique_captions": len({_norm(i.caption) for i in heldout}),
        "heldout_captions_in_train": overlap,
        "cra_pairs": len(cra),
        "translations": translations,
        "image_size": image_size,
        "train_shards": train_paths,
        "heldout_shards": heldout_paths,
        "examples": [{"txt": i.caption, "alt": i.alt, "origin": i.origin} for i in (train[:3] + heldout[:3])],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST zero-shot set


def _read_idx(path: Path):
    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:  # images: n, rows, cols, uint8
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:  # labels
        return np.frombuffer(data, dtype=np.uint8, offset=8)
    raise ValueError(f"{path}: not an IDX file (magic {magic})")


def fashion_classnames(readme: Path = FASHION_README) -> tuple[list[str], str]:
    """Class names from the label table of the package's README ('| 0 | T-shirt/top |'), else built-in."""
    try:
        text = gzip.open(readme, "rt", encoding="utf-8").read()
        rows = dict(re.findall(r"^\|\s*(\d)\s*\|\s*([^|]+?)\s*\|\s*$", text, flags=re.M))
        names = [rows[str(i)] for i in range(10)]
        return [n.lower() for n in names], str(readme)
    except (OSError, KeyError):
        return [n.lower() for n in FASHION_CLASSES_FALLBACK], "built-in list"


def open_clip_metadata_file() -> Path | None:
    """open_clip/zero_shot_metadata.py of an installed open-clip-torch, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")  # a top-level find_spec does not run the package
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "zero_shot_metadata.py"
        if path.is_file():
            return path
    return None


def prompt_templates(name: str = "SIMPLE_IMAGENET_TEMPLATES") -> tuple[list[str], str]:
    """Templates with '{}' from open_clip's metadata file (loaded standalone), else GENERIC_TEMPLATES."""
    path = open_clip_metadata_file()
    if path is not None:
        spec = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # the file is plain tuples of lambdas; it imports nothing
        return [t("{}") for t in getattr(module, name)], f"{path} ({name})"
    return list(GENERIC_TEMPLATES), "built-in generic templates (open-clip-torch not installed)"


def build_fashion_mnist(out: Path, per_class: int = 50, image_size: int = 128, n_shards: int = 1) -> dict:
    """Test-split subset as zero-shot shards + classnames.txt + templates.json."""
    from PIL import Image

    t0 = time.perf_counter()
    images = _read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    picked: list[int] = []
    counts = [0] * 10
    for i, y in enumerate(labels.tolist()):
        if counts[y] < per_class:
            counts[y] += 1
            picked.append(i)
    samples = []
    for i in picked:
        im = Image.fromarray(255 - images[i], mode="L").convert("RGB")  # dark-on-white, like the stamps
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        samples.append({"__key__": f"fm{i:05d}", "png": buf.getvalue(), "cls": str(int(labels[i]))})
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shard_paths = []
    for s in range(n_shards):
        path = out / "shards" / f"fashion-mnist-{s:05d}.tar"
        write_shard(str(path), samples[s::n_shards])
        shard_paths.append(str(path))
    names, names_from = fashion_classnames()
    templates, templates_from = prompt_templates()
    (out / "classnames.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    atomic_write_json(out / "templates.json", templates)
    summary = {
        "images": len(samples),
        "per_class": per_class,
        "classnames": names,
        "classnames_from": names_from,
        "templates": templates,
        "templates_from": templates_from,
        "shards": shard_paths,
        "preprocessing": f"inverted (dark on white) and upscaled 28 -> {image_size} px",
        "checksum": hashlib.sha256(b"".join(s["png"] for s in samples)).hexdigest()[:16],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m llm2clip.apps.demo.datasets", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pairs", help="image-caption shards (train / held-out, split by caption)")
    pp.add_argument("--out", required=True, help="output directory")
    pp.add_argument(
        "--source", default="auto", choices=("auto", *SOURCES), help="auto: every installed source"
    )
    pp.add_argument("--image-size", type=int, default=128, help="side of the stored square images")
    pp.add_argument("--heldout-fraction", type=float, default=0.2, help="fraction of images held out")
    pp.add_argument("--limit", type=int, default=0, help="at most this many images per source (0: all)")
    pp.add_argument("--train-shards", type=int, default=4, help="number of train shards")
    pp.add_argument("--heldout-shards", type=int, default=2, help="number of held-out shards")
    pp.add_argument("--seed", type=int, default=0, help="seed of the split and the subset")
    pp.add_argument(
        "--cra-pairs", type=int, default=200, help="held-out pairs in cra_pairs.jsonl (stage-1 CRA)"
    )
    fp = sub.add_parser("fashion-mnist", help="zero-shot shards, class names and templates")
    fp.add_argument("--out", required=True, help="output directory")
    fp.add_argument("--per-class", type=int, default=50, help="test images per class")
    fp.add_argument("--image-size", type=int, default=128, help="side of the stored images")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.cmd == "pairs":
        summary = build_pairs(
            Path(args.out), args.source, args.image_size, args.heldout_fraction, args.limit,
            args.train_shards, args.heldout_shards, args.seed, args.cra_pairs, log,
        )  # fmt: skip
        log(f"wrote {summary['train']} train + {summary['heldout']} held-out samples to {args.out}")
    else:
        summary = build_fashion_mnist(Path(args.out), args.per_class, args.image_size)
        log(f"wrote {summary['images']} Fashion-MNIST images to {args.out}")
        log(f"templates: {summary['templates_from']}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
