"""The planner against the GPU suite's measurements: for a run the suite measured (the bench's training step, `merv-fast
train`), the plan of that same run and one results row with both, so that the model's error is a figure.

Step time is compared as the median step; peak memory as `torch.cuda.max_memory_allocated` (live tensors, what the
memory model's `peak_bytes` predicts, without the allocator headroom and runtime reserve). On a CPU
(`gpu-suite --allow-cpu`) the prediction uses the run's own measured ceilings; the trainer's CPU peak is the process
RSS, not tensors, and is not compared.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from merv_fast.config import ModelConfig
from merv_fast.measure.results import device_slug, row
from merv_fast.measure.timing import summarize
from merv_fast.plan.hardware import DEVICES, Cluster
from merv_fast.plan.planner import plan
from merv_fast.train.config import make_train_config


def suite_cluster(ranks: int) -> Cluster | None:
    """This machine as a one-node cluster of `ranks` GPUs; a CPU run as the `cpu` device; None for a GPU the
    device table does not know."""
    if not torch.cuda.is_available():
        return Cluster("cpu", 1, 1)
    kind = device_slug().split("x", 1)[-1] if device_slug()[:1].isdigit() else device_slug()
    gpu = next((name for name in DEVICES if kind.startswith(name)), None)
    return Cluster(gpu, gpus_per_node=ranks, nodes=1) if gpu else None


def synthetic_frame_bytes(frames_sampled: int) -> int:
    """Decoded frames of the largest clip `merv-fast data synth` writes (the suite's training data)."""
    from merv_fast.data.synth import video_catalogue

    largest = max(v.width * v.height for v in video_catalogue(random.Random(0)))
    return frames_sampled * 3 * largest


def dataset_text_tokens(data_json: str, media_root: str, model_cfg: ModelConfig) -> tuple[float, int]:
    """(mean, longest) text tokens of a dataset's video samples, tokenized as the trainer tokenizes them."""
    from merv_fast.data.dataset import VideoLLaVADataset, load_entries
    from merv_fast.model.llm import training_tokenizer

    dataset = VideoLLaVADataset(load_entries(data_json), media_root, training_tokenizer(model_cfg.llm),
                                prompt_format=model_cfg.llm.prompt_format, max_length=model_cfg.llm.max_text_tokens)
    lengths = [n for kind, n in dataset.modality_lengths("tokens") if kind == "video"]
    return sum(lengths) / len(lengths), max(lengths)


def prediction_row(what: str, model_cfg: ModelConfig, *, ranks: int, global_batch: int, micro_batch: int,
                   text_tokens: float, max_text_tokens: int, checkpointing: str, frame_bytes: float, prefetch: bool,
                   ceilings: dict, step_times_s: list[float], peak_bytes: int | None,
                   num_workers: int = 2) -> dict[str, Any] | None:
    """One results row: the measured step (as `ours`) beside the plan's step time and peak memory. `text_tokens`:
    the text positions each sample computes (padding included where the run pads); `max_text_tokens`: the widest
    micro-batch's."""
    cluster = suite_cluster(ranks)
    if cluster is None:
        print(f"{what}: no prediction, the device table has no entry for {device_slug()}")
        return None
    train = make_train_config("merv-frozen", overrides={"global_batch_size": global_batch,
                                                       "micro_batch_size": micro_batch,
                                                       "activation_checkpointing": checkpointing,
                                                       "num_workers": num_workers})
    p = plan(model_cfg, train, cluster, text_tokens=text_tokens, max_text_tokens=max_text_tokens,
             ceilings=ceilings, frame_bytes=frame_bytes, prefetch=prefetch, baseline=False, search=False)
    measured = summarize([t * 1e3 for t in step_times_s])
    predicted_ms = p["time"]["step_s"] * 1e3
    config = {"preset": model_cfg.name, "ranks": ranks, "micro_batch": micro_batch, "global_batch": global_batch,
              "text_tokens_mean": round(text_tokens, 1), "text_tokens_max": max_text_tokens,
              "activation_checkpointing": checkpointing, "precision": p["settings"]["precision"],
              "predicted_step_ms": round(predicted_ms, 3),
              "step_error": round(predicted_ms / measured.median_ms - 1, 3),
              "predicted_phases_ms": {ph["name"]: round(ph["seconds"] * 1e3, 3) for ph in p["time"]["phases"]},
              "predicted_peak_bytes": p["memory"]["peak_bytes"], "predicted_peak_at": p["memory"]["peak_at"],
              "rates_from": {k: v["source"] for k, v in p["constants"].items()
                             if k.endswith(("matmul_flop_s", "memory_bytes_s"))}}
    if peak_bytes:
        config["measured_peak_bytes"] = peak_bytes
        config["peak_error"] = round(p["memory"]["peak_bytes"] / peak_bytes - 1, 3)
    else:
        config["measured_peak_bytes"] = None  # a CPU run: no allocator peak to compare with
    return row("plan", f"predicted vs measured: {what}", config, measured)


def as_run(preset: str) -> ModelConfig:
    """The preset with `llm.attention` resolved as a run on this machine resolves `auto` (the plan assumes sdpa
    for `auto`; a GPU with flash-attn installed runs flash_attn, which keeps less)."""
    from merv_fast.config import apply_overrides, get_preset
    from merv_fast.model.attention import resolve_attention

    cfg = get_preset(preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend, _ = resolve_attention(cfg.llm.attention, device, torch.bfloat16 if device.type == "cuda" else None)
    return apply_overrides(cfg, {"llm.attention": backend})
