"""Long-caption and multilingual retrieval sets in their public layouts, the eval CLI on them with
a bundle, and the trainer's periodic evaluation taking any set kind (--eval-sets)."""

from __future__ import annotations

import json

import pytest
import torch

import llm2clip
from llm2clip.apps.eval import main as eval_main
from llm2clip.cache import EmbeddingCache
from llm2clip.cli import UsageError
from llm2clip.evaluation import (
    benchmark_retrieval,
    build_multilingual_set,
    encode_images,
    encode_texts,
    evaluate,
    format_table,
    load_long_caption_set,
    load_xm3600,
    read_long_captions,
)
from llm2clip.training.config import EvalConfig
from llm2clip.training.evaluator import load_eval_sets
from tests.eval_fixtures import (
    IMAGE_SIZE,
    MAX_LENGTH,
    image_bytes,
    shared_bundle,
    write_benchmark_retrieval,
    write_long_captions,
    write_xm3600,
)


@pytest.fixture(scope="module")
def b(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def model(b):
    return llm2clip.load(b.bundle)


def test_long_captions_embedded_at_the_llm_length_with_truncations_counted(b, model, tmp_path):
    path = write_long_captions(tmp_path / "urban")
    tok = model.embedder.tokenizer
    records = read_long_captions(path)[:4]  # the fifth's image is missing
    assert all(len(tok(c)["input_ids"]) > 300 for _, caps in records for c in caps)
    short = load_long_caption_set(path, IMAGE_SIZE, model.embedder)  # the recipe's max_length
    assert short.counts["truncated"] == 4 and short.counts["max_length"] == MAX_LENGTH
    assert short.counts["missing_images"] == 1 and short.images.shape[0] == 4
    full = load_long_caption_set(path, IMAGE_SIZE, model.embedder, max_length=400)
    assert full.counts["truncated"] == 0 and full.counts["max_length"] == 400
    assert model.embedder.config.max_length == MAX_LENGTH  # restored
    assert not torch.allclose(short.text_embeddings, full.text_embeddings)  # the tail now counts
    with pytest.raises(ValueError, match="exceeds the LLM's 512 positions"):
        load_long_caption_set(path, IMAGE_SIZE, model.embedder, max_length=1024)
    with pytest.raises(ValueError, match="no image of .* found under"):
        load_long_caption_set(path, IMAGE_SIZE, model.embedder, images_root=tmp_path)

    # the other layouts: JSON lines with a split (DOCCI), ShareGPT4V conversations, Urban-1k folders
    sharegpt = [{"from": "human", "value": "?"}, {"from": "gpt", "value": "a sea"}]
    lines = [
        {"image_file": "0.jpg", "description": "a red dog", "split": "test"},
        {"image_file": "1.jpg", "description": "a cat", "split": "train"},
        {"image": "2.jpg", "conversations": sharegpt},
    ]
    (tmp_path / "urban" / "docci.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    got = read_long_captions(tmp_path / "urban" / "docci.jsonl", split="test")
    assert got == [("0.jpg", ["a red dog"]), ("2.jpg", ["a sea"])]
    folder = tmp_path / "Urban1k"
    (folder / "image").mkdir(parents=True)
    (folder / "caption").mkdir()
    (folder / "image" / "7.jpg").write_bytes(image_bytes(7, "JPEG"))
    (folder / "caption" / "7.txt").write_text("a big green tree near the river\n")
    assert read_long_captions(folder) == [
        (str(folder / "image" / "7.jpg"), ["a big green tree near the river"])
    ]
    with pytest.raises(ValueError, match="record 0: no caption"):
        (tmp_path / "bad.json").write_text(json.dumps([{"image": "0.jpg"}]))
        read_long_captions(tmp_path / "bad.json")


def test_xm3600_languages_scored_on_one_image_set(model, tmp_path):
    root = write_xm3600(tmp_path / "xm3600")
    s = load_xm3600(root, IMAGE_SIZE, model.embedder, languages=["en", "de"])
    assert list(s.languages) == ["en", "de"] and s.images.shape[0] == 5 and s.counts["missing_images"] == 1
    assert all(c.text_to_image.tolist() == list(range(5)) for c in s.languages.values())  # first caption
    every = load_xm3600(root, IMAGE_SIZE, model.embedder, captions="all")
    assert sorted(every.languages) == ["de", "en", "fr"] and len(every.languages["fr"].captions) == 10
    with pytest.raises(ValueError, match=r"no captions in \['xx'\]; the set has \['de', 'en', 'fr'\]"):
        load_xm3600(root, IMAGE_SIZE, model.embedder, languages=["xx"])

    r = evaluate(model.clip, sets={"xm": every}, batch_size=3)["xm"]
    img = encode_images(model.clip, every.images, batch_size=3)
    for lang, c in every.languages.items():  # the same features and arithmetic: equal exactly
        ref = benchmark_retrieval(
            img, encode_texts(model.clip, c.text_embeddings, batch_size=3), c.text_to_image
        )
        assert {k: r["languages"][lang][k] for k in ref} == ref
    table = r["table"]
    assert table["languages"] == ["de", "en", "fr"] and "text_retrieval_recall@1" in table["metrics"]
    assert len(table["values"]) == len(table["chance"]) == 3
    text = format_table({"xm": r})
    assert "language" in text and "\nchance" in text and "definitions:" in text

    # a caller's own per-language captions (a demo): a language without a caption for image 1
    captions = {"en": [["a red dog"], ["a cat"], ["a boat"]], "fr": [["un chien"], [], ["une chatte"]]}
    own = build_multilingual_set(every.images[:3], captions, model.embedder, dataset="mine")
    r = evaluate(model.clip, sets={"own": own})["own"]
    assert r["languages"]["en"]["N"] == 3 and r["languages"]["fr"]["N"] == 2
    assert "  chance" in format_table({"own": r})  # chance differs per language: a row each


def test_eval_cli_with_a_bundle_on_every_set_kind(b, tmp_path, capsys):
    long_json = write_long_captions(tmp_path / "urban")
    xm = write_xm3600(tmp_path / "xm3600")
    wds = write_benchmark_retrieval(tmp_path / "wds_captions", images=6)
    out = eval_main([
        "--checkpoint", str(b.bundle), "--clip-benchmark", str(wds), "--long-captions", str(long_json),
        "--max-length", "400", "--xm3600", str(xm), "--languages", "en", "fr", "--device", "cpu",
        "--out", str(tmp_path / "r.json"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["results"]) == {"wds_captions/test", "long/urban/captions.json", "multilingual/xm3600"}
    long = saved["results"]["long/urban/captions.json"]
    assert (long["truncated"], long["max_length"], long["N"], long["M"]) == (0, 400, 4, 4)
    assert (
        "urban/captions.json, 4 images, 4 captions, clip_benchmark protocol, 0 texts truncated at 400"
        in printed
    )
    assert saved["results"]["multilingual/xm3600"]["table"]["languages"] == ["en", "fr"]
    assert out["counts"]["long/urban/captions.json"]["missing_images"] == 1
    for r in saved["results"].values():
        assert r["dataset"] and "chance" in r["definitions"]
    with pytest.raises(UsageError, match="embedded on the fly: give --embed-like"):
        eval_main(["--checkpoint", str(b.run / "final"), "--long-captions", str(long_json)])
    with pytest.raises(UsageError, match="--llm applies to bundles"):
        eval_main(["--checkpoint", str(b.run / "final"), "--llm", str(b.llm), "--xm3600", str(xm)])
    with pytest.raises(UsageError, match="not a CLIP_benchmark wds eval set"):
        eval_main(["--checkpoint", str(b.bundle), "--clip-benchmark", str(xm), "--device", "cpu"])


def test_trainer_periodic_eval_takes_any_set_kind(b, model, tmp_path):
    wds = write_benchmark_retrieval(tmp_path / "wds_captions", images=6)
    long_json = write_long_captions(tmp_path / "urban")
    xm = write_xm3600(tmp_path / "xm3600")
    cfg = EvalConfig(
        eval_sets=(f"clip_benchmark:{wds}", f"long:{long_json}", f"xm3600:{xm}"), eval_languages=("de",),
        eval_max_length=400,
    )  # fmt: skip
    assert cfg.enabled
    sets = load_eval_sets(cfg, EmbeddingCache.open(b.cache), IMAGE_SIZE, torch.device("cpu"))
    assert list(sets) == ["wds_captions/test", "long/urban/captions.json", "multilingual/xm3600"]
    assert sets["long/urban/captions.json"].counts["truncated"] == 0 and list(
        sets["multilingual/xm3600"].languages
    ) == ["de"]
    results = evaluate(model.clip, sets=sets)
    assert (
        results["wds_captions/test"]["protocol"] == "clip_benchmark"
        and "de" in results["multilingual/xm3600"]["languages"]
    )
    with pytest.raises(ValueError, match="expected KIND:PATH"):
        EvalConfig(eval_sets=("coco:/data",))
    with pytest.raises(ValueError, match="no such file or folder"):
        EvalConfig(eval_sets=(f"long:{tmp_path / 'nothing.json'}",))
