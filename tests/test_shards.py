"""webdataset-format shard reading without the webdataset package."""

from __future__ import annotations

import pytest

from llm2clip.data.shards import ShardError, expand_shards, iter_samples, write_shard


def test_round_trip_and_grouping(tmp_path):
    samples = [{"__key__": f"{i:04d}", "txt": f"caption {i}", "json": b"{}"} for i in range(5)]
    path = str(tmp_path / "00003.tar")
    write_shard(path, samples)
    got = list(iter_samples(path))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples]
    assert got[2]["txt"] == b"caption 2" and got[2]["__shard__"] == "00003.tar"


def test_expand(tmp_path):
    for i in range(3):
        write_shard(str(tmp_path / f"{i:03d}.tar"), [{"__key__": "a", "txt": "x"}])
    assert len(expand_shards(str(tmp_path))) == 3
    assert expand_shards(str(tmp_path / "{000..001}.tar")) == [
        str(tmp_path / "000.tar"),
        str(tmp_path / "001.tar"),
    ]
    assert len(expand_shards(str(tmp_path / "00[01].tar") + "::" + str(tmp_path / "002.tar"))) == 3
    with pytest.raises(ValueError, match="000.tar is listed twice"):
        expand_shards(str(tmp_path / "*.tar") + "::" + str(tmp_path / "000.tar"))
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_shards(str(tmp_path / "missing-*.tar"))


def test_truncated_shard_names_itself(tmp_path):
    path = tmp_path / "bad.tar"
    write_shard(str(path), [{"__key__": f"{i}", "txt": "y" * 5000} for i in range(4)])
    path.write_bytes(path.read_bytes()[:6000])
    with pytest.raises(ShardError, match="bad.tar"):
        list(iter_samples(str(path)))
    with pytest.raises(ShardError, match="cannot open shard"):
        list(iter_samples(str(tmp_path / "nope.tar")))
