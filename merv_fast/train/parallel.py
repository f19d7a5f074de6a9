"""Distribution: process group from the torchrun environment, and FSDP2 (`fully_shard`) of the trainable model.

What is sharded (one FSDP2 unit each): every LLM decoder layer; the visual path (projectors + fusion); and a root unit,
`TrainModule`, holding what remains of the LLM (embeddings, final norm, LM head). The frozen encoders are not part of
`TrainModule` at all: they stay plain, replicated on every rank, in eval mode, and run under `no_grad` outside it.

Every rank must run the same FSDP units every micro-step, or the collectives hang: a text-only micro-batch still runs
the visual path, on one zero "dummy" feature sample, and adds `0 * visual.sum()` to its loss (so the visual path's
reduce-scatter happens too, with zero gradients). `TrainModule.forward` does this whenever `features` is None.

Activation checkpointing per LLM layer, through transformers' own per-layer checkpointing (non-reentrant):
"full" = every decoder layer, "selective" = every other layer (layers 0, 2, 4, ...: about half the recomputation for
about half the saved activations), "off". Optional `torch.compile` of each decoder layer. Hybrid sharding: a 2-D device
mesh (replicate across nodes x shard within a node, the node size from LOCAL_WORLD_SIZE).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # older spelling
    from torch.distributed._composable.fsdp import (CPUOffloadPolicy, FSDPModule,  # type: ignore[no-redef]
                                                    MixedPrecisionPolicy, fully_shard)

from merv_fast.model.attention import install_for_packing
from merv_fast.model.llm import IGNORE_INDEX, llm_forward
from merv_fast.train.packing import pack

__all__ = ["DistInfo", "init_distributed", "TrainModule", "shard_model", "apply_activation_checkpointing",
           "is_fsdp", "CPUOffloadPolicy", "FSDPModule", "MixedPrecisionPolicy", "fully_shard", "all_reduce_sum",
           "barrier"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT) and start the
    process group: NCCL on CUDA, gloo on CPU. A plain `python`/`merv-fast` run is one process, no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    here = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        here = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, local_world, dev, here)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class TrainModule(nn.Module):
    """The trainable part of MERV (visual path + LLM) as one module, so that FSDP2's root unit wraps the whole
    forward (the LLM's embeddings are called outside `llm.forward` in `MERV.language_model_forward`). The frozen
    encoders are deliberately not registered here: they are never sharded."""

    def __init__(self, merv: nn.Module, pack_budget: int | None = None):
        super().__init__()
        self.visual = merv.visual
        self.llm = merv.llm
        object.__setattr__(self, "_merv", merv)  # not a submodule (its encoders must stay out of FSDP)
        self._dummy_shapes: list[tuple[int, ...]] | None = None
        self.pack_budget = pack_budget  # None: no packing; else tokens per packed row (merv_fast/train/packing.py)

    @property
    def merv(self) -> nn.Module:
        return self._merv

    def dummy_features(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """One all-zero sample of encoder features, shaped as the encoders' outputs (measured once, on a zero input)."""
        if self._dummy_shapes is None:
            cfg = self.merv.config
            pixels = []
            for enc in cfg.encoders:
                enc_dtype = next(self.merv.encoders[enc.name].parameters()).dtype
                pixels.append(torch.zeros(1, enc.frames, 3, enc.image_size, enc.image_size, device=device,
                                          dtype=enc_dtype))
            self._dummy_shapes = [tuple(f.shape) for f in self.merv.encode(pixels)]
        return [torch.zeros(s, device=device, dtype=dtype) for s in self._dummy_shapes]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                features: list[torch.Tensor] | None = None, num_items_in_batch: torch.Tensor | None = None):
        """-> (loss, visual token count per sample). `num_items_in_batch` given: the loss is the SUM of the per-token
        losses divided by it (transformers' loss); else the mean over this micro-batch's supervised tokens. The loss
        is `llm.loss`'s (fused: no full logits), on the samples packed into rows when `pack_budget` is set."""
        kwargs = {"loss": self.merv.config.llm.loss}
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        if features is not None:
            visual = self.visual(features)
            out = self._language_model(input_ids, attention_mask, labels, visual, kwargs)
            return out.loss, visual.shape[1]
        # Text-only: the visual path still runs (every rank runs every FSDP unit), with zero weight on the loss.
        dtype = next(self.visual.parameters()).dtype
        dummy = self.visual(self.dummy_features(input_ids.device, dtype))
        out = self._language_model(input_ids, attention_mask, labels, None, kwargs)
        return out.loss + 0.0 * dummy.float().sum(), 0

    def _language_model(self, input_ids, attention_mask, labels, visual, kwargs):
        """The LLM forward on the micro-batch as given, or on its samples packed into rows of `pack_budget`."""
        if not self.pack_budget:
            return self.merv.language_model_forward(input_ids, attention_mask, labels, visual, **kwargs)
        install_for_packing(self.llm)  # sdpa: one call per packed sample, never a dense block-diagonal mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, attention_mask, labels = self.merv.spliced_inputs(input_ids, attention_mask, labels, visual)
        packed = pack(embeds, attention_mask, labels, self.pack_budget)
        return llm_forward(self.llm, packed.embeds, None, packed.labels, packed.documents, packed.position_ids,
                           **kwargs)


def supervised_targets(labels: torch.Tensor, num_visual: int, has_bos: bool) -> int:
    """How many positions the LLM loss averages over for this micro-batch: the spliced labels, shifted by one."""
    if num_visual:
        p = 1 if has_bos else 0
        ignored = labels.new_full((labels.shape[0], num_visual), IGNORE_INDEX)
        labels = torch.cat([labels[:, :p], ignored, labels[:, p:]], dim=1)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    return llm.model.layers


def enable_checkpointing(llm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, under the name this transformers has:
    `activation_checkpointing_enable` since 5.25 (the old `gradient_checkpointing_enable` goes in v6)."""
    if hasattr(llm, "activation_checkpointing_enable"):
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
def fsdp_units(module: TrainModule) -> list[nn.Module]:
    """The modules `shard_model` makes FSDP2 units of, in the order it wraps them: every LLM decoder layer, the
    visual path, then the root (`module`: the parameters no other unit holds). The planner counts the same units."""
    return [*decoder_layers(module.llm), module.visual, module]


def checkpointed_layer(mode: str, index: int) -> bool:
    """Whether decoder layer `index` is checkpointed: full = every layer; selective = every other layer (0, 2, ...);
    off = none. `merv-fast plan` counts memory by the same rule."""
    return mode == "full" or (mode == "selective" and index % 2 == 0)


def apply_activation_checkpointing(llm: nn.Module, mode: str) -> None:
    """Checkpoint the decoder layers `checkpointed_layer` picks."""
    if mode == "off":
        return
    enable_checkpointing(llm)
    for i, layer in enumerate(decoder_layers(llm)):
        layer.gradient_checkpointing = checkpointed_layer(mode, i)


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def build_mesh(info: DistInfo, hybrid: bool):
    from torch.distributed.device_mesh import init_device_mesh

    dev = info.device.type
    if hybrid:
        shard = info.local_world_size
        if info.world_size % shard:
            raise ValueError(f"hybrid sharding: world size {info.world_size} is not a multiple of the node size {shard}")
        return init_device_mesh(dev, (info.world_size // shard, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(dev, (info.world_size,), mesh_dim_names=("dp_shard",))


def shard_model(module: TrainModule, info: DistInfo, *, param_dtype: str = "bfloat16",
                reduce_dtype: str = "float32", hybrid: bool = False, compile_layers: bool = False,
                cpu_offload: bool = False) -> TrainModule:
    """FSDP2 on each LLM decoder layer, on the visual path, and on `module` (the root). Mixed precision only on GPU.
    Single process: nothing is sharded (layers are still compiled when asked)."""
    layers = decoder_layers(module.llm)
    if compile_layers:
        for layer in layers:
            layer.compile()
    if not info.distributed:
        return module
    mesh = build_mesh(info, hybrid)
    kwargs = {"mesh": mesh}
    if info.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype))
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    *layer_units, visual, root = fsdp_units(module)
    for i, layer in enumerate(layer_units):
        # The last layer's parameters are needed again right away in backward: keep them gathered (torchtitan's rule).
        fully_shard(layer, reshard_after_forward=i < len(layer_units) - 1, **kwargs)
    fully_shard(visual, **kwargs)
    fully_shard(root, **kwargs)
    return module


def is_fsdp(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)
