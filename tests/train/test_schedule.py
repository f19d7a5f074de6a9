"""Warmup + cosine to 0, as HF's get_cosine_schedule_with_warmup with the Trainer's ceil(ratio x total) warmup."""

import math

import pytest
import torch

from merv_fast.train.schedule import build_scheduler, total_steps_for, warmup_steps


def _lrs(total, ratio, lr=1e-4):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, total, ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("total,ratio", [(100, 0.03), (7, 0.03), (50, 0.0), (33, 0.2)])
def test_matches_transformers(total, ratio):
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    ref = get_cosine_schedule_with_warmup(opt, math.ceil(total * ratio), total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs(total, ratio) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_shape():
    lrs = _lrs(100, 0.03)
    assert warmup_steps(100, 0.03) == 3
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(1e-4) and lrs[1] < lrs[2] < lrs[3]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 1e-7


def test_total_steps_from_epochs_or_explicit():
    assert total_steps_for(10, 1.0) == 10
    assert total_steps_for(10, 2.5) == 25
    assert total_steps_for(10, 0.01) == 1
    assert total_steps_for(10, 3.0, total_steps=7) == 7


def test_state_dict_roundtrip_is_json():
    import json

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, 20, 0.1)
    for _ in range(5):
        opt.step()
        sched.step()
    sd = json.loads(json.dumps(sched.state_dict()))
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, 20, 0.1)
    sched2.load_state_dict(sd)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_train_config_recipes_and_overrides(tmp_path):
    from merv_fast.config import ConfigError
    from merv_fast.train.config import make_train_config

    c = make_train_config("merv-full-stage1")
    assert (c.lr, c.global_batch_size, c.weight_decay) == (1e-4, 256, 0.0)
    c = make_train_config("merv-frozen", preset="merv-7b")
    assert (c.lr, c.global_batch_size, c.weight_decay, c.epochs) == (2e-5, 128, 0.1, 1.0)
    assert make_train_config("merv-frozen", preset="tiny").global_batch_size == 4
    y = tmp_path / "t.yaml"
    y.write_text("recipe: merv-full-stage2\nlr: 3e-5\nloss_norm: release\n")
    c = make_train_config(config_file=y, overrides=["global_batch_size=8"], preset="tiny")
    assert (c.recipe, c.lr, c.loss_norm, c.global_batch_size) == ("merv-full-stage2", 3e-5, "release", 8)
    with pytest.raises(ConfigError):
        make_train_config(overrides={"no_such_key": 1})
    with pytest.raises(ConfigError):
        make_train_config(overrides={"loss_norm": "mean"})


def test_fault_and_cadence_settings(tmp_path):
    from merv_fast.config import ConfigError
    from merv_fast.train.config import make_train_config

    c = make_train_config(overrides=["debug.nan_at_step=3", "save_every_minutes=2.5", "keep_last=0"])
    assert (c.debug.nan_at_step, c.save_every_minutes, c.keep_last) == (3, 2.5, 0)
    assert c.to_dict()["debug"] == {"nan_at_step": 3}
    y = tmp_path / "t.yaml"
    y.write_text("debug:\n  nan_at_step: 2\nsave_every_minutes: 0\n")
    c = make_train_config(config_file=y)
    assert (c.debug.nan_at_step, c.save_every_minutes) == (2, 0.0)
    for bad, words in (({"debug.nan_at": 1}, "debug.nan_at"), ({"debug.nan_at_step": 0}, "nan_at_step"),
                       ({"save_every_minutes": -1}, "save_every_minutes"), ({"keep_last": -1}, "keep_last"),
                       ({"resume": True, "overwrite": True}, "contradict")):
        with pytest.raises(ConfigError, match=words):
            make_train_config(overrides=bad)
