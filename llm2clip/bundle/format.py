"""The bundle: a stage-2 model folder that says which text side it needs, and how it is written.

    out/
      model.safetensors, config.json   the ClipModel (tower, projection, text adapter): ClipModel.load(out)
      bundle.json                      what the text side is, written last (a folder with it is complete)
      text_probe.safetensors           "probe": (P, d) fp32 embeddings of the probe captions by the LLM
      llm_adapter/                     the stage-1 LoRA adapter of the recorded LLM, when it had one

bundle.json: ``format``/``format_version``; ``text.spec`` (the CacheSpec of the caption embeddings
the adapter was trained on: model id, revision (a sha256 of the model files unless one was given),
adapter revision, template, pooling, max length, normalisation, width); ``text.recipe`` (the
TextRecipe of ``llm2clip.extract``: LLM path, template, pooling, max length, dtype, ...; null when
the training cache had no extraction summary: captions must then come from a cache);
``text.probe`` (captions, min cosine); ``image`` (size, mean, std); ``dims`` (LLM width, embedding
width); ``center_text``; ``source`` (checkpoint, cache). No code is referenced or executed:
``llm2clip.load`` rebuilds llm2clip's own tower classes only and loads the LLM with local files.

    export_bundle("runs/stage2/checkpoints/step_00001000", "bundles/b16")   # the run's cache found
    export_bundle("runs/stage2/final", "runs/stage2/final", cache_dir=...)   # in place (the trainer)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llm2clip.cache import CacheSpec, EmbeddingCache, StaleCacheError
from llm2clip.cache.manifest import check_spec
from llm2clip.files import atomic_write_json, files_sha256, fsync_dir
from llm2clip.models.clip_model import CONFIG_NAME, WEIGHTS_NAME, ClipModel, ClipModelConfig
from llm2clip.models.text_recipe import SUMMARY_FILE, TextRecipe
from llm2clip.models.vit import CLIP_MEAN, CLIP_STD

__all__ = [
    "BUNDLE_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "LLM_ADAPTER_DIR",
    "PROBE_FILE",
    "BundleInfo",
    "export_bundle",
    "is_bundle",
]

BUNDLE_FILE = "bundle.json"
PROBE_FILE = "text_probe.safetensors"
LLM_ADAPTER_DIR = "llm_adapter"
FORMAT = "llm2clip-bundle"
FORMAT_VERSION = 1


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


@dataclass
class BundleInfo:
    """bundle.json, parsed and checked against the folder's config.json."""

    path: Path
    raw: dict
    spec: CacheSpec
    recipe: dict | None
    config: ClipModelConfig

    @classmethod
    def read(cls, path: str | os.PathLike) -> BundleInfo:
        path = Path(path)
        if not (path / BUNDLE_FILE).is_file():
            hint = (
                " (a ClipModel folder: make it a bundle with llm2clip.bundle.export_bundle or "
                "`python -m llm2clip.export --format bundle`)"
                if (path / CONFIG_NAME).is_file()
                else ""
            )
            raise ValueError(f"{path} is not an llm2clip bundle: no {BUNDLE_FILE}{hint}")
        raw = json.loads((path / BUNDLE_FILE).read_text())
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path / BUNDLE_FILE}: format {raw.get('format')!r} version {raw.get('format_version')!r}, "
                f"this llm2clip reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        text = raw["text"]
        info = cls(
            path, raw, CacheSpec.from_dict(text["spec"]), text.get("recipe"), ClipModel.read_config(path)
        )
        info.check()
        return info

    @property
    def probe_captions(self) -> list[str]:
        return list(self.raw["text"]["probe"]["captions"])

    @property
    def probe_min_cosine(self) -> float:
        return float(self.raw["text"]["probe"]["min_cosine"])

    def probe_embeddings(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.path / PROBE_FILE))["probe"].float()

    def check(self) -> None:
        """bundle.json against config.json: widths and the recorded training cache's spec."""
        cfg = self.config
        where = f"{self.path}: "
        if cfg.adapter.input_dim != self.spec.dim:
            raise ValueError(
                f"{where}{CONFIG_NAME} has an adapter over {cfg.adapter.input_dim}-d LLM embeddings, "
                f"{BUNDLE_FILE} records a {self.spec.dim}-d text side"
            )
        if cfg.text_spec is not None:
            check_spec(self.spec, CacheSpec.from_dict(cfg.text_spec), self.path / CONFIG_NAME)


# ------------------------------------------------------------------------------------------------
# Writing


def export_bundle(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | EmbeddingCache | None = None,
) -> Path:
    """Write a bundle of the ClipModel folder `checkpoint_dir` (``final/`` or a
    ``checkpoints/step_N/``) into `out_dir` (a new or empty folder, or `checkpoint_dir` itself:
    the bundle files are then added in place and ClipModel.load still reads it).

    cache_dir: the training cache (or an open EmbeddingCache); default: the one the run's
    ``config.json`` (beside ``final/``, or above ``checkpoints/``) names. Its spec must equal the
    one the model records, and its extraction summary gives the LLM recipe. Returns out_dir.
    Raises ValueError (StaleCacheError for another cache) naming both sides of any mismatch.
    """
    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (ckpt / name).is_file():
            raise ValueError(f"{ckpt} is not a ClipModel folder: no {name}")
    cache = cache_dir if isinstance(cache_dir, EmbeddingCache) else _open_training_cache(ckpt, cache_dir)
    config = ClipModel.read_config(ckpt)
    if config.vision is None:
        raise ValueError(
            f"{ckpt}: its vision tower is not one of llm2clip's (config.json cannot rebuild it), "
            "so a bundle could not be loaded without code: export the tower's weights instead"
        )
    _check_cache(config, cache)
    in_place = out.exists() and out.resolve() == ckpt.resolve()
    if not in_place and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: give a new folder for the bundle")
    target = ckpt if in_place else out.parent / f".{out.name}.tmp-{os.getpid()}"
    if not in_place:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            shutil.copyfile(ckpt / name, target / name)
    _write_text_side(target, config, cache, ckpt)
    if not in_place:
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(target, out)
        fsync_dir(out.parent)
    return out


def _open_training_cache(ckpt: Path, cache_dir) -> EmbeddingCache:
    """The given cache, or the one named by the run's config.json above the checkpoint folder."""
    if cache_dir is not None:
        return EmbeddingCache.open(cache_dir)
    for run_dir in (ckpt.parent, ckpt.parent.parent):
        path = run_dir / "config.json"
        if not path.is_file():
            continue
        run_cfg = json.loads(path.read_text())
        cache = (run_cfg.get("data") or {}).get("cache") if isinstance(run_cfg, dict) else None
        if not cache:
            continue
        if not Path(cache).exists():
            raise ValueError(
                f"the run's {path} names the training cache {cache}, which is not here: pass cache_dir="
            )
        opened = EmbeddingCache.open(cache)
        if run_cfg.get("cache_spec"):  # the run recorded the spec it trained on: same cache?
            check_spec(CacheSpec.from_dict(run_cfg["cache_spec"]), opened.spec, cache)
        return opened
    raise ValueError(
        f"no run config.json naming the training cache above {ckpt}: pass cache_dir= (the cache "
        "the model was trained on)"
    )


def _check_cache(config: ClipModelConfig, cache: EmbeddingCache) -> None:
    if config.adapter.input_dim != cache.dim:
        raise StaleCacheError(
            f"the model's adapter takes {config.adapter.input_dim}-d LLM embeddings, the cache "
            f"{cache.path} holds {cache.dim}-d ones: not its training cache"
        )
    if config.text_spec is not None:
        check_spec(CacheSpec.from_dict(config.text_spec), cache.spec, cache.path)


def _cache_recipe(cache: EmbeddingCache) -> dict | None:
    """config.text of the cache's extraction summary (unknown settings refused), or None."""
    path = Path(cache.path) / SUMMARY_FILE
    if not path.is_file():
        return None
    raw = (json.loads(path.read_text()).get("config") or {}).get("text")
    if not isinstance(raw, dict):
        return None
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(TextRecipe)})
    if unknown:
        raise ValueError(f"{path}: unknown text settings {unknown} (written by another llm2clip version?)")
    return dict(raw)


def _write_text_side(target: Path, config: ClipModelConfig, cache: EmbeddingCache, ckpt: Path) -> None:
    """text_probe.safetensors, llm_adapter/ and bundle.json (last) into `target`."""
    from safetensors.torch import save_file

    (target / BUNDLE_FILE).unlink(missing_ok=True)  # re-export in place: incomplete until written again
    probe = cache.manifest["probe"]
    save_file({"probe": cache.probe_embeddings().contiguous()}, str(target / PROBE_FILE))
    recipe = _cache_recipe(cache)
    adapter_dir = target / LLM_ADAPTER_DIR
    shutil.rmtree(adapter_dir, ignore_errors=True)
    if recipe is not None and recipe.get("adapter"):
        src = Path(recipe["adapter"])
        if not src.is_dir():
            raise ValueError(f"the cache's LLM adapter {src} (its extraction summary) is not here")
        rev = cache.spec.adapter_revision
        if rev.startswith("sha256:") and files_sha256(src) != rev:
            raise StaleCacheError(
                f"the LLM adapter at {src} has {files_sha256(src)}, the cache {cache.path} was built "
                f"with {rev}: it changed since extraction"
            )
        shutil.copytree(src, adapter_dir)
    vis = (config.vision or {}).get("config", {})
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "text": {
            "spec": cache.spec.to_dict(), "recipe": recipe,
            "llm_adapter": LLM_ADAPTER_DIR if adapter_dir.is_dir() else None,
            "probe": {"file": PROBE_FILE, "captions": list(probe["captions"]),
                      "min_cosine": probe["min_cosine"]},
        },
        "image": {"size": vis.get("image_size"), "mean": list(vis.get("image_mean") or CLIP_MEAN),
                  "std": list(vis.get("image_std") or CLIP_STD),
                  "preprocess": "resize the shorter side, center crop"},
        "dims": {"llm": cache.dim, "embed": config.embed_dim},
        "center_text": config.adapter.center_input,
        "source": {"checkpoint": str(ckpt.resolve()), "cache": str(Path(cache.path).resolve()),
                   "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }  # fmt: skip
    atomic_write_json(target / BUNDLE_FILE, info)
