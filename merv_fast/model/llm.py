"""The language model: building it (random or from a local checkpoint), its tokenizer, and visual-token splicing.

Follows the release's LLM backbones (merv/models/backbones/llm/): Llama-2, Vicuna and Llama-3 get a pad token
`<PAD>` added to the tokenizer, and the embedding table (and the untied LM head) is resized to `len(tokenizer)`
rounded up to a multiple of 64 (Llama-2: 32000 + 1 -> 32064), the new rows drawn from N(0, initializer_range) as
transformers 4.44 (the release's pin) did; Llama-3.1 and Qwen2.5 keep their vocabulary and use an existing token as
pad.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merv_fast.config import LLM_LOSSES, LLMConfig
from merv_fast.kernels.fused_linear_ce import linear_cross_entropy
from merv_fast.model.attention import Documents, backend_of, install, resolve_attention

IGNORE_INDEX = -100
PAD_TOKEN = "<PAD>"


def llama_config(cfg: LLMConfig):
    """The transformers config of `cfg.architecture` (a `LlamaConfig`, or Qwen2's) with `cfg`'s sizes and the padded
    vocabulary."""
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[cfg.architecture]
    extra = {"rope_scaling": dict(cfg.rope_scaling)} if cfg.rope_scaling else {}  # transformers edits the dict
    return config_class(
        **extra,
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=1 if cfg.has_bos else None,
        eos_token_id=2,
        use_cache=False,  # training default, as in the release; generation turns it back on
        attn_implementation="sdpa",
    )


def _check_weights_dir(path: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"LLM weights directory {str(directory)!r} does not exist")
    if not (directory / "config.json").is_file():
        raise ValueError(f"LLM weights directory {str(directory)!r} has no config.json")
    return directory


def build_llm(cfg: LLMConfig):
    """A causal LM: random Llama from `cfg`'s sizes when `cfg.weights` is None, else loaded from that local directory.

    Builds under any device context (`with torch.device("meta")` allocates nothing). A loaded checkpoint is resized
    to `cfg.padded_vocab_size` when smaller; every weight must come from the checkpoint (never silently random).
    """
    if cfg.weights is None:
        import transformers

        model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}
        model = model_class[cfg.architecture](llama_config(cfg))
        if cfg.add_pad_token:
            model.config.pad_token_id = cfg.vocab_size  # the id `<PAD>` gets when added to a `vocab_size` tokenizer
        attach_attention(model, cfg)
        return model

    from transformers import AutoModelForCausalLM

    directory = _check_weights_dir(cfg.weights)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, attn_implementation="sdpa", output_loading_info=True)
    except OSError as err:  # e.g. config.json present but no weight files
        raise ValueError(f"cannot load LLM weights from {str(directory)!r}: {err}") from err
    if info.get("missing_keys"):
        raise ValueError(f"LLM checkpoint {str(directory)!r} lacks weights {sorted(info['missing_keys'])[:8]}; "
                         "refusing to train from randomly initialised ones")
    check_checkpoint_config(model.config, cfg, directory)
    resize_embeddings(model, cfg)
    model.config.use_cache = False
    attach_attention(model, cfg)
    return model


# (our field, the checkpoint config's attribute) pairs that must agree: a checkpoint of another backbone than the
# configured one would otherwise load wherever the shapes allow.
_CHECKED_FIELDS = (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                   ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                   ("intermediate_size", "intermediate_size"), ("tie_word_embeddings", "tie_word_embeddings"))
_ARCHITECTURE_OF = {"llama": "llama", "qwen2": "qwen2"}  # our name -> transformers' model_type


def check_checkpoint_config(hf_config, cfg: LLMConfig, directory: Path) -> None:
    """Refuse a checkpoint whose config.json describes another LLM than `cfg`, naming the field and both values."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != _ARCHITECTURE_OF[cfg.architecture]:
        raise ValueError(f"{directory / 'config.json'}: model_type {model_type!r}, but llm.architecture is "
                         f"{cfg.architecture!r} (llm.backbone {cfg.backbone!r})")
    for ours, theirs in _CHECKED_FIELDS:
        value = getattr(hf_config, theirs, None)
        if value != getattr(cfg, ours):
            raise ValueError(f"{directory / 'config.json'}: {theirs}={value!r}, but llm.{ours} is "
                             f"{getattr(cfg, ours)!r} (llm.backbone {cfg.backbone!r}); set llm to this checkpoint's "
                             "backbone")


def attach_attention(model, cfg: LLMConfig) -> tuple[str, str]:
    """Resolve `cfg.attention` for the device the model lives on (meta: the machine's) and install it; -> (backend,
    why). CUDA assumes the trainer's bf16 activations."""
    device = next(model.parameters()).device
    if device.type == "meta":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend, why = resolve_attention(cfg.attention, device, torch.bfloat16 if device.type == "cuda" else None)
    install(model, backend)
    return backend, why


def resize_embeddings(model, cfg: LLMConfig) -> None:
    """Grow the input and output embeddings to `cfg.padded_vocab_size`, like the release's `resize_token_embeddings(
    len(tokenizer), pad_to_multiple_of=64)`; a checkpoint with more rows than that means `cfg.vocab_size` is wrong."""
    rows = model.get_input_embeddings().weight.shape[0]
    target = cfg.padded_vocab_size
    if rows > target:
        raise ValueError(f"checkpoint has {rows} embedding rows but llm.vocab_size={cfg.vocab_size} pads to only "
                         f"{target}; set llm.vocab_size to the tokenizer's size")
    if rows < target:
        # mean_resizing=False: new rows ~ N(0, initializer_range), the release's (transformers 4.44) behaviour.
        model.resize_token_embeddings(target, mean_resizing=False)
    if cfg.add_pad_token:
        model.config.pad_token_id = cfg.vocab_size


def add_pad_token(tokenizer, token: str | None = None) -> int:
    """Add `token` (default `<PAD>`) as the pad token (the release's Llama-2/Llama-3 handling); returns its id."""
    tokenizer.add_special_tokens({"pad_token": token or PAD_TOKEN})
    return tokenizer.pad_token_id


def set_pad_token(tokenizer, cfg: LLMConfig, source: str) -> None:
    """The pad token `cfg` asks for: added (`add_pad_token`), an existing token (`pad_token`: the release set
    Llama-3.1's `<|finetune_right_pad_id|>`), else the tokenizer's own or EOS. Only the id that fills padded positions
    depends on it: they are never attended or supervised (the mask comes from the sample lengths, see collate.py)."""
    if cfg.add_pad_token:
        add_pad_token(tokenizer, cfg.pad_token)
    elif cfg.pad_token is not None:
        if cfg.pad_token not in tokenizer.get_vocab():
            raise ValueError(f"{source}: llm.pad_token {cfg.pad_token!r} is not a token of this tokenizer")
        tokenizer.pad_token = cfg.pad_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def check_bos(tokenizer, cfg: LLMConfig, source: str) -> None:
    """`llm.has_bos` must say what the tokenizer does: the release puts the visual tokens after BOS exactly when the
    tokenizer has one (Qwen2.5's has none: they lead)."""
    starts = tokenizer("A", add_special_tokens=True).input_ids[:1] == [tokenizer.bos_token_id]
    has_bos = tokenizer.bos_token is not None and starts
    if has_bos != cfg.has_bos:
        raise ValueError(f"{source}: the tokenizer {'starts' if has_bos else 'does not start'} sequences with a BOS "
                         f"token but llm.has_bos is {cfg.has_bos} (llm.backbone {cfg.backbone!r})")


def build_tokenizer(cfg: LLMConfig):
    """The tokenizer from `cfg.tokenizer` or else `cfg.weights` (a local directory), with the pad token set; None
    without either. Right padding and `model_max_length = cfg.max_text_tokens`, as the release."""
    if cfg.tokenizer is None and cfg.weights is None:
        return None
    from transformers import AutoTokenizer

    directory = Path(cfg.tokenizer) if cfg.tokenizer is not None else _check_weights_dir(cfg.weights)
    if not directory.is_dir():
        raise ValueError(f"tokenizer directory {str(directory)!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                              model_max_length=cfg.max_text_tokens, padding_side="right")
    set_pad_token(tokenizer, cfg, f"tokenizer in {str(directory)!r}")
    check_bos(tokenizer, cfg, f"tokenizer in {str(directory)!r}")
    if len(tokenizer) > cfg.padded_vocab_size:
        raise ValueError(f"tokenizer in {str(directory)!r} has {len(tokenizer)} tokens, more than the "
                         f"{cfg.padded_vocab_size} embedding rows")
    return tokenizer


def training_tokenizer(cfg: LLMConfig):
    """The tokenizer training and evaluation use: `cfg.tokenizer`'s or `cfg.weights`'s, or for a random-init LLM (the
    test presets) the in-process tiny tokenizer of the backbone's family, with the same pad and BOS handling."""
    tokenizer = build_tokenizer(cfg)
    if tokenizer is None:
        from merv_fast.testing import tiny_tokenizer_for

        tokenizer = tiny_tokenizer_for(cfg.backbone, vocab_size=min(400, cfg.vocab_size))
        set_pad_token(tokenizer, cfg, f"the tiny {cfg.backbone} tokenizer")
        check_bos(tokenizer, cfg, f"the tiny {cfg.backbone} tokenizer")
    return tokenizer


def splice_visual_tokens(text_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                         labels: torch.Tensor | None, visual: torch.Tensor, prefix_length: int = 1):
    """Insert `visual` [B, V, D] after the first `prefix_length` text positions of `text_embeds` [B, S, D].

    The release puts the visual tokens right after BOS (`prefix_length=1`; 0 for tokenizers without BOS, e.g.
    Qwen2.5). The visual positions get attention-mask 1 and label IGNORE_INDEX. Returns (embeds [B, S+V, D],
    mask [B, S+V] or None, labels [B, S+V] or None).
    """
    batch, length, dim = text_embeds.shape
    if visual.dim() != 3 or visual.shape[0] != batch or visual.shape[2] != dim:
        raise ValueError(f"visual tokens {tuple(visual.shape)} do not match text embeddings {tuple(text_embeds.shape)}")
    if not 0 <= prefix_length <= length:
        raise ValueError(f"prefix_length {prefix_length} outside 0..{length}")
    num_visual = visual.shape[1]
    p = prefix_length
    embeds = torch.cat([text_embeds[:, :p], visual, text_embeds[:, p:]], dim=1)
    if attention_mask is not None:
        ones = attention_mask.new_ones(batch, num_visual)
        attention_mask = torch.cat([attention_mask[:, :p], ones, attention_mask[:, p:]], dim=1)
    if labels is not None:
        ignored = labels.new_full((batch, num_visual), IGNORE_INDEX)
        labels = torch.cat([labels[:, :p], ignored, labels[:, p:]], dim=1)
    return embeds, attention_mask, labels


def llm_forward(llm, embeds: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                documents: Documents | None = None,
                position_ids: torch.Tensor | None = None, num_items_in_batch: torch.Tensor | None = None,
                loss: str = "plain", **llm_kwargs):
    """The LLM on (already spliced) input embeddings, with the attention `llm` has installed.

    `documents` describes packed rows (merv_fast/train/packing.py; `attention_mask` is then None): transformers'
    sdpa gets their dense block-diagonal causal mask (a 4-D mask passes through as is), the other backends
    (`sdpa_packed` among them, which packed training installs in place of sdpa) the layout itself. Unpacked
    training batches reach the non-sdpa backends as one document per row plus its padding tail.
    `loss`: "plain" is transformers' loss on full logits; "fused" (the trainer passes `llm.loss`) is
    kernels/fused_linear_ce.py's, and returns no logits. `num_items_in_batch` given: the SUM of per-token losses
    divided by it (transformers' convention), else the mean over the supervised tokens.
    """
    backend = backend_of(llm)
    if documents is None and labels is not None and attention_mask is not None and backend not in ("sdpa", None):
        documents = Documents.from_padding_mask(attention_mask)
    if documents is not None:
        if backend is None:
            raise ValueError(f"packed rows need one of merv_fast's attention backends, not "
                             f"{llm.config._attn_implementation!r}")
        if backend == "sdpa":
            attention_mask = documents.dense_mask()
        else:
            attention_mask = None
            llm_kwargs["documents"] = documents
    head = llm.get_output_embeddings()
    if loss not in LLM_LOSSES:
        raise ValueError(f"loss={loss!r}; choose one of {list(LLM_LOSSES)}")
    fused = labels is not None and loss == "fused" and isinstance(head, torch.nn.Linear) and head.bias is None
    if not fused:
        if num_items_in_batch is not None:
            llm_kwargs["num_items_in_batch"] = num_items_in_batch
        return llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, position_ids=position_ids,
                   **llm_kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            **llm_kwargs)
    value = linear_cross_entropy(out.last_hidden_state, head.weight, labels, ignore_index=IGNORE_INDEX,
                                 reduction="mean" if num_items_in_batch is None else "sum",
                                 divisor=num_items_in_batch)
    return CausalLMOutputWithPast(loss=value)
