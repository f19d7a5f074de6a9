"""LLM construction (meta, random, from a local checkpoint), tokenizer pad handling, and visual-token splicing."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from merv_fast.config import get_preset, llama2_7b
from merv_fast.data.prompts import IGNORE_INDEX, tokenize_conversation
from merv_fast.model.llm import build_llm, build_tokenizer, splice_visual_tokens
from merv_fast.testing import tiny_llama_tokenizer


def tiny_cfg(**changes):
    return dataclasses.replace(get_preset("tiny").llm, **changes)


def test_padded_vocab_follows_release():
    assert llama2_7b().padded_vocab_size == 32064  # 32000 + <PAD>, rounded up to 64
    assert dataclasses.replace(llama2_7b(), vocab_size=32063).padded_vocab_size == 32064
    assert dataclasses.replace(llama2_7b(), vocab_size=32064).padded_vocab_size == 32128
    assert dataclasses.replace(llama2_7b(), add_pad_token=False).padded_vocab_size == 32000


def test_7b_builds_on_meta_without_memory():
    with torch.device("meta"):
        model = build_llm(llama2_7b())
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.get_input_embeddings().weight.shape == (32064, 4096)
    assert model.get_output_embeddings().weight.shape == (32064, 4096)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight  # untied, as Llama-2
    assert model.config._attn_implementation == "sdpa"
    assert len(model.model.layers) == 32
    assert 6.7e9 < sum(p.numel() for p in model.parameters()) < 6.8e9


def test_tiny_llm_sizes():
    cfg = tiny_cfg()
    model = build_llm(cfg)
    assert model.get_input_embeddings().weight.shape == (cfg.padded_vocab_size, cfg.hidden_size) == (512, 64)
    assert model.config.num_key_value_heads == cfg.num_kv_heads
    assert model.config.pad_token_id == cfg.vocab_size


def test_missing_weights_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        build_llm(tiny_cfg(weights=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="config.json"):
        build_llm(tiny_cfg(weights=str(tmp_path)))
    with pytest.raises(ValueError, match="config.json"):
        build_tokenizer(tiny_cfg(weights=str(tmp_path)))
    assert build_tokenizer(tiny_cfg()) is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama checkpoint with an unpadded 400-token vocabulary, and its tokenizer, as HF saves them."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = tiny_llama_tokenizer()
    torch.manual_seed(0)
    source = build_llm(tiny_cfg(vocab_size=len(tokenizer), add_pad_token=False, pad_to_multiple_of=1))
    source.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, source


def test_checkpoint_loads_and_pads_vocab(checkpoint):
    directory, source = checkpoint
    cfg = tiny_cfg(vocab_size=400, weights=str(directory))
    model = build_llm(cfg)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape[0] == head.shape[0] == cfg.padded_vocab_size == 448
    torch.testing.assert_close(embed[:400], source.get_input_embeddings().weight)
    torch.testing.assert_close(head[:400], source.get_output_embeddings().weight)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, source.model.layers[1].mlp.down_proj.weight)
    # New rows drawn like transformers 4.44 did (N(0, 0.02)), not from the old rows' mean.
    assert 0.015 < embed[400:].std().item() < 0.025 and abs(embed[400:].mean().item()) < 0.005
    assert model.config.pad_token_id == 400

    tokenizer = build_tokenizer(cfg)
    assert tokenizer.pad_token == "<PAD>" and tokenizer.pad_token_id == 400 and len(tokenizer) == 401
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == cfg.max_text_tokens
    assert tokenizer("A man").input_ids[0] == tokenizer.bos_token_id


def test_checkpoint_larger_than_config_is_refused(checkpoint):
    directory, _ = checkpoint
    with pytest.raises(ValueError, match="vocab_size"):
        build_llm(tiny_cfg(vocab_size=100, weights=str(directory)))


def test_incomplete_checkpoint_is_refused(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ValueError, match=str(tmp_path)):  # config but no weight file
        build_llm(tiny_cfg(vocab_size=400, weights=str(tmp_path)))
    state = load_file(str(directory / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        build_llm(tiny_cfg(vocab_size=400, weights=str(tmp_path)))


def test_splice_places_visual_tokens_after_bos():
    batch, length, dim, num_visual = 2, 5, 3, 4
    text = torch.arange(batch * length * dim, dtype=torch.float32).view(batch, length, dim)
    visual = -torch.arange(1, batch * num_visual * dim + 1, dtype=torch.float32).view(batch, num_visual, dim)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, 7, 8, 9, 10], [IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX]])

    embeds, new_mask, new_labels = splice_visual_tokens(text, mask, labels, visual)
    assert embeds.shape == (batch, length + num_visual, dim)
    torch.testing.assert_close(embeds[:, :1], text[:, :1])
    torch.testing.assert_close(embeds[:, 1:1 + num_visual], visual)
    torch.testing.assert_close(embeds[:, 1 + num_visual:], text[:, 1:])
    assert new_mask.tolist() == [[1] * 9, [1, 1, 1, 1, 1, 1, 1, 0, 0]] and new_mask.dtype == mask.dtype
    assert new_labels.tolist() == [[IGNORE_INDEX] * 5 + [7, 8, 9, 10], [IGNORE_INDEX] * 5 + [5, 6] + [IGNORE_INDEX] * 2]

    embeds, none_mask, none_labels = splice_visual_tokens(text, None, None, visual)
    assert none_mask is None and none_labels is None and embeds.shape == (batch, length + num_visual, dim)

    # Tokenizers without BOS (Qwen2.5): the visual tokens lead.
    embeds, _, new_labels = splice_visual_tokens(text, mask, labels, visual, prefix_length=0)
    torch.testing.assert_close(embeds[:, :num_visual], visual)
    assert new_labels[0].tolist() == [IGNORE_INDEX] * 5 + [7, 8, 9, 10]

    with pytest.raises(ValueError):
        splice_visual_tokens(text, mask, labels, visual[:, :, :2])
    with pytest.raises(ValueError):
        splice_visual_tokens(text, mask, labels, visual[:1])


def test_tiny_llm_loss_with_visual_tokens_matches_manual_cross_entropy():
    torch.manual_seed(0)
    tokenizer = tiny_llama_tokenizer()
    cfg = tiny_cfg()
    model = build_llm(cfg).eval()
    conversations = [
        [{"from": "human", "value": "<video>\nWhat is the man doing?"}, {"from": "gpt", "value": "Playing a guitar."},
         {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "It is blue."},
         {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "I do not know."}],
        [{"from": "human", "value": "<video>\nDescribe the video."}, {"from": "gpt", "value": "A dog runs."}],
    ]
    samples = [tokenize_conversation(c, tokenizer, cfg.prompt_format, cfg.max_text_tokens, True)
               for c in conversations]
    length = max(len(ids) for ids, _ in samples)
    pad_id = cfg.vocab_size  # right padding, masked out and ignored
    input_ids = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _ in samples])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for _, lab in samples])
    mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in samples])

    visual = torch.randn(2, 6, cfg.hidden_size)
    embeds, mask, labels = splice_visual_tokens(model.get_input_embeddings()(input_ids), mask, labels, visual)
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.loss)

    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    supervised = targets != IGNORE_INDEX
    manual = F.cross_entropy(logits[supervised], targets[supervised])
    torch.testing.assert_close(out.loss, manual)
    assert supervised.sum() == sum(sum(lab != IGNORE_INDEX for lab in labs) for _, labs in samples)

    # Padding (masked, labelled IGNORE_INDEX) carries no loss: scrambling its embeddings leaves the loss as is.
    scrambled = embeds.clone()
    scrambled[mask == 0] = torch.randn_like(scrambled[mask == 0]) * 100
    torch.testing.assert_close(model(inputs_embeds=scrambled, attention_mask=mask, labels=labels).loss, out.loss)
