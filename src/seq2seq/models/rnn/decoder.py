"""The decoder: an RNN conditioned on the encoder, with optional attention and input feeding.

Each step runs the RNN, attends from its new state to the encoder outputs (Luong's order;
JoeyNMT does the same for Bahdanau scores) and combines state and context into an
attentional vector ``tanh(W [h; c])``, which the model's output layer turns into scores.

With input feeding, that vector is also part of the next step's input (the RNN reads
``[embedding; vector]``), so the steps run one at a time (``step``). Without it the RNN does
not depend on attention, and the whole target sequence goes through the RNN in one call,
followed by one batched attention. ``forward`` runs teacher-forced steps; decoding runs
``step`` (through a decoding session, ``models/interface.py``).

Layouts that fused twins (``seq2seq.kernels``) rely on, part of this module's contract:
``combine.weight`` is ``[W_h | W_c]`` (state columns first), and the RNN's first-layer input
is ``[embedding; fed vector]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seq2seq.models.rnn.attention import make_attention
from seq2seq.models.rnn.encoder import State, make_rnn


@dataclass
class Memory:
    """What the decoder reads from the encoder, prepared once per batch.

    outputs: (batch, src_len, key_size) encoder outputs (the attention values).
    proj_keys: (batch, src_len, *) keys already projected by the attention, or None.
    mask: (batch, src_len) bool, True at real source positions.
    """

    outputs: Tensor
    proj_keys: Tensor | None
    mask: Tensor

    def select(self, index: Tensor) -> Memory:
        """Pick batch rows (index: (rows,) long; search drops finished sentences with this)."""
        proj_keys = None if self.proj_keys is None else self.proj_keys.index_select(0, index)
        return Memory(self.outputs.index_select(0, index), proj_keys,
                      self.mask.index_select(0, index))


@dataclass
class DecoderState:
    """hidden: (layers, batch, hidden), or (h, c) for an LSTM.
    feed: (batch, output_size) the last attentional vector, or None without input feeding."""

    hidden: State
    feed: Tensor | None

    def select(self, index: Tensor) -> DecoderState:
        """Pick rows (index: (rows,) long, e.g. each beam's origin)."""
        if isinstance(self.hidden, tuple):
            hidden: State = tuple(h.index_select(1, index) for h in self.hidden)  # type: ignore[assignment]
        else:
            hidden = self.hidden.index_select(1, index)
        feed = None if self.feed is None else self.feed.index_select(0, index)
        return DecoderState(hidden, feed)


class Decoder(nn.Module):
    """RNN decoder producing one attentional vector per target step."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, output_size: int,
                 encoder_output_size: int, encoder_state_size: int, num_layers: int = 1,
                 attention: str | None = "bahdanau", attention_size: int = 0,
                 input_feeding: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.output_size = output_size
        self.input_feeding = input_feeding and attention is not None
        self.attention = make_attention(attention, hidden_size, encoder_output_size,
                                         attention_size or hidden_size)
        rnn_input = input_size + (output_size if self.input_feeding else 0)
        self.rnn = make_rnn(cell, rnn_input, hidden_size, num_layers, dropout)
        self.dropout = nn.Dropout(dropout)
        # The bridge maps the encoder's final state to every decoder layer's initial state.
        self.bridge = nn.Linear(encoder_state_size, num_layers * hidden_size)
        self.cell_bridge = (nn.Linear(encoder_state_size, num_layers * hidden_size)
                            if cell == "lstm" else None)
        context_size = encoder_output_size if attention is not None else 0
        self.combine = nn.Linear(hidden_size + context_size, output_size)
        self.activation = nn.Tanh()

    def prepare(self, encoder_outputs: Tensor, mask: Tensor) -> Memory:
        """Project the attention keys once per batch, before the step loop."""
        if self.attention is None:
            return Memory(encoder_outputs, None, mask)
        return Memory(encoder_outputs, self.attention.project_keys(encoder_outputs), mask)

    def init_state(self, encoder_final: State) -> DecoderState:
        """encoder_final: (batch, encoder_state_size), or (h, c) of those for an LSTM."""
        if isinstance(encoder_final, tuple):
            h, c = encoder_final
            hidden: State = (self._bridge(self.bridge, h), self._bridge(self.cell_bridge, c))
        else:
            hidden = self._bridge(self.bridge, encoder_final)
            if self.cell_bridge is not None:  # LSTM decoder after a GRU/RNN encoder
                hidden = (hidden, self._bridge(self.cell_bridge, encoder_final))
        batch = encoder_final[0].size(0) if isinstance(encoder_final, tuple) else encoder_final.size(0)
        feed = None
        if self.input_feeding:
            ref = hidden[0] if isinstance(hidden, tuple) else hidden
            feed = ref.new_zeros(batch, self.output_size)
        return DecoderState(hidden, feed)

    def _bridge(self, layer: nn.Linear, final: Tensor) -> Tensor:
        """(batch, encoder_state_size) -> (layers, batch, hidden)."""
        batch = final.size(0)
        out = torch.tanh(layer(final)).view(batch, self.num_layers, self.hidden_size)
        return out.transpose(0, 1).contiguous()

    def forward(self, inputs: Tensor, state: DecoderState,
                memory: Memory) -> tuple[Tensor, DecoderState, Tensor | None]:
        """Run the decoder over ``tgt_len`` steps with the given (teacher-forced) inputs.

        Args:
            inputs: (batch, tgt_len, input_size) embedded previous tokens or vectors.
            state: the state before the first of these steps.
            memory: from ``prepare``.

        Returns:
            outputs: (batch, tgt_len, output_size) attentional vectors.
            state: the state after the last step.
            weights: (batch, tgt_len, src_len) float32 attention weights, or None.
        """
        if self.input_feeding:  # one step at a time
            steps = []
            for t in range(inputs.size(1)):
                out, state, weight = self.step(inputs[:, t:t + 1], state, memory)
                steps.append((out, weight))
            return torch.cat([o for o, _ in steps], 1), state, torch.cat([w for _, w in steps], 1)
        rnn_out, hidden = self.rnn(inputs, state.hidden)  # all steps in one call
        outputs, weights = self.attend(rnn_out, memory)
        return outputs, DecoderState(hidden, None), weights

    def step(self, inputs: Tensor, state: DecoderState, memory: Memory,
             beams: int = 1) -> tuple[Tensor, DecoderState, Tensor | None]:
        """``forward`` for one step of ``rows = sentences * beams`` rows, a sentence's beams
        adjacent while ``memory`` holds each sentence once (never copied per beam).

        Args:
            inputs: (rows, 1, input_size) embedded previous tokens or vectors.

        Returns:
            outputs (rows, 1, output_size), the new state, weights (rows, 1, src_len) or None.
        """
        rnn_out, hidden = self.run_rnn(inputs, state)
        out, weights = self.attend(rnn_out, memory, beams)
        return out, self.next_state(hidden, out), weights

    def run_rnn(self, inputs: Tensor, state: DecoderState) -> tuple[Tensor, State]:
        """One step's RNN: (rows, 1, input_size) -> output (rows, 1, hidden) and the new
        hidden state. With input feeding the RNN reads ``[inputs; state.feed]``."""
        if self.input_feeding:
            inputs = torch.cat([inputs, state.feed.unsqueeze(1)], dim=-1)
        return self.rnn(inputs, state.hidden)

    def next_state(self, hidden: State, out: Tensor) -> DecoderState:
        """The state after a step: the RNN's ``hidden`` and (input feeding) ``out``'s last
        (rows, output_size) attentional vector."""
        return DecoderState(hidden, out[:, -1] if self.input_feeding else None)

    def attend(self, rnn_out: Tensor, memory: Memory,
               beams: int = 1) -> tuple[Tensor, Tensor | None]:
        """(batch, steps, hidden) -> attentional vectors (batch, steps, output_size), weights
        (batch, steps, src_len) or None. With ``beams`` > 1 the beams of a sentence attend as
        that sentence's steps."""
        query = self.dropout(rnn_out)
        if self.attention is None:
            return self.activation(self.combine(query)), None
        context, weights = self.context(query, memory, memory.outputs, beams)
        return self.activation(self.combine(torch.cat([query, context], dim=-1))), weights

    def context(self, query: Tensor, memory: Memory, values: Tensor,
                beams: int = 1) -> tuple[Tensor, Tensor]:
        """Attention of (rows, steps, hidden) queries over ``memory``'s keys, averaging
        ``values`` (sentences, src_len, n): contexts (rows, steps, n), weights (rows, steps,
        src_len); ``rows = sentences * beams``."""
        grouped = query.reshape(-1, beams * query.size(1), query.size(2))
        context, weights = self.attention(grouped, memory.proj_keys, values, memory.mask)
        return (context.view(query.size(0), query.size(1), -1),
                weights.view(query.size(0), query.size(1), -1))
