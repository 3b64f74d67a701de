"""Kernels applied to the plain models from outside, as ``torch.ao.quantization.quantize_dynamic``
applies int8: the policy that picks them for a device (``policy.py``), the fused twins of
modules (``FusedGRU`` and ``FusedEncoder``: gru.py; ``StepwiseDecoder``: stepwise.py;
``FusedOutputLoss``: loss.py; ``UniformDropout``: dropout.py) and the fast decoding session
(session.py: the output layer in bf16).

The entry points:

- ``apply(model, kernels, device, precision)``: swap a model's modules for their twins
  (``reference``: swap nothing, undo earlier swaps) and return the policy chosen;
- ``policy(model)``: the policy in force for the device the model is on now;
- ``decoding_session(model)``: a decoding session (``models/interface.py``)
  for one decoding call: the fast one where the policy has decoding paths.

Twins re-decide when the model moves (``policy.Twin``): on CUDA they are the plain modules
(cuDNN, the plain step loop; bf16 is autocast's), back on the CPU fused again.

May import: ``seq2seq.files``, ``seq2seq.config``, ``seq2seq.models``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from seq2seq.kernels.dropout import UniformDropout
from seq2seq.kernels.gru import FusedEncoder, FusedGRU
from seq2seq.kernels.loss import FusedOutputLoss
from seq2seq.kernels.policy import KINDS, REFERENCE, FastPaths, Twin, resolve
from seq2seq.kernels.session import FastRNNSession
from seq2seq.kernels.stepwise import StepwiseDecoder
from seq2seq.models.interface import DecodingSession
from seq2seq.models.rnn.model import Seq2Seq
from seq2seq.models.rnn.session import RNNSession
from seq2seq.models.transformer.model import Transformer
from seq2seq.models.transformer.session import TransformerSession

__all__ = ["KINDS", "REFERENCE", "FastPaths", "apply", "decoding_session", "policy"]

# each plain class, its twin and the path that installs it
TWINS: dict[type[nn.Module], tuple[type[Twin], str]] = {
    FusedGRU.plain: (FusedGRU, "fused_gru"),
    FusedEncoder.plain: (FusedEncoder, "fused_gru"),
    StepwiseDecoder.plain: (StepwiseDecoder, "stepwise"),
    FusedOutputLoss.plain: (FusedOutputLoss, "fused_loss"),
    UniformDropout.plain: (UniformDropout, "uniform_dropout"),
}


@dataclass(frozen=True)
class Applied:
    """What ``apply`` was given, kept on the model (``model.applied_kernels``, as
    ``quantize_dynamic`` keeps ``qconfig`` on modules) so that the policy can be decided
    again for another device."""

    kernels: str | FastPaths
    precision: str


def apply(model: Seq2Seq, kernels: str | FastPaths = "fast", device: torch.device | str | None = None,
          precision: str = "fp32") -> FastPaths:
    """Swap ``model``'s modules for their fused twins (same ``state_dict``, same parameter
    objects) where the policy of ``kernels`` ('fast' or 'reference') in ``precision``
    ('fp32' or 'bf16') has them, and return the policy for the device the model is on.
    ``kernels`` may also be the CPU policy itself (a ``FastPaths``; tests use this to turn
    paths on one at a time).

    ``device``: move the model there first (default: leave it where it is). Call it again to
    change the kernels or the precision; ``reference`` swaps every twin back. A twin runs its
    CPU kernels only while its module is on a CPU, so ``.to()`` later re-decides
    (``policy(model)`` says what holds then).
    """
    if device is not None:
        model.to(device)
    if isinstance(model, Transformer):  # no twin of its modules has shown a gain: plain PyTorch
        return _plain_transformer(model, kernels, precision)
    cpu = kernels if isinstance(kernels, FastPaths) else resolve(kernels, "cpu", precision, model)
    device_type = _device_type(model)
    for module in model.modules():
        if isinstance(module, Twin):
            module.uninstall()
    for module in model.modules():
        twin, path = TWINS.get(type(module), (None, ""))
        if twin is not None and getattr(cpu, path) and _fits(module):
            twin.install(module, cpu, device_type)
    model.applied_kernels = Applied(kernels, precision)
    return policy(model)


def _plain_transformer(model: Transformer, kernels: str | FastPaths, precision: str) -> FastPaths:
    """``apply`` for a Transformer: nothing to swap. Its bf16, on a CPU as on a GPU, is autocast
    (``ops.precision_autocast``)."""
    model.applied_kernels = Applied(kernels, precision)
    return REFERENCE


def _fits(module: nn.Module) -> bool:
    """Layouts a twin's kernels cover beyond what the policy checks."""
    if isinstance(module, nn.GRU):
        return module.batch_first
    if isinstance(module, FusedEncoder.plain):
        return module.cell == "gru"
    return True


def policy(model: Seq2Seq) -> FastPaths:
    """The paths in force for ``model`` on the device it is on now (``REFERENCE`` if
    ``apply`` never ran on it)."""
    applied = getattr(model, "applied_kernels", None)
    if applied is None or isinstance(model, Transformer):
        return REFERENCE
    device_type = _device_type(model)
    if not isinstance(applied.kernels, FastPaths):
        return resolve(applied.kernels, device_type, applied.precision, model)
    here = resolve("fast", device_type, applied.precision, model)  # given paths, where they run
    return FastPaths(**{f.name: getattr(applied.kernels, f.name) and getattr(here, f.name)
                        for f in fields(FastPaths)})


def decoding_session(model: Seq2Seq, attention_layer: int = -1,
                     attention_head: int = -1) -> DecodingSession:
    """A session for one decoding call of ``model`` (in eval mode): ``FastRNNSession`` where
    ``policy(model)`` has decoding paths, else the plain ``RNNSession``. A ``Transformer``'s is
    its ``TransformerSession``, whose attention is that of ``attention_layer`` and
    ``attention_head`` (-1: the mean of the heads); an RNN has one attention."""
    if isinstance(model, Transformer):
        return TransformerSession(model, attention_layer, None if attention_head == -1 else attention_head)
    if policy(model).decodes_fast():
        return FastRNNSession(model)
    return RNNSession(model)


def _device_type(model: nn.Module) -> str:
    for tensor in model.parameters():
        return tensor.device.type
    return "cpu"
