"""Hand-made micro-batches and a tiny model + Stepper for the trainer tests."""

from __future__ import annotations

import torch

from merv_fast.data.collate import Batch
from merv_fast.model.llm import IGNORE_INDEX


def make_batch(kind: str, n: int, length: int, supervised: int, seed: int, frames_sampled: int = 16,
               width: int | None = None) -> Batch:
    """`n` samples of `length` tokens (right-padded to `width`), the last `supervised` of them supervised."""
    g = torch.Generator().manual_seed(seed)
    width = width or length
    ids = torch.full((n, width), 500, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    body = torch.randint(3, 400, (n, length), generator=g)
    body[:, 0] = 1  # BOS
    ids[:, :length] = body
    mask[:, :length] = True
    labels[:, length - supervised:length] = body[:, length - supervised:]
    frames = None
    if kind == "video":
        frames = torch.randint(0, 256, (n, frames_sampled, 24, 32, 3), generator=g, dtype=torch.uint8)
    elif kind == "image":
        frames = torch.randint(0, 256, (n, 1, 24, 32, 3), generator=g, dtype=torch.uint8)
    return Batch(ids, mask, labels, frames, torch.full((n,), kind == "image"), torch.zeros(n, dtype=torch.bool), kind)


def concat(a: Batch, b: Batch) -> Batch:
    assert a.kind == b.kind and a.input_ids.shape[1] == b.input_ids.shape[1]
    frames = None if a.frames is None else torch.cat([a.frames, b.frames])
    return Batch(torch.cat([a.input_ids, b.input_ids]), torch.cat([a.attention_mask, b.attention_mask]),
                 torch.cat([a.labels, b.labels]), frames, torch.cat([a.is_image, b.is_image]),
                 torch.cat([a.flip, b.flip]), a.kind)


def make_stepper(seed: int = 0, optimizer: str = "adamw", loss_norm: str = "tokens", nan_policy: str = "stop",
                 grad_clip: float = 1.0, lr: float = 1e-3, info=None, world_size: int = 1, hybrid: bool = False):
    from merv_fast.model.merv import build_model
    from merv_fast.train.optim import build_optimizer
    from merv_fast.train.parallel import TrainModule, shard_model
    from merv_fast.train.schedule import build_scheduler
    from merv_fast.train.step import Stepper

    torch.manual_seed(seed)
    model = build_model("tiny", kernels="torch")
    module = TrainModule(model)
    if info is not None:
        module = shard_model(module, info, hybrid=hybrid)
    if optimizer == "sgd":
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    else:
        opt = build_optimizer(module, lr=lr, weight_decay=0.1)
    sched = build_scheduler(opt, 10, 0.0)
    stepper = Stepper(module, opt, sched, device=torch.device("cpu"), loss_norm=loss_norm, grad_clip=grad_clip,
                      nan_policy=nan_policy, world_size=world_size)
    return model, module, stepper
