"""llm2clip_kernels: fused contrastive losses for any CLIP-style trainer.

Depends only on torch (and triton for the GPU kernels); never imports the llm2clip trainer.

    from llm2clip_kernels import infonce_loss
    loss = infonce_loss(image_feats, text_feats, logit_scale.exp())

Across ranks (any torch.distributed backend), with open_clip's gradient convention:

    from llm2clip_kernels import distributed_infonce_loss
    loss = distributed_infonce_loss(image_feats, text_feats, logit_scale.exp(), group=None)
"""

from .contrastive_loss import InfoNCELoss, SigmoidLoss, infonce_loss, resolve_backend, sigmoid_loss
from .distributed_loss import (
    DistributedInfoNCELoss,
    DistributedSigmoidLoss,
    distributed_infonce_loss,
    distributed_sigmoid_loss,
)

__all__ = [
    "DistributedInfoNCELoss",
    "DistributedSigmoidLoss",
    "InfoNCELoss",
    "SigmoidLoss",
    "distributed_infonce_loss",
    "distributed_sigmoid_loss",
    "infonce_loss",
    "resolve_backend",
    "sigmoid_loss",
]
