"""Small kernels of the fast paths that ``policy.FastPaths`` turns on, and process-wide tuning.

- ``tanh_``: ``tanh(x) = 2 sigmoid(2x) - 1``, within 2e-7 of ``torch.tanh`` in float32, since
  PyTorch's CPU sigmoid is much faster than its tanh; ``FastTanh`` is the twin of ``nn.Tanh``.
- ``dropout_scale``: a dropout mask from 64-bit random words, each used as four 16-bit
  uniforms, instead of one Bernoulli draw per element; ``FastDropout`` is the twin of
  ``nn.Dropout``.
- ``cpu_linear``: a float32 product through oneDNN rather than MKL, for decoding.
- ``keep_freed_memory``: glibc keeps freed memory for reuse. It changes the whole process, so
  only the ``seq2seq`` command calls it; an application calls it itself if it wants it.

What each gains on the machines measured: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from seq2seq.kernels.policy import Twin, onednn_linear


def tanh_(x: Tensor) -> Tensor:
    """tanh in place, as ``2 sigmoid(2x) - 1`` (no autograd); returns ``x``."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = tanh_(x.clone())
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


class FastTanh(Twin, nn.Tanh):
    """``nn.Tanh`` through ``tanh_`` (on a copy, with tanh's gradient) on the CPU."""

    plain = nn.Tanh

    def forward(self, x: Tensor) -> Tensor:
        return _Tanh.apply(x) if self.on_cpu else torch.tanh(x)


def dropout(x: Tensor, p: float, training: bool, fast: bool) -> Tensor:
    """``F.dropout``, or with ``fast`` with the mask of ``dropout_scale`` (the drop
    probability rounded to 1/65536)."""
    if not fast or p >= 1.0:
        return F.dropout(x, p, training)
    return x * dropout_scale(x.shape, p, x.dtype, x.device) if training and p > 0.0 else x


def dropout_scale(shape: tuple[int, ...] | torch.Size, p: float,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> Tensor:
    """A dropout mask of ``shape``: 0 with probability ``p`` (rounded to 1/65536), else
    ``1 / (1 - p)``. Each 64-bit random word gives four 16-bit uniforms."""
    n = 1
    for size in shape:
        n *= size
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, 2**63 - 1)
    uniform16 = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    keep = uniform16 >= round(p * 65536) - 32768
    return keep.to(dtype).mul_(1.0 / (1.0 - p))


class FastDropout(Twin, nn.Dropout):
    """``nn.Dropout`` with ``dropout_scale``'s masks on the CPU."""

    plain = nn.Dropout

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.on_cpu)


def precision_autocast(precision: str, device_type: str, model: object = None) -> torch.autocast:
    """The autocast context of ``train.precision`` ('fp32' or 'bf16', resolved) for ``model``.
    bf16 autocasts the model on a GPU, and on a CPU where the model's class says
    ``autocasts_on_cpu`` (the Transformer). The RNN's bf16 on a CPU is its output layer's products
    instead (``FastPaths.bf16_output``). The context turns off a caller's autocast otherwise."""
    on_cpu = getattr(model, "autocasts_on_cpu", False)
    enabled = precision == "bf16" and (device_type != "cpu" or on_cpu)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def cpu_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """(m, k) ``x`` @ (n, k) ``weight``.T (+ (n,) ``bias``) -> (m, n) through oneDNN, with no
    gradient: for decoding (``FastPaths.onednn_step``, ``onednn_output``).

    Where oneDNN would be slower or cannot run (not float32 on CPU, an operand not contiguous
    (a weight sliced from a wider one is far slower), no rows, no oneDNN in this build) it is
    ``F.linear``."""
    op = onednn_linear()
    if (op is None or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous()
            or not weight.is_contiguous() or x.size(0) == 0):
        return F.linear(x, weight, bias)
    return op(x, weight, bias, "none", [], "")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves blocks over 32 MiB (and, as its threshold adapts, smaller ones)
    with fresh mappings and unmaps them when freed, so every (tokens, vocabulary) buffer of a
    training or decoding step page-faults on each of its pages again. This serves blocks up
    to 256 MiB from the heap and trims the heap only when 1 GiB at its top is free: a block
    freed and asked for again is reused without faults, as often as the heap's layout allows
    (benchmarks/page_faults.py). The peak memory stays what the work needs; the process just
    does not shrink after a peak, which is why the library never calls this itself: the
    ``seq2seq`` command does, and an application may. ``SEQ2SEQ_KEEP_FREED_MEMORY=0`` in the
    environment leaves malloc as it is.

    Returns:
        True where applied (Linux with glibc), False otherwise (nothing changes).
    """
    if not sys.platform.startswith("linux") or os.environ.get("SEQ2SEQ_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    return bool(mallopt(m_mmap_threshold, 256 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
