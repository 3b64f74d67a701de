"""The encoder: shapes, and padding never changes a sequence's outputs or final state."""

from __future__ import annotations

import pytest
import torch

from seq2seq.models.rnn.encoder import Encoder, make_rnn

LENGTHS = [7, 3, 5, 1]


def padded_batch(features: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 7, features) random inputs, with garbage (not zeros) in the padding."""
    torch.manual_seed(0)
    return torch.randn(len(LENGTHS), max(LENGTHS), features) * 3, torch.tensor(LENGTHS)


def final_of(final, row: int):
    if isinstance(final, tuple):
        return tuple(f[row] for f in final)
    return (final[row],)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (1, True), (2, False), (2, True)])
def test_padding_invariance_and_shapes(cell, layers, bidirectional):
    torch.manual_seed(1)
    encoder = Encoder(cell, 4, 6, num_layers=layers, bidirectional=bidirectional).eval()
    inputs, lengths = padded_batch()
    outputs, final = encoder(inputs, lengths)
    directions = 2 if bidirectional else 1
    assert outputs.shape == (4, 7, 6 * directions)
    for part in final_of(final, slice(None)):
        assert part.shape == (4, 6 * directions)
    assert isinstance(final, tuple) == (cell == "lstm")

    for row, length in enumerate(LENGTHS):
        alone_out, alone_final = encoder(inputs[row:row + 1, :length], lengths[row:row + 1])
        torch.testing.assert_close(outputs[row, :length], alone_out[0], atol=1e-6, rtol=1e-5)
        assert torch.all(outputs[row, length:] == 0)  # padded positions are exactly zero
        for batched, single in zip(final_of(final, row), final_of(alone_final, 0)):
            torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


def test_final_state_is_the_last_real_step_of_each_direction():
    torch.manual_seed(2)
    encoder = Encoder("gru", 4, 5, bidirectional=True).eval()
    inputs, lengths = padded_batch()
    outputs, final = encoder(inputs, lengths)
    for row, length in enumerate(LENGTHS):
        torch.testing.assert_close(final[row, :5], outputs[row, length - 1, :5])  # forward
        torch.testing.assert_close(final[row, 5:], outputs[row, 0, 5:])  # backward


def test_dropout_only_in_training():
    encoder = Encoder("gru", 4, 5, num_layers=2, dropout=0.5)
    inputs, lengths = padded_batch()
    encoder.eval()
    first, _ = encoder(inputs, lengths)
    second, _ = encoder(inputs, lengths)
    assert torch.equal(first, second)
    encoder.train()
    torch.manual_seed(3)
    noisy, _ = encoder(inputs, lengths)
    assert not torch.allclose(noisy, first)


def test_make_rnn_builds_batch_first_cells():
    for cell, kind in (("rnn", torch.nn.RNN), ("gru", torch.nn.GRU), ("lstm", torch.nn.LSTM)):
        rnn = make_rnn(cell, 3, 4, num_layers=1, dropout=0.3)
        assert isinstance(rnn, kind) and rnn.batch_first and rnn.dropout == 0.0  # one layer
