"""`visual.init_seed`: the projectors and the fusion start from the release's initial weights when seeded as the
release seeds them (merv/models/vidlms/merv.py: `torch.manual_seed(video_backbones[0].embed_dim)`, then each
projector's Linear, then `CrossAttentionAdapterLearnableQuery`: an nn.MultiheadAttention, then its query `Q`)."""

import pytest
import torch
from torch import nn

from merv_fast.config import ConfigError, load_config
from merv_fast.model.merv import build_model


def release_visual_init(encoder_widths, llm_dim, fusion_dim, seed):
    """The release's construction, with torch's own modules: what its MERV constructor draws after seeding."""
    torch.manual_seed(seed)
    projectors = [nn.Linear(width, llm_dim, bias=True) for width in encoder_widths]  # LinearProjector
    if len(encoder_widths) == 1:
        return projectors, None, None
    attention = nn.MultiheadAttention(embed_dim=fusion_dim, num_heads=1, dropout=0.0, batch_first=True,
                                      kdim=llm_dim, vdim=llm_dim)
    query = nn.Parameter(torch.empty(1, fusion_dim))
    nn.init.xavier_uniform_(query)
    return projectors, attention, query


@pytest.mark.parametrize("preset", ["tiny", "single-tiny"])
def test_release_seed_reproduces_the_release_initial_weights(preset):
    cfg = load_config(preset, overrides={"visual.init_seed": "release", "kernels": "torch"})
    torch.manual_seed(123)
    state = torch.get_rng_state()  # the encoders and the LLM draw from the caller's stream
    model = build_model(config=cfg)
    widths = [e.hidden_size for e in cfg.encoders]
    projectors, attention, query = release_visual_init(widths, cfg.llm.hidden_size, cfg.visual.fusion_embed_dim,
                                                       seed=widths[0])  # 64: the tiny LanguageBind's width
    for ours, theirs in zip(model.visual.projectors, projectors):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    if attention is not None:
        fusion = model.visual.fusion
        assert torch.equal(fusion.query, query)
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            assert torch.equal(getattr(fusion.attention, name), getattr(attention, name)), name
        assert torch.equal(fusion.attention.out_proj.weight, attention.out_proj.weight)
        assert torch.equal(fusion.attention.out_proj.bias, attention.out_proj.bias)

    # The seeded stream is the visual path's own: the caller's stream goes on as if another seed had been used.
    torch.set_rng_state(state)
    other = build_model(config=load_config(preset, overrides={"visual.init_seed": 7, "kernels": "torch"}))
    after_other = torch.rand(4)
    torch.set_rng_state(state)
    build_model(config=cfg)
    assert torch.equal(torch.rand(4), after_other)
    assert not torch.equal(other.visual.projectors[0].weight, model.visual.projectors[0].weight)


def test_integer_seed_and_bad_values():
    cfg = load_config("tiny", overrides={"visual.init_seed": 1024, "kernels": "torch"})
    a, b = build_model(config=cfg), build_model(config=cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.visual.parameters(), b.visual.parameters()))
    projectors, _, _ = release_visual_init([e.hidden_size for e in cfg.encoders], 64, 48, seed=1024)
    assert torch.equal(a.visual.projectors[2].weight, projectors[2].weight)
    for bad in ("seven", -1, 1.5, True):
        with pytest.raises(ConfigError, match="visual.init_seed"):
            load_config("tiny", overrides={"visual.init_seed": bad})
