"""Release checkpoints: load the nested file and the flat dict, export back, identical outputs; bad files named."""

import pickle

import pytest
import torch

import merv_fast
from merv_fast.model.release import (ReleaseCheckpointError, load_release_checkpoint, nest_release,
                                     save_release_checkpoint)


def _outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, e.time_steps, e.tokens_per_step, e.hidden_size, generator=g) for e in model.config.encoders]
    ids = torch.randint(3, 400, (2, 12), generator=g)
    with torch.no_grad():
        return model(ids, features=feats).logits


def test_release_keys_follow_the_release_layout():
    sd = merv_fast.build_model("tiny", device="meta").release_state_dict()
    assert "projectors.3.projector.projector.weight" in sd and "feature_fusion.Q" in sd
    assert {"feature_fusion.attention." + k for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight",
                                                      "in_proj_bias", "out_proj.weight", "out_proj.bias")} <= set(sd)
    assert "llm_backbone.llm.model.layers.0.self_attn.q_proj.weight" in sd and "llm_backbone.llm.lm_head.weight" in sd
    assert not any(k.startswith("encoders") for k in sd)


def test_round_trip_through_a_release_file(tmp_path):
    torch.manual_seed(1)
    src = merv_fast.build_model("tiny").eval()
    path = tmp_path / "latest-checkpoint.pt"
    save_release_checkpoint(src, path, step=7)
    torch.manual_seed(2)
    dst = merv_fast.build_model("tiny").eval()
    dst.encoders.load_state_dict(src.encoders.state_dict())  # encoders are not in release checkpoints
    assert not torch.equal(_outputs(src), _outputs(dst))
    extra = load_release_checkpoint(dst, path)
    assert extra == {"step": 7}
    torch.testing.assert_close(_outputs(src), _outputs(dst), rtol=0, atol=0)
    exported = dst.release_state_dict()
    for key, value in src.release_state_dict().items():
        assert torch.equal(exported[key], value), key


def test_flat_dict_and_adapter_alias_load():
    torch.manual_seed(3)
    src = merv_fast.build_model("tiny").eval()
    flat = src.release_state_dict()
    aliased = {k.replace("feature_fusion.", "adapter."): v for k, v in flat.items()}
    for sd in (flat, aliased, {"model": nest_release(flat)}):
        dst = merv_fast.build_model("tiny")
        dst.load_release_state_dict(sd)
        assert torch.equal(dst.visual.fusion.query, src.visual.fusion.query)


def test_bad_checkpoints_name_file_and_key(tmp_path):
    model = merv_fast.build_model("tiny")
    flat = model.release_state_dict()
    missing = dict(flat)
    del missing["projectors.2.projector.projector.bias"]
    with pytest.raises(ReleaseCheckpointError, match=r"projectors\.2\.projector\.projector\.bias"):
        model.load_release_state_dict(missing, source="ckpt.pt")
    wrong = dict(flat)
    wrong["feature_fusion.Q"] = torch.zeros(1, 3)
    with pytest.raises(ReleaseCheckpointError, match=r"ckpt\.pt.*feature_fusion\.Q.*\(1, 3\)"):
        model.load_release_state_dict(wrong, source="ckpt.pt")
    extra = dict(flat, **{"vision_backbone.foo": torch.zeros(1)})
    with pytest.raises(ReleaseCheckpointError, match="vision_backbone.foo"):
        model.load_release_state_dict(extra)
    with pytest.raises(ReleaseCheckpointError, match="does not exist"):
        load_release_checkpoint(model, tmp_path / "absent.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(ReleaseCheckpointError, match="evil.pt"):
        load_release_checkpoint(merv_fast.build_model("tiny", device="meta"), path)
