"""The encoder: an (optionally bidirectional) ``nn.GRU``/``nn.LSTM``/``nn.RNN`` over
variable-length sequences."""

from __future__ import annotations

import torch
from torch import Tensor, nn

RNN_CLASSES: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

# A recurrent state: h of shape (layers, batch, size), or (h, c) for an LSTM.
State = Tensor | tuple[Tensor, Tensor]


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int,
             dropout: float, bidirectional: bool = False) -> nn.RNNBase:
    """A batch-first ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (cuDNN on GPU, oneDNN's LSTM on CPU)."""
    return RNN_CLASSES[cell](
        input_size, hidden_size, num_layers=num_layers, batch_first=True,
        dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional,
    )


def run_padded(rnn: nn.RNNBase, inputs: Tensor, lengths: Tensor | None,
               hx: State | None = None) -> tuple[Tensor, State]:
    """Run a batch-first RNN over a padded batch, packing it when something is padded so
    that padding never reaches the RNN.

    Args:
        inputs: (batch, steps, input_size); lengths: (batch,) each >= 1, or None.

    Returns:
        outputs (batch, steps, directions * hidden), zeros at padded positions, and the
        final state as the RNN returns it.
    """
    steps = inputs.size(1)
    if lengths is None or not bool((lengths < steps).any()):
        return rnn(inputs, hx)
    packed = nn.utils.rnn.pack_padded_sequence(inputs, lengths.cpu(), batch_first=True,
                                               enforce_sorted=False)
    packed_out, state = rnn(packed, hx)
    outputs, _ = nn.utils.rnn.pad_packed_sequence(packed_out, batch_first=True,
                                                  total_length=steps)
    return outputs, state


class Encoder(nn.Module):
    """Reads a padded batch of input vectors, respecting each sequence's length.

    Padding never reaches the RNN (``run_rnn`` packs the batch), so the outputs and the
    final state of a sequence do not depend on how much padding its batch has.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.cell = cell
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.num_directions
        self.dropout = nn.Dropout(dropout)
        self.rnn = make_rnn(cell, input_size, hidden_size, num_layers, dropout, bidirectional)

    def forward(self, inputs: Tensor, lengths: Tensor) -> tuple[Tensor, State]:
        """Encode a batch.

        Args:
            inputs: (batch, src_len, input_size) embedded tokens or real vectors.
            lengths: (batch,) number of real positions of each sequence, each >= 1.

        Returns:
            outputs: (batch, src_len, num_directions * hidden); zeros at padded positions.
            final: the last layer's final state, directions concatenated:
                (batch, num_directions * hidden), or a pair (h, c) of those for an LSTM.
        """
        outputs, state = self.run_rnn(self.dropout(inputs), lengths)
        if isinstance(state, tuple):
            return outputs, (self._last_layer(state[0]), self._last_layer(state[1]))
        return outputs, self._last_layer(state)

    def run_rnn(self, inputs: Tensor, lengths: Tensor) -> tuple[Tensor, State]:
        """(batch, src_len, input_size) -> outputs and final state of ``self.rnn`` (``run_padded``)."""
        return run_padded(self.rnn, inputs, lengths)

    def _last_layer(self, state: Tensor) -> Tensor:
        """(layers * directions, batch, hidden) -> (batch, directions * hidden)."""
        last = state.view(self.num_layers, self.num_directions, state.size(1), state.size(2))[-1]
        return torch.cat(list(last), dim=-1)
