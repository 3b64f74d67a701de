"""The files of a model directory, named once for training, loading, the command and the demo.

    config.yaml         the full config (data paths made absolute)
    tokenizer.json      which tokenizer files below hold the source and target vocabularies
    *.vocab.json        the tokenizers (sentencepiece adds *.model), written before training
    last.safetensors    model, optimizer, schedule, random state and position in the data
    best.safetensors    the weights with the best validation BLEU
    step-*.safetensors  the weights of the last saves, with train.keep_checkpoints
    averaged.safetensors  their mean, written by seq2seq average
    metrics.jsonl       one JSON object per logging step and per validation
    init.json           a fine-tuning run's start (train --init-from): the folder, the
                        checkpoint and its SHA-256
    train.lock          locked by the process training into the directory, which it names
    written.json        the names of the files above that seq2seq wrote here: ``--overwrite``
                        deletes only those (and the tokenizer files their tokenizer.json names)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE = "config.yaml", "tokenizer.json", "metrics.jsonl"
BEST, LAST, LOCK_FILE = "best.safetensors", "last.safetensors", "train.lock"
AVERAGED = "averaged.safetensors"  # seq2seq average: the mean of the kept step-*.safetensors
KEPT = re.compile(r"step-(\d{8,})\.safetensors")  # train.keep_checkpoints: the weights at a step
RECORD_FILE = "written.json"
INIT_FILE = "init.json"  # train --init-from: where the run's weights came from
VOCAB_SUFFIX = ".vocab.json"
# what a training run writes under these names; the tokenizer files are named by tokenizer.json
RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE, LAST, BEST, METRICS_FILE)


def trained_files(model_dir: Path) -> list[str]:
    """The names of the files of a trained (or training) model in ``model_dir``."""
    names = [name for name in (CONFIG_FILE, TOKENIZER_FILE, LAST, BEST, INIT_FILE)
             if os.path.lexists(model_dir / name)]
    return names + sorted(name for name in _names(model_dir)
                          if name.endswith(VOCAB_SUFFIX) or KEPT.fullmatch(name) or name == AVERAGED)


def tokenizer_file_names(stems: list[str]) -> list[str]:
    """The files ``Tokenizer.save`` writes for the tokenizers named ``stems`` (tokenizer.json's
    ``src`` and ``tgt``): ``NAME.vocab.json``, and ``NAME.model`` for sentencepiece."""
    return [f"{stem}{suffix}" for stem in dict.fromkeys(stems) for suffix in (VOCAB_SUFFIX, ".model")]


def remove_stale_temporary_files(model_dir: Path) -> None:
    """Half-written checkpoints of a killed session: atomic writes leave them only then."""
    for name in _names(model_dir):
        if any(name.startswith(f".{own}.") and name.endswith(".tmp") for own in (LAST, BEST, METRICS_FILE)):
            (model_dir / name).unlink(missing_ok=True)


def _names(folder: Path) -> list[str]:
    """The names in ``folder`` (none when it is missing); never a glob: a folder's name may hold
    ``*`` or ``[``, which a pattern would read as wildcards."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
