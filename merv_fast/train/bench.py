"""`merv-fast bench`: real training steps of MERV and of its single-encoder baseline on the same data, side by side
in one run.

The data is the synthesized media set (real encoded clips, written once into the cache), read through the data
pipeline (decode, frame sampling, prompts, labels, collate) before timing starts. Each timed step: preprocess the
uint8 frames for every encoder (data), frozen encoders under no_grad, pooling + projection + fusion, LLM forward
with the loss, backward, clipped AdamW update. Reported per model: samples/s, tokens/s (real text + visual), step
time, the phase breakdown (the step time not inside any phase is its own row, "other", so the phases add up to the
step), peak memory and MFU on GPU; plus the MERV/baseline step-time ratio, `bench.json` and `bench_phases.png`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from merv_fast.config import BASELINE_OF, get_preset
from merv_fast.data.preprocess import preprocess_batch
from merv_fast.model.flops import peak_bf16_flops, sample_flops
from merv_fast.model.merv import build_model
from merv_fast.train.optim import build_optimizer
from merv_fast.train.parallel import enable_checkpointing
from merv_fast.train.phases import PhaseTimer

PHASES = ("data", "encoders", "visual", "llm_forward", "backward", "optimizer")
OTHER = "other"  # the step's wall time outside every phase (Python between phases, the GPU sync, timer overhead)


@dataclass
class BenchSettings:
    preset: str | None = None  # default: tiny on CPU, merv-1b on a GPU
    baseline: str | None = None  # default: the preset's single-encoder twin
    batch_size: int | None = None
    text_tokens: int = 128
    steps: int = 10
    warmup: int = 3
    seed: int = 0
    lr: float = 2e-5
    activation_checkpointing: bool | None = None  # default: on for GPU presets, off on CPU
    out: str = "runs/bench"
    device: str | None = None
    overrides: dict = field(default_factory=dict)

    def resolve(self) -> "BenchSettings":
        s = BenchSettings(**asdict(self))
        s.device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = s.device.startswith("cuda")
        s.preset = s.preset or ("merv-1b" if gpu else "tiny")
        s.baseline = s.baseline or BASELINE_OF.get(s.preset)
        if s.baseline is None:
            raise ValueError(f"preset {s.preset!r} has no single-encoder baseline; pass --baseline")
        s.batch_size = s.batch_size or (8 if gpu else 2)
        if s.activation_checkpointing is None:
            s.activation_checkpointing = gpu
        return s


class StepRunner:
    """One model, its optimizer and the bench's training step, reusable: `merv-fast bench`, the pytest-benchmark
    suite and `merv-fast profile` all run the same step. `phase(name)` is a context-manager factory wrapped around
    each phase (the bench's PhaseTimer by default; the profiler adds record_function ranges)."""

    def __init__(self, preset: str, s: BenchSettings):
        self.settings = s
        self.device = torch.device(s.device)
        gpu = self.device.type == "cuda"
        torch.manual_seed(s.seed)
        self.model = build_model(preset, device=self.device, **s.overrides)
        if s.activation_checkpointing:
            enable_checkpointing(self.model.llm)
        self.config = self.model.config
        self.optimizer = build_optimizer(self.model, lr=s.lr, weight_decay=0.1)
        self.gpu = gpu
        self.enc_dtype = next(self.model.encoders.parameters()).dtype

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.gpu else torch.autocast("cpu", enabled=False)

    def step(self, batch, phase=None) -> torch.Tensor:
        """One training step on `batch`; returns the loss (a tensor: reading it synchronises, so callers choose)."""
        phase = phase or (lambda name: contextlib.nullcontext())
        model, cfg = self.model, self.config
        with phase("data"):
            b = batch.to(self.device)
            pixels = preprocess_batch(b.frames, cfg.encoders, cfg.frames_sampled, b.flip, self.enc_dtype)
        with self.autocast():
            with phase("encoders"):
                features = model.encode(pixels)
            with phase("visual"):
                visual = model.visual_tokens(features)
            with phase("llm_forward"):
                loss = model.language_model_forward(b.input_ids, b.attention_mask, b.labels, visual,
                                                    loss=cfg.llm.loss).loss  # the trainer's loss (fused)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss


def train_steps(preset: str, s: BenchSettings, batches) -> dict:
    runner = StepRunner(preset, s)
    device, gpu, cfg = runner.device, runner.gpu, runner.config
    timer = PhaseTimer(device)
    step_times, phase_rows, losses, text_tokens, widths, frame_bytes = [], [], [], [], [], []
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    total = s.warmup + s.steps
    for i in range(total):
        batch = batches[i % len(batches)]
        text_tokens.append(int(batch.attention_mask.sum()))
        t0 = time.perf_counter()
        loss = runner.step(batch, timer.phase)
        phases = timer.collect()  # synchronises the GPU: the step's wall time below is complete
        elapsed = time.perf_counter() - t0
        if i >= s.warmup:
            step_times.append(elapsed)
            phases[OTHER] = max(elapsed - sum(phases.get(p, 0.0) for p in PHASES), 0.0)
            phase_rows.append(phases)
            losses.append(loss.item())
            widths.append(batch.input_ids.shape[1])
            frames = batch.frames if isinstance(batch.frames, (list, tuple)) else [batch.frames]
            frame_bytes.append(sum(f.numel() * f.element_size() for f in frames) / s.batch_size)
        else:
            text_tokens.pop()  # only the measured steps count
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{preset}: loss is {loss.item()} at step {i}")
        kind = "warm-up" if i < s.warmup else "step"
        print(f"  {preset}: {kind} {i + 1}/{total}  {elapsed * 1e3:.0f} ms  loss {loss.item():.4f}", flush=True)
    step = statistics.median(step_times)
    text_per_sample = sum(text_tokens) / (len(text_tokens) * s.batch_size)  # the batches' real (unpadded) text
    tokens_per_sample = text_per_sample + cfg.num_visual_tokens
    flops = sample_flops(cfg, round(text_per_sample)).total
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if gpu else None
    samples_per_s = s.batch_size / step
    return {
        "preset": preset,
        "text_tokens_per_sample": text_per_sample,
        "padded_text_tokens": max(widths),  # the widest micro-batch (its samples padded to its longest)
        "padded_text_tokens_mean": sum(widths) / len(widths),  # text positions computed per sample, padding included
        "frame_bytes_per_sample": max(frame_bytes),  # decoded uint8 frames moved to the device
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens_per_sample,
        "step_time_s": step,
        "step_times_s": step_times,
        "mfu": (flops * samples_per_s / peak) if peak else None,
        "flops_per_sample": flops,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if gpu else None,
        "phases": {p: statistics.median(r.get(p, 0.0) for r in phase_rows) for p in PHASES + (OTHER,)},
        "losses": losses,
    }


def versions() -> dict:
    import transformers

    from merv_fast import __version__
    from merv_fast.env import git_sha

    v = {"merv_fast": __version__, "git": git_sha(), "torch": torch.__version__,
         "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def media_batches(cfg, batch_size: int, count: int, seed: int = 0) -> list:
    """Video batches of the synthesized media set (written once into the cache, `MERV_FAST_CACHE`), read through
    the real data pipeline: decoding, frame sampling, prompts and labels, collate. Frames of different sizes stay a
    per-sample list; the step's preprocessing handles that."""
    from merv_fast.data.collate import collate
    from merv_fast.data.dataset import VideoLLaVADataset, load_entries
    from merv_fast.model.llm import training_tokenizer
    from merv_fast.train.loop import ensure_synthetic_data
    from merv_fast.train.parallel import DistInfo

    data_json, media_root = ensure_synthetic_data(DistInfo(), seed)
    videos = [e for e in load_entries(data_json) if e.kind == "video"]
    tokenizer = training_tokenizer(cfg.llm)
    dataset = VideoLLaVADataset(videos, media_root, tokenizer, prompt_format=cfg.llm.prompt_format,
                                max_length=cfg.llm.max_text_tokens, seed=seed, frames=cfg.frames_sampled)
    return [collate([dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)],
                    pad_token_id=tokenizer.pad_token_id) for i in range(count)]


def save_chart(report: dict, out: Path) -> Path:
    """Phase breakdown per step, MERV vs baseline, side by side: stacked bars whose height is the median step time
    (the phases' medians plus "other"; medians of parts need not add up exactly to the median of the whole)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = {"merv": 0.0, "baseline": 0.0}
    stacked = PHASES + (OTHER,)
    for phase in stacked:
        for x, side in enumerate(("merv", "baseline")):
            v = report[side]["phases"].get(phase, 0.0) * 1e3
            ax.bar(x, v, bottom=bottom[side], color=f"C{stacked.index(phase)}", label=phase if x == 0 else None)
            bottom[side] += v
    for x, side in enumerate(("merv", "baseline")):
        step_ms = report[side]["step_time_s"] * 1e3
        ax.annotate(f"{step_ms:.1f} ms", (x, bottom[side]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([0, 1], [report["merv"]["preset"], report["baseline"]["preset"]])
    ax.set_ylabel("ms per training step")
    ax.set_title(f"{report['device']}: step-time ratio {report['ratio_step_time']:.2f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "bench_phases.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_bench(settings: BenchSettings | None = None) -> dict:
    s = (settings or BenchSettings()).resolve()
    cfg = get_preset(s.preset)
    print(f"merv-fast bench: {s.preset} vs {s.baseline} on {s.device}, batch {s.batch_size}, "
          f"{s.warmup} warm-up + {s.steps} timed steps each; reading the synthesized media set", flush=True)
    batches = media_batches(cfg, s.batch_size, count=2, seed=s.seed)
    print(f"building {s.preset}", flush=True)
    merv = train_steps(s.preset, s, batches)
    gc.collect()  # the first model's memory goes back before the second is built
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()
    # The same clips, each model sampling its frames as the release does (a 16-frame single encoder: 16 frames over
    # the clip, not every second of MERV's 32).
    base_cfg = get_preset(s.baseline)
    if base_cfg.frames_sampled != cfg.frames_sampled:
        batches = media_batches(base_cfg, s.batch_size, count=2, seed=s.seed)
    print(f"building {s.baseline}", flush=True)
    baseline = train_steps(s.baseline, s, batches)
    device = torch.cuda.get_device_name() if s.device.startswith("cuda") else f"cpu-{torch.get_num_threads()}thread"
    report = {
        "merv": merv,
        "baseline": baseline,
        "ratio_step_time": merv["step_time_s"] / baseline["step_time_s"],
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "config": asdict(s),
    }
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"wrote {out / 'bench.json'}")
    print(f"wrote {save_chart(report, out)}")
    return report


def format_report(r: dict) -> str:
    m, b = r["merv"], r["baseline"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [("samples/s", "samples_per_s", ".3f"), ("tokens/s", "tokens_per_s", ".1f"),
            ("step time (s)", "step_time_s", ".4f"), ("MFU", "mfu", ".3f"), ("peak memory (GiB)", None, "")]
    w = max(14, len(m["preset"]) + 2, len(b["preset"]) + 2)  # release ids at a size run past 14 characters
    lines = [f"merv-fast bench on {r['device']}: {m['preset']} vs {b['preset']} "
             f"(batch {r['config']['batch_size']}, {r['config']['steps']} steps after {r['config']['warmup']} warm-up)",
             f"{'':22}{m['preset']:>{w}}{b['preset']:>{w}}{'ratio':>9}"]
    for label, key, spec in rows:
        if key is None:
            mv, bv = (None if x["peak_mem_bytes"] is None else x["peak_mem_bytes"] / 2**30 for x in (m, b))
            spec = ".2f"
        else:
            mv, bv = m[key], b[key]
        ratio = fmt(mv / bv, ".2f") if mv is not None and bv else "-"
        lines.append(f"{label:22}{fmt(mv, spec):>{w}}{fmt(bv, spec):>{w}}{ratio:>9}")
    lines.append("phase breakdown (s/step, medians):")
    for p in PHASES + (OTHER,):
        mv, bv = m["phases"].get(p, 0.0), b["phases"].get(p, 0.0)
        lines.append(f"  {p:20}{mv:>{w}.4f}{bv:>{w}.4f}{(mv / bv if bv else float('nan')):>9.2f}")
    lines.append(f"step-time ratio MERV/baseline: {r['ratio_step_time']:.3f}")
    return "\n".join(lines)
