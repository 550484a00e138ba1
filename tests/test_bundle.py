"""Bundles: export and llm2clip.load round trips on tiny random models (Llama + LoRA, ViT), the
text side rebuilt from the recorded recipe and checked, every mismatch refused naming both sides,
and the trainer's final/ written as a bundle.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

import llm2clip
from llm2clip.apps.extract import main as extract_main
from llm2clip.bundle import BUNDLE_FILE, export_bundle, is_bundle
from llm2clip.cache import EmbeddingCache, StaleCacheError
from llm2clip.cli import UsageError
from llm2clip.data.images import eval_transform, normalize_images
from llm2clip.models.clip_model import ClipModel
from llm2clip.models.text_recipe import embedder_like
from tests.eval_fixtures import IMAGE_SIZE, MAX_LENGTH, TEMPLATE, image_bytes, make_bundle, tiny_clip
from tests.llm_fixtures import tiny_llm_dir


@pytest.fixture(scope="module")
def b(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _pil(seed: int) -> Image.Image:
    import io

    return Image.open(io.BytesIO(image_bytes(seed))).convert("RGB")


def test_round_trip_encodes_like_the_parts(b):
    """encode_image / encode_text equal the ClipModel run on the eval transform and on the
    training cache's LLM (rebuilt by embedder_like): the same arithmetic, so equal exactly."""
    model = llm2clip.load(b.bundle)
    clip = ClipModel.load(b.run / "final")  # the folder the bundle was exported from
    assert torch.equal(model.clip.state_dict()["visual_proj.weight"], clip.state_dict()["visual_proj.weight"])
    images = [_pil(i) for i in range(3)]
    u8 = torch.stack([eval_transform(IMAGE_SIZE)(im) for im in images])
    with torch.no_grad():
        want = clip.eval().encode_image(normalize_images(u8, model.image_mean, model.image_std))
        assert torch.equal(model.encode_image(images), want)
        assert torch.equal(model.encode_image(u8), want)  # uint8 batches are normalised
        assert torch.equal(model.encode_image(torch.stack([model.preprocess(im) for im in images])), want)
        emb = embedder_like(b.cache, "cpu").encode(b.captions)
        assert torch.equal(model.encode_text(b.captions), clip.encode_text_embedding(emb))
        assert torch.equal(model.encode_text(model.tokenize(b.captions)), clip.encode_text_embedding(emb))
    info = json.loads((b.bundle / BUNDLE_FILE).read_text())
    assert info["text"]["recipe"]["instruction"] == "retrieve : {caption}" and info["dims"] == {
        "llm": 64,
        "embed": 24,
    }
    assert info["text"]["spec"]["model_revision"].startswith("sha256:") and info["text"]["llm_adapter"]
    assert info["image"]["size"] == IMAGE_SIZE and info["center_text"] is False


def test_text_from_a_cache_and_images_only(b):
    cache = EmbeddingCache.open(b.cache)
    model = llm2clip.load(b.bundle, text_cache=b.cache)
    assert model.embedder is None  # no LLM loaded
    rows = cache.lookup("train-0.tar", [f"{i:03d}" for i in range(3)], "txt")
    with torch.no_grad():
        want = model.clip.encode_text_embedding(cache.gather(rows, out_dtype=torch.float32))
        assert torch.equal(
            model.encode_text([c.upper() + " " for c in b.captions[:3]]), want
        )  # normalised text
    with pytest.raises(UsageError, match="1 of 1 captions are not in the text cache"):
        model.encode_text(["a caption nobody embedded"])
    images_only = llm2clip.load(b.bundle, load_llm=False)
    assert images_only.encode_image(_pil(0)).shape == (1, 24)
    with pytest.raises(UsageError, match="without a text side"):
        images_only.encode_text(["a dog"])


def test_bundle_is_self_contained_and_still_a_clip_model_folder(b, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(b.bundle, moved)
    assert (
        ClipModel.load(moved).config.text_spec
        == json.loads((moved / BUNDLE_FILE).read_text())["text"]["spec"]
    )
    hidden = tmp_path / "adapter-elsewhere"
    shutil.move(b.lora, hidden)  # the stage-1 adapter is gone: the bundle's copy is used
    try:
        assert llm2clip.load(moved).encode_text(["a red dog"]).shape == (1, 24)
    finally:
        shutil.move(hidden, b.lora)
    lora = next((moved / "llm_adapter").glob("*.safetensors"))
    lora.write_bytes(lora.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StaleCacheError, match=r"bundled LLM adapter .* has sha256:.*records sha256:"):
        llm2clip.load(moved)


def test_another_llm_is_refused_naming_both_sides(b, tmp_path):
    other = tiny_llm_dir(tmp_path / "other-llm", corpus=["a red dog"], seed=1)
    with pytest.raises(StaleCacheError, match="probe captions embed with cosine"):
        llm2clip.load(b.bundle, llm=other)
    with pytest.raises(
        StaleCacheError, match=r"the LLM at .*other-llm has sha256:\w+, the bundle records sha256:"
    ):
        llm2clip.load(b.bundle, llm=other, verify="full")
    assert llm2clip.load(b.bundle, llm=b.llm, verify="full").embedder is not None
    with pytest.raises(UsageError, match=r"is not at .*nowhere: pass llm=PATH"):
        llm2clip.load(b.bundle, llm=tmp_path / "nowhere")


def test_mismatched_bundles_and_caches_are_refused(b, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(b.bundle, bad)
    info = json.loads((bad / BUNDLE_FILE).read_text())
    info["text"]["spec"]["pooling"] = "last_token"
    (bad / BUNDLE_FILE).write_text(json.dumps(info))
    with pytest.raises(StaleCacheError, match=r"pooling: expected 'last_token', found 'mean'"):
        llm2clip.load(bad)
    info["text"]["spec"]["pooling"] = "mean"
    info["image"]["size"] = 32
    (bad / BUNDLE_FILE).write_text(json.dumps(info))
    with pytest.raises(
        UsageError, match=r"records images of size/mean/std \(32.*the tower in config.json has \(16"
    ):
        llm2clip.load(bad)
    with pytest.raises(ValueError, match="not an llm2clip bundle: no bundle.json .*export_bundle"):
        llm2clip.load(b.run / "checkpoints" / "step_00000001")
    # a cache of the same LLM at another max_length as the text source
    other = tmp_path / "other-cache"
    extract_main([
        "--shards", str(b.root / "train-0.tar"), "--out", str(other), "--model", str(b.llm), "--adapter",
        str(b.lora), "--instruction", TEMPLATE, "--max-length", "32", "--dtype", "float32",
        "--storage", "fp32", "--no-progress", "--device", "cpu",
    ])  # fmt: skip
    with pytest.raises(StaleCacheError, match=rf"max_length: expected {MAX_LENGTH}, found 32"):
        llm2clip.load(b.bundle, text_cache=other)


def test_export_errors(b, tmp_path):
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_bundle(b.run / "final", b.bundle)
    lone = tmp_path / "lone"
    ClipModel.load(b.run / "final").save(lone)
    with pytest.raises(ValueError, match="pass cache_dir="):
        export_bundle(lone, tmp_path / "out")
    narrow = tmp_path / "narrow"
    tiny_clip(32).save(narrow)
    with pytest.raises(StaleCacheError, match="adapter takes 32-d LLM embeddings, the cache .* holds 64-d"):
        export_bundle(narrow, tmp_path / "out2", cache_dir=b.cache)
    assert not (tmp_path / "out2").exists()
    export_bundle(lone, lone, cache_dir=b.cache)  # in place
    assert is_bundle(lone) and llm2clip.load(lone, load_llm=False).clip is not None


def test_trainer_final_is_a_bundle(tmp_path):
    """The trainer's final/ is a bundle; this cache's summary records no LLM (the test fixtures'),
    so the bundle's text side is a cache of the same spec."""
    from llm2clip.apps.train import main as train_main
    from tests.train_fixtures import TINY_VIT, make_data

    shards, cache = make_data(tmp_path / "data", shards=2, per_shard=4)
    out = tmp_path / "run"
    metrics = train_main([
        "--train-shards", *shards[:1], "--cache", str(cache), "--vision", "B/16",
        "--vision-overrides", TINY_VIT, "--embed-dim", "16", "--adapter-depth", "1", "--batch-size", "4",
        "--steps", "1", "--workers", "0",
        "--output-dir", str(out), "--device", "cpu", "--no-tensorboard", "--warmup-steps", "0",
    ])  # fmt: skip
    assert metrics["bundle"] is True and is_bundle(out / "final")
    with pytest.raises(UsageError, match="records no LLM recipe"):
        llm2clip.load(out / "final")
    model = llm2clip.load(out / "final", text_cache=cache)
    assert model.encode_text(["short train-0000.tar 00001 0"]).shape == (1, 16)  # a text of the cache
