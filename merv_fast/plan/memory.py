"""Memory per GPU of one training step, itemised, as a timeline of the moments that can set the peak.

Everything is counted in bytes from the module shapes (`shapes.py`) and the regime (`workload.py`):

- persistent: parameters (fp32; FSDP2 shards dim 0 of each over the shard group, padding to equal chunks), AdamW's
  two moments (fp32, the unpadded shard) and its step counters, the frozen encoders (replicated, bf16 on a GPU);
- per micro-batch: the decoded frames and the encoders' inputs and outputs (held for the whole micro-step), the
  encoders' working set (no_grad: one block's live tensors), the visual path's saved tensors, and per LLM layer the
  tensors autograd saves for backward, read off transformers' Llama modules:
      RMSNorm x2: its fp32 input (or fp32 copy), the normalised x, the weighted output the projections read;
      attention: q, k, v as the kernel saves them (repeated to every head by sdpa with GQA and a mask), its output,
                 the softmax statistics (fp32 per head);
      MLP: gate, silu(gate), up and their product;
  a checkpointed layer keeps only its input and recomputes the rest during its backward;
- the fused loss (kernels/fused_linear_ce.py): the supervised rows' hidden gradients and the LM head's fp32 weight
  gradient, computed in forward, plus one chunk of fp32 logits while it runs;
- FSDP2's unsharded copies: the root unit (embeddings, LM head) stays gathered through forward and backward, and
  FSDP_GATHERED_LAYERS decoder layers are gathered at a time; with gradient accumulation (k > 1 micro-batches) the
  no-sync micro-batches keep every unit's unsharded gradient (in the reduce dtype) until the last one reduces it.

The peak is the largest of: the encoders running, the end of the forward (the loss chunk), the loss's backward, each
decoder layer's backward (its recomputation, its gradients, the gradients reduced so far), and the optimizer step.
Left out, each small next to the terms above: position ids and rotary tables, attention masks of packed rows,
norms' per-token statistics, the visual unit's all-gather (only while it runs), kernel workspaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from merv_fast.kernels.fused_linear_ce import CHUNK_ELEMENTS
from merv_fast.plan.hardware import Figure
from merv_fast.plan.shapes import ModelShapes
from merv_fast.plan.workload import ATTENTION_LAYOUT, Workload

FSDP_GATHERED_LAYERS = Figure("FSDP_GATHERED_LAYERS", 2, "FSDP2 holds the running decoder layer and the next one, "
                              "all-gathered ahead (implicit prefetch), unsharded")
# A decoder layer's backward holds, beside what the layer saved: the gradients of the MLP's product, gate and up
# (intermediate-wide) and the incoming and outgoing hidden-state gradients.
BACKWARD_WORKSPACE_I = Figure("BACKWARD_WORKSPACE_I", 2, "intermediate-wide gradients alive at once in a decoder "
                              "layer's backward (the product's, then gate's and up's as it splits)")
BACKWARD_WORKSPACE_D = Figure("BACKWARD_WORKSPACE_D", 2, "hidden-wide gradients alive at once in a decoder layer's "
                              "backward (incoming, outgoing)")
# An encoder block under no_grad, at its MLP: the residual stream, the attention's output, the norm's output (plus
# LanguageBind's temporal-attention output) and fc1's output with its activation's temporaries.
ENCODER_LIVE_C = Figure("ENCODER_LIVE_C", 3, "hidden-wide tensors alive in an encoder block's MLP (residual, "
                        "attention output, norm output; +1 with temporal attention)")
ENCODER_LIVE_I = {  # intermediate-wide tensors alive at once, by activation (EncoderConfig.hidden_act)
    "gelu": Figure("ENCODER_LIVE_I_GELU", 2, "fc1's output and GELU's output"),
    "gelu_fast": Figure("ENCODER_LIVE_I_GELU_FAST", 5, "fc1's output and the tanh approximation written out "
                        "in elementwise ops (transformers' FastGELUActivation): up to four temporaries at once"),
}
# A checkpointed layer's forward keeps nothing, but while it runs its MLP holds silu(gate), up and their product
# beside the residual stream and the norm's output.
CHECKPOINTED_FORWARD_I = Figure("CHECKPOINTED_FORWARD_I", 3, "intermediate-wide tensors alive in a checkpointed "
                                "layer's MLP during the forward")
CHECKPOINTED_FORWARD_D = Figure("CHECKPOINTED_FORWARD_D", 2, "hidden-wide tensors alive in a checkpointed layer's "
                                "MLP during the forward")
SOURCE_FRAME_PIXELS = Figure("SOURCE_FRAME_PIXELS", 720 * 1280, "assumption: decoded frames at 720p (the trainer "
                             "moves them to the GPU at their own size and preprocesses there)")


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float
    basis: str

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": int(round(self.bytes)), "from": self.basis}


def _sum(items: list[Item]) -> float:
    return sum(i.bytes for i in items)


# ----------------------------------------------------------------------------------------------- persistent
def shard_numel(s: ModelShapes, group: int, rank: int = 0, *, trainable: bool | None = None,
                padded: bool = False) -> int:
    """Parameter elements rank `rank` holds when every unit is sharded over `group` ranks (group 1: all)."""
    return sum(p.shard_numel(group, rank, padded) for u in s.units for p in u.params
               if trainable is None or p.trainable == trainable)


def state_items(s: ModelShapes, w: Workload, rank: int = 0) -> dict[str, Item]:
    """What a rank holds between steps (parameters, optimizer state, encoders) and its gradients after backward,
    exactly (tests/plan/test_fsdp_state.py checks them against the sharded model under torchrun)."""
    group = w.shard_group if w.fsdp else 1
    rank = rank % group  # the rank's place in its shard group (hybrid: within its node)
    how = f"FSDP2 shard over {group} ranks, dim 0 padded to equal chunks" if group > 1 else "whole (one process)"
    tensors = sum(1 for u in s.units for p in u.params if p.trainable)
    return {
        "parameters": Item("parameters (fp32)", 4 * shard_numel(s, group, rank, padded=group > 1),
                           f"module shapes, {how}"),
        "gradients": Item("gradients (fp32)", 4 * shard_numel(s, group, rank, trainable=True, padded=group > 1),
                          f"trainable shapes, {how}"),
        "optimizer": Item("AdamW exp_avg + exp_avg_sq (fp32) and step counters",
                          8 * shard_numel(s, group, rank, trainable=True) + 4 * tensors,
                          f"trainable shapes, {how} (unpadded), one fp32 step per tensor"),
        "encoders": Item("frozen encoders (replicated)", w.precision.encoder * s.encoder_params(),
                         f"encoder shapes x {w.precision.encoder} bytes ({w.precision.name})"),
    }


# ----------------------------------------------------------------------------------------------- per layer
def layer_saved_per_token(s: ModelShapes, w: Workload) -> list[Item]:
    """Bytes per token one decoder layer saves for backward when it is not checkpointed."""
    p, d, i = w.precision, s.hidden, s.intermediate
    layout = ATTENTION_LAYOUT[w.attention]
    kv = d if layout["repeats_kv"] and s.kv_width != d else s.kv_width
    seq = w.max_text_tokens + s.visual_tokens
    # Under autocast each projection saves its own bf16 copy of its fp32 input (q, k, v; gate, up).
    projection_inputs = 5 if p.casts_weights else 2
    return [
        Item("RMSNorm fp32 inputs x2", 2 * (4 * d + 4), "hidden x 4 bytes (+ rsqrt)"),
        Item("RMSNorm normalised x2", 2 * p.residual * d, f"hidden x {p.residual} bytes"),
        Item(f"projection inputs x{projection_inputs}", projection_inputs * p.act * d, f"hidden x {p.act} bytes"),
        Item("q and attention output", 2 * p.act * d, f"hidden x {p.act} bytes"),
        Item("k, v", 2 * p.act * kv, f"{'hidden (repeated to every head)' if kv != s.kv_width else 'kv width'} x "
                                     f"{p.act} bytes ({w.attention})"),
        Item("softmax statistics", 4 * s.heads, "heads x 4 bytes"),
        Item("MLP gate, silu, up, product", 4 * p.act * i, f"intermediate x {p.act} bytes"),
        # sdpa turns the boolean padding mask into an additive one of the query's dtype in every call, and saves it
        Item("padding mask as sdpa converts it", seq * p.act if layout["dense_mask"] else 0.0,
             f"[B, 1, S, S] x {p.act} bytes per layer"),
    ]


def layer_linear_params(s: ModelShapes) -> int:
    """Weights of one decoder layer's projections (its norms' weights are the rest)."""
    return s.layer_params() - 2 * s.hidden


def _layer_activation(s: ModelShapes, w: Workload, tokens: int, layer: int) -> float:
    """The activations decoder layer `layer` keeps for backward over `tokens` tokens (its input when
    checkpointed)."""
    if w.checkpointed(layer):
        return w.precision.residual * s.hidden * tokens
    return _sum(layer_saved_per_token(s, w)) * tokens


def _layer_weight_copies(s: ModelShapes, w: Workload, layer: int) -> float:
    """Under autocast a non-checkpointed layer's projections save the bf16 copies of their weights."""
    return 2 * layer_linear_params(s) if w.precision.casts_weights and not w.checkpointed(layer) else 0.0


# ----------------------------------------------------------------------------------------------- the timeline
# The phases of Stepper.step and the moments of the timeline that fall in each.
STEP_PHASES = {"encoders": ("encoders",), "llm_forward": ("forward",), "backward": ("backward",),
               "optimizer": ("optimizer",)}


@dataclass
class MemoryPlan:
    persistent: list[Item]
    events: dict[str, list[Item]]  # moment -> what is alive then besides `persistent`
    peak_event: str
    peak_bytes: float  # live tensors at the peak (what torch.cuda.max_memory_allocated reports)
    needed_bytes: float  # with the allocator headroom and the runtime's reserve
    capacity_bytes: float
    state: dict[str, Item]

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.capacity_bytes

    def peak_items(self) -> list[Item]:
        return self.persistent + self.events[self.peak_event]

    def phase_peaks(self) -> dict[str, float]:
        """The largest moment of each phase of `Stepper.step` (merv_fast/train/step.py), without the persistent
        state: what `merv_fast.measure.step_memory.step_phase_peaks` measures."""
        return {phase: max(_sum(items) for name, items in self.events.items() if name.startswith(prefixes))
                for phase, prefixes in STEP_PHASES.items()}


def micro_batch_items(s: ModelShapes, w: Workload) -> dict[str, Item]:
    """The tensors of one micro-batch, by name (each used by several moments of the timeline)."""
    p, b = w.precision, w.micro_batch
    seq = w.max_text_tokens + s.visual_tokens
    tokens = b * seq
    d, k, v = s.hidden, s.pooled_width, s.vocab
    on_device_frames = w.frame_bytes * b if w.precision.name != "fp32" else 0.0
    # On a CPU the projection runs the release's computation (kernels/project_fuse.py's reference), whose weighted
    # sum saves every encoder's projected tokens; the fused op (Triton, on a GPU) saves only the pooled input.
    fusion = len(s.encoders) > 1
    stacked = b * len(s.encoders) * s.visual_tokens * d if fusion and w.precision.name == "fp32" else 0
    copies = 2 if w.prefetch else 1
    items = {
        "frames": Item("decoded frames on the device (uint8)" + (", this and the next micro-batch" if copies > 1
                                                                 else ""),
                       copies * on_device_frames, "decoded bytes per sample (SOURCE_FRAME_PIXELS x 3 x frames "
                                                  "unless the run's are known); on a CPU they are the batch itself"),
        "pixels": Item("encoder inputs" + (", this and the next micro-batch" if copies > 1 else ""),
                       copies * b * sum(e.frames * 3 * e.image_size ** 2 for e in s.encoders) * p.encoder,
                       f"frames x 3 x size^2 x {p.encoder} bytes per encoder"),
        "features": Item("encoder outputs", b * sum(e.feature_numel for e in s.encoders) * p.encoder,
                         f"[T, N, C] per encoder x {p.encoder} bytes"),
        "visual_saved": Item("visual path: pooled tokens, their means, concatenated projector weights" +
                             (", stacked projections (torch reference)" if stacked else ""),
                             (b * (s.visual_tokens + 1) * k + d * k + stacked) * p.act,
                             f"[B, L, K] + [D, K] {'+ [B, E, L, D] ' if stacked else ''}x {p.act} bytes"),
        "visual_out": Item("visual tokens [B, L, D]", b * s.visual_tokens * d * p.act, f"x {p.act} bytes"),
        "embeds": Item("LLM input embeddings", tokens * d * p.residual, f"[B, S, D] x {p.residual} bytes"),
        "mask": Item("boolean padding mask (sdpa)", b * seq * seq if ATTENTION_LAYOUT[w.attention]["dense_mask"]
                     else 0.0, "[B, 1, S, S] x 1 byte"),
        "final_norm": Item("final RMSNorm saved", tokens * (4 * d + 4 + p.residual * d), "fp32 input + normalised"),
        "final_out": Item("final hidden states", tokens * d * p.residual, f"[B, S, D] x {p.residual} bytes"),
    }
    supervised = b * w.max_text_tokens  # upper bound: every text token supervised
    if w.loss == "fused":
        chunk = min(supervised, max(1, CHUNK_ELEMENTS // v))
        transient = 4 * chunk * v + 4 * v * d
        if p.act != 4:  # the matmul-dtype logits and weight-gradient product before their fp32 copies
            transient += p.act * chunk * v + p.act * v * d
        if p.casts_weights:  # weight.to(bf16) of an fp32 LM head
            transient += p.act * v * d
        items["loss_saved"] = Item("fused loss: hidden-row gradients + LM-head fp32 weight gradient",
                                   supervised * d * p.residual + 4 * v * d,
                                   "supervised rows x D + vocab x D x 4 bytes (kernels/fused_linear_ce.py)")
        items["loss_transient"] = Item(f"fused loss: one chunk of {chunk} rows of logits + weight-gradient product",
                                       transient + supervised * d * p.residual,
                                       f"CHUNK_ELEMENTS={CHUNK_ELEMENTS} fp32 logits per chunk")
    else:
        items["loss_saved"] = Item("logits and fp32 log-softmax (plain loss)", tokens * v * (p.act + 4),
                                   "[B, S, V] x (act + 4) bytes")
        items["loss_transient"] = Item("fp32 logits copy (plain loss)", tokens * v * 4, "[B, S, V] x 4 bytes")
    return items


def _encoder_working_set(s: ModelShapes, w: Workload) -> list[tuple[str, float]]:
    width = w.precision.encoder * w.micro_batch
    out = []
    for e in s.encoders:
        live_i = ENCODER_LIVE_I.get(e.activation, ENCODER_LIVE_I["gelu"]).value
        live_c = ENCODER_LIVE_C.value + (1 if e.temporal else 0)
        out.append((e.name, width * e.sequences * e.seq_len * (live_c * e.width + live_i * e.intermediate)))
    return out


def _encoder_event(s: ModelShapes, w: Workload, items: dict[str, Item]) -> list[Item]:
    working = _encoder_working_set(s, w)
    feats = [w.micro_batch * e.feature_numel * w.precision.encoder for e in s.encoders]
    base = [items["frames"], items["pixels"]]
    if w.encoder_mode != "sequential" and w.precision.name != "fp32":  # all encoders at once on their streams
        return base + [Item("encoders' working sets (all at once)", sum(ws for _, ws in working),
                            "ENCODER_LIVE_C / ENCODER_LIVE_I per token, every encoder"), items["features"]]
    best, best_bytes = 0, -1.0
    for e, (_, ws) in enumerate(working):
        alive = sum(feats[:e + 1]) + ws
        if alive > best_bytes:
            best, best_bytes = e, alive
    name = working[best][0]
    return base + [Item(f"encoder outputs so far (through {name})", sum(feats[:best + 1]),
                        f"{w.precision.encoder} bytes"),
                   Item(f"{name} working set", working[best][1],
                        "(ENCODER_LIVE_C x C + ENCODER_LIVE_I x I) per token")]


def _gathered(s: ModelShapes, w: Workload) -> list[Item]:
    if not w.fsdp:
        return []
    return [Item("FSDP2: root unit unsharded (embeddings, LM head)", w.param_bytes * s.root_unit.numel(),
                 f"root shapes x {w.param_bytes} bytes (param_dtype)"),
            Item("FSDP2: decoder layers unsharded", FSDP_GATHERED_LAYERS.value * w.param_bytes * s.layer_params(),
                 f"FSDP_GATHERED_LAYERS x layer shapes x {w.param_bytes} bytes")]


def _accumulated(s: ModelShapes, w: Workload) -> list[Item]:
    if w.micro_batches <= 1:
        return []
    if w.fsdp:
        return [Item("unsharded gradients kept across no-sync micro-batches (FSDP2)",
                     w.reduce_bytes * s.trainable(), f"trainable x {w.reduce_bytes} bytes (reduce_dtype)")]
    return [Item("gradients accumulated across micro-batches", 4 * s.trainable(), "trainable x 4 bytes")]


def memory_plan(s: ModelShapes, w: Workload, capacity: Figure, reserved: Figure, headroom: Figure) -> MemoryPlan:
    p, seq = w.precision, w.max_text_tokens + s.visual_tokens
    tokens = w.micro_batch * seq
    d, v = s.hidden, s.vocab
    state = state_items(s, w)
    persistent = [state["parameters"], state["optimizer"], state["encoders"]]
    if w.encoder_mode == "graph" and p.name != "fp32":
        bucket = 1 << max(0, w.micro_batch - 1).bit_length()
        pool = sum(ws for _, ws in _encoder_working_set(s, w)) * bucket / w.micro_batch
        persistent.append(Item("CUDA graph of the encoders: static inputs, outputs and memory pool",
                               pool + 2 * sum(e.feature_numel for e in s.encoders) * bucket * p.encoder,
                               f"working sets at the batch bucket {bucket}"))
    items = micro_batch_items(s, w)
    held = [items["frames"], items["pixels"], items["features"]] + _accumulated(s, w) + _gathered(s, w)
    layers = [_layer_activation(s, w, tokens, i) for i in range(s.layers)]
    copies = [_layer_weight_copies(s, w, i) for i in range(s.layers)]
    note = f"{w.checkpointing} checkpointing, layer shapes x tokens"

    def saved(upto: int, with_copies: bool = True) -> Item:
        """Layers 0..upto-1's saved tensors (with the weight copies they saved, outside the forward's cache)."""
        extra = sum(copies[:upto]) if with_copies else 0.0
        return Item(f"decoder layers 0..{upto - 1}: saved tensors", sum(layers[:upto]) + extra, note)

    # The input embeddings are layer 0's saved input (checkpointed) or its RMSNorm's saved input (an fp32 stream);
    # a bf16 stream's norm saves an fp32 copy instead, and the embeddings live until the forward returns.
    embeds_in_forward = [] if (not w.checkpointed(0) and p.residual == 4) else [items["embeds"]]
    embeds_saved = [items["embeds"]] if w.checkpointed(0) else []
    # Under autocast the cache holds every projection weight's bf16 copy until the forward returns (the copies
    # non-checkpointed layers save are those same tensors).
    cache = ([Item("autocast's bf16 weight copies (whole forward)", 2 * s.layers * layer_linear_params(s),
                   "every projection weight x 2 bytes")] if p.casts_weights else [])
    visual = [items["visual_saved"], items["mask"]]
    events: dict[str, list[Item]] = {"encoders": _encoder_event(s, w, items) + _accumulated(s, w)}
    last = s.layers - 1
    running = (Item("last layer running (checkpointed: its MLP's live tensors)", tokens * (
        CHECKPOINTED_FORWARD_I.value * p.act * s.intermediate + CHECKPOINTED_FORWARD_D.value * p.residual * d),
        "CHECKPOINTED_FORWARD_I x I + CHECKPOINTED_FORWARD_D x D per token") if w.checkpointed(last) else
               Item("last layer's saved tensors", layers[last], note))
    events["forward: last decoder layer"] = (held + visual + [saved(last, False), running] + embeds_in_forward +
                                             cache + [items["visual_out"]])
    events["forward end (loss)"] = (held + visual + [saved(s.layers, False), items["final_norm"]] +
                                    embeds_in_forward + cache + [items["visual_out"], items["final_out"],
                                                                 items["loss_saved"], items["loss_transient"]])
    head_grad = Item("LM-head gradient (unsharded)", v * d * (w.param_bytes if w.fsdp else 4),
                     f"vocab x D x {w.param_bytes if w.fsdp else 4} bytes")
    events["backward: loss"] = (held + visual + [saved(s.layers), items["final_norm"]] + embeds_saved + [
        items["loss_saved"], Item(
        "LM-head gradient being scaled", 4 * v * d + (w.param_bytes * v * d if w.fsdp and w.param_bytes != 4 else 0),
        "vocab x D x 4 bytes (+ its param_dtype copy)")])
    grad_per_layer = [4 * u.numel(True) / (w.shard_group if w.fsdp else 1) for u in s.decoder_units]
    workspace_per_token = (BACKWARD_WORKSPACE_I.value * p.act * s.intermediate +
                           BACKWARD_WORKSPACE_D.value * p.residual * d)
    for layer in reversed(range(s.layers)):
        live = [*held, *visual, *embeds_saved, head_grad, saved(layer + 1),
                Item(f"gradients of layers {layer + 1}..{s.layers - 1}", sum(grad_per_layer[layer + 1:]),
                     "fp32" + (" shards" if w.fsdp else "")),
                Item("hidden-state gradient", tokens * d * p.residual, f"[B, S, D] x {p.residual} bytes"),
                Item("layer backward workspace", tokens * workspace_per_token,
                     "BACKWARD_WORKSPACE_I x I + BACKWARD_WORKSPACE_D x D per token")]
        if w.checkpointed(layer):
            live.append(Item("recomputed layer", _sum(layer_saved_per_token(s, w)) * tokens +
                             (2 * layer_linear_params(s) if p.casts_weights else 0), "layer shapes x tokens"))
        n = s.decoder_units[layer].numel(True)
        live.append(Item("this layer's gradients" + (" (unsharded + reduce-scatter input)" if w.fsdp else ""),
                         n * ((w.param_bytes + w.reduce_bytes) if w.fsdp else 4) +
                         (2 * layer_linear_params(s) if p.casts_weights else 0),
                         "layer shapes x bytes"))
        events[f"backward: layer {layer}"] = live
    optimizer_temp = 0 if p.fused_optimizer else 4 * shard_numel(s, w.shard_group if w.fsdp else 1,
                                                                 trainable=True)
    events["optimizer step"] = [*held[:3], state["gradients"], Item(
        "AdamW temporaries", optimizer_temp, "fused AdamW: none" if p.fused_optimizer else
        "foreach AdamW: one parameter-sized sqrt(v) buffer")]
    peak_event = max(events, key=lambda e: _sum(events[e]))
    peak = _sum(persistent) + _sum(events[peak_event])
    needed = peak * (1 + headroom.value) + reserved.value
    return MemoryPlan(persistent, events, peak_event, peak, needed, capacity.value, state)
