"""The RNN's plain decoding session (``models/interface.py``): ``Seq2Seq`` one step at a time
in plain PyTorch, holding nothing between calls but the model."""

from __future__ import annotations

from torch import Tensor

from seq2seq.models.rnn.decoder import DecoderState, Memory
from seq2seq.models.rnn.model import Seq2Seq


class RNNSession:
    """One decoding call of a ``Seq2Seq``: see ``models.interface.DecodingSession``."""

    rounds_scores = False

    def __init__(self, model: Seq2Seq) -> None:
        if model.training:  # dropout would apply to some steps and not to others
            raise ValueError("decode with the model in eval mode (model.eval())")
        self.model = model

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Memory, DecoderState]:
        """``Seq2Seq.encode``."""
        return self.model.encode(src, src_lengths)

    def step(self, prev: Tensor, state: DecoderState, memory: Memory,
             beams: int = 1) -> tuple[Tensor, DecoderState, Tensor | None]:
        """(rows, 1) tokens or (rows, 1, tgt_features) vectors -> (rows, 1, tgt_vocab or
        tgt_features) scores, the new state, (rows, 1, src_len) weights or None."""
        outputs, state, weights = self.model.decoder.step(self.model.embed_target(prev), state,
                                                          memory, beams)
        return self.generate(outputs), state, weights

    def generate(self, outputs: Tensor) -> Tensor:
        """(rows, 1, output_size) decoder outputs -> (rows, 1, tgt_vocab or tgt_features)
        scores: the output layer."""
        return self.model.generator(outputs)

    def reorder_state(self, state: DecoderState, index: Tensor) -> DecoderState:
        return state.select(index)

    def reorder_memory(self, memory: Memory, index: Tensor) -> Memory:
        return memory.select(index)

    def exact_logits(self, rows: Tensor, tokens: Tensor) -> Tensor | None:
        return None
