"""llm2clip.eval: metrics against independent references, evaluation sets from real shards and
caches (tiny random Llama + the real extraction CLI), the probe-checked embedder, and the CLI end
to end on a tiny ClipModel checkpoint.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from llm2clip.apps.eval import main
from llm2clip.apps.extract import main as extract_main
from llm2clip.cache import EmbeddingCache, StaleCacheError
from llm2clip.cli import UsageError
from llm2clip.data.images import decode_image, eval_transform, normalize_images
from llm2clip.data.shards import write_shard
from llm2clip.evaluation import (
    build_prompts,
    encode_images,
    encode_texts,
    evaluate,
    fill_template,
    format_table,
    load_retrieval_set,
    load_zeroshot_set,
    read_names,
    retrieval_metrics,
    zeroshot_accuracy,
    zeroshot_classifier,
)
from llm2clip.models.adapter import AdapterConfig
from llm2clip.models.clip_model import ClipModel, ClipModelConfig
from llm2clip.models.cnn_tower import IMAGENET_MEAN, IMAGENET_STD, CNNTower, CNNTowerConfig
from llm2clip.models.text_recipe import embedder_like
from tests.llm_fixtures import tiny_llm_dir

WORDS = "a the dog cat red blue green small big photo of on in near sofa grass sea car tree house".split()
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
IMAGE_SIZE = 32


# ---------------------------------------------------------------------------------------------
# Retrieval metrics


def _reference_ranks(sim: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Per query row: position of the first correct item in a ranking sorted by score, descending,
    with wrong items placed before correct ones among equal scores (ties count against)."""
    ranks = []
    for s, c in zip(sim, correct, strict=True):
        order = sorted(range(len(s)), key=lambda j: (-s[j], bool(c[j])))
        ranks.append(next((pos for pos, j in enumerate(order) if c[j]), -1))
    return np.array(ranks)


def _reference_metrics(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, ks) -> dict:
    sim = img.double().numpy() @ txt.double().numpy().T  # (N, M)
    n, m = sim.shape
    own = np.zeros((n, m), dtype=bool)
    own[t2i.numpy(), np.arange(m)] = True
    has = own.any(1)
    i2t = _reference_ranks(sim[has], own[has])
    t2i_rank = _reference_ranks(sim.T, own.T)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(i2t < k))
        out[f"t2i_R@{k}"] = float(np.mean(t2i_rank < k))
    return out


@pytest.mark.parametrize(
    ("n", "d", "levels", "seed"),
    [(13, 6, None, 0), (40, 3, 3, 1), (7, 2, 2, 2), (1, 4, None, 3)],
    ids=["continuous", "ties", "many-ties", "one-image"],
)
def test_retrieval_metrics_match_brute_force(n, d, levels, seed):
    g = torch.Generator().manual_seed(seed)
    per_image = torch.randint(0, 4, (n,), generator=g)  # 0 to 3 captions per image
    per_image[0] = max(int(per_image[0]), 1)
    t2i = torch.repeat_interleave(torch.arange(n), per_image)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]  # captions not grouped by image
    m = len(t2i)
    if levels is None:
        img, txt = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    else:  # small integers: dot products are exact in fp32, so ties are real ties
        img = torch.randint(-1, levels, (n, d), generator=g).float()
        txt = torch.randint(-1, levels, (m, d), generator=g).float()
    ks = (1, 2, 5, 10, 1000)
    ref = _reference_metrics(img, txt, t2i, ks)
    for chunk in (1, 7, 1 << 24):  # one row per block, ragged blocks, one block
        got = retrieval_metrics(img, txt, t2i, ks, chunk_elems=chunk)
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (key, chunk)
        assert got["N"] == n and got["M"] == m and got["i2t_queries"] == int((per_image > 0).sum())
        assert got["i2t_R@1000"] == got["t2i_R@1000"] == 1.0  # k beyond N and M


def test_retrieval_metrics_perfect_and_degenerate():
    n = 6
    img = torch.eye(n, 8)
    t2i = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5])
    txt = img[t2i]
    got = retrieval_metrics(img, txt, t2i, ks=(1, 5))
    assert all(got[k] == 1.0 for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5"))
    # constant features: every score ties, and ties count against the model
    const = retrieval_metrics(torch.ones(n, 8), torch.ones(len(t2i), 8), t2i, ks=(1, 5))
    assert const["i2t_R@1"] == const["t2i_R@1"] == 0.0
    assert const["t2i_R@5"] == 0.0  # 5 wrong images tie with the right one
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((2, 3), float("nan")), torch.ones(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 2]))


def test_retrieval_chance_exact():
    # 2 images, 3 captions (image 0 has 2): i2t@1 = mean(1 - 1/3, 1 - 2/3) = 1/2,
    # i2t@2 = mean(1 - 0, 1 - (2/3)(1/2)) = 5/6; t2i@k = min(k, 2) / 2
    got = retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1, 0]), ks=(1, 2, 3, 5))
    assert got["i2t_chance_R@1"] == pytest.approx(1 / 2)
    assert got["i2t_chance_R@2"] == pytest.approx(5 / 6)
    assert got["i2t_chance_R@3"] == got["i2t_chance_R@5"] == 1.0
    assert got["t2i_chance_R@1"] == pytest.approx(1 / 2)
    assert got["t2i_chance_R@2"] == got["t2i_chance_R@5"] == 1.0


def test_retrieval_chance_equals_enumeration():
    """i2t chance = the recall averaged over every possible ranking of the captions (exact)."""
    t2i = torch.tensor([0, 0, 1, 2, 2, 2, 0])  # 3 images with 3, 1, 3 captions among M = 7; image 3 has none
    m = len(t2i)
    got = retrieval_metrics(torch.randn(4, 3), torch.randn(m, 3), t2i, ks=(1, 2, 3))
    perms = list(itertools.permutations(range(m)))
    for k in (1, 2, 3):
        hits = Fraction(0)
        for img in range(3):
            own = {j for j in range(m) if int(t2i[j]) == img}
            hits += Fraction(sum(bool(own & set(p[:k])) for p in perms), len(perms))
        assert got[f"i2t_chance_R@{k}"] == pytest.approx(float(hits / 3), abs=1e-12)
        assert got[f"t2i_chance_R@{k}"] == pytest.approx(k / 4)


# ---------------------------------------------------------------------------------------------
# Zero-shot


class _TinyTower(nn.Module):
    """Images -> mean colour -> Linear: enough for a ClipModel in unit tests."""

    embed_dim = 3

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x):
        return self.proj(x.mean((2, 3)))


def _identity_text_model(d: int) -> ClipModel:
    """A ClipModel whose text side is L2-normalise -> identity (adapter kind 'linear')."""
    model = ClipModel(_TinyTower(), ClipModelConfig(embed_dim=d, adapter=AdapterConfig(d, d, kind="linear")))
    with torch.no_grad():
        model.adapter.proj.weight.copy_(torch.eye(d))
        model.adapter.proj.bias.zero_()
    return model


def test_zeroshot_classifier_normalises_each_prompt_before_the_mean():
    model = _identity_text_model(3)
    prompts = torch.tensor(
        [
            [[1.0, 0, 0], [0, 5.0, 0]],  # unequal norms: a raw mean would lean towards the second
            [[0, 0, 2.0], [0, 0, 1.0]],
        ]
    )
    got = zeroshot_classifier(model, prompts)
    expected = torch.tensor([[2**-0.5, 2**-0.5, 0], [0, 0, 1.0]])
    assert torch.allclose(got, expected, atol=1e-6), got
    assert got.shape == (2, 3) and got.dtype == torch.float32


def test_zeroshot_accuracy_hand_built():
    classifier = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0]])
    images = torch.tensor(
        [
            [1.0, 0.2],  # class 0 first, then 1: label 0 -> top1
            [0.2, 1.0],  # label 0: second -> top2 only
            [-1.0, 0.0],  # label 2 -> top1
            [1.0, 1.0],  # label 1: ties with class 0 -> miss at top1, hit at top2
        ]
    )
    labels = torch.tensor([0, 0, 2, 1])
    got = zeroshot_accuracy(images, classifier, labels, ks=(1, 2, 5))
    assert got["top1"] == pytest.approx(2 / 4)
    assert got["top2"] == 1.0 and got["top5"] == 1.0
    assert got["chance_top1"] == pytest.approx(1 / 3) and got["chance_top2"] == pytest.approx(2 / 3)
    assert got["chance_top5"] == 1.0 and got["N"] == 4 and got["C"] == 3
    for chunk in (1, 4):
        assert zeroshot_accuracy(images, classifier, labels, ks=(1, 2), chunk_elems=chunk)["top1"] == 0.5
    with pytest.raises(ValueError, match="labels outside"):
        zeroshot_accuracy(images, classifier, torch.tensor([0, 0, 3, 1]))


def test_prompts_and_names(tmp_path):
    assert fill_template("a photo of a {}.", "dog") == "a photo of a dog."
    assert fill_template("{c}, {c}!", "cat") == "cat, cat!"
    assert fill_template("a {} in {style}", "dog") == "a dog in {style}"  # other braces are left alone
    with pytest.raises(ValueError, match="placeholder"):
        fill_template("a photo", "dog")
    assert build_prompts(["a", "b"], ["{}.", "x {}"]) == ["a.", "x a", "b.", "x b"]
    (tmp_path / "c.txt").write_text("dog\n\n  sea lion \ncat\n")
    assert read_names(tmp_path / "c.txt") == ["dog", "sea lion", "cat"]
    (tmp_path / "t.json").write_text(json.dumps(["a {}.", "the {c}"]))
    assert read_names(tmp_path / "t.json") == ["a {}.", "the {c}"]
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="list of strings"):
        read_names(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------
# Shards, caches and the embedder


def _png(rgb, noise_seed: int | None = None, size=(40, 28)) -> bytes:
    """A PNG of one colour; with noise_seed, plus noise so that no two images (and no two
    image features: ties would make the ranking depend on the batch) are equal."""
    arr = np.empty((size[1], size[0], 3), dtype=np.int16)
    arr[:] = rgb
    if noise_seed is not None:
        arr += np.random.default_rng(noise_seed).integers(-25, 26, arr.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _retrieval_shards(root: Path) -> list[Path]:
    """2 shards of captioned images; shard 0 also holds the special cases of the loader."""
    rng = np.random.default_rng(0)
    paths = []
    for s in range(2):
        samples = []
        for k in range(5):
            color = list(COLORS)[(s + k) % 3]
            samples.append({
                "__key__": f"{k:04d}",
                "png": _png(COLORS[color], noise_seed=10 * s + k),
                "txt": f"a {color} photo of a {rng.choice(WORDS)}",
                "json": json.dumps({"dense_caption": f"a big {color} {' '.join(rng.choice(WORDS, 4))}"}),
            })  # fmt: skip
        if s == 0:
            samples[1]["png"] = b"\x89PNG\r\n\x1a\n truncated"  # corrupt image: skipped, counted
            del samples[2]["png"]  # no image
            samples[3]["txt"] = " "  # only the dense caption left
            samples[4]["json"] = json.dumps({"dense_caption": "tree", "other": "an extra caption"})
            samples.append({"__key__": "0005", "png": _png((9, 9, 9)), "json": json.dumps({"x": 1})})  # none
        p = root / f"ret-{s:03d}.tar"
        write_shard(str(p), samples)
        paths.append(p)
    return paths


FIELDS = ["txt", "dense=json:dense_caption"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = [" ".join(WORDS), "retrieve : an extra caption", *(f"a photo of a {c}" for c in COLORS)]
    llm = tiny_llm_dir(root / "llm", corpus=corpus)
    shards = _retrieval_shards(root)
    cache = root / "cache"
    extract_main([
        "--shards", str(root / "ret-{000..001}.tar"), "--out", str(cache), "--model", str(llm),
        "--fields", *FIELDS, "--instruction", "retrieve : {caption}", "--max-length", "16",
        "--dtype", "float32", "--storage", "fp32", "--tokens-per-batch", "64", "--no-progress",
        "--device", "cpu",
    ])  # fmt: skip
    return {"root": root, "llm": llm, "shards": shards, "cache": cache}


@pytest.fixture(scope="module")
def embedder(env):
    return embedder_like(env["cache"], "cpu")


def test_load_retrieval_set_from_cache(env):
    cache = EmbeddingCache.open(env["cache"])
    fields = [*FIELDS, "other=json:other"]  # 'other' was not extracted: its caption is not in the cache
    rs = load_retrieval_set([str(p) for p in env["shards"]], fields, IMAGE_SIZE, cache=cache)
    c = rs.counts
    assert (c["corrupt_images"], c["no_image"], c["no_caption"]) == (1, 1, 1)
    assert c["captions_not_in_cache"] == 1 and c["samples"] == 11
    # shard 0 keeps keys 0, 3 (dense only), 4; shard 1 all five
    assert rs.image_keys == [("ret-000.tar", "0000"), ("ret-000.tar", "0003"), ("ret-000.tar", "0004")] + [
        ("ret-001.tar", f"{k:04d}") for k in range(5)
    ]
    assert rs.images.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and rs.images.dtype == torch.uint8
    assert rs.text_embeddings.shape == (len(rs.captions), cache.dim) == (15, cache.dim)
    assert rs.text_to_image.tolist()[:4] == [0, 0, 1, 2] and rs.caption_fields[:4] == [
        "txt",
        "dense",
        "dense",
        "txt",
    ]
    # each row is the cache's row for its (shard, key, field)
    for i in (0, 3, 14):
        shard, key = rs.image_keys[int(rs.text_to_image[i])]
        row = cache.lookup(shard, [key], rs.caption_fields[i])
        assert torch.equal(rs.text_embeddings[i], cache.gather(row, out_dtype=torch.float32)[0])
    # images are the shared eval transform of the decoded bytes
    from llm2clip.data.shards import iter_samples

    first = next(iter_samples(str(env["shards"][1])))
    assert torch.equal(rs.images[3], eval_transform(IMAGE_SIZE)(decode_image(first["png"])))

    small = load_retrieval_set(str(env["root"] / "ret-*.tar"), FIELDS, IMAGE_SIZE, cache=cache, max_images=2)
    assert small.images.shape[0] == 2 and small.image_keys == rs.image_keys[:2]


def test_load_retrieval_set_with_embedder_matches_cache(env, embedder):
    cache = EmbeddingCache.open(env["cache"])
    a = load_retrieval_set([str(p) for p in env["shards"]], FIELDS, IMAGE_SIZE, cache=cache)
    b = load_retrieval_set([str(p) for p in env["shards"]], FIELDS, IMAGE_SIZE, embedder=embedder)
    assert a.captions == b.captions and torch.equal(a.text_to_image, b.text_to_image)
    assert torch.equal(a.images, b.images) and b.counts["corrupt_images"] == 1
    # fp32 storage: rows differ only by batch composition (packed fp32 on a 64-wide model, ~1e-6)
    err = (a.text_embeddings - b.text_embeddings).abs().max().item()
    scale = a.text_embeddings.abs().max().item()
    print(f"max |on the fly - cache| = {err:.3g} (max |row| {scale:.3g})")
    assert err <= 1e-5 * max(1.0, scale)


def test_load_retrieval_set_errors(env, tmp_path):
    cache = EmbeddingCache.open(env["cache"])
    empty = tmp_path / "empty.tar"
    write_shard(
        str(empty), [{"__key__": "a", "txt": "no image here"}, {"__key__": "b", "png": _png((1, 2, 3))}]
    )
    with pytest.raises(ValueError, match="no usable sample") as e:
        load_retrieval_set([str(empty)], FIELDS, IMAGE_SIZE, cache=cache)
    assert "'no_image': 1" in str(e.value) and "'no_caption': 1" in str(e.value)
    with pytest.raises(ValueError, match="cache= .* or embedder="):
        load_retrieval_set([str(empty)], FIELDS, IMAGE_SIZE)


def test_embedder_like_is_checked_against_the_cache(env, embedder, tmp_path):
    cache = EmbeddingCache.open(env["cache"])
    assert float(cache.verify_probe(embedder.encode).min()) >= cache.manifest["probe"]["min_cosine"]
    # the same cache but its summary points at another LLM (same architecture, other weights)
    other = tiny_llm_dir(tmp_path / "other-llm", corpus=[" ".join(WORDS)], seed=1)
    moved = tmp_path / "cache"
    shutil.copytree(env["cache"], moved)
    summary = json.loads((moved / "extract_summary.json").read_text())
    summary["config"]["text"]["model"] = str(other)
    (moved / "extract_summary.json").write_text(json.dumps(summary))
    with pytest.raises(StaleCacheError, match="probe check failed"):
        embedder_like(moved, "cpu")
    (moved / "extract_summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="extract_summary.json"):
        embedder_like(moved, "cpu")


# ---------------------------------------------------------------------------------------------
# evaluate() and the CLI


def _zeroshot_shards(root: Path, labels=(0, 1, 2, 1, 0, 2)) -> Path:
    names = list(COLORS)
    samples = [
        {"__key__": f"z{i}", "png": _png(COLORS[names[lab]], noise_seed=100 + i), "cls": str(lab)}
        for i, lab in enumerate(labels)
    ]
    samples.append({"__key__": "nolabel", "png": _png((0, 0, 0))})
    samples.append({"__key__": "corrupt", "png": b"not a png", "cls": "0"})
    p = root / "zs.tar"
    write_shard(str(p), samples)
    return p


def _tiny_checkpoint(path: Path, text_dim: int) -> ClipModel:
    torch.manual_seed(0)
    tower = CNNTower(CNNTowerConfig(image_size=IMAGE_SIZE, embed_dim=64, heads=2))
    model = ClipModel(tower, ClipModelConfig(embed_dim=32, adapter=AdapterConfig(text_dim, 32, depth=1)))
    model.save(path)
    return model


def test_evaluate_uses_tower_normalisation_and_restores_mode(env, embedder, tmp_path):
    model = _tiny_checkpoint(tmp_path / "ckpt", embedder.hidden_size)
    cache = EmbeddingCache.open(env["cache"])
    rs = load_retrieval_set([str(p) for p in env["shards"]], FIELDS, IMAGE_SIZE, cache=cache)
    zs = load_zeroshot_set(
        [str(_zeroshot_shards(tmp_path))], IMAGE_SIZE, list(COLORS), ["a photo of a {}", "{c}"], embedder
    )
    assert (
        zs.counts["no_label"] == 1
        and zs.counts["corrupt_images"] == 1
        and zs.labels.tolist() == [0, 1, 2, 1, 0, 2]
    )
    assert zs.prompt_embeddings.shape == (3, 2, embedder.hidden_size)

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel: the model is .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model.train()
    bn_before = model.visual.backbone.features[0][1].running_mean.clone()
    got = evaluate(Wrapper(model), rs, zs, batch_size=3)
    assert model.training  # restored
    assert torch.equal(model.visual.backbone.features[0][1].running_mean, bn_before)  # ran in eval mode

    # The features evaluate() ranks are the tower's on images normalised with its (ImageNet)
    # mean/std, in eval mode: checked within tolerance against an independent computation.
    model.eval()
    with torch.no_grad():
        img = model.encode_image(normalize_images(rs.images, IMAGENET_MEAN, IMAGENET_STD)).float()
        zimg = model.encode_image(normalize_images(zs.images, IMAGENET_MEAN, IMAGENET_STD)).float()
    batched = encode_images(model, rs.images, batch_size=3)  # evaluate()'s batching
    torch.testing.assert_close(batched, img, rtol=0, atol=1e-5)
    torch.testing.assert_close(encode_images(model, zs.images, batch_size=3), zimg, rtol=0, atol=1e-5)
    # The metrics are then exactly those of these features: recall is a discrete function of
    # scores, so both sides come from the same arithmetic (batch of 3), never from two paths.
    txt = encode_texts(model, rs.text_embeddings, batch_size=3)
    ref = retrieval_metrics(batched, txt, rs.text_to_image)
    for key, value in ref.items():
        assert got["retrieval"][key] == value, key
    classifier = zeroshot_classifier(model, zs.prompt_embeddings, batch_size=3)
    zref = zeroshot_accuracy(encode_images(model, zs.images, batch_size=3), classifier, zs.labels)
    for key, value in zref.items():
        assert got["zeroshot"][key] == value, key
    table = format_table(got)
    assert "i2t R@1" in table and "zero-shot top1" in table and f"{100 / 8:.2f}%" in table  # t2i chance R@1


def test_cli_end_to_end(env, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _tiny_checkpoint(ckpt, 64)
    zs = _zeroshot_shards(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(COLORS) + "\n")
    (tmp_path / "templates.json").write_text(json.dumps(["a photo of a {}.", "a {c} thing"]))
    out = tmp_path / "res" / "results.json"
    args = [
        "--checkpoint", str(ckpt), "--retrieval-shards", *(str(p) for p in env["shards"]),
        "--retrieval-fields", *FIELDS, "--eval-cache", str(env["cache"]), "--embed-like", str(env["cache"]),
        "--zeroshot-shards", str(zs), "--classnames", str(tmp_path / "classes.txt"),
        "--templates", str(tmp_path / "templates.json"), "--device", "cpu", "--batch-size", "4",
        "--out", str(out),
    ]  # fmt: skip
    result = main(args)
    printed = capsys.readouterr().out
    assert "t2i R@10" in printed and "zero-shot top5" in printed
    saved = json.loads(out.read_text())
    assert saved["results"] == result["results"]  # floats round-trip JSON exactly
    r, z = saved["results"]["retrieval"], saved["results"]["zeroshot"]
    assert r["N"] == 8 and r["M"] == 15 and r["t2i_chance_R@1"] == pytest.approx(1 / 8)
    assert z["N"] == 6 and z["C"] == 3 and z["chance_top1"] == pytest.approx(1 / 3) and z["top5"] == 1.0
    assert all(0.0 <= r[f"{d}_R@{k}"] <= 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert (
        saved["counts"]["retrieval"]["corrupt_images"] == 1 and saved["counts"]["zeroshot"]["no_label"] == 1
    )
    assert saved["args"]["checkpoint"] == str(ckpt) and saved["image_size"] == IMAGE_SIZE
    # every result names its data, protocol and metric definitions; the table too
    assert r["protocol"] == "llm2clip" and r["dataset"] == " ".join(str(p) for p in env["shards"])
    assert z["dataset"] == str(zs) and "top{k}" in z["definitions"] and "i2t_R@k" in r["definitions"]
    assert "8 images, 15 captions, llm2clip protocol" in printed and "definitions:" in printed
    assert saved["seconds"]["total"] > 0

    # clear errors
    with pytest.raises(UsageError, match="no evaluation data"):
        main(["--checkpoint", str(ckpt)])
    with pytest.raises(UsageError, match="no config.json"):
        main(["--checkpoint", str(tmp_path), "--retrieval-shards", str(env["shards"][0]), "--eval-cache",
              str(env["cache"])])  # fmt: skip
    zs_args = [
        "--checkpoint",
        str(ckpt),
        "--zeroshot-shards",
        str(zs),
        "--templates",
        str(tmp_path / "templates.json"),
    ]
    with pytest.raises(UsageError, match="--embed-like"):
        main([*zs_args, "--classnames", str(tmp_path / "classes.txt")])
    (tmp_path / "two.txt").write_text("red\ngreen\n")
    with pytest.raises(UsageError, match=r"zs.tar, key 'z2': label 2 out of range for 2 class names"):
        main(
            [
                *zs_args,
                "--classnames",
                str(tmp_path / "two.txt"),
                "--embed-like",
                str(env["cache"]),
                "--device",
                "cpu",
            ]
        )


def test_eval_refuses_caches_of_another_llm_or_width(env, tmp_path):
    """The checkpoint records the training cache's spec: an eval cache (or --embed-like cache) of
    another LLM is refused naming the field; a width mismatch names both widths."""
    import dataclasses

    cache = EmbeddingCache.open(env["cache"])
    ckpt = tmp_path / "other-llm"
    model = _tiny_checkpoint(ckpt, cache.dim)
    model.config.text_spec = dataclasses.replace(cache.spec, model_id="another/llm").to_dict()
    model.save(ckpt)
    shards = ["--retrieval-shards", str(env["shards"][0]), "--device", "cpu"]
    with pytest.raises(StaleCacheError, match="model_id"):
        main(["--checkpoint", str(ckpt), *shards, "--eval-cache", str(env["cache"])])
    with pytest.raises(StaleCacheError, match="model_id"):
        main(["--checkpoint", str(ckpt), *shards, "--embed-like", str(env["cache"])])
    narrow = tmp_path / "narrow"
    _tiny_checkpoint(narrow, cache.dim // 2)
    message = rf"holds {cache.dim}-d LLM embeddings, but the model's adapter takes {cache.dim // 2}-d"
    with pytest.raises(UsageError, match=message):
        main(["--checkpoint", str(narrow), *shards, "--eval-cache", str(env["cache"])])
