"""A loaded bundle: ``encode_image(images)`` and ``encode_text(list[str])`` in one module.

    model = llm2clip.load("runs/stage2/final")                       # the recorded LLM, probe-checked
    model = llm2clip.load(path, llm="/models/llama", verify="full")  # the LLM moved: files hashed too
    model = llm2clip.load(path, text_cache="caches/held")            # captions looked up in a cache
    img = model.encode_image([Image.open("cat.jpg")])                # (1, D), L2-normalised
    txt = model.encode_text(["a photo of a cat"])                    # (1, D), L2-normalised

The text side is exactly the one the adapter was trained against: the LLM of the bundle's recipe
(the stage-1 LoRA from the bundle's own copy), which must reproduce the bundle's probe embeddings
(cosine >= the cache's threshold) before anything is returned; or an embedding cache with the
same spec, looked up by caption text (``llm2clip.cache`` text hashes: captions equal after
normalisation). Any mismatch is refused naming both sides. Nothing is downloaded and no remote
code runs: the LLM loads from local files (``local_files_only``), towers are llm2clip's own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from llm2clip.bundle.format import LLM_ADAPTER_DIR, BundleInfo
from llm2clip.bundle.text import TokenizedText, embedding_length, tokenize_captions
from llm2clip.cache import EmbeddingCache, StaleCacheError, text_hashes
from llm2clip.cache.index import sorted_lookup
from llm2clip.cache.manifest import check_spec
from llm2clip.cli import UsageError
from llm2clip.data.images import eval_transform, normalize_images
from llm2clip.files import files_sha256
from llm2clip.models.clip_model import ClipModel
from llm2clip.models.text_recipe import TextRecipe, load_embedder

__all__ = ["VERIFY", "LLM2CLIP", "check_probe", "load"]

VERIFY = ("probe", "full")
"""probe: the LLM must reproduce the probe embeddings; full: its files' sha256 must also equal the
recorded revision (when the revision is such a hash; reads every byte of the model)."""


def check_probe(new: Tensor, ref: Tensor, captions: Sequence[str], min_cosine: float, what: str) -> Tensor:
    """Cosines of re-embedded probe captions `new` to the recorded `ref` (P, d); StaleCacheError
    naming `what` and the worst captions when one is below min_cosine or the shapes differ."""
    new = torch.as_tensor(new).detach().to("cpu", torch.float64)
    ref = ref.to(torch.float64)
    if new.shape != ref.shape:
        raise StaleCacheError(
            f"{what}: probe embeddings of shape {tuple(new.shape)}, recorded {tuple(ref.shape)}"
        )
    cos = torch.nn.functional.cosine_similarity(new, ref, dim=1).float()
    bad = torch.nonzero(cos < min_cosine).flatten().tolist()
    if bad:
        worst = sorted(bad, key=lambda i: float(cos[i]))[:3]
        detail = ", ".join(f"{captions[i]!r}: {float(cos[i]):.5f}" for i in worst)
        raise StaleCacheError(
            f"{what}: {len(bad)} of {len(captions)} probe captions embed with cosine < {min_cosine} to "
            f"the recorded ones ({detail}): another model, adapter, template, pooling or numerics"
        )
    return cos


class LLM2CLIP(nn.Module):
    """A stage-2 ClipModel with its text side: images and caption strings in, features out."""

    def __init__(self, clip: ClipModel, info: BundleInfo, embedder=None, text_cache=None):
        super().__init__()
        self.clip = clip
        self.embedder = embedder
        self.text_cache: EmbeddingCache | None = text_cache
        self.info = info
        self.max_length: int | None = None
        """Tokens per caption for encode_text (None: the recipe's; longer captions are truncated)."""
        cfg = clip.visual.config
        self.image_size = int(cfg.image_size)
        self.image_mean, self.image_std = tuple(cfg.image_mean), tuple(cfg.image_std)
        self._transform = eval_transform(self.image_size)
        self._hash_index: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    # ---- images

    def preprocess(self, image) -> Tensor:
        """A PIL image -> (3, S, S) float32, resized (shorter side), center-cropped and normalised
        as the tower was trained (clip_benchmark's `transform`)."""
        x = self._transform(image.convert("RGB"))[None]
        return normalize_images(x, self.image_mean, self.image_std)[0]

    def encode_image(self, images) -> Tensor:
        """(B, D) L2-normalised features of: PIL images (a list or one), (B, 3, S, S) uint8 images
        (normalised here), or (B, 3, S, S) float images already through ``preprocess``."""
        if isinstance(images, Tensor):
            x = images[None] if images.ndim == 3 else images
            if x.dtype == torch.uint8:
                x = normalize_images(x, self.image_mean, self.image_std)
        else:
            images = [images] if hasattr(images, "convert") else list(images)
            x = torch.stack([self.preprocess(im) for im in images])
        dtype = next(self.clip.visual.parameters()).dtype
        return self.clip.encode_image(x.to(self.device, dtype))

    # ---- text

    def tokenize(self, texts: Sequence[str] | str) -> TokenizedText:
        """Captions tokenized for the recorded LLM (clip_benchmark's `tokenizer`); with a cache, the
        captions themselves."""
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        if self.embedder is None:
            return TokenizedText(texts)
        return tokenize_captions(self.embedder, texts, self.max_length)

    def embed_text(self, texts: Sequence[str] | TokenizedText | str) -> Tensor:
        """(n, d) fp32 frozen LLM embeddings on the model's device (autocast off for the LLM)."""
        tok = texts if isinstance(texts, TokenizedText) else self.tokenize(texts)
        if self.embedder is not None:
            if tok.ids is None:
                tok = self.tokenize(tok.texts)
            dev = self.embedder.device
            with torch.inference_mode(), torch.autocast(dev.type, enabled=False):
                with embedding_length(self.embedder, self.max_length):
                    emb = self.embedder.encode(ids=tok.ids, pool_masks=tok.pool_masks)
            return emb.to(self.device, torch.float32)
        if self.text_cache is not None:
            return self._cached(tok.texts).to(self.device)
        raise UsageError("this model was loaded without a text side: pass text_cache= or load the LLM")

    def encode_text(self, texts: Sequence[str] | TokenizedText | str) -> Tensor:
        """(n, D) L2-normalised text features of caption strings (or ``tokenize``'s output)."""
        emb = self.embed_text(texts)
        dtype = next(self.clip.adapter.parameters()).dtype
        return self.clip.encode_text_embedding(emb.to(dtype))

    def forward(self, images, texts) -> tuple[Tensor, Tensor, Tensor]:
        """(image features, text features, logit scale exp)."""
        return self.encode_image(images), self.encode_text(texts), self.clip.logit_scale.exp()

    def _cached(self, texts: list[str]) -> Tensor:
        """Rows of the text cache whose caption equals each text after normalisation."""
        if self._hash_index is None:
            hashes = np.asarray(self.text_cache.text_hashes())
            order = np.argsort(hashes, kind="stable")
            self._hash_index = (hashes[order], order)
        keys, order = self._hash_index
        rows = sorted_lookup(keys, order, text_hashes(texts))
        missing = [t for t, r in zip(texts, rows.tolist(), strict=True) if r < 0]
        if missing:
            raise UsageError(
                f"{len(missing)} of {len(texts)} captions are not in the text cache {self.text_cache.path} "
                f"(e.g. {missing[0][:80]!r}): load the LLM to embed new captions"
            )
        return self.text_cache.gather(torch.from_numpy(rows), out_dtype=torch.float32)


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    llm: str | os.PathLike | None = None,
    text_cache: str | os.PathLike | None = None,
    load_llm: bool | None = None,
    verify: str = "probe",
) -> LLM2CLIP:
    """Load a bundle (``llm2clip.bundle.format``) in eval mode on `device`.

    llm:        where the recorded LLM is on this machine (default: the path the recipe records).
    text_cache: embed captions by looking them up in this cache (its spec must equal the bundle's).
    load_llm:   load the recorded LLM (default: yes unless text_cache is given).
    verify:     'probe' (default) or 'full' (``VERIFY``).
    Raises UsageError / StaleCacheError naming both sides of any mismatch.
    """
    if verify not in VERIFY:
        raise UsageError(f"verify must be one of {VERIFY}, got {verify!r}")
    info = BundleInfo.read(path)
    device = torch.device(device)
    clip = ClipModel.load(info.path, map_location=device)
    _check_image_side(info, clip)
    cache = None
    if text_cache is not None:
        cache = EmbeddingCache.open(text_cache)
        check_spec(info.spec, cache.spec, text_cache)
        what = f"the text cache {text_cache} against the bundle {info.path}"
        check_probe(
            cache.probe_embeddings(),
            info.probe_embeddings(),
            info.probe_captions,
            info.probe_min_cosine,
            what,
        )
    embedder = None
    if load_llm if load_llm is not None else text_cache is None:
        embedder = _load_llm(info, device, llm, verify)
    return LLM2CLIP(clip, info, embedder, cache).eval()


def _check_image_side(info: BundleInfo, clip: ClipModel) -> None:
    cfg, image = clip.visual.config, info.raw["image"]
    found = (cfg.image_size, [float(v) for v in cfg.image_mean], [float(v) for v in cfg.image_std])
    recorded = (image["size"], [float(v) for v in image["mean"]], [float(v) for v in image["std"]])
    if found != recorded:
        raise UsageError(
            f"{info.path}: bundle.json records images of size/mean/std {recorded}, the tower in "
            f"config.json has {found}"
        )


def _recipe(info: BundleInfo, llm) -> TextRecipe:
    """The bundle's recipe with the LLM at `llm` (or where recorded) and the bundled LoRA."""
    raw = dict(info.recipe or {})
    if not raw:
        raise UsageError(
            f"{info.path} records no LLM recipe (its training cache had no extraction summary): pass "
            "text_cache= (a cache of the same spec; llm2clip.eval: --eval-cache or --embed-like) "
            "or load_llm=False"
        )
    model = Path(llm if llm is not None else raw["model"])
    if not model.exists():
        raise UsageError(
            f"the bundle's LLM {raw['model']} ({info.spec.model_id} at revision {info.spec.model_revision}) "
            f"is not at {model}: pass llm=PATH (python -m llm2clip.eval: --llm)"
        )
    raw["model"] = str(model)
    if raw.get("adapter"):
        lora = info.path / LLM_ADAPTER_DIR
        if not lora.is_dir():
            raise UsageError(
                f"{info.path}: the recipe uses a LoRA adapter but the bundle holds no {LLM_ADAPTER_DIR}/"
            )
        _check_files(lora, info.spec.adapter_revision, "the bundled LLM adapter")
        raw["adapter"] = str(lora)
    return TextRecipe(**raw)


def _check_files(path: Path, revision: str, what: str) -> None:
    if revision.startswith("sha256:"):
        found = files_sha256(path)
        if found != revision:
            raise StaleCacheError(f"{what} at {path} has {found}, the bundle records {revision}")


def _load_llm(info: BundleInfo, device: torch.device, llm, verify: str):
    recipe = _recipe(info, llm)
    if verify == "full":
        _check_files(Path(recipe.model), info.spec.model_revision, "the LLM")
    embedder = load_embedder(recipe, device)
    if embedder.hidden_size != info.spec.dim:
        raise StaleCacheError(
            f"the LLM at {recipe.model} is {embedder.hidden_size}-d, the bundle's adapter takes "
            f"{info.spec.dim}-d embeddings of {info.spec.model_id}"
        )
    with torch.inference_mode():
        new = embedder.encode(info.probe_captions)
    what = f"the LLM at {recipe.model} against the bundle {info.path} ({info.spec.model_id})"
    check_probe(new, info.probe_embeddings(), info.probe_captions, info.probe_min_cosine, what)
    return embedder
