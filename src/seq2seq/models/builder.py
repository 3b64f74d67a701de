"""The model a config describes: the one place that turns a ``model`` section into a module.

Training builds it to train, the ``Translator`` to load weights into, and both build a
skeleton first (``meta=True``) to check a config's sizes before allocating anything.
"""

from __future__ import annotations

import contextlib

from seq2seq.config import ModelConfig
from seq2seq.models.checkpoint import shapes_only
from seq2seq.models.rnn.model import Seq2Seq
from seq2seq.models.transformer.model import Transformer


def build_model(config: ModelConfig, src_vocab: int, tgt_vocab: int, pad_id: int, *,
                meta: bool = False) -> Seq2Seq | Transformer:
    """A translation model of ``src_vocab`` source and ``tgt_vocab`` target tokens: a
    ``Seq2Seq`` (``model.arch: rnn``) or a ``Transformer`` (``transformer``).

    ``pad_id`` is the padding token of both vocabularies (masked out of attention and loss).
    ``meta``: parameters on the meta device, without memory or initialisation (their shapes
    only, for ``checkpoint.check_shapes`` or a parameter count); a config describing sizes past
    int64 raises a ValueError or RuntimeError here rather than allocating.
    """
    with shapes_only() if meta else contextlib.nullcontext():
        family = Transformer if config.arch == "transformer" else Seq2Seq
        return family(config, src_vocab=src_vocab, tgt_vocab=tgt_vocab, pad_id=pad_id)
