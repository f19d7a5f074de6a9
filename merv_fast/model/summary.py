"""What `merv-fast info` prints: parameters per module (trainable vs frozen), visual tokens, FLOPs per sample."""

from __future__ import annotations

from merv_fast.model.flops import sample_flops


def _count(module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


def model_summary(model, text_tokens: int = 128, recipe: str | None = None, stage: str | None = None) -> dict:
    """Counts as the model's parameters are set (a frozen LLM: the align stage); `recipe` / `stage` are named only."""
    cfg = model.config
    flops = sample_flops(cfg, text_tokens, llm_trained=any(p.requires_grad for p in model.llm.parameters()))
    modules = {}
    for name, enc in model.encoders.items():
        t, f = _count(enc)
        modules[f"encoder.{name}"] = {"trainable": t, "frozen": f, "flops_per_sample": flops.encoders[name],
                                      "layers_run": enc.config.layers_run, "of_layers": enc.config.num_layers}
    t, f = _count(model.visual)
    modules["visual (poolers, projectors, fusion)"] = {"trainable": t, "frozen": f, "flops_per_sample": flops.visual}
    t, f = _count(model.llm)
    modules["llm"] = {"trainable": t, "frozen": f, "flops_per_sample": flops.llm}
    return {
        "preset": cfg.name,
        "llm": {"backbone": cfg.llm.backbone, "prompt_format": cfg.llm.prompt_format, "has_bos": cfg.llm.has_bos},
        "recipe": recipe, "stage": stage,
        "visual_tokens": cfg.num_visual_tokens,
        "pool_size": list(model.visual.pool_size),
        "arch": cfg.visual.arch,
        "fusion": cfg.visual.fusion,
        "text_tokens_assumed": text_tokens,
        "modules": modules,
        "total_trainable": sum(m["trainable"] for m in modules.values()),
        "total_frozen": sum(m["frozen"] for m in modules.values()),
        "flops_per_sample": flops.total,
    }


def format_summary(s: dict) -> str:
    lines = [f"preset {s['preset']} ({s['arch']}, {s['fusion']}): {s['visual_tokens']} visual tokens "
             f"(grid {'x'.join(map(str, s['pool_size']))} per encoder), "
             f"FLOPs per video sample with {s['text_tokens_assumed']} text tokens (training step)",
             f"LLM {s['llm']['backbone']} (prompt format {s['llm']['prompt_format']}, "
             f"{'visual tokens after BOS' if s['llm']['has_bos'] else 'no BOS: visual tokens first'})"
             + (f"; recipe {s['recipe']} (the release's {s['stage']} stage)" if s["recipe"] else ""),
             f"{'module':32}{'trainable':>16}{'frozen':>16}{'TFLOP/sample':>14}"]
    for name, m in s["modules"].items():
        note = f"  ({m['layers_run']} of {m['of_layers']} layers)" if "layers_run" in m else ""
        lines.append(f"{name:32}{m['trainable']:>16,}{m['frozen']:>16,}{m['flops_per_sample'] / 1e12:>14.4f}{note}")
    lines.append(f"{'total':32}{s['total_trainable']:>16,}{s['total_frozen']:>16,}{s['flops_per_sample'] / 1e12:>14.4f}")
    return "\n".join(lines)
