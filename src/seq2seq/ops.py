"""CPU fast paths for what PyTorch makes slow here: tanh, dropout, reusing freed memory, and
bf16 where it pays (``precision_plan``).

- ``tanh``: PyTorch's CPU tanh costs about 1.3 ns an element here (a (64, 15, 256) tensor
  takes 0.32 ms), its sigmoid about 0.23 ns. ``tanh(x) = 2 sigmoid(2x) - 1`` gives the same
  values to within 2e-7 (absolute) at a third of the cost.
- dropout: PyTorch's CPU dropout draws one Bernoulli sample per element (about 12 ns each
  here, 4 ms for a 64 x 20 x 256 batch); ``dropout_scale`` draws 64-bit random words and uses
  each as four 16-bit uniforms, 5-10 times faster.
- freed memory: by default glibc hands large freed blocks back to the system, so a step
  that allocates the buffers of the last one page-faults on every page again;
  ``keep_freed_memory`` asks it to keep them.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F


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


def fast_tanh(x: Tensor) -> Tensor:
    """``torch.tanh`` on CPU through ``tanh_`` (with its gradient when one is recorded);
    plain ``torch.tanh`` on other devices and for bf16/fp16 (not measured there)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return torch.tanh(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Tanh.apply(x)
    return tanh_(x.clone())


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout`` with the mask of ``dropout_scale`` on CPU (see the module's notes).
    The drop probability is rounded to 1/65536."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return x * dropout_scale(x.shape, p, x.dtype)


def dropout_scale(shape: tuple[int, ...] | torch.Size, p: float,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU dropout mask of ``shape``: 0 with probability ``p`` (rounded to 1/65536),
    else ``1 / (1 - p)``. Each 64-bit random word gives four 16-bit uniforms."""
    n = 1
    for size in shape:
        n *= size
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
    uniform16 = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    keep = uniform16 >= round(p * 65536) - 32768
    return keep.to(dtype).mul_(1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` that uses ``fast_dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)


def precision_plan(precision: str, device_type: str) -> tuple[bool, torch.dtype | None]:
    """How ``train.precision`` runs on a device: (autocast the model in bf16?, the dtype of
    the output layer's products or None), for training and decoding alike.

    bf16 on a GPU autocasts the model. On CPU only the output layer's products run in bf16
    (``loss.output_cross_entropy``'s ``matmul_dtype``, ``Seq2Seq.decoding``'s
    ``output_dtype``): they are most of the FLOPs and the one place where bf16 was faster
    here. Autocast over the whole model was no faster, kept the step-wise decoder off its
    fused path, and made oneDNN build and keep a kernel for every shape of every small
    product (training grew 0.49 -> 1.42 GiB in 170 steps; a run that validated in bf16
    peaked at 1.55 GiB)."""
    bf16 = precision == "bf16"
    if device_type == "cpu":
        return False, torch.bfloat16 if bf16 else None
    return bf16, None


def precision_autocast(precision: str, device_type: str) -> torch.autocast:
    """The autocast context of ``precision_plan``: bf16 where it autocasts, else off (even
    inside a caller's autocast)."""
    autocast, _ = precision_plan(precision, device_type)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast)


def records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an operation on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _linear_pointwise():
    """oneDNN's fp32 ``x @ w.T (+ bias)`` (``torch.ops.mkldnn._linear_pointwise``, the op
    that TorchInductor's CPU backend calls), or None where this build has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.linspace(-1.0, 1.0, 128).view(8, 16)  # no draw from the random stream
        w = torch.linspace(1.0, -0.5, 64).view(4, 16)
        if not torch.allclose(op(x, w, None, "none", [], ""), x @ w.t(), atol=1e-4):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


_ONEDNN_LINEAR = _linear_pointwise()


def cpu_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """(m, k) ``x`` @ (n, k) ``weight``.T (+ (n,) ``bias``) -> (m, n): ``F.linear``.

    On CPU in float32 it runs through oneDNN rather than MKL: here (AMD EPYC, AVX-512) MKL's
    products reach about 150-175 GFLOP/s and oneDNN's 190-210 on the output layer's shapes,
    with float32 results all the same. Both operands must be contiguous: a transposed ``x``
    ran slower than MKL, and a weight sliced from a wider one (rows strided) a thousand
    times slower. Elsewhere, or without oneDNN, it is ``F.linear``, and so where a gradient
    is recorded (the oneDNN op has none)."""
    if (_ONEDNN_LINEAR is None or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous()
            or not weight.is_contiguous() or x.size(0) == 0 or records_grad(x, weight, bias)):
        return F.linear(x, weight, bias)
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves blocks over 32 MiB (and, as its threshold adapts, smaller ones)
    with fresh mappings and unmaps them when freed, so every (tokens, vocabulary) buffer of a
    training step or decoding step page-faults on each of its pages again: a log-softmax over
    1,250 x 8,000 scores took 15 ms here, 4.7 ms with this setting. It serves blocks up to
    256 MiB from the heap and trims the heap only when 1 GiB at its top is free. A block
    freed and asked for again is then reused without faults; with PyTorch's own allocations
    in between, the heap's layout decides how often (ten 40 MB log-softmaxes faulted on 0 to
    90% of the pages that the default faults on, varying from run to run). The peak memory
    stays what the work needs; the process just does not shrink after a peak.
    ``SEQ2SEQ_KEEP_FREED_MEMORY=0`` in the environment leaves malloc as it is.

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
