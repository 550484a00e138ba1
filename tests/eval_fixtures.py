"""Tiny bundles and evaluation sets in the exact public layouts (no downloads).

b = make_bundle(tmp_path)            # a random Llama + LoRA, a cache extracted by the real CLI,
                                     # a tiny ViT ClipModel trained on nothing, exported as a bundle
write_benchmark_retrieval(root, ...) # CLIP_benchmark's wds layout: test/nshards.txt, test/0.tar, ...
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llm2clip.apps.extract import main as extract_main
from llm2clip.bundle import export_bundle
from llm2clip.cache import EmbeddingCache
from llm2clip.data.shards import write_shard
from llm2clip.models.adapter import AdapterConfig
from llm2clip.models.clip_model import ClipModel, ClipModelConfig
from llm2clip.models.text_embedder import LLMTextEmbedder, LoraSettings, TextEmbedderConfig
from llm2clip.models.vit import ViT, ViTConfig
from tests.llm_fixtures import tiny_llm_dir

WORDS = (
    "a the dog cat red blue green yellow small big photo of on in near sofa grass sea car tree house "
    "bird boat sky street man woman child old new bright dark wooden stone river hill"
).split()
MULTI = "ein hund eine katze un chien une chatte 一只 狗 猫".split()
CORPUS = [" ".join(WORDS), " ".join(MULTI), "retrieve : an extra caption"]
TEMPLATE = "retrieve : {caption}"
IMAGE_SIZE = 16
MAX_LENGTH = 48


def image_bytes(seed: int, fmt: str = "PNG", size=(24, 20)) -> bytes:
    """A noisy RGB image (no two alike, so no two image features tie)."""
    rng = np.random.default_rng(seed)
    arr = (rng.integers(0, 256, 3) + rng.integers(-40, 41, (size[1], size[0], 3))).clip(0, 255)
    buf = io.BytesIO()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(arr.astype(np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def caption(rng: np.random.Generator, words: int = 6) -> str:
    return " ".join(rng.choice(WORDS, words))


def random_lora(llm: Path, out: Path, seed: int = 0) -> Path:
    """A stage-1-like LoRA adapter with non-zero weights (peft starts B at zero: no effect)."""
    emb = LLMTextEmbedder.from_pretrained(TextEmbedderConfig(model=str(llm), dtype="float32"))
    emb.add_lora(LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in emb.model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    emb.save_lora(out)
    return out


def tiny_clip(text_dim: int, seed: int = 0, spec=None) -> ClipModel:
    torch.manual_seed(seed)
    tower = ViT(ViTConfig.preset("B/16", width=32, depth=2, heads=2, patch_size=8, image_size=IMAGE_SIZE))
    model = ClipModel(tower, ClipModelConfig(embed_dim=24, adapter=AdapterConfig(text_dim, 24, depth=1)))
    model.config.text_spec = spec.to_dict() if spec is not None else None
    return model


@dataclass
class Bundle:
    root: Path
    llm: Path
    lora: Path
    cache: Path
    run: Path
    bundle: Path
    captions: list[str]


def make_bundle(root: Path) -> Bundle:
    """A run folder (config.json naming the cache, final/ and checkpoints/step_00000001/) and
    its export to root/bundle; the cache holds the captions of one small shard."""
    root.mkdir(parents=True, exist_ok=True)
    llm = tiny_llm_dir(root / "llm", corpus=CORPUS)
    lora = random_lora(llm, root / "stage1-adapter")
    rng = np.random.default_rng(0)
    captions = [caption(rng) for _ in range(6)]
    write_shard(
        str(root / "train-0.tar"), [{"__key__": f"{i:03d}", "txt": c} for i, c in enumerate(captions)]
    )
    cache = root / "cache"
    extract_main([
        "--shards", str(root / "train-0.tar"), "--out", str(cache), "--model", str(llm),
        "--adapter", str(lora), "--instruction", TEMPLATE, "--max-length", str(MAX_LENGTH),
        "--dtype", "float32", "--storage", "fp32", "--tokens-per-batch", "256", "--no-progress",
        "--device", "cpu",
    ])  # fmt: skip
    spec = EmbeddingCache.open(cache).spec
    model = tiny_clip(spec.dim, spec=spec)
    run = root / "run"
    model.save(run / "final")
    model.save(run / "checkpoints" / "step_00000001")
    (run / "config.json").write_text(
        json.dumps({"data": {"cache": str(cache)}, "cache_spec": spec.to_dict()})
    )
    export_bundle(run / "checkpoints" / "step_00000001", root / "bundle")
    return Bundle(root, llm, lora, cache, run, root / "bundle", captions)


# ---------------------------------------------------------------------------------------------
# CLIP_benchmark's wds layout


def _write_split(root: Path, split: str, shards: list[list[dict]]) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    for i, samples in enumerate(shards):
        write_shard(str(root / split / f"{i}.tar"), samples)
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n")


def write_benchmark_retrieval(root: Path, images: int = 8, seed: int = 0, blank: bool = False) -> Path:
    """A retrieval set: 2 shards, png/jpg/webp images, 1-3 captions per image in .txt lines; with
    `blank`, a blank line and an image whose .txt holds no caption."""
    rng = np.random.default_rng(seed)
    formats = (("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"))
    samples = []
    for i in range(images):
        ext, fmt = formats[i % 3]
        caps = [caption(rng) for _ in range(1 + i % 3)]
        samples.append(
            {"__key__": f"s{i:04d}", ext: image_bytes(seed * 100 + i, fmt), "txt": "\n".join(caps)}
        )
    if blank:
        samples[1]["txt"] = samples[1]["txt"] + "\n\n"
        samples[2]["txt"] = "   \n"
    half = images // 2
    _write_split(root, "test", [samples[:half], samples[half:]])
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


CLASSNAMES = ["dog", "cat", "bird", "boat", "car", "tree", "house"]
TEMPLATES = ["{c}", "a {c}", "the {c} ."]


def write_benchmark_classification(root: Path, images: int = 14, seed: int = 1, classes: int = 7) -> Path:
    samples = [
        {"__key__": f"c{i:04d}", "png": image_bytes(seed * 100 + i), "cls": str(i % classes)}
        for i in range(images)
    ]
    _write_split(root, "test", [samples])
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES[:classes]) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# Long captions and XM3600


def long_caption(rng: np.random.Generator, words: int = 350) -> str:
    """A caption far beyond CLIP's 77 tokens (one token per word with the tiny tokenizer)."""
    return " ".join(rng.choice(WORDS, words))


def write_long_captions(root: Path, images: int = 4, seed: int = 3) -> Path:
    """images/*.jpg and captions.json ([{image, caption}], plus a record whose image is missing)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(images):
        (root / "images" / f"{i}.jpg").write_bytes(image_bytes(500 + i, "JPEG"))
        records.append({"image": f"{i}.jpg", "caption": long_caption(rng)})
    records.append({"image": "missing.jpg", "caption": "a dog"})
    (root / "captions.json").write_text(json.dumps(records))
    return root / "captions.json"


XM_LANGUAGES = {"en": WORDS, "de": "ein hund eine katze".split(), "fr": "un chien une chatte".split()}


def write_xm3600(root: Path, images: int = 6, seed: int = 4) -> Path:
    """captions.jsonl + images/<key>.jpg, two captions per language; the last image file is missing."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        key = f"{i:016x}"
        if i < images - 1:
            (root / "images" / f"{key}.jpg").write_bytes(image_bytes(700 + i, "JPEG"))
        record = {"image/key": key, "image/locale": "en"}
        for lang, words in XM_LANGUAGES.items():
            caps = [" ".join(rng.choice(words, 4)) for _ in range(2)]
            record[lang] = {"caption": caps, "caption/tokenized": caps}
        lines.append(json.dumps(record, ensure_ascii=False))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


_SHARED: dict = {}


def shared_bundle(tmp_path_factory) -> Bundle:
    """One bundle for the test modules that only read it (made on first use)."""
    if "bundle" not in _SHARED:
        _SHARED["bundle"] = make_bundle(tmp_path_factory.mktemp("shared-bundle"))
    return _SHARED["bundle"]
