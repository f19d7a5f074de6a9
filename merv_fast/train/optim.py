"""AdamW with the release's weight-decay groups: no decay on biases and other 1-D parameters."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    on_cuda = next(model.parameters()).is_cuda
    # fused=True is torch's single-kernel AdamW on CUDA; on CPU the foreach path is the fast one.
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), **kwargs)
