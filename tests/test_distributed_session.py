"""llm2clip.distributed.distributed_session: no process group outlives the session.

A gloo group still alive at interpreter exit aborts the process now and then ("terminate called
without an active exception" after a finished FSDP2 run). FSDP2's DeviceMesh, kept by DTensor's
caches, holds the group after destroy_process_group(); the session must free it. The group's
worker threads are the witness: named pt_gloo_runloop / gloo_tcp_loop on Linux.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names come from /proc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_session_leaves_no_gloo_threads():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(REPO / "tests" / "session_run.py")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["during"], "the witness is gone: no gloo thread seen while the group was alive"
        assert r["after"] == [], r
