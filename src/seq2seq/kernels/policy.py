"""Which fast paths a model runs (``FastPaths``), decided for the device it is on, and the
``Twin`` base of the fused modules that carry them out.

The model (``seq2seq.models``) is plain PyTorch: ``nn.GRU``, the decoder's step loop,
``F.linear`` and ``F.cross_entropy``. That is ``reference``.
``fast`` (the default, ``train.kernels``) swaps modules for twins where ``FastPaths`` says
so (``seq2seq.kernels.apply``) and, in bf16 on a CPU, decodes through
``session.FastRNNSession`` (the output layer's products in bf16) and trains the fused GRUs
with their whole-sequence products in bf16 (``bf16_products``: the input projections and the
weight gradients, one large product each; every step's recurrence stays float32). On a CPU,
``uniform_dropout`` draws dropout masks from uniform floats instead of ``bernoulli_``. The
training paths run in training mode (``model.train()``). Each gives the reference's results to
rounding (tests/test_fastpath.py), except that ``uniform_dropout``'s masks are another draw
from the same distribution (tests/test_dropout.py). Each path earns its place: with the others on, it buys at
least 5% of training or decoding speed in one of the shipped RNN configs
(``benchmarks/kernel_share.py``; the figures, and the paths dropped for buying less, are in
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

KINDS = ("fast", "reference")


@dataclass(frozen=True)
class FastPaths:
    """The fast paths a model runs; all off is ``reference``."""

    fused_gru: bool = False  # GRU training, one autograd Function per layer (gru.py)
    stepwise: bool = False  # the input-feeding decoder's training in one Function (stepwise.py)
    fused_loss: bool = False  # output layer and cross-entropy in one pass (loss.py)
    bf16_output: bool = False  # CPU bf16: output products in bf16, candidates rescored (search)
    bf16_products: bool = False  # CPU bf16: the fused GRUs' whole-sequence products in bf16
    uniform_dropout: bool = False  # CPU training: dropout masks from uniform draws (dropout.py)

    def describe(self) -> str:
        """One line for the training log, e.g. ``fast paths: fused_gru, fused_loss``."""
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return "fast paths: " + (", ".join(on) if on else "none (plain PyTorch)")


    def products_dtype(self) -> torch.dtype | None:
        """The dtype of the fused GRUs' whole-sequence products (``ops.matmul_in``,
        ``ops.linear_in``): bf16 under ``bf16_products``, else None (the inputs')."""
        return torch.bfloat16 if self.bf16_products else None

    def decodes_fast(self) -> bool:
        """Whether decoding has a path of its own (``session.FastRNNSession``)."""
        return self.bf16_output


REFERENCE = FastPaths()


class Twin:
    """The base of a fused twin of a plain module, as ``torch.ao.quantization``'s int8
    ``Linear`` is of ``nn.Linear`` but with the same weights.

    ``install`` turns a plain module into its twin by changing its class (as
    ``torch.nn.utils.parametrize`` does), so its parameters, buffers, hooks and ``state_dict``
    stay the same objects (an optimizer made before keeps training them); ``uninstall``
    turns it back. A twin subclasses its plain class (``plain``) and overrides only public
    methods of it. Its fused paths are CPU kernels: it runs them while its module is on the
    CPU (``on_cpu``), decided again whenever the module moves (``_apply``: ``.to()``,
    ``.cuda()``, ``.cpu()``), and elsewhere is the plain module (cuDNN on CUDA).

    ``cpu_policy``: the paths of the model's layout on a CPU, which the twin reads its
    options from (``bf16_output``).
    """

    plain: ClassVar[type[nn.Module]]
    cpu_policy: FastPaths
    device_type: str

    @classmethod
    def install(cls, module: nn.Module, cpu_policy: FastPaths, device_type: str) -> None:
        if type(module) is not cls.plain:
            raise TypeError(f"{cls.__name__} is the twin of {cls.plain.__name__}, "
                            f"not of {type(module).__name__}")
        module.__class__ = cls
        module.cpu_policy, module.device_type = cpu_policy, device_type  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        del self.cpu_policy, self.device_type
        self.__class__ = self.plain

    @property
    def on_cpu(self) -> bool:
        return self.device_type == "cpu"

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        # where fn sends a tensor of this device is where the module went
        self.device_type = fn(torch.empty(0, device=self.device_type)).device.type
        return result


def resolve(kernels: str, device_type: str, precision: str, model: nn.Module,
            available: frozenset[str] | None = None) -> FastPaths:
    """The fast paths of ``model`` (a ``Seq2Seq``) on ``device_type`` in ``precision``.

    ``kernels``: 'fast' or 'reference'. ``available``: the private torch ops that work here
    (default: ``private_ops()``, probed once); without them their paths stay off.
    """
    if kernels not in KINDS:
        raise ValueError(f"kernels must be 'fast' or 'reference', got {kernels!r}")
    if kernels == "reference":
        return REFERENCE
    ops = private_ops() if available is None else available
    cpu, config, decoder = device_type == "cpu", model.config, model.decoder
    one_layer_gru = config.cell == "gru" and config.decoder_layers == 1
    linear_output = isinstance(model.generator, nn.Linear)  # not int8
    tokens = model.tgt_embed is not None
    fused_gru = cpu and config.cell == "gru" and "grad_input" in ops
    return FastPaths(
        fused_gru=fused_gru,
        stepwise=cpu and one_layer_gru and decoder.input_feeding and "grad_input" in ops,
        fused_loss=tokens,
        bf16_output=cpu and precision == "bf16" and linear_output and tokens,
        bf16_products=fused_gru and precision == "bf16",
        uniform_dropout=cpu,
    )


@functools.cache
def private_ops() -> frozenset[str]:
    """The private torch ops of the fast paths that work here, checked once against public
    ones: 'grad_input' (``aten.tanh_backward`` and ``aten.sigmoid_backward.grad_input`` of the
    hand-written backward passes)."""
    x = torch.linspace(-1.0, 1.0, 128, device="cpu").view(8, 16)
    y, out = torch.tanh(x), torch.empty_like(x)
    aten = torch.ops.aten
    try:
        works = (torch.allclose(aten.tanh_backward.grad_input(x, y, grad_input=out), x * (1 - y * y))
                 and torch.allclose(aten.sigmoid_backward.grad_input(x, y, grad_input=out), x * y * (1 - y)))
    except (AttributeError, RuntimeError):
        works = False
    return frozenset({"grad_input"} if works else ())
