"""`train(cfg, model_cfg)`: the training loop behind `merv-fast train` (one process, or one per rank under torchrun).

Builds the model, the dataset (the LLaVA JSON at `cfg.data`, or synthetic data generated once into a cache
directory), the rank's share of the length-grouped single-modality sampler, the DataLoader, AdamW and the schedule;
runs optimizer steps until the schedule's end or `max_steps`; writes `metrics.jsonl` (one JSON object per step), a
progress line with ETA on stderr, TensorBoard scalars when `torch.utils.tensorboard` imports, and `summary.json`.

Checkpointing goes through `merv_fast.train.checkpoint.Checkpointer(out_dir, keep_last, save_every,
save_every_minutes)`: `resumable()` then `load(state, path)` when resuming, `maybe_save(step, state)` after every
step, `save_final(state)` at the end or on a stop signal, where `state` is a `TrainState` (below). The run directory
holds one run (`merv_fast.train.rundir`); stop signals are `merv_fast.train.signals`'. A checkpoint is always taken
at a step boundary with the data position as (epoch, consumed micro-batches), an epoch's end stated as the next
epoch's start, so that a run stopped after any step and resumed equals the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
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
        return self._state.data_sampler.state_dict(position=self._state.consumed, epoch=self._state.epoch)

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
def synthetic_data_dir(seed: int = 0, captions: bool = False) -> Path:
    base = os.environ.get("MERV_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "merv_fast")
    # v2: the catalogue gained its 11th clip
    return Path(base) / f"train-synth-v2{'-captions' if captions else ''}-seed{seed}"


def ensure_synthetic_data(info: DistInfo, seed: int = 0, captions: bool = False) -> tuple[str, str]:
    """Synthesize the default dataset once (rank 0; the others wait) and return (json, media_root). `captions`: the
    align stages' kind (one round per entry)."""
    from merv_fast.data.synth import synthesize

    root = synthetic_data_dir(seed, captions)
    done = root / ".complete"
    if info.is_main and not done.exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        # One clip of each kind in the catalogue. Caption data has no text-only entries (the release's stage-1 mix
        # has none; a frozen LLM learns nothing from them).
        synthesize(tmp, videos=11, images=6, texts=0 if captions else 4, seed=seed, captions=captions)
        if root.exists():
            import shutil

            shutil.rmtree(root)
        tmp.rename(root)
        done.write_text("ok\n")
    barrier()
    return str(root / "data.json"), str(root)


def build_dataset(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer, data_json: str, media_root: str,
                  feature_cache=None):
    """The training dataset: the recipe's stage picks what a sample supervises (captions only for the align stages,
    as the release's AlignVideoDataset; the conversations' answers otherwise); `feature_cache`: read pooled features
    instead of decoding."""
    from merv_fast.data.dataset import VideoLLaVADataset, check_media_root, load_entries

    entries = load_entries(data_json)
    if feature_cache is None:  # read from the cache, the media are not opened
        check_media_root(entries, media_root)
    args = (entries, media_root, tokenizer)
    kwargs = dict(prompt_format=model_cfg.llm.prompt_format, max_length=model_cfg.llm.max_text_tokens,
                  seed=cfg.seed, frames=model_cfg.frames_sampled, decoder=cfg.decoder, objective=cfg.stage.data)
    if feature_cache is not None:
        from merv_fast.runtime.feature_cache import CachedFeatureDataset

        return CachedFeatureDataset(feature_cache, *args, **kwargs)
    return VideoLLaVADataset(*args, **kwargs)


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
# what a finished run's `export` setting leaves in the run directory (export_weights)
EXPORT_FILES = {"safetensors": ("model.safetensors",),
                "release": ("release/config.json", "release/checkpoints/latest-checkpoint.pt"),
                "both": ("model.safetensors", "release/config.json", "release/checkpoints/latest-checkpoint.pt"),
                "none": ()}
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

    return Checkpointer(cfg.out, cfg.keep_last, cfg.save_every, save_every_minutes=cfg.save_every_minutes)


def train(cfg: TrainConfig, model_cfg: ModelConfig, checkpointer=None, signals=None) -> dict:
    """Train; returns the summary (also written to `<out>/summary.json` by rank 0). `signals`: the SignalState of
    handlers installed earlier (the CLI installs them before its imports); None installs them here."""
    from merv_fast.train.signals import install_signal_handlers

    own_signals = signals is None
    if own_signals:
        signals = install_signal_handlers()  # SIGTERM/SIGINT: finish the step, save, exit cleanly
    try:
        return _train(cfg, model_cfg, checkpointer, signals)
    finally:
        if own_signals:
            signals.restore()


def _train(cfg: TrainConfig, model_cfg: ModelConfig, checkpointer, signals) -> dict:
    from merv_fast.data.collate import collate
    from merv_fast.data.dataset import counter_hash, summarize_bad_samples
    from merv_fast.data.sampler import ModalityLengthGroupedSampler
    from merv_fast.model.flops import peak_bf16_flops
    from merv_fast.model.llm import training_tokenizer
    from merv_fast.model.merv import build_model
    from merv_fast.train.checkpoint import read_meta
    from merv_fast.train.optim import build_optimizer
    from merv_fast.train.stages import check_stage_fits, freeze_for_stage, load_initial_weights
    from merv_fast.train.rundir import claim, truncate_metrics
    from merv_fast.train.signals import held, ignore_in_worker

    check_stage_fits(cfg.stage, cfg.recipe, model_cfg)  # first: no other setting can make this recipe fit
    cfg.validate()
    cfg.check_init()
    info = init_distributed(cfg.device)
    device = info.device
    gpu = device.type == "cuda"
    out = Path(cfg.out)
    moved = claim(out, cfg.resume, cfg.overwrite, info.is_main)  # one run per directory
    barrier()
    if info.is_main:
        if moved is not None:
            print(f"--overwrite: moved the run that was in {out} to {moved}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    if checkpointer is None:
        checkpointer = _make_checkpointer(cfg)
    checkpointer.clean_leftovers()  # killed saves' and exports' temporaries: never mistaken for checkpoints

    # ---- data first: the schedule's length depends on it, and a finished run stops here
    data_json, media_root = cfg.data, cfg.media_root
    if data_json is None:
        data_json, media_root = ensure_synthetic_data(info, cfg.seed, captions=cfg.stage.data == "captions")
    elif media_root is None:
        media_root = str(Path(data_json).parent)
    tokenizer = training_tokenizer(model_cfg.llm)
    feature_cache = None
    if cfg.feature_cache:  # pooled features read from the cache: no decoding, no encoders
        from merv_fast.runtime.feature_cache import FeatureCache, training_autocast

        feature_cache = FeatureCache(cfg.feature_cache)
    dataset = build_dataset(cfg, model_cfg, tokenizer, data_json, media_root, feature_cache)
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

    # ---- where to start: the newest intact checkpoint (damaged ones are set aside, with a warning)
    resume_from = checkpointer.resumable() if cfg.resume else None
    start_step = int(read_meta(resume_from)["step"]) if resume_from is not None else 0
    if cfg.resume and resume_from is None and info.is_main:
        print(f"--resume: no checkpoint in {out}: starting from step 0", file=sys.stderr)
    if start_step >= last and all((out / name).is_file() for name in EXPORT_FILES[cfg.export]):
        return {"finished_before": True, "steps": start_step, "total_steps": total, "steps_run": 0, "rank": info.rank}
    if info.is_main:
        truncate_metrics(out / "metrics.jsonl", start_step)  # the steps after the checkpoint are run again
    barrier()

    # ---- model
    random.seed(cfg.seed)  # python, numpy and torch, as the release seeds them (merv/util/torch_utils.py:30)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them from there)
    model = build_model(config=model_cfg, device=device)
    # all trained weights, or only the projectors (the release's finetune after align); the run records what it read
    weights_read = {"init_from": load_initial_weights(model, cfg.init_from, cfg.stage) if cfg.init_from else None}
    freeze_for_stage(model, cfg.stage)  # align: the LLM too
    apply_activation_checkpointing(model.llm, cfg.activation_checkpointing)
    module = TrainModule(model, pack_budget=cfg.pack_budget if cfg.packing else None)
    module = shard_model(module, info, param_dtype=cfg.param_dtype, reduce_dtype=cfg.reduce_dtype,
                         hybrid=cfg.hybrid_shard, compile_layers=cfg.compile_llm, cpu_offload=cfg.cpu_offload)
    model.train()
    if feature_cache is not None:
        feature_cache.check(model, training_autocast(device))

    # ---- optimizer, schedule
    optimizer = build_optimizer(module, lr=cfg.lr, weight_decay=cfg.weight_decay, prefer_apex=cfg.apex_adam)
    if info.is_main and cfg.apex_adam and type(optimizer).__name__ != "FusedAdam":
        print("apex_adam: NVIDIA apex's FusedAdam is not usable here (see `merv-fast env`); using torch's AdamW",
              file=sys.stderr)
    scheduler = build_scheduler(optimizer, total, cfg.warmup_ratio)
    state = TrainState(model, module, optimizer, scheduler, sampler, rank=info.rank, world_size=info.world_size,
                       config=cfg.to_dict())
    if resume_from is not None:
        checkpointer.load(state, resume_from)
        weights_read["resumed_from"] = str(resume_from)

    timer = PhaseTimer(device)
    stepper = Stepper(module, optimizer, scheduler, device=device, loss_norm=cfg.loss_norm, grad_clip=cfg.grad_clip,
                      nan_policy=cfg.nan_policy, world_size=info.world_size,
                      autocast_dtype=torch.bfloat16 if gpu else None, timer=timer,
                      nan_at_step=cfg.debug.nan_at_step)
    if feature_cache is not None:
        names = [e.name for e in model_cfg.encoders]
        stepper.feature_source = lambda batch, dev: dataset.features_for(batch, names, dev)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if gpu else None
    metrics = MetricsWriter(out, info.is_main)
    pad_id = tokenizer.pad_token_id
    workers = max(0, cfg.num_workers)

    def loader_for_epoch(epoch: int):
        # The loader's own generator: its workers' base seed then comes from (seed, epoch), never from the global
        # torch RNG, whose stream a resumed run must continue exactly (a loader started mid-epoch would draw again).
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, pin_memory=gpu,
            collate_fn=partial(collate, pad_token_id=pad_id, max_length=model_cfg.llm.max_text_tokens),
            prefetch_factor=2 if workers else None, worker_init_fn=ignore_in_worker if workers else None,
            generator=torch.Generator().manual_seed(counter_hash(cfg.seed, epoch) >> 1))

    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    bad_all: list = []
    losses: list[float] = []
    skipped = 0
    t_start = time.perf_counter()
    steps_run = 0
    stop_requested = signals.should_stop()  # a signal during start-up: stop before the first step
    if stop_requested and info.is_main:
        print(f"signal received during start-up: stopping at step {state.step}", file=sys.stderr)
    exported: dict[str, str] = {}
    try:
        while state.step < last and not stop_requested:
            sampler.set_epoch(state.epoch)
            loader = loader_for_epoch(state.epoch)
            if gpu:  # the next micro-batch is copied and preprocessed on a side stream while this one trains
                from merv_fast.data.prefetch import CudaPrefetcher

                loader = CudaPrefetcher(loader, device, stepper.prepare_on_device)
            with held():  # workers start with the stop signals blocked, and then ignore them
                iterator = iter(loader)
            while state.step < last:
                t0 = time.perf_counter()
                micro_batches = []
                for _ in range(k):
                    try:
                        micro_batches.append(next(iterator))
                    except StopIteration:
                        raise RuntimeError(f"the data loader ended {state.consumed + len(micro_batches)} "
                                           f"micro-batches into epoch {state.epoch}; the sampler has "
                                           f"{len(sampler)}") from None
                data_time = time.perf_counter() - t0
                result = stepper.step(micro_batches, data_time)
                state.consumed += k
                state.step += 1
                steps_run += 1
                step_epoch = state.epoch
                if state.consumed >= len(sampler):  # an epoch's end is the next one's start, in every checkpoint
                    state.epoch += 1
                    state.consumed = 0
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
                       "skipped": result.skipped, "epoch": step_epoch}
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
                if state.consumed == 0:  # the epoch is over: the next one gets its own loader
                    break
            del iterator, loader  # shut this epoch's workers down before anything else (a save) runs
        if steps_run:
            checkpointer.save_final(state)
        if not stop_requested:  # a preempted run resumes from its checkpoint; a finished one hands its weights on
            exported = export_weights(model, out, cfg.export, seed=cfg.seed)
    finally:
        metrics.close()
    wall = time.perf_counter() - t_start
    summary = {"steps": state.step, "steps_run": steps_run, "stopped_by_signal": stop_requested,
               "finished": state.step >= last, "total_steps": total, "steps_per_epoch": steps_per_epoch,
               "micro_batches_per_step": k, "micro_batch_size": micro, "world_size": info.world_size, "rank": info.rank,
               "final_loss": losses[-1] if losses else None, "losses": losses, "skipped_steps": skipped,
               "wall_s": wall, "bad_samples": summarize_bad_samples(bad_all), "data": data_json,
               "config": cfg.to_dict(), "model": model_cfg.name, "stage": cfg.stage.release, "exported": exported,
               "weights_read": weights_read}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
