"""`train(cfg, model_cfg)`: the training loop behind `merv-fast train` (one process, or one per rank under torchrun).

Builds the model, the dataset (the LLaVA JSON at `cfg.data`, or synthetic data generated once into a cache
directory), the rank's share of the length-grouped single-modality sampler, the DataLoader, AdamW and the schedule;
runs optimizer steps until the schedule's end or `max_steps`; writes `metrics.jsonl` (one JSON object per step), a
progress line with ETA on stderr, TensorBoard scalars when `torch.utils.tensorboard` imports, and `summary.json`.

Checkpointing goes through `merv_fast.train.checkpoint.Checkpointer(out_dir, keep_last, save_every)`:
`load_latest(state)` when resuming, `maybe_save(step, state)` after every step, `save_final(state)` at the end, where
`state` is a `TrainState` (below).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from merv_fast.config import ModelConfig
from merv_fast.train.config import TrainConfig
from merv_fast.train.parallel import DistInfo, TrainModule, apply_activation_checkpointing, barrier, init_distributed, \
    shard_model
from merv_fast.train.phases import PhaseTimer
from merv_fast.train.schedule import build_scheduler, total_steps_for
from merv_fast.train.step import Stepper

METRIC_KEYS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu", "phases", "peak_mem_bytes",
               "bad_samples")


# ------------------------------------------------------------------------------------------------ state
def rng_states() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class SamplerProgress:
    """What a checkpoint sees as `state.sampler`: the real sampler's exact-resume state at the number of micro-batches
    the loop has CONSUMED (the DataLoader prefetches, so the sampler itself has handed out more)."""

    def __init__(self, state: "TrainState"):
        self._state = state

    def state_dict(self) -> dict:
        return self._state.data_sampler.state_dict(position=self._state.consumed)

    def load_state_dict(self, sd: dict) -> None:
        s = self._state
        s.data_sampler.load_state_dict(sd)
        s.epoch, s.consumed = s.data_sampler.epoch, s.data_sampler.position


@dataclass
class TrainState:
    """Everything a checkpoint holds. `model` is the MERV (its trainable parts possibly FSDP-sharded: DTensors;
    the frozen encoders plain), `module` the TrainModule over its trainable parts, `optimizer`, `scheduler` (a
    LambdaLR whose state_dict is JSON-able), `sampler` (a `SamplerProgress`: state_dict()/load_state_dict() of the
    data position, counted in consumed micro-batches), `step` (optimizer steps done), `epoch` and `consumed`
    (micro-batches of that epoch this rank has consumed). RNG states are per rank: `rng_states()` /
    `set_rng_states()`."""

    model: torch.nn.Module
    module: TrainModule
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data_sampler: Any
    step: int = 0
    epoch: int = 0
    consumed: int = 0
    rank: int = 0
    world_size: int = 1
    config: dict = field(default_factory=dict)
    sampler: SamplerProgress = field(init=False)

    def __post_init__(self):
        self.sampler = SamplerProgress(self)

    rng_states = staticmethod(rng_states)
    set_rng_states = staticmethod(set_rng_states)


# ------------------------------------------------------------------------------------------------ data
def synthetic_data_dir(seed: int = 0) -> Path:
    base = os.environ.get("MERV_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "merv_fast")
    return Path(base) / f"train-synth-seed{seed}"


def ensure_synthetic_data(info: DistInfo, seed: int = 0) -> tuple[str, str]:
    """Synthesize the default dataset once (rank 0; the others wait) and return (json, media_root)."""
    from merv_fast.data.synth import synthesize

    root = synthetic_data_dir(seed)
    done = root / ".complete"
    if info.is_main and not done.exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        synthesize(tmp, videos=10, images=6, texts=4, seed=seed)
        if root.exists():
            import shutil

            shutil.rmtree(root)
        tmp.rename(root)
        done.write_text("ok\n")
    barrier()
    return str(root / "data.json"), str(root)


def default_micro_batch(per_rank: int, cap: int = 16) -> int:
    return max(d for d in range(1, min(per_rank, cap) + 1) if per_rank % d == 0)


# ------------------------------------------------------------------------------------------------ metrics
def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except (ImportError, OSError):
        return 0


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsWriter:
    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(out / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL is the record
                self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "mfu"):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])
            for name, sec in row["phases"].items():
                self.tb.add_scalar(f"phases/{name}", sec, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------ the loop
def _load_init(model, path: str) -> dict:
    """Initial weights from any trained-weights path `--weights` takes (merv_fast.pretrained.weights), strictly;
    returns what was read."""
    from merv_fast.pretrained.weights import load_weights

    return load_weights(model, path).record()


def export_weights(model, out: Path, export: str, seed: int | None = None) -> dict[str, str]:
    """The trained weights (all but the frozen encoders), gathered from the shards: `model.safetensors` (ours, what
    `merv-fast eval --weights` reads) and/or `release/` (a release run directory: config.json and
    checkpoints/latest-checkpoint.pt, what the release's `load_vid` reads). Every rank calls it."""
    from merv_fast.train.checkpoint import export_release_run, export_safetensors

    written = {}
    if export in ("safetensors", "both"):
        written["safetensors"] = export_safetensors(model, out / "model.safetensors", seed=seed)
    if export in ("release", "both"):
        written["release"] = export_release_run(model, out / "release", seed=seed)
    return {k: str(v) for k, v in written.items() if v is not None}


def _make_checkpointer(cfg: TrainConfig):
    from merv_fast.train.checkpoint import Checkpointer

    return Checkpointer(cfg.out, cfg.keep_last, cfg.save_every)


def train(cfg: TrainConfig, model_cfg: ModelConfig, checkpointer=None) -> dict:
    """Train; returns the summary (also written to `<out>/summary.json` by rank 0)."""
    from merv_fast.data.collate import collate
    from merv_fast.data.dataset import VideoLLaVADataset, load_entries, summarize_bad_samples
    from merv_fast.data.sampler import ModalityLengthGroupedSampler
    from merv_fast.model.flops import peak_bf16_flops
    from merv_fast.model.llm import tokenizer_for
    from merv_fast.model.merv import build_model
    from merv_fast.train.optim import build_optimizer

    cfg.validate()
    info = init_distributed(cfg.device)
    device = info.device
    gpu = device.type == "cuda"
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them from there)

    # ---- model
    model = build_model(config=model_cfg, device=device)
    weights_read = {"init_from": _load_init(model, cfg.init_from) if cfg.init_from else None}
    apply_activation_checkpointing(model.llm, cfg.activation_checkpointing)
    module = TrainModule(model, pack_budget=cfg.pack_budget if cfg.packing else None)
    module = shard_model(module, info, param_dtype=cfg.param_dtype, reduce_dtype=cfg.reduce_dtype,
                         hybrid=cfg.hybrid_shard, compile_layers=cfg.compile_llm, cpu_offload=cfg.cpu_offload)
    model.train()

    # ---- data
    data_json, media_root = cfg.data, cfg.media_root
    if data_json is None:
        data_json, media_root = ensure_synthetic_data(info, cfg.seed)
    elif media_root is None:
        media_root = str(Path(data_json).parent)
    tokenizer = tokenizer_for(model_cfg.llm)
    dataset_args = (load_entries(data_json), media_root, tokenizer)
    dataset_kwargs = dict(prompt_format=model_cfg.llm.prompt_format, max_length=model_cfg.llm.max_text_tokens,
                          seed=cfg.seed, frames=model_cfg.visual.frames_sampled, decoder=cfg.decoder)
    feature_cache = None
    if cfg.feature_cache:  # pooled features read from the cache: no decoding, no encoders
        from merv_fast.runtime.feature_cache import CachedFeatureDataset, FeatureCache, training_autocast

        feature_cache = FeatureCache(cfg.feature_cache)
        feature_cache.check(model, training_autocast(device))
        dataset = CachedFeatureDataset(feature_cache, *dataset_args, **dataset_kwargs)
    else:
        dataset = VideoLLaVADataset(*dataset_args, **dataset_kwargs)
    per_rank = cfg.global_batch_size // info.world_size if cfg.global_batch_size % info.world_size == 0 else None
    if per_rank is None:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not a multiple of the world size "
                         f"{info.world_size}")
    micro = cfg.micro_batch_size or default_micro_batch(per_rank)
    sampler = ModalityLengthGroupedSampler(dataset.modality_lengths(), cfg.global_batch_size, info.world_size,
                                           info.rank, micro, seed=cfg.seed, split=cfg.split, yield_epoch=True)
    k = sampler.micro_batches_per_global_batch
    steps_per_epoch = sampler.num_global_batches()
    total = total_steps_for(steps_per_epoch, cfg.epochs, cfg.total_steps)
    last = total if cfg.max_steps is None else min(total, cfg.max_steps)

    # ---- optimizer, schedule
    optimizer = build_optimizer(module, lr=cfg.lr, weight_decay=cfg.weight_decay, prefer_apex=cfg.apex_adam)
    if info.is_main and cfg.apex_adam and type(optimizer).__name__ != "FusedAdam":
        print("apex_adam: NVIDIA apex's FusedAdam is not usable here (see `merv-fast env`); using torch's AdamW",
              file=sys.stderr)
    scheduler = build_scheduler(optimizer, total, cfg.warmup_ratio)
    state = TrainState(model, module, optimizer, scheduler, sampler, rank=info.rank, world_size=info.world_size,
                       config=cfg.to_dict())
    if checkpointer is None:
        checkpointer = _make_checkpointer(cfg)
    if cfg.resume and checkpointer.load_latest(state):
        weights_read["resumed_from"] = str(checkpointer.latest())

    timer = PhaseTimer(device)
    stepper = Stepper(module, optimizer, scheduler, device=device, loss_norm=cfg.loss_norm, grad_clip=cfg.grad_clip,
                      nan_policy=cfg.nan_policy, world_size=info.world_size,
                      autocast_dtype=torch.bfloat16 if gpu else None, timer=timer)
    if feature_cache is not None:
        names = [e.name for e in model_cfg.encoders]
        stepper.feature_source = lambda batch, dev: dataset.features_for(batch, names, dev)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if gpu else None
    metrics = MetricsWriter(out, info.is_main)
    pad_id = tokenizer.pad_token_id
    workers = max(0, cfg.num_workers)

    def loader_for_epoch():
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, pin_memory=gpu,
            collate_fn=partial(collate, pad_token_id=pad_id, max_length=model_cfg.llm.max_text_tokens),
            prefetch_factor=2 if workers else None)

    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    bad_all: list = []
    losses: list[float] = []
    skipped = 0
    t_start = time.perf_counter()
    steps_run = 0
    from merv_fast.train.checkpoint import install_signal_handlers

    signals = install_signal_handlers()  # SIGTERM/SIGINT: finish the step, save, exit cleanly
    stop_requested = False
    exported: dict[str, str] = {}
    try:
        while state.step < last and not stop_requested:
            sampler.set_epoch(state.epoch)
            loader = loader_for_epoch()
            if gpu:  # the next micro-batch is copied and preprocessed on a side stream while this one trains
                from merv_fast.data.prefetch import CudaPrefetcher

                loader = CudaPrefetcher(loader, device, stepper.prepare_on_device)
            iterator = iter(loader)
            epoch_done = False
            while state.step < last:
                t0 = time.perf_counter()
                micro_batches = []
                try:
                    for _ in range(k):
                        micro_batches.append(next(iterator))
                except StopIteration:
                    epoch_done = True
                    break
                data_time = time.perf_counter() - t0
                result = stepper.step(micro_batches, data_time)
                state.consumed += k
                state.step += 1
                steps_run += 1
                step_time = time.perf_counter() - t0
                skipped += result.skipped
                bad_all.extend(result.bad_samples)
                losses.append(result.loss)
                tokens = result.text_tokens + result.visual_tokens
                row = {"step": state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                       "samples_per_s": result.samples / step_time, "tokens_per_s": tokens / step_time,
                       "text_tokens_per_s": result.text_tokens / step_time,
                       "visual_tokens_per_s": result.visual_tokens / step_time,
                       "mfu": (result.flops / step_time / (peak * info.world_size)) if peak else None,
                       "step_time_s": step_time, "phases": result.phases,
                       "peak_mem_bytes": peak_memory_bytes(device), "bad_samples": len(result.bad_samples),
                       "skipped": result.skipped, "epoch": state.epoch}
                metrics.write(row)
                if info.is_main and (state.step % max(1, cfg.log_every) == 0 or state.step == last):
                    elapsed = time.perf_counter() - t_start
                    eta = elapsed / steps_run * (last - state.step)
                    print(f"step {state.step}/{last} loss {result.loss:.4f} lr {result.lr:.3g} "
                          f"gnorm {result.grad_norm:.3f} {row['samples_per_s']:.2f} samples/s "
                          f"{step_time:.2f} s/step ETA {_fmt_time(eta)}", file=sys.stderr, flush=True)
                checkpointer.maybe_save(state.step, state, loss=result.loss)
                if signals.should_stop():  # every rank agrees, so all stop at the same step
                    stop_requested = True
                    if info.is_main:
                        print(f"signal received: saving at step {state.step} and stopping", file=sys.stderr)
                    break
            if epoch_done or state.consumed >= len(sampler):
                state.epoch += 1
                state.consumed = 0
        checkpointer.save_final(state)
        if not stop_requested:  # a preempted run resumes from its checkpoint; a finished one hands its weights on
            exported = export_weights(model, out, cfg.export, seed=cfg.seed)
    finally:
        signals.restore()
        metrics.close()
    wall = time.perf_counter() - t_start
    summary = {"steps": state.step, "steps_run": steps_run, "stopped_by_signal": stop_requested, "total_steps": total, "steps_per_epoch": steps_per_epoch,
               "micro_batches_per_step": k, "micro_batch_size": micro, "world_size": info.world_size,
               "final_loss": losses[-1] if losses else None, "losses": losses, "skipped_steps": skipped,
               "wall_s": wall, "bad_samples": summarize_bad_samples(bad_all), "data": data_json,
               "config": cfg.to_dict(), "model": model_cfg.name, "exported": exported, "weights_read": weights_read}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
