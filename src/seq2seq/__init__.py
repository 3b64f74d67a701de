"""seq2seq: RNN encoder-decoder models with attention, on PyTorch.

- ``EncoderDecoderRNN``: NumPy arrays in and out, for sequences of vectors (``vectors/``).
- ``Translator``: load, translate and evaluate translation models (``decoding/``);
  ``train_translator`` trains one and loads it (``training/``).
- ``Seq2Seq``: the PyTorch model core both of them use (``models/``).

The layers, each a folder that imports only from the ones listed before it:
``files``, ``config`` -> ``models`` -> ``kernels`` -> ``data`` -> ``training`` / ``decoding``
-> ``serving`` -> the faces (``vectors``, ``cli``, ``demo``). ``tests/test_import_graph.py``
holds the package to that table.

Importing the package loads no torch: the names below are imported on first use (PEP 562),
so ``seq2seq --help`` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_LAZY = {
    "Config": "seq2seq.config", "DataConfig": "seq2seq.config", "DecodeConfig": "seq2seq.config",
    "ModelConfig": "seq2seq.config", "TrainConfig": "seq2seq.config",
    "Seq2Seq": "seq2seq.models.rnn.model",
    "EncoderDecoderRNN": "seq2seq.vectors.model",
    "Translator": "seq2seq.decoding.translator",
    "train_translator": "seq2seq.training.loop",
}
__all__ = [
    "Config", "DataConfig", "DecodeConfig", "EncoderDecoderRNN", "ModelConfig", "Seq2Seq",
    "TrainConfig", "Translator", "train_translator",
]

if TYPE_CHECKING:
    from seq2seq.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig
    from seq2seq.decoding.translator import Translator
    from seq2seq.models.rnn.model import Seq2Seq
    from seq2seq.training.loop import train_translator
    from seq2seq.vectors.model import EncoderDecoderRNN


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'seq2seq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
