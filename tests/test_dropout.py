"""Dropout's fast path (``FastPaths.uniform_dropout``): ``UniformDropout`` keeps an element with
probability ``1 - p`` and scales it by ``1 / (1 - p)``, from the seeded generator, in training
on the CPU only; elsewhere it is ``nn.Dropout``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seq2seq.config import ModelConfig
from seq2seq.kernels import apply as apply_kernels
from seq2seq.kernels.dropout import UniformDropout, dropout_scale
from seq2seq.kernels.gru import FusedGRU
from seq2seq.kernels.policy import FastPaths
from seq2seq.models.rnn.model import Seq2Seq

PATHS = FastPaths(uniform_dropout=True)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_mask_drops_the_share_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    scale = dropout_scale((1000, 1000), p, torch.empty(0))
    dropped = float((scale == 0).double().mean())
    values = scale.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))
    assert abs(dropped - p) < 0.003  # the standard error is under 0.0005
    assert abs(float(scale.double().mean()) - 1.0) < 0.005


def test_mask_follows_the_dtype_and_the_seed():
    torch.manual_seed(4)
    first = dropout_scale((64, 32), 0.3, torch.empty(0, dtype=torch.bfloat16))
    torch.manual_seed(4)
    again = dropout_scale((64, 32), 0.3, torch.empty(0, dtype=torch.bfloat16))
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)


def test_twin_drops_in_training_and_passes_through_otherwise():
    dropout = nn.Dropout(0.4)
    UniformDropout.install(dropout, PATHS, "cpu")
    x = torch.randn(32, 16, requires_grad=True)
    torch.manual_seed(2)
    y = dropout(x)
    torch.manual_seed(2)
    scale = dropout_scale(x.shape, 0.4, x)
    torch.testing.assert_close(y, x * scale)
    y.sum().backward()
    torch.testing.assert_close(x.grad, scale)  # the gradient goes through the kept elements only
    assert 0 < int((y == 0).sum()) < y.numel()
    dropout.eval()
    assert torch.equal(dropout(x), x)
    dropout.train()
    dropout.device_type = "cuda"  # off the CPU: nn.Dropout's own draw
    torch.manual_seed(2)
    plain = torch.nn.functional.dropout(x, 0.4)
    torch.manual_seed(2)
    torch.testing.assert_close(dropout(x), plain)


def test_twin_in_place_and_at_the_ends():
    dropout = nn.Dropout(0.5, inplace=True)
    UniformDropout.install(dropout, PATHS, "cpu")
    x = torch.ones(8, 8)
    torch.manual_seed(1)
    assert dropout(x) is x and set(x.unique().tolist()) == {0.0, 2.0}
    for p, expected in ((0.0, torch.ones(4, 4)), (1.0, torch.zeros(4, 4))):
        dropout = nn.Dropout(p)
        UniformDropout.install(dropout, PATHS, "cpu")
        torch.testing.assert_close(dropout(torch.ones(4, 4)), expected)


def test_model_dropouts_are_swapped_and_reference_swaps_them_back():
    config = ModelConfig(embed_size=6, hidden_size=8, attention="bahdanau", input_feeding=True,
                         dropout=0.3)
    model = Seq2Seq(config, src_vocab=11, tgt_vocab=11).train()
    apply_kernels(model, "fast")
    swapped = [m for m in model.modules() if isinstance(m, UniformDropout)]
    assert len(swapped) == sum(1 for m in model.modules() if isinstance(m, nn.Dropout)) >= 3
    apply_kernels(model, "reference")
    assert not any(isinstance(m, UniformDropout) for m in model.modules())


def test_fused_gru_drops_between_layers_with_the_uniform_mask():
    """With the path on, the fused two-layer GRU drops its first layer's outputs with
    ``dropout_scale``'s mask: the same as two nn.GRU layers given that mask."""
    torch.manual_seed(0)
    gru = nn.GRU(5, 7, num_layers=2, batch_first=True, dropout=0.4).double()
    FusedGRU.install(gru, FastPaths(fused_gru=True, uniform_dropout=True), "cpu")
    first, second = nn.GRU(5, 7, batch_first=True).double(), nn.GRU(7, 7, batch_first=True).double()
    with torch.no_grad():
        for name, value in gru.named_parameters():
            layer = first if name.endswith("l0") else second
            getattr(layer, name[:-1] + "0").copy_(value)
    x = torch.randn(3, 6, 5, dtype=torch.double)
    torch.manual_seed(7)
    fused, _ = gru.forward_padded(x)
    torch.manual_seed(7)
    keep = dropout_scale((6, 3, 7), 0.4, x).transpose(0, 1)  # (T, B, H) as drawn
    assert 0 < int((keep == 0).sum()) < keep.numel()
    plain, _ = second(first(x)[0] * keep)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
