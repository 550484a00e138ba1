"""llm2clip_kernels: fused contrastive losses for any CLIP-style trainer.

Depends only on torch (and triton for the GPU kernels); never imports the llm2clip trainer.

    from llm2clip_kernels import infonce_loss
    loss = infonce_loss(image_feats, text_feats, logit_scale.exp())
"""

from .contrastive_loss import InfoNCELoss, SigmoidLoss, infonce_loss, resolve_backend, sigmoid_loss

__all__ = ["InfoNCELoss", "SigmoidLoss", "infonce_loss", "sigmoid_loss", "resolve_backend"]
