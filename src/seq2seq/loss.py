"""The training loss: output layer and label-smoothed cross-entropy in one pass.

``nn.Linear`` followed by ``nn.CrossEntropyLoss`` stores the (tokens, vocabulary) scores,
their log-softmax and, in the backward pass, a gradient of the same size, each a separate
sweep over memory. With the 8,000-piece vocabulary that is about a tenth of a CPU training
step. ``output_cross_entropy`` computes the scores in row chunks, turns each chunk into its
gradient in place (softmax minus the smoothed target) and keeps only that for the backward
pass, which is then two matrix products. Same value and gradients as
``nn.CrossEntropyLoss(ignore_index=..., reduction="sum", label_smoothing=...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ROWS_PER_CHUNK = 2048  # bounds the live scores to 2048 x vocabulary floats per chunk


class _OutputCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                ignore_index: int, smoothing: float, needs_grad: bool) -> Tensor:
        vocab = weight.size(0)
        matmul_dtype = (torch.get_autocast_dtype(hidden.device.type)
                        if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype)
        w = weight.to(matmul_dtype)
        # with gradients, every chunk's gradient is kept; without, one chunk's buffer is reused
        buffer_rows = hidden.size(0) if needs_grad else min(hidden.size(0), ROWS_PER_CHUNK)
        grad_scores = torch.empty(buffer_rows, vocab, device=hidden.device, dtype=torch.float32)
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.size(0), ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            scores = grad_scores[rows] if needs_grad else grad_scores[:len(targets[rows])]
            x = hidden[rows].to(matmul_dtype)
            if matmul_dtype == torch.float32:
                if bias is None:
                    torch.mm(x, w.t(), out=scores)
                else:
                    torch.addmm(bias, x, w.t(), out=scores)
            else:
                scores.copy_(torch.nn.functional.linear(x, w, bias if bias is None
                                                         else bias.to(matmul_dtype)))
            target = targets[rows]
            valid = (target != ignore_index).unsqueeze(1)  # (rows, 1)
            safe_target = target.masked_fill(~valid.squeeze(1), 0).unsqueeze(1)
            target_score = scores.gather(1, safe_target)  # (rows, 1)
            mean_score = scores.mean(1, keepdim=True) if smoothing else None
            top = scores.amax(1, keepdim=True)
            scores.sub_(top).exp_()
            total = scores.sum(1, keepdim=True)
            log_z = top + total.log()  # (rows, 1)
            # loss = log Z - (1 - s) * target score - s * mean score
            row_loss = log_z - (1.0 - smoothing) * target_score
            if smoothing:
                row_loss = row_loss - smoothing * mean_score
            loss = loss + (row_loss * valid).sum()
            if not needs_grad:
                continue
            # gradient: softmax - (1 - s) * one-hot(target) - s / V, zero on ignored rows
            real = valid.float()
            torch.addcmul((-smoothing / vocab) * real, scores, real / total, out=scores)
            scores.scatter_add_(1, safe_target, -(1.0 - smoothing) * real)
        if needs_grad:
            ctx.save_for_backward(hidden, weight, grad_scores)
        ctx.has_bias = bias is not None
        ctx.matmul_dtype = matmul_dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, grad_scores = ctx.saved_tensors
        dtype = ctx.matmul_dtype
        g = grad_scores.to(dtype)
        grad_hidden = (g @ weight.to(dtype)).to(hidden.dtype) * grad_loss
        grad_weight = (g.t() @ hidden.to(dtype)).to(weight.dtype) * grad_loss
        grad_bias = grad_scores.sum(0) * grad_loss if ctx.has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def output_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         ignore_index: int, label_smoothing: float = 0.0) -> Tensor:
    """Summed label-smoothed cross-entropy of ``hidden @ weight.T + bias`` against targets.

    Args:
        hidden: (tokens, features) the output layer's inputs.
        weight: (vocab, features), bias: (vocab,) or None: the output layer.
        targets: (tokens,) ids; positions equal to ``ignore_index`` add nothing.
        label_smoothing: the share of probability spread evenly over the vocabulary, as in
            ``nn.CrossEntropyLoss``.

    Returns:
        a float32 scalar, the sum over the non-ignored tokens.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _OutputCrossEntropy.apply(hidden, weight, bias, targets, ignore_index,
                                     float(label_smoothing), needs_grad)
