"""The LM head and its cross-entropy in one op, without ever holding full-vocabulary fp32 logits.

`linear_cross_entropy(hidden, weight, labels)` is transformers' causal-LM loss on `hidden @ weight.T`: labels shifted
by one, IGNORE positions skipped, `reduction="mean"` over the supervised positions or `"sum"` divided by an external
`divisor` (the trainer's num_items_in_batch). It first gathers the hidden states of the supervised positions (after
the shift): the 1024 visual positions and the prompt never reach the head. It then walks those rows in chunks: a
chunk's logits in the matmul dtype (the autocast dtype when autocast is on, as `nn.Linear` would give), an fp32
log-softmax, the loss, and right away the gradients of the chunk's hidden rows and its share of the weight gradient
(Liger style: computed in forward, so backward only scales them by the incoming gradient; the weight gradient
accumulates in fp32). Peak extra memory: one chunk of fp32 logits plus the gradients themselves.

`linear_cross_entropy_reference` is the plain computation (full logits, `.float()`, `F.cross_entropy`), i.e. what
transformers' `ForCausalLMLoss` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk (128 MiB): 1046 rows at Llama-2's 32064-row head
# Poisoning: tests set this so that the hidden-state gradient starts as NaN and a row no chunk wrote fails the test.
POISON_OUTPUTS = False


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _supervised(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool):
    """(hidden rows [N, D], targets [N]) at the positions whose (shifted) label is supervised."""
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    keep = labels != ignore_index
    return hidden[keep], labels[keep]


def _divisor(reduction: str, divisor, count: int):
    if reduction == "mean":
        return float(max(count, 1))  # no supervised token: loss 0, gradients 0 (never 0/0)
    if reduction != "sum":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return 1.0 if divisor is None else divisor


class LinearCrossEntropy(torch.autograd.Function):
    """rows [N, D], weight [V, D], targets [N] -> sum of the rows' cross-entropies / divisor (a float or 0-d tensor)."""

    @staticmethod
    def forward(ctx, rows, weight, targets, divisor, matmul_dtype, chunk_rows):
        n = rows.shape[0]
        w = weight.to(matmul_dtype)
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.full_like(rows, float("nan")) if POISON_OUTPUTS else torch.empty_like(rows)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) \
            if ctx.needs_input_grad[1] else None
        inv = 1.0 / divisor
        loss = torch.zeros((), device=rows.device, dtype=torch.float32)
        with torch.autocast(rows.device.type, enabled=False):
            for start in range(0, n, chunk_rows):
                h = rows[start:start + chunk_rows].to(matmul_dtype)
                t = targets[start:start + chunk_rows]
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if grad_rows is None and grad_weight is None:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits chunk
                grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad = grad.mul_(inv).to(matmul_dtype)
                if grad_rows is not None:
                    grad_rows[start:start + chunk_rows] = (grad @ w).to(rows.dtype)
                if grad_weight is not None:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_rows, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss * inv

    @staticmethod
    def backward(ctx, grad_loss):
        grad_rows, grad_weight = ctx.saved_tensors
        if grad_rows is not None:
            grad_rows = grad_rows * grad_loss.to(grad_rows.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_rows, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         reduction: str = "mean", divisor: float | torch.Tensor | None = None,
                         ignore_index: int = IGNORE_INDEX, shift: bool = True,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """hidden [..., S, D] (the final norm's output), weight [V, D] (the LM head), labels [..., S] -> fp32 scalar."""
    matmul_dtype = _matmul_dtype(hidden, weight)
    rows, targets = _supervised(hidden, labels, ignore_index, shift)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return LinearCrossEntropy.apply(rows, weight, targets, _divisor(reduction, divisor, rows.shape[0]),
                                    matmul_dtype, chunk_rows)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                   reduction: str = "mean", divisor: float | torch.Tensor | None = None,
                                   ignore_index: int = IGNORE_INDEX, shift: bool = True) -> torch.Tensor:
    """Full logits in the matmul dtype, then fp32 cross-entropy over all of them (transformers' ForCausalLMLoss)."""
    matmul_dtype = _matmul_dtype(hidden, weight)
    logits = (hidden.to(matmul_dtype) @ weight.to(matmul_dtype).T).float()
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if reduction == "mean" and not bool((flat_labels != ignore_index).any()):
        return flat_logits.sum() * 0.0  # F.cross_entropy's mean over nothing is NaN; the op defines it as 0
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index,
                           reduction="mean" if reduction == "mean" else "sum")
    return loss if reduction == "mean" or divisor is None else loss / divisor
