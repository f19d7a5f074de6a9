"""Tiny visual paths of any architecture specifier and fusion, with non-trivial parameters, and random features:
shared by the visual-variant tests and their interpreter subprocess."""

import torch

from merv_fast.config import apply_overrides, get_preset
from merv_fast.model.visual import VisualPath


def visual_case(arch: str, fusion: str, preset: str = "merv-base-tiny", seed: int = 0, **more):
    cfg = apply_overrides(get_preset(preset), {"visual.arch": arch, "visual.fusion": fusion, **more})
    torch.manual_seed(seed)
    visual = VisualPath(cfg, cfg.llm.hidden_size)
    with torch.no_grad():  # non-zero biases and a query that separates the encoders
        for name, p in visual.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
        if visual.fusion is not None:
            visual.fusion.query.mul_(4)
    return cfg, visual


def features(cfg, batch=2, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, e.time_steps, e.tokens_per_step, e.hidden_size, generator=g).to(dtype)
            for e in cfg.encoders]
