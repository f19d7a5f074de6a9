"""Packed training computes unpacked training's loss and gradients: per sample, positions restart, attention stays
inside the sample, labels shift inside the sample; both loss normalisations, video and text-only micro-batches."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_batch, make_stepper  # noqa: E402

from merv_fast.model.llm import IGNORE_INDEX  # noqa: E402
from merv_fast.model.merv import build_model  # noqa: E402
from merv_fast.train.packing import first_fit_decreasing, pack  # noqa: E402
from merv_fast.train.parallel import TrainModule, supervised_targets  # noqa: E402


def test_first_fit_decreasing():
    assert first_fit_decreasing([20, 9, 14], 30) == [[0, 1], [2]]
    assert first_fit_decreasing([5, 50, 5], 10) == [[1], [0, 2]]  # over-long sample: a row of its own
    with pytest.raises(ValueError, match="pack_budget"):
        first_fit_decreasing([3], 0)


def _micro_batch(lengths, width, seed, supervise_first):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    ids = torch.randint(3, 400, (n, width), generator=g)
    ids[:, 0] = 1
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
        labels[i, length // 2:length] = ids[i, length // 2:length]
        if supervise_first:  # nothing predicts a sample's first token: packing must not make the previous one do so
            labels[i, 0] = ids[i, 0]
    return ids, mask, labels


def _loss_and_grads(module, ids, mask, labels, features, num_items):
    module.zero_grad(set_to_none=True)
    loss, _ = module(ids, mask, labels, features, num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_kind", ["fused", "plain"])
@pytest.mark.parametrize("norm", ["tokens", "release"])
@pytest.mark.parametrize("kind", ["video", "text"])
def test_packed_loss_and_gradients_equal_unpacked(kind, norm, loss_kind):
    torch.manual_seed(0)
    model = build_model("tiny", kernels="torch", **{"llm.loss": loss_kind})
    ids, mask, labels = _micro_batch([20, 9, 14], 22, seed=3, supervise_first=kind == "text")
    features, num_visual = None, 0
    if kind == "video":
        shapes = [f.shape for f in TrainModule(model).dummy_features(torch.device("cpu"), torch.float32)]
        features = [torch.randn(3, *s[1:]) for s in shapes]
        num_visual = model.num_visual_tokens
    count = supervised_targets(labels, num_visual, True)
    num_items = torch.tensor(float(count)) if norm == "tokens" else None
    budget = 2 * num_visual + 30  # two samples in the first row, one in the second (with a padding tail)

    plain = _loss_and_grads(TrainModule(model), ids, mask, labels, features, num_items)
    packed_module = TrainModule(model, pack_budget=budget)
    packed = _loss_and_grads(packed_module, ids, mask, labels, features, num_items)

    torch.testing.assert_close(packed[0], plain[0], rtol=1e-5, atol=1e-6)
    assert plain[1].keys() == packed[1].keys() and any("visual" in n for n in plain[1])
    for name, grad in plain[1].items():
        torch.testing.assert_close(packed[1][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_pack_layout():
    embeds = torch.arange(3 * 6, dtype=torch.float32).view(3, 6, 1).repeat(1, 1, 2).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.arange(3 * 6).view(3, 6)
    p = pack(embeds, mask, labels, budget=7)
    assert p.rows == [[2], [0, 1]]
    assert p.documents.segments == [[6], [4, 2]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]]
    assert p.embeds[:, :, 0].tolist() == [[12, 13, 14, 15, 16, 17], [0, 1, 2, 3, 6, 7]]
    assert p.labels.tolist() == [[IGNORE_INDEX, 13, 14, 15, 16, 17], [IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX, 7]]
    p.embeds.sum().backward()  # every real token gathered once, padding never
    assert embeds.grad[:, :, 0].tolist() == mask.float().tolist()
    short = pack(embeds, mask, labels, budget=4)
    assert short.documents.segments == [[6], [4, 2], [2, 4]]  # a padding tail is a segment of its own
    with pytest.raises(ValueError, match="right-padded"):
        pack(embeds, torch.tensor([[0, 1, 1, 1, 1, 1]] * 3), labels, budget=8)


def test_train_settings():
    from merv_fast.config import ConfigError
    from merv_fast.train.config import make_train_config

    cfg = make_train_config(overrides=["packing=true", "pack_budget=2048"])
    assert cfg.packing is True and cfg.pack_budget == 2048
    assert make_train_config().packing is False and make_train_config().pack_budget == 16384
    with pytest.raises(ConfigError, match="pack_budget"):
        make_train_config(overrides=["pack_budget=0"])
    with pytest.raises(ConfigError, match="packing"):
        make_train_config(overrides=["packing=maybe"])


def test_stepper_with_packing_logs_the_same_step():
    """Through the trainer's step: same loss and gradient norm, and the same token counts (real tokens only: the
    counts come from the micro-batches' attention masks, never from the packed rows)."""
    results = []
    for budget in (None, 700):
        _, module, stepper = make_stepper(optimizer="sgd", grad_clip=0.0)
        module.pack_budget = budget
        batches = [make_batch("video", 3, 20, 6, seed=1, width=26), make_batch("text", 2, 24, 9, seed=2)]
        results.append(stepper.step(batches))
    plain, packed = results
    assert packed.loss == pytest.approx(plain.loss, rel=1e-5)
    assert packed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-4)
    assert (packed.text_tokens, packed.visual_tokens, packed.supervised_tokens, packed.flops) == \
        (plain.text_tokens, plain.visual_tokens, plain.supervised_tokens, plain.flops)
    assert plain.text_tokens == 3 * 20 + 2 * 24  # the padding of the first micro-batch is not counted
