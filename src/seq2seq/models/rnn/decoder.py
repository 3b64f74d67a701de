"""The decoder: an RNN conditioned on the encoder, with optional attention and input feeding.

Each step runs the RNN, attends from its new state to the encoder outputs (Luong's order;
JoeyNMT does the same for Bahdanau scores) and combines state and context into an
attentional vector ``tanh(W [h; c])``, which the model's output layer turns into scores.

With input feeding, that vector is also part of the next step's input, so the steps must run
one at a time (``step``; in training with ``FastPaths.stepwise``, inside one autograd
Function: ``stepwise.py``). Without it the RNN does not depend on attention, and the whole
target sequence goes through the fused RNN kernel in one call, followed by one batched
attention. ``forward`` runs teacher-forced steps; decoding runs ``step`` (through
``model.DecodingSession``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from seq2seq.kernels import stepwise
from seq2seq.kernels.gru import GRU
from seq2seq.kernels.ops import Dropout, tanh
from seq2seq.kernels.policy import REFERENCE, FastPaths
from seq2seq.models.rnn.attention import make_attention
from seq2seq.models.rnn.encoder import State, make_rnn


@dataclass
class Memory:
    """What the decoder reads from the encoder, prepared once per batch.

    outputs: (batch, src_len, key_size) encoder outputs (the attention values).
    proj_keys: (batch, src_len, *) keys already projected by the attention, or None.
    mask: (batch, src_len) bool, True at real source positions.
    combined_values: (batch, src_len, output_size) the encoder outputs times the context half
        of the combine layer, or None. Set for decoding (``Decoder.combine_values``): the context
        enters ``tanh(W [h; c])`` only through ``W_c c = sum_s weight_s (W_c value_s)``, so
        with this each step skips the context half of the combine product.
    """

    outputs: Tensor
    proj_keys: Tensor | None
    mask: Tensor
    combined_values: Tensor | None = None

    def select(self, index: Tensor) -> Memory:
        """Pick batch rows (beam search expands and prunes with this)."""
        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.index_select(0, index)
        return Memory(self.outputs.index_select(0, index), pick(self.proj_keys),
                      self.mask.index_select(0, index), pick(self.combined_values))


@dataclass
class DecoderState:
    """hidden: (layers, batch, hidden), or (h, c) for an LSTM.
    feed: (batch, output_size) the last attentional vector, or None without input feeding."""

    hidden: State
    feed: Tensor | None

    def select(self, index: Tensor) -> DecoderState:
        if isinstance(self.hidden, tuple):
            hidden: State = tuple(h.index_select(1, index) for h in self.hidden)  # type: ignore[assignment]
        else:
            hidden = self.hidden.index_select(1, index)
        feed = None if self.feed is None else self.feed.index_select(0, index)
        return DecoderState(hidden, feed)


class Decoder(nn.Module):
    """RNN decoder producing one attentional vector per target step."""

    paths: FastPaths = REFERENCE  # set by Seq2Seq.set_fast_paths

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
        self.dropout = Dropout(dropout)
        # The bridge maps the encoder's final state to every decoder layer's initial state.
        self.bridge = nn.Linear(encoder_state_size, num_layers * hidden_size)
        self.cell_bridge = (nn.Linear(encoder_state_size, num_layers * hidden_size)
                            if cell == "lstm" else None)
        context_size = encoder_output_size if attention is not None else 0
        self.combine = nn.Linear(hidden_size + context_size, output_size)

    def prepare(self, encoder_outputs: Tensor, mask: Tensor) -> Memory:
        """Project the attention keys once per batch, before the step loop."""
        if self.attention is None:
            return Memory(encoder_outputs, None, mask)
        return Memory(encoder_outputs, self.attention.project_keys(encoder_outputs), mask)

    def combine_values(self, memory: Memory) -> Memory:
        """``memory`` with ``combined_values``, for decoding (``FastPaths.combined_values``)."""
        combined = F.linear(memory.outputs, self.combine.weight[:, self.hidden_size:])
        return Memory(memory.outputs, memory.proj_keys, memory.mask, combined)

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
        if self.input_feeding and self.training and self.paths.stepwise:
            outputs, hidden, weights = stepwise.run_stepwise(
                self, inputs, state.hidden, state.feed, memory.proj_keys, memory.outputs,
                memory.mask)
            return outputs, DecoderState(hidden, outputs[:, -1]), weights
        if self.input_feeding:  # one step at a time
            steps = []
            for t in range(inputs.size(1)):
                out, state, weight = self.step(inputs[:, t:t + 1], state, memory)
                steps.append((out, weight))
            return torch.cat([o for o, _ in steps], 1), state, torch.cat([w for _, w in steps], 1)
        if isinstance(self.rnn, GRU):  # all steps in one fused call
            rnn_out, hidden = self.rnn.forward_padded(inputs, hx=state.hidden)
        else:
            rnn_out, hidden = self.rnn(inputs, state.hidden)
        outputs, weights = self._attend(rnn_out, memory)
        return outputs, DecoderState(hidden, None), weights

    def step(self, inputs: Tensor | None, state: DecoderState, memory: Memory, beams: int = 1,
             input_gates: Tensor | None = None) -> tuple[Tensor, DecoderState, Tensor | None]:
        """``forward`` for one step of ``rows = sentences * beams`` rows, a sentence's beams
        adjacent while ``memory`` holds each sentence once (never copied per beam).
        ``inputs``: (rows, 1, input_size); or, for a one-layer GRU, ``input_gates``: (rows,
        1, 3 * hidden) their input projection, from ``GRU.input_table``."""
        if input_gates is not None:
            gates = input_gates[:, 0]
            if self.input_feeding:  # the fed-back part of the input projection
                embed_size = self.rnn.input_size - self.output_size
                gates = torch.addmm(gates, state.feed, self.rnn.weight_ih_l0[:, embed_size:].t())
            hidden = self.rnn.step(gates, state.hidden)
            rnn_out = hidden.transpose(0, 1)
        else:
            if self.input_feeding:
                inputs = torch.cat([inputs, state.feed.unsqueeze(1)], dim=-1)
            rnn_out, hidden = self.rnn(inputs, state.hidden)  # (rows, 1, hidden)
        out, weights = self._attend(rnn_out, memory, beams)
        return out, DecoderState(hidden, out[:, 0] if self.input_feeding else None), weights

    def _attend(self, rnn_out: Tensor, memory: Memory,
                beams: int = 1) -> tuple[Tensor, Tensor | None]:
        """(batch, steps, hidden) -> attentional vectors (batch, steps, output_size), weights.
        With ``beams`` > 1 the beams of a sentence attend as that sentence's steps."""
        query = self.dropout(rnn_out)
        fast = self.paths.fast_tanh
        if self.attention is None:
            return tanh(self.combine(query), fast), None
        grouped = query.reshape(-1, beams * query.size(1), query.size(2))
        combined = memory.combined_values
        values = memory.outputs if combined is None else combined
        context, weights = self.attention(grouped, memory.proj_keys, values, memory.mask)
        context = context.view(query.size(0), query.size(1), -1)
        weights = weights.view(query.size(0), query.size(1), -1)
        if combined is None:
            return tanh(self.combine(torch.cat([query, context], dim=-1)), fast), weights
        # ``context`` is W_c c already: add the state half W_h h + b
        state_half = F.linear(query, self.combine.weight[:, :self.hidden_size], self.combine.bias)
        return tanh(state_half.add_(context), fast), weights
