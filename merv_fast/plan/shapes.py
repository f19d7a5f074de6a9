"""The model as the planner sees it: parameter shapes per FSDP2 unit and the sizes of every activation, read off the
real model built on the meta device (no memory), the way `merv-fast info` builds it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from merv_fast.config import ModelConfig


@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def shard_numel(self, shards: int, rank: int = 0, padded: bool = False) -> int:
        """Elements rank `rank` holds when FSDP2 shards dim 0 over `shards` ranks: torch.chunk's split (chunks of
        ceil(rows / shards), the last ones shorter or empty); `padded`: the storage FSDP2 allocates, every rank
        rank 0's chunk size."""
        if not self.shape:
            return 1 if padded or rank == 0 else 0
        rows, rest = self.shape[0], math.prod(self.shape[1:])
        chunk = -(-rows // shards)
        if padded:
            return chunk * rest
        return max(0, min(chunk, rows - rank * chunk)) * rest


@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit (`merv_fast.train.parallel.fsdp_units`): its parameters."""

    name: str
    params: tuple[Param, ...]

    def numel(self, trainable: bool | None = None) -> int:
        return sum(p.numel for p in self.params if trainable is None or p.trainable == trainable)


@dataclass(frozen=True)
class EncoderShape:
    name: str
    params: int
    frames: int  # input frames
    image_size: int
    sequences: int  # spatial-attention sequences per video
    seq_len: int
    width: int
    intermediate: int
    layers: int
    feature_numel: int  # [T_out, N, C] per video: what the visual path receives
    temporal: bool  # LanguageBind's temporal attention in every block
    activation: str  # the MLP's activation (hidden_act)


@dataclass(frozen=True)
class ModelShapes:
    config: ModelConfig
    units: tuple[Unit, ...]  # decoder layers, visual path, root
    encoders: tuple[EncoderShape, ...]
    hidden: int  # LLM width D
    kv_width: int  # key/value width (GQA: heads_kv * head_dim)
    heads: int
    intermediate: int
    layers: int
    vocab: int  # padded rows of the embedding / LM head
    visual_tokens: int
    pooled_width: int  # K = sum of encoder widths
    frames_sampled: int

    @property
    def decoder_units(self) -> tuple[Unit, ...]:
        return self.units[:self.layers]

    @property
    def visual_unit(self) -> Unit:
        return self.units[self.layers]

    @property
    def root_unit(self) -> Unit:
        return self.units[self.layers + 1]

    @property
    def preset(self) -> str:
        return self.config.name

    def trainable(self) -> int:
        return sum(u.numel(True) for u in self.units)

    def layer_params(self) -> int:
        return max(u.numel() for u in self.decoder_units)

    def encoder_params(self) -> int:
        return sum(e.params for e in self.encoders)


def _unit(name: str, module, exclude: set[int]) -> Unit:
    params = tuple(Param(tuple(p.shape), p.requires_grad) for p in module.parameters() if id(p) not in exclude)
    return Unit(name, params)


def model_shapes(cfg: ModelConfig) -> ModelShapes:
    """Build `cfg` on the meta device and read its FSDP2 units and encoder shapes."""
    from merv_fast.model.flops import encoder_sequences
    from merv_fast.model.merv import build_model
    from merv_fast.train.parallel import TrainModule, fsdp_units

    model = build_model(config=cfg, device="meta")
    module = TrainModule(model)
    *layers, visual, root = fsdp_units(module)
    units, held = [], set()
    for i, layer in enumerate(layers):
        units.append(_unit(f"llm.layers.{i}", layer, held))
        held |= {id(p) for p in layer.parameters()}
    units.append(_unit("visual", visual, held))
    held |= {id(p) for p in visual.parameters()}
    units.append(_unit("root (embeddings, final norm, LM head)", root, held))

    encoders = []
    for enc_cfg in cfg.encoders:
        enc = model.encoders[enc_cfg.name]
        sequences, seq_len = encoder_sequences(enc_cfg)
        h, w = enc_cfg.grid
        encoders.append(EncoderShape(
            enc_cfg.name, sum(p.numel() for p in enc.parameters()), enc_cfg.frames, enc_cfg.image_size, sequences,
            seq_len, enc_cfg.hidden_size, enc_cfg.intermediate_size, enc_cfg.layers_run,
            enc_cfg.time_steps * h * w * enc_cfg.hidden_size, bool(enc_cfg.clip_frames), enc_cfg.hidden_act))

    llm = model.llm.config
    attn = model.llm.model.layers[0].self_attn
    mlp = model.llm.model.layers[0].mlp
    return ModelShapes(
        config=cfg, units=tuple(units), encoders=tuple(encoders), hidden=llm.hidden_size,
        kv_width=attn.k_proj.out_features, heads=llm.num_attention_heads, intermediate=mlp.gate_proj.out_features,
        layers=len(layers), vocab=model.llm.get_output_embeddings().weight.shape[0],
        visual_tokens=cfg.num_visual_tokens, pooled_width=sum(e.hidden_size for e in cfg.encoders),
        frames_sampled=cfg.frames_sampled)
