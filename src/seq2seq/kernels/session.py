"""The RNN's fast decoding session: ``RNNSession`` with the output layer's product in bf16
on a CPU (``FastPaths.bf16_output``), and ``exact_logits`` for the few candidates that
search rescores, so that the results are those of float32 to rounding
(tests/test_fastpath.py).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from seq2seq.kernels.loss import reduced_precision_scores
from seq2seq.models.rnn.session import RNNSession


class FastRNNSession(RNNSession):
    """One decoding call of a ``Seq2Seq`` whose output layer is an ``nn.Linear``, its product
    in bf16. The bf16 copy of the output weight lives here, so the weights must not change
    while the session is in use."""

    rounds_scores = True  # so exact_logits has work to do

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.reduced_weight: Tensor | None = None  # the output layer's weight in bf16
        self.outputs: Tensor | None = None  # (rows, output_size) the last step's outputs

    def generate(self, outputs: Tensor) -> Tensor:
        """(rows, 1, output_size) decoder outputs -> (rows, 1, tgt_vocab) float32 scores from
        a bf16 product; the outputs are kept for ``exact_logits``."""
        generator = self.model.generator
        if self.reduced_weight is None:
            self.reduced_weight = generator.weight.detach().to(torch.bfloat16)
        self.outputs = outputs.reshape(-1, outputs.size(-1))
        return reduced_precision_scores(outputs, self.reduced_weight, generator.bias)

    def exact_logits(self, rows: Tensor, tokens: Tensor) -> Tensor | None:
        """Float32 ``outputs[rows] . weight[tokens] + bias[tokens]`` for (row, token) pairs of
        the last step (int tensors of one shape): ``step`` rounded the scores to bf16's 8
        significant bits, enough to reorder close candidates, and ``search`` rescores its
        few candidates with this."""
        generator = self.model.generator
        logits = (self.outputs[rows].float() * F.embedding(tokens, generator.weight)).sum(-1)
        if generator.bias is not None:
            logits = logits + generator.bias[tokens]
        return logits
