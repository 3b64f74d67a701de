"""The training loss's fast path (``FastPaths.fused_loss``): output layer and label-smoothed
cross-entropy in one pass (``FusedOutputLoss``, the twin of the model's ``OutputLoss``).

``nn.Linear`` followed by ``nn.CrossEntropyLoss`` stores the (tokens, vocabulary) scores,
their log-softmax and, in the backward pass, a gradient of the same size, each a separate
sweep over memory. ``output_cross_entropy`` computes the scores in row chunks, turns each
chunk into its gradient in place (softmax minus the smoothed target) and keeps only that for
the backward pass, which is then two matrix products. Same value and gradients as
``nn.CrossEntropyLoss(ignore_index=..., reduction="sum", label_smoothing=...)``.

On CPU ``exp`` runs as ``exp2(x * log2 e)`` and the gradient is scaled in place with ``mul_``
and ``sub_``, the faster forms there (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from seq2seq.kernels.policy import Twin
from seq2seq.models.rnn.model import OutputLoss

ROWS_PER_CHUNK = 2048  # bounds the live scores to 2048 x vocabulary floats per chunk
LOG2_E = 1.4426950408889634
ROW_MULTIPLE = 256  # reduced-precision products on CPU: rows padded to a multiple of this
_scratch = threading.local()


def _reduced_rows(x: Tensor, dtype: torch.dtype, scratch: bool = False) -> Tensor:
    """``x`` (rows, n) in ``dtype`` for a bf16/fp16 product; on CPU with zero rows added up to
    a multiple of ``ROW_MULTIPLE``, and with ``scratch`` written into a per-thread buffer
    that is reused.

    oneDNN builds a kernel for each product shape, and the allocations of building one leave
    holes in the heap: with every batch's row count a shape of its own, bf16 training's
    memory kept growing (benchmarks/RESULTS.md). Padded rows bound the shapes, and the reused
    buffer keeps the per-step (rows, vocabulary) copies from adding holes of their own."""
    if x.device.type != "cpu":
        return x.to(dtype)
    rows = -(-x.size(0) // ROW_MULTIPLE) * ROW_MULTIPLE
    if scratch:
        out = _scratch_buffer(rows, x.size(1), dtype)
    else:
        out = x.new_empty(rows, x.size(1), dtype=dtype)
    out[:x.size(0)].copy_(x)
    out[x.size(0):].zero_()
    return out


def _scratch_buffer(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A (rows, cols) CPU tensor from this thread's reused buffer (grown when too small).
    Its contents last until the next call."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < rows * cols:
        with torch.inference_mode(False):  # made while decoding, it still serves training
            buffer = _scratch.buffer = torch.empty(rows * cols, dtype=dtype)
    return buffer[:rows * cols].view(rows, cols)


def reduced_precision_scores(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                             out: Tensor | None = None) -> Tensor:
    """The output layer with its product in ``weight``'s dtype (bf16): (..., n) ``hidden`` ->
    (..., vocab) float32 ``hidden @ weight.T + bias``, the bias added in float32, into
    ``out`` if given. On CPU the rows are padded (``_reduced_rows``) and the product goes
    into this thread's reused buffer."""
    flat = hidden.reshape(-1, hidden.size(-1))
    x = _reduced_rows(flat, weight.dtype)
    if x.device.type == "cpu":
        product = torch.mm(x, weight.t(), out=_scratch_buffer(x.size(0), weight.size(0),
                                                                weight.dtype))
    else:
        product = x @ weight.t()
    product = product[:flat.size(0)]
    out = product.float() if out is None else out.copy_(product)
    if bias is not None:
        out.add_(bias)
    return out.view(*hidden.shape[:-1], weight.size(0))


class _OutputCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                ignore_index: int, smoothing: float, needs_grad: bool,
                matmul_dtype: torch.dtype | None) -> Tensor:
        vocab = weight.size(0)
        matmul_dtype = matmul_dtype or hidden.dtype  # under a GPU's autocast: bf16 already
        reduced = matmul_dtype in (torch.bfloat16, torch.float16)
        w = weight.to(matmul_dtype)
        # with gradients, every chunk's gradient is kept; without, one chunk's buffer is reused
        buffer_rows = hidden.size(0) if needs_grad else min(hidden.size(0), ROWS_PER_CHUNK)
        score_dtype = torch.float64 if matmul_dtype == torch.float64 else torch.float32
        grad_scores = torch.empty(buffer_rows, vocab, device=hidden.device, dtype=score_dtype)
        loss = hidden.new_zeros((), dtype=score_dtype)
        for start in range(0, hidden.size(0), ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            scores = grad_scores[rows] if needs_grad else grad_scores[:len(targets[rows])]
            if not reduced:
                x = hidden[rows].to(matmul_dtype)
                if bias is None:
                    torch.mm(x, w.t(), out=scores)
                else:
                    torch.addmm(bias.to(matmul_dtype), x, w.t(), out=scores)
            else:
                reduced_precision_scores(hidden[rows], w, bias, out=scores)
            target = targets[rows]
            valid = (target != ignore_index).unsqueeze(1)  # (rows, 1)
            safe_target = target.masked_fill(~valid.squeeze(1), 0).unsqueeze(1)
            target_score = scores.gather(1, safe_target)  # (rows, 1)
            mean_score = scores.mean(1, keepdim=True) if smoothing else None
            top = scores.amax(1, keepdim=True)
            scores.sub_(top).mul_(LOG2_E).exp2_()  # exp(scores - top)
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
            real = valid.to(scores.dtype)
            scores.mul_(real / total).sub_((smoothing / vocab) * real)
            scores.scatter_add_(1, safe_target, -(1.0 - smoothing) * real)
        if needs_grad:
            ctx.save_for_backward(hidden, w, grad_scores)
        ctx.has_bias, ctx.weight_dtype = bias is not None, weight.dtype
        ctx.matmul_dtype, ctx.reduced = matmul_dtype, reduced
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        hidden, w, grad_scores = ctx.saved_tensors  # w: the weight in matmul_dtype
        dtype = ctx.matmul_dtype
        if not ctx.reduced:
            g, h = grad_scores.to(dtype), hidden.to(dtype)
        else:  # zero rows add nothing to grad_weight, and are cut from grad_hidden
            g, h = _reduced_rows(grad_scores, dtype, scratch=True), _reduced_rows(hidden, dtype)
        rows = hidden.size(0)
        grad_hidden = (g @ w)[:rows].to(hidden.dtype).mul_(grad_loss)
        grad_weight = (g.t() @ h).to(ctx.weight_dtype).mul_(grad_loss)
        grad_bias = grad_scores.sum(0) * grad_loss if ctx.has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def output_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         ignore_index: int, label_smoothing: float = 0.0,
                         matmul_dtype: torch.dtype | None = None) -> Tensor:
    """Summed label-smoothed cross-entropy of ``hidden @ weight.T + bias`` against targets.

    Args:
        hidden: (tokens, features) the output layer's inputs.
        weight: (vocab, features), bias: (vocab,) or None: the output layer.
        targets: (tokens,) ids; positions equal to ``ignore_index`` add nothing.
        label_smoothing: the share of probability spread evenly over the vocabulary, as in
            ``nn.CrossEntropyLoss``.
        matmul_dtype: the dtype of the three matrix products (bf16 for mixed precision);
            None: ``hidden``'s. The softmax and the loss are float32 either way.

    Returns:
        a float32 scalar (float64 for float64 products), the sum over the non-ignored tokens.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    needs_grad = torch.is_grad_enabled() and any(  # else no gradient buffers are kept
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _OutputCrossEntropy.apply(hidden, weight, bias, targets, ignore_index,
                                     float(label_smoothing), needs_grad, matmul_dtype)


class FusedOutputLoss(Twin, OutputLoss):
    """The twin of ``OutputLoss``: ``output_cross_entropy`` of the output layer's weight and
    bias (an ``nn.Linear``), on any device; on a CPU in bf16 (``FastPaths.bf16_output``) with
    its products in bf16 (a GPU's bf16 is autocast's)."""

    plain = OutputLoss

    def forward(self, outputs: Tensor, generator: nn.Module, targets: Tensor,
                label_smoothing: float = 0.0) -> Tensor:
        """outputs: (batch, tgt_len, output_size), targets: (batch, tgt_len) -> the loss sum."""
        dtype = torch.bfloat16 if self.on_cpu and self.cpu_policy.bf16_output else None
        return output_cross_entropy(outputs.reshape(-1, outputs.size(-1)), generator.weight,
                                    generator.bias, targets.reshape(-1), self.pad_id,
                                    label_smoothing, dtype)
