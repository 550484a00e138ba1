"""Multi-node runs on one machine: two torchrun launchers (--nnodes 2 --nproc_per_node 1, c10d
rendezvous on 127.0.0.1) are two "nodes". Stage 2 and extraction end to end, each compared with the
single-node 2-process run of the same job: same world size, same arithmetic (gloo, one thread),
so the losses and the cache bytes must be equal. The two-node runs read their shards over HTTP
from a loopback server (tests/test_remote_shards.py), the single-node runs from local paths:
the cache keys do not depend on where a shard is read from.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.llm_fixtures import tiny_llm_dir
from tests.test_extract import WORDS, _files, _make_shards
from tests.test_extract import _args as extract_args
from tests.test_remote_shards import Server
from tests.test_train import args as train_args
from tests.test_train import losses
from tests.train_fixtures import make_data

REPO = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    nnodes: int, nproc: int, module: str, argv: list[str], port: int, run_id: str
) -> subprocess.Popen:
    if nnodes == 1:
        where = [f"--nproc_per_node={nproc}", f"--master_port={port}", "--master_addr=127.0.0.1"]
    else:
        where = [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
                 "--local-addr=127.0.0.1"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, "-m", module, *argv]
    return subprocess.Popen(
        cmd, env={**os.environ, **ENV}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run(module: str, argv: list[str], nodes: int) -> None:
    """One job on 2 ranks: one launcher with 2 processes, or `nodes` launchers with one each."""
    port, run_id = _free_port(), uuid.uuid4().hex[:8]
    procs = [_launch(1, 2, module, argv, port, run_id)] if nodes == 1 else [
        _launch(nodes, 1, module, argv, port, run_id) for _ in range(nodes)
    ]  # fmt: skip
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(x[-3000:] for x in logs)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("multinode")


def test_stage2_on_two_nodes_equals_one_node(root):
    _, cache = make_data(root / "data")
    local = {"shards": str(root / "data" / "train-{0000..0003}.tar"), "cache": str(cache)}
    run("llm2clip.train", train_args(local, root / "one", "--batch-size", "4", "--fused-loss"), nodes=1)
    server = Server(root / "data")
    try:
        remote = {**local, "shards": f"{server.url}/ok/train-{{0000..0003}}.tar"}
        run("llm2clip.train", train_args(remote, root / "two", "--batch-size", "4", "--fused-loss"), nodes=2)
    finally:
        server.close()
    assert len(losses(root / "one")) == 4
    assert losses(root / "two") == losses(root / "one")


def test_extraction_on_two_nodes_equals_one_node(root):
    env = {
        "root": root / "ex",
        "model": tiny_llm_dir(root / "llm", corpus=[" ".join(WORDS), "retrieve caption :"]),
    }
    env["root"].mkdir()
    _make_shards(env["root"])
    run("llm2clip.extract", extract_args(env, root / "cache-one"), nodes=1)
    server = Server(env["root"])
    try:
        argv = extract_args(env, root / "cache-two")
        argv[1] = f"{server.url}/ok/{{00000..00002}}.tar"
        run("llm2clip.extract", argv, nodes=2)
    finally:
        server.close()
    assert _files(root / "cache-two") == _files(root / "cache-one")
