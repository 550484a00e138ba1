"""One rank of tests/test_distributed_session.py: a distributed_session around two FSDP2 steps
(llm2clip.training.parallel.wrap_model), then the names of this process's gloo threads once the
session is over, as JSON on stdout."""

from __future__ import annotations

import json

import torch
from gloo_threads import gloo_threads  # tests/ is this script's sys.path[0]
from torch import nn

from llm2clip.distributed import DistInfo, distributed_session
from llm2clip.training.parallel import average_replicated_grads, wrap_model


class TinyClip(nn.Module):
    """The parts wrap_model shards (visual, adapter) and a replicated 0-d root parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(8, 8))
        self.adapter = nn.Linear(8, 8)
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.visual(x)) * self.logit_scale.exp()


def train_two_steps(dist: DistInfo) -> None:
    model = wrap_model(TinyClip(), fsdp=True, dist=dist)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(4, 8)).square().mean().backward()
        average_replicated_grads(list(model.parameters()), dist)
        optimizer.step()
        optimizer.zero_grad()


if __name__ == "__main__":
    with distributed_session("cpu") as dist:
        train_two_steps(dist)
        during = gloo_threads()
    print(json.dumps({"rank": dist.rank, "during": during, "after": gloo_threads()}), flush=True)
