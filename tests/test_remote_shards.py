"""Shards over URLs (llm2clip.data.shards / remote): a loopback HTTP server started here serves,
cuts, refuses and stalls; pipe:cat and file: read local files through the URL path.

Same bytes, same samples: every URL form reads what the local file holds; the stream over URLs
gives the same batches as over local paths (worker counts, resume); faults end in a ShardError
naming the URL within a bounded time, or, with on_shard_error="skip", in counted skips with the
batch positions kept. Also: img2dataset's folder layout (stats files) as training shards.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip.data.shards import (
    ReadPolicy,
    ShardError,
    count_samples,
    expand_shards,
    iter_samples,
    shard_name,
    split_name,
    walk_samples,
    write_shard,
)
from llm2clip.data.sizes import img2dataset_count, nominal_sizes, shard_sizes
from tests.test_image_data import Data, assert_same_batches, take

FAST = ReadPolicy(retries=2, timeout_s=0.5, backoff_s=0.05)


class Server:
    """127.0.0.1 HTTP server over a folder. Paths: /ok/NAME serves, /cut/NAME sends half then closes,
    /flaky/NAME cuts the first request of each NAME and serves the next, /slow/NAME sends 1000 bytes
    and stalls; a missing file is a 404."""

    def __init__(self, root: Path):
        self.root, self.requests, self.stop = root, [], threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                _, mode, *rest = self.path.split("/", 2)
                path = server.root / (rest[0] if rest else "")
                server.requests.append(self.path)
                if not rest or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if mode == "flaky":
                    mode = "cut" if server.requests.count(self.path) == 1 else "ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mode == "ok":
                    self.wfile.write(data)
                elif mode == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif mode == "slow":
                    self.wfile.write(data[:1000])
                    self.wfile.flush()
                    server.stop.wait(5)
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    return Data(tmp_path_factory.mktemp("remote_data"))


@pytest.fixture(scope="module")
def server(data):
    s = Server(data.root)
    yield s
    s.close()


def _samples(url, policy=FAST):
    return [(s["__key__"], s["__shard__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for s in iter_samples(url, policy)]  # fmt: skip


def test_every_url_form_reads_the_local_bytes(data, server):
    path = data.main[2]
    name = Path(path).name
    want = _samples(path)
    forms = [f"{server.url}/ok/{name}", f"pipe:cat {path}", f"file://{path}"]
    for url in forms:
        assert shard_name(url) == name
        assert _samples(url) == want, url
    assert count_samples([path, *forms], policy=FAST) == [len(want)] * 4
    keep = lambda i, f: i % 2 == 1  # noqa: E731  only some payloads, as a DataLoader worker reads
    local = list(walk_samples(path, keep))
    assert list(walk_samples(forms[0], keep, FAST)) == list(walk_samples(forms[1], keep, FAST)) == local
    assert [m for _, _, m in local[::2]] == [{}] * len(local[::2]) and local[1][2]


def test_member_names_split_as_webdataset_splits_them():
    from webdataset.tariterators import base_plus_ext

    for name in ("000123.jpg", "a/b/000123.seg.png", "x.JSON", "noext", ".hidden", "dir.v2/k.txt", "k."):
        assert split_name(name) == base_plus_ext(name), name


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_faults_end_in_a_shard_error_naming_the_url(data, server, tmp_path):
    name = Path(data.many).name
    cases = {
        f"{server.url}/cut/{name}": "status 18",
        f"{server.url}/ok/missing.tar": "status 22",
        f"http://127.0.0.1:{_closed_port()}/x.tar": "status 7",
        f"{server.url}/slow/{name}": "no data for 0.5 s",
        f"pipe:cat {tmp_path}/nope.tar": "command exited with status 1",
    }
    for url, why in cases.items():
        t = time.monotonic()
        with pytest.raises(ShardError, match="unreadable") as e:
            list(iter_samples(url, FAST))
        assert url in str(e.value) and why in str(e.value) and "3 attempt(s)" in str(e.value)
        assert time.monotonic() - t < 8, url  # 3 attempts x (0.5 s timeout) + backoff, not a hang
    # A first attempt cut mid-shard is retried; the retry skips the bytes already read.
    assert _samples(f"{server.url}/flaky/{name}") == _samples(data.many)
    assert server.requests.count(f"/flaky/{name}") == 2


def test_a_stream_cut_at_a_member_boundary_is_not_a_clean_end(data, tmp_path):
    with tarfile.open(data.many) as tar:
        cut = [m.offset for m in tar.getmembers()][len(tar.getmembers()) // 2]
    bad = tmp_path / "many-0000.tar"
    bad.write_bytes(Path(data.many).read_bytes()[:cut])
    with pytest.raises(ShardError, match="end-of-archive"):
        list(iter_samples(f"pipe:cat {bad}", FAST))
    with pytest.raises(ShardError, match="many-0000.tar"):
        list(iter_samples(str(bad)))


def test_specs_names_and_lists(data, server, tmp_path):
    urls = expand_shards(f"{server.url}/ok/main-{{0000..0002}}.tar::pipe:cat {data.main[3]}")
    assert [shard_name(u) for u in urls] == [Path(p).name for p in data.main]
    listing = tmp_path / "shards.txt"
    listing.write_text(
        f"# training shards\n{server.url}/ok/main-0000.tar\n\n{os.path.relpath(data.main[1], tmp_path)}\n"
    )
    assert expand_shards(str(listing)) == [f"{server.url}/ok/main-0000.tar", os.path.normpath(data.main[1])]
    assert shard_name("pipe:aws s3 cp s3://bucket/cc/00042.tar -") == "00042.tar"
    assert shard_name("https://host/cc/00042.tar?X-Amz-Signature=ab/cd") == "00042.tar"
    with pytest.raises(ValueError, match="no argument of the command ends in .tar"):
        shard_name("pipe:cat")
    with pytest.raises(ValueError, match="pipe:aws s3 cp s3://b/0.tar -"):
        expand_shards("s3://b/0.tar")
    with pytest.raises(ValueError, match=f"{data.main[0]} and {server.url}/ok/main-0000.tar are both named"):
        expand_shards([data.main[0], f"{server.url}/ok/main-0000.tar"])


def test_stream_over_urls_gives_the_local_batches(data, server):
    urls = [f"{server.url}/ok/{Path(p).name}" for p in data.main]
    ref = take(data.dataset(seed=7), 10)
    assert_same_batches(ref, take(data.dataset(urls, seed=7, policy=FAST), 10))
    assert_same_batches(ref, take(data.dataset(urls, seed=7, policy=FAST), 10, workers=2))
    assert_same_batches(ref[4:], take(data.dataset(urls, seed=7, policy=FAST, start_batch=4), 6, workers=2))
    # Shard sizes of URLs without img2dataset stats: streamed through once, then reused.
    assert shard_sizes(urls, data.root / "sizes.json", policy=FAST) == data.dataset().shard_sizes


def test_unreadable_shard_is_skipped_and_counted_or_raises(data, server):
    urls = [f"{server.url}/ok/{Path(p).name}" for p in data.main]
    urls[1] = f"{server.url}/cut/{Path(data.main[1]).name}"
    sizes = [5, 3, 6, 4]
    ds = data.dataset(urls, seed=7, policy=FAST, shard_sizes=sizes, on_shard_error="skip")
    ref = take(data.dataset(seed=7), 5)
    got = take(ds, 5, workers=2)
    lost = sum(b["skipped"]["unreadable_shard"] for b in got)
    kept = [(s, k) for b in got for s, k in zip(b["shards"], b["keys"])]
    want = [(s, k) for b in ref for s, k in zip(b["shards"], b["keys"]) if s != "main-0001.tar"]
    assert kept == want and lost == 20 - len(want) > 0  # positions held, every lost sample counted
    assert all(b["skipped"].by_shard.get("main-0001.tar", 0) == b["skipped"].total for b in got)
    with pytest.raises(ShardError, match="cut/main-0001.tar"):
        take(data.dataset(urls, seed=7, policy=FAST, shard_sizes=sizes), 5)


def test_nominal_sizes_count_missing_positions(data):
    assert nominal_sizes(4, 18) == [5, 5, 4, 4]
    ds = data.dataset(shuffle=False, shard_sizes=[5, 5, 5, 5], exact_sizes=False, batch_size=5, augment=False)
    got = take(ds, 4)
    assert [len(b["keys"]) for b in got] == [5, 3, 5, 4]  # main-0001 holds 3, main-0003 holds 4
    assert [b["skipped"]["short_shard"] for b in got] == [0, 2, 0, 1]
    with pytest.raises(ShardError, match="shard_sizes says 5"):
        take(data.dataset(shuffle=False, shard_sizes=[5, 5, 5, 5]), 2)


def test_retrieval_set_and_pairs_read_urls(data, server):
    from llm2clip.data.pairs import read_source
    from llm2clip.evaluation import load_retrieval_set

    url = f"{server.url}/ok/{Path(data.main[0]).name}"
    a = load_retrieval_set([data.main[0]], ["short=txt"], 12, cache=data.cache)
    b = load_retrieval_set([url], ["short=txt"], 12, cache=data.cache)
    assert a.counts == b.counts and torch.equal(a.images, b.images)
    assert read_source("shard", url, "txt", "txt")[0] == read_source("shard", data.main[0], "txt", "txt")[0]


# ------------------------------------------------------------------------------------------------
# img2dataset's output folder (webdataset format) as training shards


def _jpeg(rng: np.random.Generator, cls: int) -> bytes:
    colour = np.array([(cls * 67) % 256, (cls * 131 + 40) % 256, (cls * 29 + 90) % 256])
    pixels = np.clip(colour + rng.normal(0, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_img2dataset_folder(root: Path, shards: int = 2, per_shard: int = 10, failed: int = 2) -> None:
    """The files img2dataset writes with --output_format webdataset: NNNNN.tar holding
    {key}.jpg / .txt / .json per successful sample (key = shard id + index, 9 digits), and
    NNNNN_stats.json beside it (its "successes" is the number of samples in the tar)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for s in range(shards):
        samples = []
        for i in range(per_shard + failed):
            key = f"{s:05d}{i:04d}"
            if i % 6 == 5:  # failed_to_download: not in the tar
                continue
            cls = int(rng.integers(4))
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                    "caption": f"c {cls}", "width": 24, "height": 20, "original_width": 480,
                    "original_height": 400, "error_message": None}  # fmt: skip
            samples.append(
                {"__key__": key, "jpg": _jpeg(rng, cls), "txt": f"class {cls}", "json": json.dumps(meta)}
            )
        write_shard(str(root / f"{s:05d}.tar"), samples)
        n = per_shard + failed
        stats = {"count": n, "successes": len(samples), "failed_to_download": n - len(samples),
                 "failed_to_resize": 0, "status_dict": {"success": len(samples)}}  # fmt: skip
        (root / f"{s:05d}_stats.json").write_text(json.dumps(stats))


def test_img2dataset_folder_trains_as_is(tmp_path, monkeypatch):
    from llm2clip.apps.train import main
    from llm2clip.cache import PROBE_CAPTIONS, CacheWriter
    from tests.train_fixtures import DIM, TINY_VIT, spec

    folder = tmp_path / "cc-img2dataset"
    make_img2dataset_folder(folder)
    shards = expand_shards(str(folder))
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar"]  # stats files are not shards
    assert [img2dataset_count(s) for s in shards] == count_samples(shards) == [10, 10]
    gen = torch.Generator().manual_seed(0)
    writer = CacheWriter(tmp_path / "cache", spec(), "fp32")
    for s in shards:
        keys = [x["__key__"] for x in iter_samples(s)]
        with writer.shard(shard_name(s)) as w:
            emb = torch.nn.functional.normalize(torch.randn(len(keys), DIM, generator=gen), dim=1)
            w.add_batch(keys, "short", [f"{s}{k}" for k in keys], emb)
    writer.merge(torch.nn.functional.normalize(torch.randn(len(PROBE_CAPTIONS), DIM, generator=gen), dim=1))
    args = ["--cache", str(tmp_path / "cache"), "--fields", "short", "--vision", "B/16",
            "--vision-overrides", TINY_VIT, "--embed-dim", "16", "--adapter-depth", "1", "--batch-size", "4",
            "--steps", "3", "--workers", "0", "--device", "cpu", "--lr", "1e-3", "--warmup-steps", "1",
            "--loss-backend", "torch", "--fused-loss"]  # fmt: skip
    local = main(["--train-shards", str(folder), "--output-dir", str(tmp_path / "local"), *args])
    assert local["finished"] and local["skipped"]["total"] == 0
    # Over HTTP the sizes come from the _stats.json files: no shard is read to count it.
    server = Server(folder)
    try:
        import llm2clip.data.sizes as sizes_mod

        monkeypatch.setattr(sizes_mod, "count_samples", lambda *a, **k: pytest.fail("a shard was counted"))
        url = f"{server.url}/ok/{{00000..00001}}.tar"
        remote = main(["--train-shards", url, "--output-dir", str(tmp_path / "remote"), *args])
    finally:
        server.close()
    assert remote["losses"] == local["losses"]  # same samples, same arithmetic
