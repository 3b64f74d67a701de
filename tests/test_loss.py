"""output_cross_entropy must equal nn.Linear + nn.CrossEntropyLoss in value and gradients."""

import pytest
import torch
from torch import nn

from seq2seq.kernels import loss as loss_module
from seq2seq.kernels.loss import output_cross_entropy, reduced_precision_scores


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("rows_per_chunk", [2048, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_and_cross_entropy(smoothing, rows_per_chunk, bias, monkeypatch):
    monkeypatch.setattr(loss_module, "ROWS_PER_CHUNK", rows_per_chunk)
    torch.manual_seed(0)
    hidden = torch.randn(11, 6)
    weight = torch.randn(9, 6)
    b = torch.randn(9) if bias else None
    targets = torch.randint(1, 9, (11,))
    targets[[2, 7]] = 0  # padding
    ours = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    ref = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    got = output_cross_entropy(*ours, targets, 0, smoothing)
    want = nn.CrossEntropyLoss(ignore_index=0, reduction="sum", label_smoothing=smoothing)(
        nn.functional.linear(*ref), targets)
    torch.testing.assert_close(got, want)
    (got * 3).backward()
    (want * 3).backward()
    for a, r in zip(ours, ref):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad)


def test_all_rows_ignored_gives_zero():
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    loss = output_cross_entropy(hidden, weight, None, torch.zeros(3, dtype=torch.long), 0, 0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_bad_smoothing_is_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        output_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), None,
                             torch.tensor([1, 2]), 0, 1.0)


def test_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 16), torch.randn(30, 16) * 0.1
    targets = torch.randint(1, 30, (20,))
    fp32 = output_cross_entropy(hidden, weight, None, targets, 0, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = output_cross_entropy(hidden, weight, None, targets, 0, 0.1)
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 0.02


@pytest.mark.parametrize("rows_per_chunk", [2048, 4])
def test_value_without_gradients_is_the_same(rows_per_chunk, monkeypatch):
    monkeypatch.setattr(loss_module, "ROWS_PER_CHUNK", rows_per_chunk)
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(11, 6), torch.randn(9, 6), torch.randn(9)
    targets = torch.randint(0, 9, (11,))
    with_grad = output_cross_entropy(hidden.requires_grad_(), weight, bias, targets, 0, 0.1)
    with torch.no_grad():
        without = output_cross_entropy(hidden, weight, bias, targets, 0, 0.1)
    torch.testing.assert_close(without, with_grad.detach())


def _loss_and_grads(hidden, weight, bias, targets, **kwargs):
    hidden, weight, bias = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    loss = output_cross_entropy(hidden, weight, bias, targets, 0, 0.1, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, bias.grad


@pytest.mark.parametrize("rows_per_chunk", [2048, 100])
def test_bf16_products_without_autocast_are_close_to_fp32(rows_per_chunk, monkeypatch):
    """matmul_dtype=bf16 (CPU bf16 training): 300 rows are padded to 512 for the products
    and cut again; loss and gradients stay within bf16 rounding of float32."""
    monkeypatch.setattr(loss_module, "ROWS_PER_CHUNK", rows_per_chunk)
    torch.manual_seed(2)
    hidden, weight, bias = torch.randn(300, 16), torch.randn(40, 16) * 0.3, torch.randn(40)
    targets = torch.randint(0, 40, (300,))
    expected = _loss_and_grads(hidden, weight, bias, targets)
    got = _loss_and_grads(hidden, weight, bias, targets, matmul_dtype=torch.bfloat16)
    assert abs(got[0].item() - expected[0].item()) / expected[0].item() < 0.01
    for g, e in zip(got[1:], expected[1:]):
        assert g.dtype == torch.float32 and g.shape == e.shape
        assert (g - e).abs().max() <= 0.02 * e.abs().max()


def test_bf16_scratch_buffer_is_not_shared_between_pending_losses():
    """Two losses computed before one backward: the buffer reused for the bf16 products must
    not leak one batch's gradient into the other's."""
    torch.manual_seed(3)
    weight, bias = torch.randn(30, 8), torch.randn(30)
    h1, h2 = torch.randn(50, 8), torch.randn(70, 8) * 2
    t1, t2 = torch.randint(1, 30, (50,)), torch.randint(1, 30, (70,))
    alone = _loss_and_grads(h1, weight, bias, t1, matmul_dtype=torch.bfloat16)
    w = weight.clone().requires_grad_()
    first, second = h1.clone().requires_grad_(), h2.clone().requires_grad_()
    loss = (output_cross_entropy(first, w, bias, t1, 0, 0.1, matmul_dtype=torch.bfloat16)
            + output_cross_entropy(second, w, bias, t2, 0, 0.1, matmul_dtype=torch.bfloat16))
    loss.backward()
    torch.testing.assert_close(first.grad, alone[1])


def test_bf16_scratch_buffer_made_while_decoding_serves_training():
    """The reused buffer may first be made (or grown) inside ``torch.inference_mode``, by
    bf16 decoding; training's in-place writes into it must still work afterwards."""
    _grow_buffer_in_inference_mode()
    torch.manual_seed(4)
    hidden, weight, bias = torch.randn(40, 8), torch.randn(30, 8), torch.randn(30)
    targets = torch.randint(1, 30, (40,))
    got = _loss_and_grads(hidden, weight, bias, targets, matmul_dtype=torch.bfloat16)
    want = _loss_and_grads(hidden, weight, bias, targets)
    assert abs(got[0].item() - want[0].item()) / want[0].item() < 0.01


def _grow_buffer_in_inference_mode() -> None:
    with torch.inference_mode():
        reduced_precision_scores(torch.randn(3000, 8), torch.randn(600, 8).bfloat16(), None)
