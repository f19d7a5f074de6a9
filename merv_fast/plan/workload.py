"""What is planned: the precision regime the trainer runs in, and one optimizer step's shape on one rank.

The regime follows from where the step runs (merv_fast/train/loop.py, parallel.py, step.py):
- `fsdp-bf16`: several GPUs. FSDP2 keeps fp32 shards and all-gathers bf16 parameters (`param_dtype`); the step runs
  under bf16 autocast, so activations and the residual stream are bf16.
- `autocast`: one GPU (the trainer's one-process run, `merv-fast bench`). Parameters stay fp32 and autocast casts
  them per op: the residual stream stays fp32 (embedding lookups and residual adds are not autocast), every
  projection saves its own bf16 copy of its input, and the bf16 copy of every weight lives in autocast's cache for
  the whole forward. FSDP2 with a `param_dtype` other than bf16 behaves the same way.
- `fp32`: a CPU. No autocast, everything fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from merv_fast.train.parallel import checkpointed_layer


@dataclass(frozen=True)
class Precision:
    name: str
    act: int  # bytes of a matmul output (the autocast dtype, or fp32)
    residual: int  # bytes of the residual stream and the norms' outputs
    encoder: int  # bytes of the frozen encoders' weights and activations
    casts_weights: bool  # fp32 weights under autocast: bf16 copies per forward, one input copy per projection
    fused_optimizer: bool  # torch's fused AdamW (CUDA): no temporaries; foreach (CPU): one parameter-sized temporary


PRECISIONS = {
    "fsdp-bf16": Precision("fsdp-bf16", act=2, residual=2, encoder=2, casts_weights=False, fused_optimizer=True),
    "autocast": Precision("autocast", act=2, residual=4, encoder=2, casts_weights=True, fused_optimizer=True),
    "fp32": Precision("fp32", act=4, residual=4, encoder=4, casts_weights=False, fused_optimizer=False),
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# What each LLM attention backend keeps (merv_fast/model/attention.py): transformers' sdpa gets a dense [B, 1, S, S]
# padding mask, and with grouped-query attention and a mask it repeats k and v to every head before the call
# (transformers.integrations.sdpa_attention.use_gqa_in_sdpa); the varlen backends take neither.
ATTENTION_LAYOUT = {
    "sdpa": {"dense_mask": True, "repeats_kv": True},
    "flex": {"dense_mask": False, "repeats_kv": False},
    "flash_attn": {"dense_mask": False, "repeats_kv": False},
    "xformers": {"dense_mask": False, "repeats_kv": False},
}


def precision_for(device: str, world: int, param_dtype: str) -> Precision:
    if device == "cpu":
        return PRECISIONS["fp32"]
    if world > 1 and param_dtype == "bfloat16":
        return PRECISIONS["fsdp-bf16"]
    return PRECISIONS["autocast"]


@dataclass(frozen=True)
class Workload:
    """One rank's optimizer step: `micro_batches` micro-batches of `micro_batch` video samples."""

    micro_batch: int
    micro_batches: int
    text_tokens: float  # mean text tokens per sample: what the time model charges
    max_text_tokens: int  # the longest sample: micro-batches are padded to it, so memory is planned for it
    checkpointing: str  # off | selective | full (merv_fast/train/parallel.apply_activation_checkpointing)
    world: int
    shard_group: int  # ranks one FSDP2 shard spans: the world, or a node under hybrid sharding
    precision: Precision
    param_bytes: int  # FSDP2's all-gathered copy (param_dtype)
    reduce_bytes: int  # reduce-scatter and accumulation dtype
    attention: str  # a key of ATTENTION_LAYOUT
    loss: str  # fused | plain
    encoder_mode: str  # sequential | streams | graph
    num_workers: int  # DataLoader workers per rank
    frame_bytes: float  # decoded uint8 frames of one sample on the device
    prefetch: bool  # the trainer's CUDA prefetcher holds the next micro-batch on the device

    @property
    def fsdp(self) -> bool:
        return self.world > 1

    def checkpointed(self, layer: int) -> bool:
        return checkpointed_layer(self.checkpointing, layer)
