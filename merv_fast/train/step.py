"""One optimizer step over K micro-batches (gradient accumulation), with the loss normalisation of the config.

loss_norm="tokens" (default): every micro-batch's loss is the SUM of its per-token losses divided by the number of
supervised tokens in the whole step, all micro-batches of all ranks together (the count is all-reduced before the
first forward). The gradient is then exactly that of one big batch, whatever the split into micro-batches and ranks.
Since FSDP averages gradients over ranks, each rank's loss is multiplied by the world size.

loss_norm="release": each micro-batch's mean loss divided by K (and averaged over ranks by FSDP): the release's (HF
Trainer's) mean of per-micro-batch means.

NaN/Inf: the step's loss (and gradient norm) is checked after the backward passes, identically on every rank (the
values are all-reduced), before the optimizer runs; "stop" raises `NonFiniteLossError`, "skip" drops the gradients
and leaves the weights and optimizer state untouched (the scheduler still advances: the schedule keeps its length).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from merv_fast.data.collate import Batch
from merv_fast.data.preprocess import preprocess_batch
from merv_fast.model.flops import encoder_forward_flops, llm_train_flops, visual_path_flops
from merv_fast.train.parallel import TrainModule, all_reduce_sum, is_fsdp, supervised_targets
from merv_fast.train.phases import PhaseTimer


class NonFiniteLossError(FloatingPointError):
    """The step's loss or gradient norm was NaN or Inf (nan_policy="stop")."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    samples: int  # over all ranks
    text_tokens: int  # over all ranks (attended text positions)
    visual_tokens: int  # over all ranks
    supervised_tokens: int  # over all ranks
    flops: float  # model FLOPs of the step over all ranks (MFU numerator)
    skipped: bool = False
    phases: dict[str, float] = field(default_factory=dict)
    bad_samples: list = field(default_factory=list)  # this rank's, from the batches' loaders


@dataclass
class Prepared:
    """A micro-batch already on the device with its encoder inputs (what the CUDA prefetcher hands over), and its
    features when they are ready early: from the feature cache, or encoded one micro-batch ahead on the prefetcher's
    side stream (`encoders.prefetch`)."""

    batch: Batch
    pixels: list[torch.Tensor] | None
    features: Any = None  # list of per-encoder features | PooledFeatures | None


def _micro_flops(cfg, batch: Batch, num_visual: int, encoders_run: bool = True, llm_trained: bool = True) -> float:
    lengths = batch.attention_mask.sum(dim=1).tolist()
    visual = num_visual > 0
    encoders = sum(encoder_forward_flops(e) for e in cfg.encoders) if encoders_run else 0  # 0: the feature cache
    per_sample_fixed = (encoders + visual_path_flops(cfg)) if visual else 0
    return float(sum(llm_train_flops(cfg.llm, int(n) + num_visual, weight_grads=llm_trained) + per_sample_fixed
                     for n in lengths))


def _grad_norm_value(norm) -> float:
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


class Stepper:
    """Runs training steps for one model. `module` is the (possibly FSDP-sharded) TrainModule; the frozen encoders
    are `module.merv.encoders`."""

    def __init__(self, module: TrainModule, optimizer: torch.optim.Optimizer, scheduler, *, device: torch.device,
                 loss_norm: str = "tokens", grad_clip: float = 1.0, nan_policy: str = "stop",
                 world_size: int = 1, autocast_dtype: torch.dtype | None = None,
                 timer: PhaseTimer | None = None, nan_at_step: int | None = None):
        if loss_norm not in ("tokens", "release"):
            raise ValueError(f"loss_norm must be 'tokens' or 'release', got {loss_norm!r}")
        if nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {nan_policy!r}")
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.device, self.loss_norm, self.grad_clip, self.nan_policy = device, loss_norm, grad_clip, nan_policy
        self.world_size = world_size
        self.nan_at_step = nan_at_step  # fault injection (debug.nan_at_step): this step's loss is made NaN
        self.merv = module.merv
        self.cfg = self.merv.config
        self.enc_dtype = next(self.merv.encoders.parameters()).dtype
        self.autocast_dtype = autocast_dtype
        self.timer = timer or PhaseTimer(device)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.llm_trained = any(p.requires_grad for p in self.merv.llm.parameters())  # False: align (FLOPs)
        # Training from the feature cache: batch -> PooledFeatures on the device (the encoders never run).
        self.feature_source: Callable[[Batch, torch.device], Any] | None = None
        # encoders.prefetch: on CUDA, the prefetcher's side stream runs the next micro-batch's encoders while this
        # one trains (same runner, same autocast: the same features). A CPU run has no prefetcher: nothing changes.
        self.prefetch_encoders = self.cfg.encoder_runtime.prefetch and device.type == "cuda"

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare_on_device(self, b: Batch) -> Prepared:
        """A batch already on the device -> its encoder inputs (None for text-only); the prefetcher's function."""
        if b.frames is None:
            return Prepared(b, None)
        if self.feature_source is not None:
            return Prepared(b, None, self.feature_source(b, self.device))
        pixels = preprocess_batch(b.frames, self.cfg.encoders, self.cfg.frames_sampled, b.flip,
                                  self.enc_dtype, is_image=b.is_image)
        features = None
        if self.prefetch_encoders:
            with self._autocast():
                features = self.merv.encode(pixels, is_image=bool(b.is_image.all()))
        return Prepared(b, pixels, features)

    def prepare(self, batch: Batch | Prepared) -> Prepared:
        """Host batch -> device batch, each encoder's preprocessed input (None for a text-only batch) and the
        features when they are ready already."""
        if isinstance(batch, Prepared):
            return batch
        return self.prepare_on_device(batch.to(self.device))

    def step(self, micro_batches: Sequence[Batch | Prepared], data_time: float = 0.0) -> StepResult:
        """One optimizer step over `micro_batches` (host `Batch`es, or `Prepared` ones from the CUDA prefetcher)."""
        phase = self.timer.phase
        hosts = [mb.batch if isinstance(mb, Prepared) else mb for mb in micro_batches]
        k = len(micro_batches)
        has_bos = self.cfg.llm.has_bos
        nv = self.cfg.num_visual_tokens
        # Counts first: the `tokens` normalisation needs the step's global count before any backward.
        counts = torch.zeros(6, dtype=torch.float64)
        local_targets = []
        flops = 0.0
        for mb in hosts:
            v = nv if mb.frames is not None else 0
            local_targets.append(supervised_targets(mb.labels, v, has_bos))
            counts[1] += len(mb)
            counts[2] += float(mb.attention_mask.sum())
            counts[3] += v * len(mb)
            flops += _micro_flops(self.cfg, mb, v, encoders_run=self.feature_source is None,
                                  llm_trained=self.llm_trained)
        counts[0] = sum(local_targets)
        counts[4] = flops
        with phase("comm"):
            counts = all_reduce_sum(counts.to(self.device)).cpu()
        total_targets = max(1.0, float(counts[0]))
        num_items = torch.tensor(total_targets / self.world_size, device=self.device, dtype=torch.float32)

        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        poison = (self.nan_at_step is not None and self.scheduler is not None
                  and self.scheduler.last_epoch + 1 == self.nan_at_step)
        fsdp = is_fsdp(self.module)
        for i, mb in enumerate(micro_batches):
            if fsdp:  # reduce-scatter gradients once per step, on the last micro-batch
                self.module.set_requires_gradient_sync(i == k - 1)
            with phase("data"):
                prepared = self.prepare(mb)
            b, pixels, features = prepared.batch, prepared.pixels, prepared.features
            with self._autocast():
                if features is None and pixels is not None:
                    with phase("encoders"):
                        features = self.merv.encode(pixels, is_image=bool(b.is_image.all()))
                with phase("llm_forward"):  # visual path + LLM (the visual path runs inside the FSDP root)
                    if self.loss_norm == "tokens":
                        loss, _ = self.module(b.input_ids, b.attention_mask, b.labels, features, num_items)
                        logged = loss.detach() / self.world_size  # this micro-batch's share of the global mean
                    else:
                        loss, _ = self.module(b.input_ids, b.attention_mask, b.labels, features)
                        loss = loss / k
                        logged = loss.detach() / self.world_size
            if poison:  # a real NaN through the real backward, clipping and checks
                loss = loss * float("nan")
                logged = logged * float("nan")
            with phase("backward"):
                loss.backward()
            loss_sum += logged.float()

        with phase("comm"):
            loss_value = float(all_reduce_sum(loss_sum))
        with phase("optimizer"):
            if self.grad_clip and self.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.params, float("inf"))
            grad_norm = _grad_norm_value(norm)
            finite = bool(torch.isfinite(torch.tensor(loss_value))) and bool(torch.isfinite(torch.tensor(grad_norm)))
            skipped = False
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                if self.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite training loss {loss_value} (grad norm {grad_norm}) at optimizer step "
                        f"{self.scheduler.last_epoch + 1 if self.scheduler is not None else '?'}: stopping "
                        f"(nan_policy=stop; no checkpoint is written for this step; set nan_policy=skip to skip such "
                        f"steps)")
                skipped = True
            else:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            lr = self.optimizer.param_groups[0]["lr"]
            if self.scheduler is not None:
                self.scheduler.step()
        phases = self.timer.collect()
        phases["data_wait"] = data_time
        return StepResult(loss=loss_value, grad_norm=grad_norm, lr=lr, samples=int(counts[1]),
                          text_tokens=int(counts[2]), visual_tokens=int(counts[3]),
                          supervised_tokens=int(counts[0]), flops=float(counts[4]), skipped=skipped, phases=phases,
                          bad_samples=[b for mb in hosts for b in mb.bad_samples])
