"""Dropout's fast path (``FastPaths.uniform_dropout``): ``UniformDropout``, the twin of
``nn.Dropout``, draws its mask from uniform floats instead of Bernoulli draws.

PyTorch's CPU dropout draws its mask with ``bernoulli_``, which is several times slower than
``torch.rand``'s vectorised uniform draw (benchmarks/RESULTS.md). Here an element is kept
where ``u >= p`` for ``u`` uniform in [0, 1): the same distribution, drawn from the same
generator (a resumed run draws the same masks), but another stream of draws than the
reference's, so a run's masks differ from a ``reference`` run's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from seq2seq.kernels.policy import Twin


def dropout_scale(shape: tuple[int, ...] | torch.Size, p: float, like: Tensor) -> Tensor:
    """A dropout mask of ``shape`` in ``like``'s dtype and device: 0 with probability ``p``
    (0 <= p < 1), else ``1 / (1 - p)``."""
    uniform = torch.rand(shape, device=like.device)  # float32 whatever ``like`` is
    return uniform.ge_(p).mul_(1.0 / (1.0 - p)).to(like.dtype)


def dropout(x: Tensor, p: float, training: bool, uniform: bool, inplace: bool = False) -> Tensor:
    """``F.dropout``; with ``uniform`` (``FastPaths.uniform_dropout``), in training, with the
    mask of ``dropout_scale`` instead."""
    if not (uniform and training and 0.0 < p < 1.0):
        return F.dropout(x, p, training, inplace)
    scale = dropout_scale(x.shape, p, x)
    return x.mul_(scale) if inplace else x * scale


class UniformDropout(Twin, nn.Dropout):
    """The twin of ``nn.Dropout``: in training on the CPU, the mask of ``dropout_scale``;
    otherwise (evaluation, another device, p of 0 or 1) ``nn.Dropout``."""

    plain = nn.Dropout

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Dropout's name)
        return dropout(input, self.p, self.training, self.on_cpu, self.inplace)
