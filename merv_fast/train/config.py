"""`TrainConfig`: the trainer's settings, from a recipe (MERV_SPEC.md section 6), then a YAML file, then `key=value`
overrides (the same dotted-override parsing as the model config, `merv_fast.config.parse_cli_overrides`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merv_fast.config import ConfigError, parse_cli_overrides, read_yaml_mapping



@dataclass(frozen=True)
class Stage:
    """What a recipe trains and loads: one of the release's `--stage`s (scripts/pretrain_video.py), with what its
    `freeze_backbones` trains and its `load_from_checkpoint` loads (merv/models/vidlms/merv.py)."""

    release: str  # the release's stage name
    train_llm: bool  # False: the LLM is frozen, only the projectors and the fusion train (align)
    data: str  # merv_fast.data.dataset.OBJECTIVES: "captions" (the release's AlignVideoDataset) | "conversations"
    init_loads: str  # what `init_from` restores: "all" (visual path + LLM) | "projectors" (the release's finetune)
    init_required: bool  # the release will not start this stage without weights to load


STAGES = {
    "align": Stage("align", train_llm=False, data="captions", init_loads="all", init_required=False),
    "full-align": Stage("full-align", train_llm=True, data="captions", init_loads="all", init_required=False),
    # finetune of a `no-align` architecture (merv-base): the release loads nothing and trains one stage.
    "no-align": Stage("finetune", train_llm=True, data="conversations", init_loads="all", init_required=False),
    "finetune": Stage("finetune", train_llm=True, data="conversations", init_loads="projectors", init_required=True),
    "second_finetune": Stage("second_finetune", train_llm=True, data="conversations", init_loads="all",
                             init_required=True),
}

# The recipes: a stage and its hyperparameters. Everything not named here is the spec's common default (AdamW, wd 0.1
# except where the table says 0, warmup ratio 0.03 then cosine, clip 1.0, bf16, frozen encoders, activation
# checkpointing on LLM layers). The release's stage names take the hyperparameters the release gives that stage with
# its default model config (merv/conf/models.py MERV_Base: align_* for the align stages, finetune_* for the others);
# merv-full-stage1 is full-align with merv-full's align learning rate.
_ALIGN = {"lr": 1e-3, "global_batch_size": 256, "epochs": 1.0, "weight_decay": 0.0}
_FINETUNE = {"lr": 2e-5, "global_batch_size": 128, "epochs": 1.0, "weight_decay": 0.1}
RECIPE_STAGES = {"merv-frozen": "no-align", "merv-full-stage1": "full-align", "merv-full-stage2": "second_finetune",
                 "align": "align", "full-align": "full-align", "finetune": "finetune",
                 "second_finetune": "second_finetune"}
RECIPES: dict[str, dict[str, Any]] = {
    "merv-frozen": _FINETUNE,
    "merv-full-stage1": {**_ALIGN, "lr": 1e-4},
    "merv-full-stage2": _FINETUNE,
    "align": _ALIGN,
    "full-align": _ALIGN,
    "finetune": _FINETUNE,
    "second_finetune": _FINETUNE,
}
assert set(RECIPES) == set(RECIPE_STAGES), "every recipe names its stage"

# CPU test presets cannot take a 128-sample step in reasonable time: unless the batch sizes were set explicitly,
# these presets use this global batch (the learning rate and everything else stay the recipe's).
SMALL_PRESETS = {"tiny": 4, "single-tiny": 4}

LOSS_NORMS = ("tokens", "release")
AC_MODES = ("full", "selective", "off")
NAN_POLICIES = ("stop", "skip")
DTYPES = ("bfloat16", "float32", "float16")
EXPORTS = ("safetensors", "release", "both", "none")


@dataclass
class DebugConfig:
    """Fault injection, to test the trainer's failure handling through the CLI (`--set debug.nan_at_step=3`);
    never set in real training."""

    nan_at_step: int | None = None  # optimizer step (1-based) whose loss is made NaN: then nan_policy decides


@dataclass
class TrainConfig:
    recipe: str = "merv-frozen"
    lr: float = 2e-5
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    global_batch_size: int = 128
    micro_batch_size: int | None = None  # per rank; None: the largest divisor of the per-rank share <= 16
    epochs: float = 1.0
    total_steps: int | None = None  # the schedule's length; None: from epochs and the dataset size
    max_steps: int | None = None  # stop early (never changes the schedule)
    grad_clip: float = 1.0
    loss_norm: str = "tokens"  # tokens | release
    activation_checkpointing: str = "full"  # full | selective (every other LLM layer) | off
    compile_llm: bool = False
    param_dtype: str = "bfloat16"  # FSDP2 mixed precision on GPU (CPU runs in fp32)
    reduce_dtype: str = "float32"
    hybrid_shard: bool = False  # 2-D mesh: replicate across nodes, shard within a node
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimizer state on the host
    apex_adam: bool = False  # NVIDIA apex's FusedAdam where the real apex imports; else torch's fused AdamW
    packing: bool = False  # pack each micro-batch's samples into rows of pack_budget tokens (train/packing.py)
    pack_budget: int = 16384  # tokens per packed row: a whole stage-2 micro-batch of 8 (packing.py)
    seed: int = 0
    save_every: int = 0  # also checkpoint every N optimizer steps (0: off)
    save_every_minutes: float = 30.0  # and every this many minutes of training (0: off); always at the end
    keep_last: int = 2  # checkpoints kept (0: all)
    export: str = "safetensors"  # at the end of a finished run: safetensors | release | both | none
    out: str = "runs/train"
    data: str | None = None  # LLaVA JSON; None: synthetic data, generated once into a cache directory
    media_root: str | None = None
    decoder: str = "auto"
    nan_policy: str = "stop"  # stop | skip
    num_workers: int = 2
    split: str = "kind"  # sampler grouping: kind (video/image/text) | release (multimodal/text)
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False  # an `out` that holds a run: move it aside and start anew (else refused without resume)
    init_from: str | None = None
    feature_cache: str | None = None  # a `merv-fast cache-features` directory: read pooled features, skip the encoders
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    debug: DebugConfig = field(default_factory=DebugConfig)
    explicit: list[str] = field(default_factory=list, repr=False)  # keys set by the user (not the recipe)

    def validate(self) -> "TrainConfig":
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; recipes are {sorted(RECIPES)}")
        for key, allowed in (("loss_norm", LOSS_NORMS), ("activation_checkpointing", AC_MODES),
                             ("nan_policy", NAN_POLICIES), ("param_dtype", DTYPES), ("reduce_dtype", DTYPES),
                             ("split", ("kind", "release")), ("export", EXPORTS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}; choose one of {list(allowed)}")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"packing must be true or false, got {self.packing!r}")
        if not isinstance(self.pack_budget, int) or isinstance(self.pack_budget, bool) or self.pack_budget < 1:
            raise ConfigError(f"pack_budget must be a positive number of tokens, got {self.pack_budget!r}")
        if self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be positive, got {self.global_batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be positive, got {self.micro_batch_size}")
        for key in ("total_steps", "max_steps"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key} must be positive, got {v}")
        for key in ("save_every", "keep_last"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{key} must be a whole number >= 0, got {v!r}")
        if not isinstance(self.save_every_minutes, (int, float)) or self.save_every_minutes < 0:
            raise ConfigError(f"save_every_minutes must be >= 0 (0: off), got {self.save_every_minutes!r}")
        nan_at = self.debug.nan_at_step
        if nan_at is not None and (not isinstance(nan_at, int) or isinstance(nan_at, bool) or nan_at < 1):
            raise ConfigError(f"debug.nan_at_step must be an optimizer step >= 1, got {nan_at!r}")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other: --resume continues the run in --out, "
                              "--overwrite moves it aside")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        return self

    @property
    def stage(self) -> Stage:
        return STAGES[RECIPE_STAGES[self.recipe]]

    def check_init(self) -> None:
        """The stages that continue an earlier run need its weights (`init_from`), as the release's do."""
        stage = self.stage
        if stage.init_required and not self.init_from:
            loads = "its projectors" if stage.init_loads == "projectors" else "its projectors, fusion and LLM"
            raise ConfigError(f"recipe {self.recipe!r} (the release's {stage.release!r} stage) continues an earlier "
                              f"run and loads {loads}: give --init-from (that run's directory, export or release "
                              "checkpoint)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("explicit")
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "explicit"}


def _coerce(key: str, value: Any) -> Any:
    """YAML gives ints for `1` where a float is meant, strings for `1e-4` (YAML 1.1): fix what is unambiguous."""
    current = TrainConfig.__dataclass_fields__[key].default
    if key == "activation_checkpointing" and isinstance(value, bool):  # YAML 1.1 reads `off`/`on` as booleans
        return "full" if value else "off"
    if isinstance(value, str) and key in ("lr", "weight_decay", "warmup_ratio", "epochs", "grad_clip",
                                          "save_every_minutes"):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key == "compile_llm" or key in ("hybrid_shard", "resume", "overwrite"):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _set_debug(debug: DebugConfig, key: str, value: Any) -> None:
    items = value.items() if key == "debug" and isinstance(value, dict) else [(key.partition(".")[2], value)]
    known = [f.name for f in dataclasses.fields(DebugConfig)]
    for name, v in items:
        if name not in known:
            raise ConfigError(f"unknown training key 'debug.{name}'; debug keys: {known}")
        setattr(debug, name, v)
def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--set` keys of `merv-fast train` / `plan`: (training settings for the TrainConfig, model-config overrides)."""
    train = {k: v for k, v in overrides.items() if k.replace("-", "_").split(".")[0] in _FIELDS}  # debug.* too
    return train, {k: v for k, v in overrides.items() if k not in train}


def make_train_config(recipe: str = "merv-frozen", config_file: str | Path | None = None,
                      overrides: dict[str, Any] | list[str] | None = None, preset: str | None = None,
                      **kwargs: Any) -> TrainConfig:
    """Recipe defaults, then the YAML file's keys (it may name its own `recipe`), then `overrides` (a dict or
    `key=value` strings), then keyword arguments (the CLI's flags). Keys left as the recipe set them may be adapted to
    small presets (see SMALL_PRESETS)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_yaml_mapping(config_file))
    if isinstance(overrides, list):
        overrides = parse_cli_overrides(overrides)
    values.update(overrides or {})
    values.update({k: v for k, v in kwargs.items() if v is not None})
    recipe = values.pop("recipe", None) or recipe
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; recipes are {sorted(RECIPES)}")
    cfg = TrainConfig(recipe=recipe, **RECIPES[recipe])
    for key, value in values.items():
        key = key.replace("-", "_")
        if key.split(".")[0] == "debug":  # `debug.nan_at_step: 3`, or `debug: {nan_at_step: 3}` in a YAML file
            _set_debug(cfg.debug, key, value)
            cfg.explicit.append(key)
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown training key {key!r}; known keys: {sorted(_FIELDS)}")
        setattr(cfg, key, _coerce(key, value))
        cfg.explicit.append(key)
    if preset in SMALL_PRESETS and "global_batch_size" not in cfg.explicit:
        cfg.global_batch_size = SMALL_PRESETS[preset]
    return cfg.validate()
