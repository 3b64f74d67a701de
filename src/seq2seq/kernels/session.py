"""The RNN's fast decoding session: ``RNNSession`` through the decoding kernels that
``FastPaths`` turns on, with the same results to rounding (tests/test_fastpath.py).

- ``input_tables``: the GRU's input projection of every token, made once per call when the
  rows to decode pay for it, then read by row (``gru_input_table``, ``gru_step``);
- ``onednn_step``, ``onednn_output``: the GRU's recurrent product and the output layer
  through oneDNN (``ops.cpu_linear``);
- ``combined_values``: the encoder outputs through the context half of the combine layer
  once per batch (``CombinedMemory``), so each step skips that half of ``tanh(W [h; c])``;
- ``bf16_output``: the output layer's product in bf16, with ``exact_logits`` for the few
  candidates that search rescores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from seq2seq.kernels.gru import gru_input_table, gru_step
from seq2seq.kernels.loss import reduced_precision_scores
from seq2seq.kernels.ops import cpu_linear
from seq2seq.kernels.policy import FastPaths
from seq2seq.models.rnn.decoder import DecoderState, Memory
from seq2seq.models.rnn.model import Seq2Seq
from seq2seq.models.rnn.session import RNNSession


@dataclass
class CombinedMemory(Memory):
    """``Memory`` with combined_values: (batch, src_len, output_size) the encoder outputs
    times the context half ``W_c`` of the combine layer. The context enters
    ``tanh(W [h; c])`` only through ``W_c c = sum_s weight_s (W_c value_s)``."""

    combined_values: Tensor | None = None

    def select(self, index: Tensor) -> CombinedMemory:
        memory = super().select(index)
        return CombinedMemory(memory.outputs, memory.proj_keys, memory.mask,
                              self.combined_values.index_select(0, index))


class FastRNNSession(RNNSession):
    """One decoding call of a ``Seq2Seq`` through the kernels of ``paths``; what it computes
    from the weights (tables, a bf16 copy of the output layer) lives here, so the weights
    must not change while it is in use."""

    def __init__(self, model: Seq2Seq, paths: FastPaths, expected_rows: int = 0) -> None:
        """``expected_rows``: about how many rows x steps the call will decode (source tokens
        x beam), so that a table that pays for itself is made at the first step."""
        super().__init__(model)
        self.paths = paths
        self.rounds_scores = paths.bf16_output  # so exact_logits has work to do
        self.rows = expected_rows  # rows x steps decoded, plus those expected
        self.gru_input: Tensor | None = None  # (vocab, 3 * hidden), see _input_gates
        self.reduced_weight: Tensor | None = None  # the output layer's weight in bf16
        self.outputs: Tensor | None = None  # (rows, output_size) the last step's, in bf16

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Memory, DecoderState]:
        memory, state = super().encode(src, src_lengths)
        if self.paths.combined_values:
            decoder = self.model.decoder
            w_context = decoder.combine.weight[:, decoder.hidden_size:]
            memory = CombinedMemory(memory.outputs, memory.proj_keys, memory.mask,
                                    F.linear(memory.outputs, w_context))
        return memory, state

    def step(self, prev: Tensor, state: DecoderState, memory: Memory,
             beams: int = 1) -> tuple[Tensor, DecoderState, Tensor | None]:
        """``RNNSession.step``: (rows, 1) tokens -> (rows, 1, tgt_vocab) float32 scores, the
        new state, (rows, 1, src_len) weights or None."""
        decoder = self.model.decoder
        rnn_out, hidden = self._run_rnn(prev, state)
        if isinstance(memory, CombinedMemory):
            out, weights = self._attend_combined(rnn_out, memory, beams)
        else:
            out, weights = decoder.attend(rnn_out, memory, beams)
        return self._generate(out), decoder.next_state(hidden, out), weights

    def _run_rnn(self, prev: Tensor, state: DecoderState) -> tuple[Tensor, Tensor]:
        """``Decoder.run_rnn`` of ``prev``'s embedding: (rows, 1, hidden) and the new state;
        from the token table where there is one."""
        decoder = self.model.decoder
        gates = self._input_gates(prev)
        if gates is None:
            return decoder.run_rnn(self.model.embed_target(prev), state)
        gates = gates[:, 0]
        rnn = decoder.rnn
        if decoder.input_feeding:  # the fed-back part of the input projection
            embed = self.model.tgt_embed.embedding_dim
            gates = torch.addmm(gates, state.feed, rnn.weight_ih_l0[:, embed:].t())
        hidden = gru_step(rnn, gates, state.hidden, self.paths.onednn_step)
        return hidden.transpose(0, 1), hidden

    def _attend_combined(self, rnn_out: Tensor, memory: CombinedMemory,
                         beams: int) -> tuple[Tensor, Tensor]:
        """``Decoder.attend`` with the context half of the combine layer already applied to
        the values: ``tanh(W_h h + b + sum_s weight_s (W_c value_s))``."""
        decoder = self.model.decoder
        query = decoder.dropout(rnn_out)
        context, weights = decoder.context(query, memory, memory.combined_values, beams)
        combine = decoder.combine
        state_half = F.linear(query, combine.weight[:, :decoder.hidden_size], combine.bias)
        return decoder.activation(state_half.add_(context)), weights

    def _input_gates(self, prev: Tensor) -> Tensor | None:
        """(rows, 1, 3 * hidden) the GRU input projection of ``prev``, read from a table of
        every token's, or None. The table costs as much as projecting ``vocab`` rows, so it
        is made once the rows expected and decoded reach that."""
        if not self.paths.input_tables:
            return None
        if self.gru_input is None:
            self.rows += prev.size(0)
            embedding = self.model.tgt_embed.weight
            if self.rows < embedding.size(0):
                return None
            self.gru_input = gru_input_table(self.model.decoder.rnn, embedding)
        return F.embedding(prev, self.gru_input)

    def _generate(self, outputs: Tensor) -> Tensor:
        """The output layer, through oneDNN or in bf16 where the paths say so."""
        generator = self.model.generator
        flat = outputs.reshape(-1, outputs.size(-1))
        if self.paths.bf16_output:
            if self.reduced_weight is None:
                self.reduced_weight = generator.weight.detach().to(torch.bfloat16)
            self.outputs = flat
            return reduced_precision_scores(outputs, self.reduced_weight, generator.bias)
        if self.paths.onednn_output:
            return cpu_linear(flat, generator.weight, generator.bias).view(*outputs.shape[:-1], -1)
        return generator(outputs)

    def exact_logits(self, rows: Tensor, tokens: Tensor) -> Tensor | None:
        """Float32 ``outputs[rows] . weight[tokens] + bias[tokens]`` for (row, token) pairs of
        the last step (int tensors of one shape), where ``step`` rounded the scores (bf16:
        8 significant bits, enough to reorder close candidates; ``search`` rescores its few
        candidates with this); else None, the step's scores being exact already."""
        if not self.rounds_scores:
            return None
        generator = self.model.generator
        logits = (self.outputs[rows].float() * F.embedding(tokens, generator.weight)).sum(-1)
        if generator.bias is not None:
            logits = logits + generator.bias[tokens]
        return logits
