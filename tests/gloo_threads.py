"""The witness that a process group is really gone: its gloo threads (Linux thread names).

A group that outlives destroy_process_group() is torn down during interpreter finalization, which
aborts the process now and then ("terminate called without an active exception"); see
llm2clip.distributed.release_process_groups. Test workers leave with leave_process_group().
"""

from __future__ import annotations

import os

import torch.distributed as dist

from llm2clip.distributed import release_process_groups


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (pt_gloo_runloop, gloo_tcp_loop)."""
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if "gloo" in n)


def leave_process_group() -> None:
    """Every rank leaves together (gloo aborts a process whose peer tears its connections down while
    it is still in a collective), then the group is freed; raises if its threads survive."""
    dist.barrier()
    dist.destroy_process_group()
    release_process_groups()
    if os.path.isdir("/proc/self/task") and gloo_threads():
        raise RuntimeError(f"the process group outlived destroy_process_group: {gloo_threads()} still run")
