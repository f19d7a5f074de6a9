"""The fused LM head + cross-entropy against F.cross_entropy on full fp32 logits: loss and gradients (hidden, weight),
fp32 and bf16, odd shapes, rows without supervised tokens, nothing supervised at all; and through MERV's training
loss (fused == plain)."""

import pytest
import torch

from merv_fast.kernels import fused_linear_ce
from merv_fast.kernels.fused_linear_ce import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_reference

# bf16: both sides round the same bf16 logits; the gradients differ by where bf16 rounding happens (chunked
# accumulation in fp32 vs one bf16 GEMM).
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(batch, seq, dim, vocab, dtype, seed, supervised=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, dim, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) > supervised] = IGNORE_INDEX
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fn(h, w, labels, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _compare(hidden, weight, labels, dtype, **kwargs):
    chunk = kwargs.pop("chunk_rows", None)
    ours = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_rows=chunk, **kwargs)
    ref = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels, **kwargs)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")
    return ours


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(fused_linear_ce, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_cross_entropy_on_full_logits(dtype, reduction):
    hidden, weight, labels = _inputs(3, 17, 24, 97, dtype, seed=1)  # 97: odd vocabulary
    divisor = torch.tensor(11.0) if reduction == "sum" else None
    # 5 rows per chunk: several chunks and a short last one
    loss, _, _ = _compare(hidden, weight, labels, dtype, reduction=reduction, divisor=divisor, chunk_rows=5)
    assert loss > 0


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_chunking_does_not_change_the_result(chunk_rows):
    hidden, weight, labels = _inputs(2, 9, 16, 41, torch.float32, seed=2)
    _compare(hidden, weight, labels, torch.float32, chunk_rows=chunk_rows)


def test_one_row_and_rows_without_supervised_tokens():
    hidden, weight, labels = _inputs(4, 6, 8, 33, torch.float32, seed=3)
    labels[1] = IGNORE_INDEX  # a row with nothing supervised
    labels[2] = IGNORE_INDEX
    labels[2, 0] = 5  # its only label is at position 0, which nothing predicts after the shift
    _, h_grad, _ = _compare(hidden, weight, labels, torch.float32, reduction="sum", divisor=3.0)
    assert h_grad[1].abs().max() == 0 and h_grad[2].abs().max() == 0
    one = _inputs(1, 2, 8, 33, torch.float32, seed=4, supervised=1.0)
    _compare(*one, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nothing_supervised_gives_zero_loss_and_zero_gradients(reduction):
    hidden, weight, labels = _inputs(2, 5, 8, 19, torch.float32, seed=5)
    labels[:] = IGNORE_INDEX
    loss, h_grad, w_grad = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, reduction=reduction,
                                           divisor=4.0 if reduction == "sum" else None)
    assert loss == 0 and torch.isfinite(loss)
    assert h_grad.abs().max() == 0 and w_grad.abs().max() == 0


def test_autocast_matmul_dtype_as_nn_linear():
    """Under bf16 autocast the logits are bf16 products (what the plain LM head gives), the grads in fp32 leaves."""
    hidden, weight, labels = _inputs(2, 8, 16, 37, torch.float32, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_rows=4)
        ref = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    plain = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, labels)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOLERANCES[torch.bfloat16])
    assert not torch.equal(ref[0], plain[0])  # autocast did change the products


def test_bad_arguments_are_clear():
    hidden, weight, labels = _inputs(1, 4, 8, 11, torch.float32, seed=7)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, labels, chunk_rows=0)


@pytest.mark.parametrize("with_visual", [True, False], ids=["video", "text-only"])
def test_merv_training_loss_fused_equals_plain(with_visual):
    from merv_fast.model.merv import build_model
    from merv_fast.train.parallel import TrainModule

    losses, grads = {}, {}
    for loss_kind in ("fused", "plain"):
        torch.manual_seed(0)
        module = TrainModule(build_model("tiny", kernels="torch", **{"llm.loss": loss_kind}))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 400, (2, 12), generator=g)
        ids[:, 0] = 1
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.clone()
        labels[:, :5] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        features = None
        if with_visual:
            shapes = [f.shape for f in module.dummy_features(torch.device("cpu"), torch.float32)]
            features = [torch.randn(2, *s[1:], generator=g) for s in shapes]
        loss, _ = module(ids, mask, labels, features, torch.tensor(7.0))
        loss.backward()
        losses[loss_kind] = loss.detach()
        grads[loss_kind] = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["fused"], losses["plain"], rtol=1e-5, atol=1e-6)
    assert grads["fused"].keys() == grads["plain"].keys() and "llm.lm_head.weight" in grads["plain"]
    for name in grads["plain"]:
        torch.testing.assert_close(grads["fused"][name], grads["plain"][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
