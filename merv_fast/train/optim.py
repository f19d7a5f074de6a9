"""AdamW with the release's weight-decay groups: no decay on biases and other 1-D parameters."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                    prefer_apex: bool = False) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.999, eps 1e-8) with the release's decay groups. On CUDA: torch's fused AdamW, or NVIDIA
    apex's FusedAdam (adam_w_mode) when `prefer_apex` and the real NVIDIA apex with its CUDA extensions imports
    (merv_fast.env.probe_apex; the unrelated PyPI `apex` is never used). Works on FSDP2 (DTensor) parameters."""
    on_cuda = next(model.parameters()).is_cuda
    if on_cuda and prefer_apex:
        from merv_fast.env import probe_apex

        if probe_apex()["usable"]:
            from apex.optimizers import FusedAdam

            return FusedAdam(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), adam_w_mode=True)
    # fused=True is torch's single-kernel AdamW on CUDA; on CPU the foreach path is the fast one.
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), **kwargs)
