"""llm2clip.data.images: decoding, transforms, normalisation, sample counting and ShardImageDataset
(worker-count independence, resume, rank split, skips, caption-field choice, shard errors).

Fixture: tiny PNG shards written with write_shard and one fp32 cache built with CacheWriter +
merge. Every caption is unique, so a cache row identifies its (shard, key, field).
"""

from __future__ import annotations

import gc
import io
import itertools
import math
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip.cache import PROBE_CAPTIONS, CacheSpec, CacheWriter, EmbeddingCache
from llm2clip.data.images import IMAGE_FIELDS, decode_image, eval_transform, normalize_images, train_transform
from llm2clip.data.shards import ShardError, count_samples, iter_samples, write_shard
from llm2clip.data.skips import SkipCounts
from llm2clip.data.stream import ShardImageDataset

DIM = 8
FIELDS = ("short", "dense")
MAIN_SIZES = (5, 3, 6, 4)  # 18 samples; batches of 4 straddle shards and epochs
MANY = 240  # samples of the field-choice shard


def png_bytes(rng: np.random.Generator, w: int | None = None, h: int | None = None, mode="RGB") -> bytes:
    w = int(rng.integers(16, 49)) if w is None else w
    h = int(rng.integers(16, 49)) if h is None else h
    channels = len(mode)
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def caption(name: str, key: str, field: str) -> str:
    return f"{field} caption of {key} in {name}"


class Data:
    """Paths of the fixture's shards and its cache."""

    def __init__(self, root: Path) -> None:
        rng = np.random.default_rng(0)
        self.root = root
        self.main = []  # keys repeat across shards: only (shard, key) is unique
        rows: dict[str, list[tuple[str, str]]] = {}  # shard name -> [(key, field)] with a cache row
        for i, n in enumerate(MAIN_SIZES):
            name = f"main-{i:04d}.tar"
            keys = [f"{k:03d}" for k in range(n)]
            write_shard(str(root / name), [{"__key__": k, "png": png_bytes(rng), "txt": "x"} for k in keys])
            self.main.append(str(root / name))
            # Every third sample has no dense caption.
            rows[name] = [(k, f) for j, k in enumerate(keys) for f in FIELDS if f == "short" or j % 3 != 2]
        # Even keys have both captions, odd keys only a dense one.
        name = "many-0000.tar"
        keys = [f"{k:04d}" for k in range(MANY)]
        write_shard(str(root / name), [{"__key__": k, "png": png_bytes(rng, 16, 16)} for k in keys])
        self.many = str(root / name)
        rows[name] = [(k, f) for j, k in enumerate(keys) for f in FIELDS if f == "dense" or j % 2 == 0]
        # ok, corrupt (truncated PNG), no image member, no cache row, ok (jpg field name, PNG bytes).
        name = "bad-0000.tar"
        good = png_bytes(rng)
        samples = [
            {"__key__": "ok0", "png": png_bytes(rng)},
            {"__key__": "corrupt", "png": good[: len(good) // 2]},
            {"__key__": "noimage", "txt": "only a caption"},
            {"__key__": "norow", "png": png_bytes(rng)},
            {"__key__": "ok1", "jpg": png_bytes(rng)},
        ]
        write_shard(str(root / name), samples)
        self.bad = str(root / name)
        rows[name] = [(s["__key__"], "short") for s in samples if s["__key__"] != "norow"]
        self.cache_path = root / "cache"
        spec = CacheSpec(
            model_id="test/tiny",
            model_revision="0" * 40,
            adapter_revision="",
            prompt_template="{caption}",
            pooling="mean",
            max_length=16,
            normalize=True,
            dim=DIM,
        )
        writer = CacheWriter(self.cache_path, spec, "fp32")
        for name, entries in rows.items():
            with writer.shard(name) as s:
                for f in FIELDS:
                    ks = [k for k, g in entries if g == f]
                    if ks:
                        emb = torch.nn.functional.normalize(torch.randn(len(ks), DIM), dim=1)
                        s.add_batch(ks, f, [caption(name, k, f) for k in ks], emb)
        writer.merge(torch.nn.functional.normalize(torch.randn(len(PROBE_CAPTIONS), DIM), dim=1))
        self.cache = EmbeddingCache.open(self.cache_path)

    def dataset(self, shards=None, **kw) -> ShardImageDataset:
        args = dict(batch_size=4, image_size=12)
        args.update(kw)
        return ShardImageDataset(self.main if shards is None else shards, self.cache, list(FIELDS), **args)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    return Data(tmp_path_factory.mktemp("image_data"))


def take(ds, n: int, workers: int = 0) -> list[dict]:
    if workers == 0:
        return list(itertools.islice(iter(ds), n))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        del it  # shuts the workers down now, also when a worker raised (not at a later gc)


def pairs(batch: dict) -> list[tuple[str, str]]:
    """(shard name, key) of each sample of a batch."""
    return list(zip(batch["shards"], batch["keys"]))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("index", "epoch", "shards", "keys", "fields", "skipped"):
            assert x[name] == y[name], name
        assert torch.equal(x["rows"], y["rows"])
        assert torch.equal(x["images"], y["images"])


# ------------------------------------------------------------------------------------------------
# Decoding and transforms


def test_decode_errors_are_value_errors():
    rng = np.random.default_rng(1)
    good = png_bytes(rng, 20, 20)
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(jpeg, format="JPEG")
    jpeg = jpeg.getvalue()
    for bad in (b"", b"not an image at all", good[: len(good) // 2], good[:40], jpeg[: len(jpeg) // 2]):
        with pytest.raises(ValueError, match="undecodable image"):
            decode_image(bad)
    img = decode_image(good)
    assert img.mode == "RGB" and img.size == (20, 20)
    assert decode_image(jpeg).mode == "RGB"


def test_decode_composites_transparency_on_white():
    buf = io.BytesIO()
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :3] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    arr = np.asarray(decode_image(buf.getvalue()))
    assert (arr[:, :3] == (255, 0, 0)).all() and (arr[:, 3:] == 255).all()
    # Palette image whose index 0 is transparent; grey-scale image (plain conversion).
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    arr = np.asarray(decode_image(buf.getvalue()))
    assert tuple(arr[0, 0]) == (0, 0, 255) and (arr[1:] == 255).all()
    buf = io.BytesIO()
    Image.new("L", (5, 3), 77).save(buf, format="PNG")
    arr = np.asarray(decode_image(buf.getvalue()))
    assert arr.shape == (3, 5, 3) and (arr == 77).all()


def test_eval_transform_resizes_shorter_side_and_center_crops():
    rng = np.random.default_rng(2)
    s = 16
    square = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    out = eval_transform(s)(Image.fromarray(square))
    assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(square).permute(2, 0, 1))
    # Shorter side already s: no resampling, the centre s columns / rows are kept exactly.
    wide = rng.integers(0, 256, (s, 2 * s + 1, 3), dtype=np.uint8)
    out = eval_transform(s)(Image.fromarray(wide))
    assert torch.equal(out, torch.from_numpy(wide[:, 8 : 8 + s]).permute(2, 0, 1))
    tall = rng.integers(0, 256, (3 * s, s, 3), dtype=np.uint8)
    out = eval_transform(s)(Image.fromarray(tall))
    assert torch.equal(out, torch.from_numpy(tall[s : 2 * s]).permute(2, 0, 1))
    for w, h in ((7, 40), (48, 17), (300, 299)):
        assert eval_transform(24)(Image.new("RGB", (w, h))).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="image_size"):
        eval_transform(0)


def test_train_transform_is_a_function_of_the_rng():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (150, 160, 3), dtype=np.uint8))
    tf = train_transform(20)
    a, b = tf(img, random.Random("x")), tf(img, random.Random("x"))
    assert a.shape == (3, 20, 20) and a.dtype == torch.uint8 and torch.equal(a, b)
    outs = {tf(img, random.Random(seed)).numpy().tobytes() for seed in range(5)}
    assert len(outs) == 5  # another generator state, another crop
    # Every box fits the image, covers an area fraction in `scale` and has an aspect ratio in
    # [3/4, 4/3], up to the rounding of each side to whole pixels (+-0.5 px).
    tf = train_transform(20, scale=(0.3, 0.6))
    r = random.Random(0)
    for w, h in ((44, 30), (30, 44), (17, 16)):
        for _ in range(200):
            left, top, cw, ch = tf.crop_box(w, h, r)
            assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
            if (cw, ch) != (w, h):  # not the fallback
                assert (cw - 0.5) * (ch - 0.5) <= 0.6 * w * h and (cw + 0.5) * (ch + 0.5) >= 0.3 * w * h
                assert (cw - 0.5) / (ch + 0.5) <= 4 / 3 and (cw + 0.5) / (ch - 0.5) >= 3 / 4
    # scale (1, 1) on a square image: the whole image, unresampled.
    sq = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    out = train_transform(20, scale=(1.0, 1.0))(Image.fromarray(sq), random.Random(5))
    assert torch.equal(out, torch.from_numpy(sq).permute(2, 0, 1))
    # No box of full area fits a 3:1 image: fall back to the centred box of aspect 4/3.
    assert train_transform(8, scale=(1.0, 1.0)).crop_box(48, 16, random.Random(0)) == (13, 0, 21, 16)
    with pytest.raises(ValueError, match="scale"):
        train_transform(8, scale=(0.0, 1.0))


def test_normalize_images_matches_the_formula():
    x = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    x[0, :, 0, 0] = 0
    x[0, :, 0, 1] = 255
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    # The plain float32 computation of the same formula bounds the acceptable error.
    pt = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = normalize_images(x, mean, std)
    err, pt_err = (out.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    print(f"normalize: max err {err:.3g}, plain fp32 {pt_err:.3g}")
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert err <= 2 * pt_err + torch.finfo(torch.float32).tiny
    bf = normalize_images(x, torch.tensor(mean), torch.tensor(std), dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, out.to(torch.bfloat16))
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(x.float(), mean, std)
    with pytest.raises(ValueError, match="3 values"):
        normalize_images(x, mean[:2], std)


# ------------------------------------------------------------------------------------------------
# Counting and shard errors


def test_count_samples(data, tmp_path):
    shards = [*data.main, data.many, data.bad]
    assert count_samples(shards) == [*MAIN_SIZES, MANY, 5]
    assert count_samples(shards, threads=1) == [len(list(iter_samples(p))) for p in shards]
    assert count_samples([]) == []
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(data.many).read_bytes()[:3000])
    with pytest.raises(ShardError, match="cut.tar"):
        count_samples([data.main[0], str(cut)])
    with pytest.raises(ShardError, match="cannot open shard .*nope.tar"):
        count_samples([str(tmp_path / "nope.tar")])


def test_truncated_or_changed_shard_raises_while_iterating(data, tmp_path):
    # A copy of main-0001 cut inside its last sample, under its own name (the cache has its rows).
    d = tmp_path / "cut"
    d.mkdir()
    cut = d / "main-0001.tar"
    raw = Path(data.main[1]).read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    shards = [data.main[0], str(cut)]
    ds = data.dataset(shards, shard_sizes=[5, 3], shuffle=False, batch_size=2)
    with pytest.raises(ShardError, match="main-0001.tar"):
        take(ds, 4)
    with pytest.raises(ShardError, match="main-0001.tar"):
        take(ds, 4, workers=1)  # re-raised in the main process with its type and message
    # The failed loader's iterator lives in a reference cycle of the exception; collecting it joins
    # its worker, which torch lets take MP_STATUS_CHECK_INTERVAL (5 s). Pay that here, not later.
    gc.collect()
    # Stale sizes: every later batch position would be wrong.
    ds = data.dataset(data.main[:2], shard_sizes=[5, 4], shuffle=False, batch_size=2)
    with pytest.raises(ShardError, match="main-0001.tar has 3 samples, shard_sizes says 4"):
        take(ds, 4)


# ------------------------------------------------------------------------------------------------
# The dataset


def test_worker_count_and_resume_give_the_same_batches(data):
    n = 12  # 48 stream samples: 2.7 epochs of 18
    ref = take(data.dataset(seed=7), n)
    assert [b["index"] for b in ref] == list(range(n))
    assert [b["epoch"] for b in ref] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # batch j starts at 4j
    for workers in (1, 2, 3):
        assert_same_batches(ref, take(data.dataset(seed=7), n, workers))
    for start in (1, 5, 9):
        assert_same_batches(ref[start:], take(data.dataset(seed=7, start_batch=start), n - start))
    assert_same_batches(ref[5:], take(data.dataset(seed=7, start_batch=5), n - 5, workers=2))
    # The stream really is what the module docstring says: shards permuted per epoch, samples
    # within a shard permuted per (epoch, shard), batches cut every batch_size samples.
    ds = data.dataset(seed=7)
    stream = [
        (ds.names[s], f"{t:03d}") for e in range(3) for s in ds.rank_shards(e) for t in ds.sample_order(e, s)
    ]
    got = [k for b in ref for k in pairs(b)]
    assert got == stream[: 4 * n]  # nothing in the main shards is skipped
    assert [b["skipped"].total for b in ref] == [0] * n
    # Another seed gives another order.
    other = take(data.dataset(seed=8), n)
    assert [k for b in other for k in pairs(b)] != got


def test_samples_are_decoded_cropped_and_matched_to_their_rows(data):
    """Each output image is train_transform(decode) under the per-sample generator (after the
    field draw), and each row is that sample's cache row for the chosen field."""
    by_key = {(d["__shard__"], d["__key__"]): d["png"] for p in data.main for d in iter_samples(p)}
    tf = train_transform(12)
    for augment in (True, False):
        for b in take(data.dataset(seed=3, augment=augment), 5):
            for img, row, (name, key), field in zip(b["images"], b["rows"], pairs(b), b["fields"]):
                rng = random.Random(f"3/{b['epoch']}/{name}/{key}")
                rng.random()  # the field draw
                pil = decode_image(by_key[name, key])
                want = tf(pil, rng) if augment else eval_transform(12)(pil)
                assert torch.equal(img, want)
                assert row.item() == data.cache.lookup([name], [key], field)[0] >= 0


def test_rank_split_covers_every_sample_once_per_epoch(data):
    """4 shards over 2 ranks: each epoch, the ranks' streams together hold every sample once."""
    world = 2
    dss = [data.dataset(rank=r, world_size=world, seed=11, batch_size=1, augment=False) for r in range(world)]
    streams = []
    for ds in dss:
        per_epoch = [sum(ds.shard_sizes[s] for s in ds.rank_shards(e)) for e in range(2)]
        batches = take(ds, sum(per_epoch))
        streams.append([(b["epoch"], k) for b in batches for k in pairs(b)])
    all_keys = {(Path(p).name, f"{k:03d}") for p, n in zip(data.main, MAIN_SIZES) for k in range(n)}
    for e in range(2):
        seen = [k for s in streams for ep, k in s if ep == e]
        assert len(seen) == len(all_keys) and set(seen) == all_keys
    # Within an epoch the ranks read disjoint shards; the assignment changes between epochs.
    for e in range(2):
        assert not {k[0] for ep, k in streams[0] if ep == e} & {k[0] for ep, k in streams[1] if ep == e}
    assert len({tuple(dss[0].rank_shards(e)) for e in range(10)}) > 1
    assert dss[0].batches_per_epoch() == 18 // (1 * world)


@pytest.mark.parametrize("world", [2, 4])
def test_no_rank_starves_with_fewer_shards_than_needed(data, world):
    shards = data.main[:3]  # 14 samples
    for r in range(world):
        ds = data.dataset(shards, rank=r, world_size=world, seed=1, batch_size=2, augment=False)
        for e in range(50):
            assert ds.rank_shards(e), f"rank {r} has no shard in epoch {e}"
        steps = 3 * ds.batches_per_epoch()
        batches = take(ds, steps)
        assert [b["index"] for b in batches] == list(range(steps))
        assert all(len(b["rows"]) == 2 for b in batches)
    # More ranks than shards: rank r >= 3 re-reads a shard of the epoch (perm[r % 3]).
    ds3 = data.dataset(shards, rank=3, world_size=4, seed=1)
    ds0 = data.dataset(shards, rank=0, world_size=4, seed=1)
    assert all(ds3.rank_shards(e) == ds0.rank_shards(e) for e in range(10))
    # Unshuffled, a rank whose only shard is empty would never produce a sample.
    empty = Path(data.root) / "empty-0000.tar"
    write_shard(str(empty), [])
    with pytest.raises(ValueError, match="rank 1 of 2 is assigned only empty shards"):
        data.dataset([data.main[0], str(empty)], rank=1, world_size=2, shuffle=False)


def test_skipped_samples_are_counted_with_their_shard(data):
    ds = data.dataset([data.bad], batch_size=5, shuffle=False, augment=False)
    (b,) = take(ds, 1)
    assert b["keys"] == ["ok0", "ok1"] and b["shards"] == ["bad-0000.tar"] * 2
    assert b["images"].shape == (2, 3, 12, 12) and b["rows"].shape == (2,)
    sk = b["skipped"]
    assert (sk["corrupt_image"], sk["missing_image"], sk["missing_row"], sk.total) == (1, 1, 1, 3)
    assert sk.by_shard == {"bad-0000.tar": 3}
    # Workers give the same counts; the counts add up over batches.
    assert_same_batches([b], take(ds, 1, workers=2))
    total = SkipCounts()
    for x in take(data.dataset([data.bad, data.main[0]], batch_size=2, shuffle=False), 5):
        total.merge(x["skipped"])
    assert total.to_dict() == {
        "corrupt_image": 1,
        "missing_image": 1,
        "missing_row": 1,
        "unreadable_shard": 0,
        "short_shard": 0,
        "total": 3,
        "by_shard": {"bad-0000.tar": 3},
    }
    # A batch with every sample skipped is still produced (empty), so the batch positions hold.
    ds = data.dataset([data.bad], batch_size=1, shuffle=False)
    sizes = [len(x["rows"]) for x in take(ds, 5)]
    assert sizes == [1, 0, 0, 0, 1]
    assert take(ds, 2)[1]["images"].shape == (0, 3, 12, 12)


def test_field_choice_is_among_fields_with_rows_and_balanced(data):
    ds = data.dataset([data.many], batch_size=MANY, seed=5, augment=False)
    (b,) = take(ds, 1)
    assert len(b["rows"]) == MANY
    choice = dict(zip(b["keys"], b["fields"]))
    odd = [choice[k] for k in choice if int(k) % 2]
    even = [choice[k] for k in choice if int(k) % 2 == 0]
    assert set(odd) == {"dense"}  # the only field with a row
    # Exactly the documented rule: first draw of the per-sample generator, uniform over the fields
    # that have rows.
    for key in choice:
        if int(key) % 2 == 0:
            u = random.Random(f"5/0/many-0000.tar/{key}").random()
            assert choice[key] == ("short" if u < 0.5 else "dense")
    # Roughly 50/50: within 4 standard deviations of a fair coin over n draws.
    n, short = len(even), Counter(even)["short"]
    assert abs(short - n / 2) <= 4 * math.sqrt(n / 4), (short, n)


def test_constructor_checks_and_pickling(data):
    ds = data.dataset(seed=2)
    assert ds.shard_sizes == list(MAIN_SIZES) and ds.batches_per_epoch() == 18 // 4
    assert data.dataset(world_size=2, rank=1).batches_per_epoch() == 18 // 8
    with pytest.raises(ValueError, match="do not fill one global batch"):
        data.dataset(batch_size=10, world_size=2).batches_per_epoch()
    with pytest.raises(ValueError, match="unique"):
        data.dataset([data.main[0], data.main[0]])
    with pytest.raises(ValueError, match="rank"):
        data.dataset(rank=2, world_size=2)
    with pytest.raises(ValueError, match="shard_sizes"):
        data.dataset(shard_sizes=[1, 2])
    with pytest.raises(ValueError, match="fields"):
        ShardImageDataset(data.main, data.cache, [], 4, 12)
    # DataLoader workers started with spawn receive a pickled copy: same batches.
    clone = pickle.loads(pickle.dumps(ds))
    assert_same_batches(take(ds, 3), take(clone, 3))
    assert IMAGE_FIELDS[0] == "jpg"
