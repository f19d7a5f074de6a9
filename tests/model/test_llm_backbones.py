"""The release's LLM backbones (merv/models/backbones/llm/*.py): full-size shapes on meta, and each one's tiny variant
(same architecture, prompt format, pad and BOS handling) through tokenisation, splice, loss and gradients, against
the release's computation written out with plain transformers calls; local checkpoints of each tokenizer family."""

import dataclasses

import pytest
import torch

from merv_fast.config import LLM_BACKBONES, ConfigError, llm_backbone, load_config
from merv_fast.data.prompts import IGNORE_INDEX, tokenize_conversation, wrap_turns
from merv_fast.model.llm import build_llm, build_tokenizer
from merv_fast.model.merv import build_model
from merv_fast.testing import tiny_tokenizer_for, tokenizer_family
from merv_fast.model.llm import training_tokenizer

# Parameter counts as each model card states them (the vocabulary before the release's pad row is added).
PUBLISHED_PARAMS = {"llama2-7b-pure": 6_738_415_616, "llama2-13b-pure": 13_015_864_320,
                    "llama3-8b-pure": 8_030_261_248, "llama3.1-8b-chat": 8_030_261_248,
                    "qwen2.5-3b-instruct": 3_085_938_688, "qwen2.5-7b-instruct": 7_615_616_512}

CONVERSATION = [{"from": "human", "value": "<video>\nWhat is the man doing?"},
                {"from": "gpt", "value": "He is playing a guitar."},
                {"from": "human", "value": "What color is it?"},
                {"from": "gpt", "value": "It is blue."}]


@pytest.mark.parametrize("backbone", sorted(PUBLISHED_PARAMS))
def test_full_size_backbone_matches_its_model_card(backbone):
    cfg = llm_backbone(backbone)
    with torch.device("meta"):
        llm = build_llm(cfg)
    added_rows = cfg.padded_vocab_size - cfg.vocab_size
    head = 0 if cfg.tie_word_embeddings else added_rows * cfg.hidden_size
    assert sum(p.numel() for p in llm.parameters()) == PUBLISHED_PARAMS[backbone] + added_rows * cfg.hidden_size + head
    assert (llm.get_output_embeddings().weight is llm.get_input_embeddings().weight) == cfg.tie_word_embeddings
    # Llama-2/3 get `<PAD>` and 64-row padding (32064, 128320); Llama-3.1 and Qwen2.5 keep their tables.
    assert cfg.padded_vocab_size == {"llama2": 32064, "llama3": 128320 if cfg.add_pad_token else 128256,
                                     "qwen2": cfg.vocab_size}[tokenizer_family(backbone)]


def test_backbone_table_follows_the_release_builders():
    formats = {b: llm_backbone(b).prompt_format for b in LLM_BACKBONES}
    assert formats == {"llama2-7b-pure": "llama2-base", "llama2-13b-pure": "llama2-base",
                       "llama2-7b-chat": "llama2-chat", "llama2-13b-chat": "llama2-chat",
                       "vicuna-v15-7b": "vicuna-v15", "vicuna-v15-13b": "vicuna-v15",
                       "llama3-8b-pure": "llama2-base", "llama3-8b-chat": "llama2-chat",
                       "llama3.1-8b-chat": "llama3-chat",
                       "qwen2.5-3b-instruct": "qwen25-chat", "qwen2.5-7b-instruct": "qwen25-chat",
                       "tinyllama-1.1b": "llama2-base"}  # ours (merv-1b), not a release backbone
    assert [b for b in LLM_BACKBONES if not llm_backbone(b).has_bos] == ["qwen2.5-3b-instruct", "qwen2.5-7b-instruct"]
    assert llm_backbone("llama3.1-8b-chat").rope_scaling["rope_type"] == "llama3"
    cfg = load_config("merv-7b", overrides={"llm": "vicuna-v15-13b", "llm.max_text_tokens": 1024})
    assert (cfg.llm.backbone, cfg.llm.num_layers, cfg.llm.max_text_tokens) == ("vicuna-v15-13b", 40, 1024)
    with pytest.raises(ConfigError, match="unknown LLM backbone 'mistral-7b'"):
        load_config("tiny", overrides={"llm": "mistral-7b"})


def release_reference(model, ids, labels, visual, has_bos):
    """The release's MERV.forward, written out: visual tokens after BOS (`bos_token_length` 1, or 0 without BOS),
    labelled IGNORE_INDEX, then the LLM's own loss (transformers' shifted cross-entropy)."""
    p = 1 if has_bos else 0
    embeds = model.llm.get_input_embeddings()(ids)
    embeds = torch.cat([embeds[:, :p], visual, embeds[:, p:]], dim=1)
    labels = torch.cat([labels[:, :p], torch.full(visual.shape[:2], IGNORE_INDEX), labels[:, p:]], dim=1)
    out = model.llm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                    labels=labels)
    return embeds, out.loss


@pytest.mark.parametrize("backbone", list(LLM_BACKBONES))
def test_tiny_backbone_end_to_end(backbone):
    cfg = load_config("single-tiny", overrides={"llm": f"tiny-{backbone}", "kernels": "torch"})
    llm_cfg = cfg.llm
    torch.manual_seed(0)
    model = build_model(config=cfg)
    tokenizer = training_tokenizer(cfg.llm)
    assert type(model.llm).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
        llm_cfg.architecture]
    if llm_cfg.rope_scaling:
        assert model.llm.config.rope_parameters["rope_type"] == "llama3"

    # Pad: `<PAD>` added after the vocabulary (Llama-2/3, Vicuna), or an existing token (Llama-3.1, Qwen2.5).
    if llm_cfg.add_pad_token:
        assert tokenizer.pad_token == "<PAD>" and tokenizer.pad_token_id == len(tokenizer) - 1
    else:
        assert tokenizer.pad_token == llm_cfg.pad_token and tokenizer.pad_token_id < len(tokenizer)
    assert len(tokenizer) <= model.llm.get_input_embeddings().weight.shape[0] == llm_cfg.padded_vocab_size

    # Prompt and labels: each release turn string tokenised on its own, BOS (where the tokenizer has one) on turn 0.
    ids, labels = tokenize_conversation(CONVERSATION, tokenizer, llm_cfg.prompt_format, 256, has_visual=True)
    expected_ids, expected_labels = [], []
    for index, text in enumerate(wrap_turns(CONVERSATION, llm_cfg.prompt_format)):
        turn = tokenizer(text.rstrip(), add_special_tokens=index == 0).input_ids
        expected_ids += turn
        expected_labels += turn if index % 2 else [IGNORE_INDEX] * len(turn)
    expected_labels[0] = IGNORE_INDEX
    assert (ids, labels) == (expected_ids, expected_labels)
    if llm_cfg.has_bos:
        assert ids[0] == tokenizer.bos_token_id
    else:
        assert tokenizer.bos_token is None and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")

    # Splice, loss and gradients against the release's computation on the same weights.
    ids_t, labels_t = torch.tensor([ids]), torch.tensor([labels])
    visual = torch.randn(1, 6, llm_cfg.hidden_size)
    embeds, mask, _ = model.spliced_inputs(ids_t, torch.ones_like(ids_t), labels_t, visual)
    ref_embeds, ref_loss = release_reference(model, ids_t, labels_t, visual, llm_cfg.has_bos)
    assert torch.equal(embeds, ref_embeds) and bool(mask.all())
    grads = {}
    for name, run in (("ours", lambda: model.language_model_forward(ids_t, torch.ones_like(ids_t), labels_t, visual,
                                                                    loss="fused").loss),
                      ("release", lambda: release_reference(model, ids_t, labels_t, visual, llm_cfg.has_bos)[1])):
        model.zero_grad(set_to_none=True)
        loss = run()
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.llm.named_parameters()})
    torch.testing.assert_close(grads["ours"][0], ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for n, g in grads["release"][1].items():
        torch.testing.assert_close(grads["ours"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.fixture(scope="module", params=["vicuna-v15-7b", "llama3.1-8b-chat", "qwen2.5-3b-instruct"])
def checkpoint(request, tmp_path_factory):
    """A tiny checkpoint of each tokenizer family as Hugging Face saves it (unpadded vocabulary, its tokenizer)."""
    backbone = request.param
    directory = tmp_path_factory.mktemp(backbone)
    tokenizer = tiny_tokenizer_for(backbone)
    cfg = dataclasses.replace(llm_backbone(f"tiny-{backbone}"), vocab_size=len(tokenizer), add_pad_token=False,
                              pad_to_multiple_of=1)
    torch.manual_seed(0)
    build_llm(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return backbone, directory, len(tokenizer)


def test_local_checkpoint_of_each_family_loads_with_its_pad_and_bos(checkpoint):
    backbone, directory, vocab = checkpoint
    cfg = dataclasses.replace(llm_backbone(f"tiny-{backbone}"), vocab_size=vocab, weights=str(directory))
    llm, tokenizer = build_llm(cfg), build_tokenizer(cfg)
    assert llm.get_input_embeddings().weight.shape[0] == cfg.padded_vocab_size
    assert (llm.get_output_embeddings().weight is llm.get_input_embeddings().weight) == cfg.tie_word_embeddings
    assert tokenizer.pad_token == (cfg.pad_token or "<PAD>") and tokenizer.padding_side == "right"
    assert (tokenizer("A").input_ids[0] == tokenizer.bos_token_id) == cfg.has_bos


def test_checkpoint_of_another_backbone_is_refused(checkpoint):
    backbone, directory, vocab = checkpoint
    cfg = dataclasses.replace(llm_backbone(f"tiny-{backbone}"), vocab_size=vocab, weights=str(directory))
    with pytest.raises(ValueError, match=r"config.json: num_hidden_layers=2, but llm.num_layers is 3"):
        build_llm(dataclasses.replace(cfg, num_layers=3))
    other = "llama" if cfg.architecture == "qwen2" else "qwen2"
    with pytest.raises(ValueError, match=f"model_type '{cfg.architecture}', but llm.architecture is '{other}'"):
        build_llm(dataclasses.replace(cfg, architecture=other))
    with pytest.raises(ValueError, match=f"llm.has_bos is {not cfg.has_bos}"):
        build_tokenizer(dataclasses.replace(cfg, has_bos=not cfg.has_bos))
    if not cfg.add_pad_token:
        with pytest.raises(ValueError, match="llm.pad_token '<nope>' is not a token"):
            build_tokenizer(dataclasses.replace(cfg, pad_token="<nope>"))
