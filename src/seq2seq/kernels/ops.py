"""Small pieces of the fast paths, and process-wide tuning.

- ``tanh_``: ``tanh(x) = 2 sigmoid(2x) - 1`` in place, within 2e-7 of ``torch.tanh`` in
  float32, inside the fused GRU and step-wise kernels: PyTorch's own tanh kernel costs several
  times its sigmoid on some CPUs (an AMD EPYC) and about the same on others.
- ``matmul_in``, ``linear_in``: a matrix product or a linear layer with its operands rounded
  to bf16 (``FastPaths.bf16_products``).
- ``precision_autocast``: the autocast context of a training or decoding precision.
- ``keep_freed_memory``: glibc keeps freed memory for reuse. It changes the whole process, so
  only the ``seq2seq`` command calls it; an application calls it itself if it wants it.

What each gains on the machines measured: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import Tensor
from torch.nn import functional as F


def tanh_(x: Tensor) -> Tensor:
    """tanh in place, as ``2 sigmoid(2x) - 1`` (no autograd); returns ``x``."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def matmul_in(dtype: torch.dtype | None, a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (``torch.matmul``: mm or bmm) with both operands rounded to ``dtype`` first, the
    result in ``a``'s dtype; ``None``: as given. In bf16 a CPU with AMX or AVX-512 BF16 multiplies
    large matrices several times faster, accumulating in float32."""
    if dtype is None:
        return torch.matmul(a, b)
    return torch.matmul(a.to(dtype), b.to(dtype)).to(a.dtype)


def linear_in(dtype: torch.dtype | None, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` with its operands rounded to ``dtype`` (differentiably: the gradients are
    products in ``dtype`` too), the result in ``dtype``; ``None``: as given."""
    if dtype is None:
        return F.linear(x, weight, bias)
    return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def precision_autocast(precision: str, device_type: str, model: object = None) -> torch.autocast:
    """The autocast context of ``train.precision`` ('fp32' or 'bf16', resolved) for ``model``.
    bf16 autocasts the model on a GPU, and on a CPU where the model's class says
    ``autocasts_on_cpu`` (the Transformer). The RNN's bf16 on a CPU is its output layer's products
    instead (``FastPaths.bf16_output``). The context turns off a caller's autocast otherwise."""
    on_cpu = getattr(model, "autocasts_on_cpu", False)
    enabled = precision == "bf16" and (device_type != "cpu" or on_cpu)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


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
