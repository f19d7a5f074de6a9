"""One optimizer step over K micro-batches: loss normalisation, accumulation, parameter sets, the NaN policy."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import concat, make_batch, make_stepper  # noqa: E402

from merv_fast.train.parallel import supervised_targets  # noqa: E402


def _reference_losses(model, batches):
    """(mean loss, supervised count) per micro-batch, by a plain forward."""
    out = []
    with torch.no_grad():
        for b in batches:
            features = None
            if b.frames is not None:
                from merv_fast.data.preprocess import preprocess_batch

                px = preprocess_batch(b.frames, model.config.encoders, model.config.frames_sampled, b.flip,
                                      is_image=b.is_image)
                features = model.encode(px, is_image=bool(b.is_image.all()))
            loss = model(b.input_ids, b.attention_mask, b.labels, features=features).loss
            nv = model.config.num_visual_tokens if features is not None else 0
            out.append((float(loss), supervised_targets(b.labels, nv, True)))
    return out


def _micro_batches():
    return [make_batch("video", 2, 20, 3, seed=1), make_batch("video", 2, 30, 12, seed=2, width=34)]


@pytest.mark.parametrize("norm", ["tokens", "release"])
def test_loss_normalisation(norm):
    model, _, stepper = make_stepper(loss_norm=norm)
    mbs = _micro_batches()
    ref = _reference_losses(model, mbs)
    assert ref[0][1] != ref[1][1]  # different token counts: the two normalisations differ
    result = stepper.step(mbs)
    if norm == "tokens":
        expected = sum(l * n for l, n in ref) / sum(n for _, n in ref)
    else:
        expected = sum(l for l, _ in ref) / len(ref)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.supervised_tokens == sum(n for _, n in ref)
    assert result.samples == 4 and result.visual_tokens == 4 * model.config.num_visual_tokens


def test_accumulation_equals_one_big_batch_under_tokens():
    a = make_batch("video", 2, 20, 3, seed=1, width=30)
    b = make_batch("video", 2, 30, 12, seed=2, width=30)
    deltas = []
    for mbs in ([a, b], [concat(a, b)]):
        _, module, stepper = make_stepper(optimizer="sgd", grad_clip=0.0, lr=1.0)
        before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        result = stepper.step(mbs)
        deltas.append((result.loss, {n: p.detach() - before[n] for n, p in module.named_parameters()
                                     if p.requires_grad}))
    (l1, d1), (l2, d2) = deltas
    assert l1 == pytest.approx(l2, rel=1e-5)
    for name in d1:
        torch.testing.assert_close(d1[name], d2[name], rtol=1e-4, atol=1e-6, msg=name)


def test_text_only_micro_batch_runs_the_visual_path_with_zero_gradient():
    _, module, stepper = make_stepper(optimizer="sgd", grad_clip=0.0, lr=1.0)
    seen = []
    module.visual.register_forward_hook(lambda *a: seen.append(1))
    before = {n: p.detach().clone() for n, p in module.visual.named_parameters()}
    result = stepper.step([make_batch("text", 2, 20, 5, seed=3)])
    assert seen and result.visual_tokens == 0 and result.loss > 0
    for n, p in module.visual.named_parameters():
        assert torch.equal(p.detach(), before[n]), n  # zero-weighted: no update
        assert p.requires_grad is False or p.grad is None  # zero_grad after the step


@pytest.mark.parametrize("recipe", ["merv-frozen", "merv-full-stage1", "merv-full-stage2"])
def test_trainable_and_frozen_parameter_sets(recipe):
    from merv_fast.model.merv import build_model
    from merv_fast.train.config import make_train_config
    from merv_fast.train.optim import build_optimizer
    from merv_fast.train.parallel import TrainModule

    cfg = make_train_config(recipe, preset="tiny")
    model = build_model("tiny")
    module = TrainModule(model)
    opt = build_optimizer(module, lr=cfg.lr, weight_decay=cfg.weight_decay)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        frozen = name.startswith("encoders.") or "v_proj_weight" in name or "out_proj" in name
        assert p.requires_grad is not frozen, name
        assert (id(p) in in_opt) is not frozen, name
    assert not any(n.startswith("encoders.") for n, _ in module.named_parameters())  # never sharded
    decay = opt.param_groups[0]
    assert decay["weight_decay"] == cfg.weight_decay and all(p.ndim >= 2 for p in decay["params"])
    assert opt.param_groups[1]["weight_decay"] == 0.0 and all(p.ndim < 2 for p in opt.param_groups[1]["params"])


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_policy(policy):
    from merv_fast.train.step import NonFiniteLossError

    model, module, stepper = make_stepper(nan_policy=policy)
    with torch.no_grad():
        model.llm.lm_head.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    batch = [make_batch("text", 2, 20, 5, seed=3)]
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
            stepper.step(batch)
    else:
        result = stepper.step(batch)
        assert result.skipped
        for n, p in module.named_parameters():
            if p.requires_grad:
                assert torch.equal(p.detach(), before[n]) or torch.isnan(before[n]).any(), n
        assert not stepper.optimizer.state  # no moments were created
