"""The encoder: a fused (optionally bidirectional) RNN over variable-length sequences."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seq2seq.kernels.gru import GRU, run_padded
from seq2seq.kernels.ops import Dropout

RNN_CLASSES: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "gru": GRU, "lstm": nn.LSTM}

# A recurrent state: h of shape (layers, batch, size), or (h, c) for an LSTM.
State = Tensor | tuple[Tensor, Tensor]


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int,
             dropout: float, bidirectional: bool = False) -> nn.RNNBase:
    """A batch-first ``nn.RNN``/``GRU``/``nn.LSTM``: cuDNN on GPU; on CPU oneDNN for the LSTM,
    and for the GRU ``seq2seq.kernels.gru.GRU``, with its fused training path."""
    return RNN_CLASSES[cell](
        input_size, hidden_size, num_layers=num_layers, batch_first=True,
        dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional,
    )


class Encoder(nn.Module):
    """Reads a padded batch of input vectors, respecting each sequence's length.

    Padding never reaches the RNN: sequences are packed (``run_padded``), or for the GRU's
    training path masked, so the outputs and the final state of a sequence do not depend on
    how much padding its batch has.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.cell = cell
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.num_directions
        self.dropout = Dropout(dropout)
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
        inputs = self.dropout(inputs)
        if isinstance(self.rnn, GRU):
            outputs, state = self.rnn.forward_padded(inputs, lengths)
        else:
            outputs, state = run_padded(self.rnn, inputs, lengths)
        if isinstance(state, tuple):
            return outputs, (self._last_layer(state[0]), self._last_layer(state[1]))
        return outputs, self._last_layer(state)

    def _last_layer(self, state: Tensor) -> Tensor:
        """(layers * directions, batch, hidden) -> (batch, directions * hidden)."""
        last = state.view(self.num_layers, self.num_directions, state.size(1), state.size(2))[-1]
        return torch.cat(list(last), dim=-1)
