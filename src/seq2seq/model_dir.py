"""The files of a model directory, named once for training, loading, the command and the demo.

    config.yaml         the full config (data paths made absolute)
    tokenizer.json      which tokenizer files below hold the source and target vocabularies
    *.vocab.json        the tokenizers (sentencepiece adds *.model), written before training
    last.safetensors    model, optimizer, schedule, random state and position in the data
    best.safetensors    the weights with the best validation BLEU
    metrics.jsonl       one JSON object per logging step and per validation
    train.lock          locked by the process training into the directory, which it names
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE = "config.yaml", "tokenizer.json", "metrics.jsonl"
BEST, LAST, LOCK_FILE = "best.safetensors", "last.safetensors", "train.lock"
VOCAB_PATTERN = "*.vocab.json"


def trained_files(model_dir: Path) -> list[str]:
    """The names of the files of a trained (or training) model in ``model_dir``."""
    names = [name for name in (CONFIG_FILE, TOKENIZER_FILE, LAST, BEST) if (model_dir / name).exists()]
    return names + sorted(path.name for path in model_dir.glob(VOCAB_PATTERN))


def remove_trained_files(model_dir: Path) -> None:
    """Delete a model's files from ``model_dir`` (a new run replaces it); other files stay."""
    for name in [*trained_files(model_dir), METRICS_FILE]:
        (model_dir / name).unlink(missing_ok=True)


def remove_stale_temporary_files(model_dir: Path) -> None:
    """Half-written checkpoints of a killed session: atomic writes leave them only then."""
    for name in (LAST, BEST, METRICS_FILE):
        for stale in model_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
