"""Setting up a training run, before its first update: the model directory (its lock, a trained
model already in it), the config of a resumed run, the data and tokenizers (made by
``binarize.py``), and the model, its size checked against the device's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq.config import Config, ConfigError
from seq2seq.data.batches import EncodedCorpus, encode_corpus
from seq2seq.data.prepare import training_corpus
from seq2seq.data.prepared import PreparedCorpus
from seq2seq.data.text import DataError, read_parallel
from seq2seq.data.tokenizers import PAD_ID, Tokenizer
from seq2seq.model_dir import CONFIG_FILE, LAST, LOCK_FILE, remove_trained_files, trained_files
from seq2seq.models.checkpoint import shapes_only
from seq2seq.models.rnn.model import Seq2Seq

BYTES_PER_PARAMETER = 16  # float32 weight, gradient and Adam's two moments, activations aside


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class ModelDirLock:
    """An exclusive ``flock`` on ``train.lock`` in a model directory, for one training process.

    The OS releases it when the process ends, however it ends: a SIGKILL leaves no stale lock.
    The file names the holder (pid and host) for the error that a second run gets; it is
    emptied on release, never deleted (a deleted lock file lets two runs lock two files).
    """

    def __init__(self, model_dir: Path) -> None:
        path = model_dir / LOCK_FILE
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            if not path.is_file():
                raise
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # read-only: the first write will say
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(self.fd)
            raise TrainingError(f"{model_dir} is in use: {holder} is training into it (it holds "
                                f"{path}); wait for it to end, or choose another --model-dir") from None
        with contextlib.suppress(OSError):  # the note is for that error alone: a full disk may refuse it
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing releases the lock


def claim_model_dir(model_dir: Path, resume: bool, overwrite: bool) -> ModelDirLock:
    """Lock ``model_dir`` for this run (rank 0 only), refusing to overwrite a trained model."""
    if resume and not (model_dir / LAST).is_file():
        raise TrainingError(f"--resume: no checkpoint to resume from at {model_dir / LAST} (the run "
                            f"stopped before its first one); start it again without --resume")
    model_dir.mkdir(parents=True, exist_ok=True)
    lock = ModelDirLock(model_dir)
    found = [] if resume else trained_files(model_dir)
    if found and not overwrite:
        lock.release()
        raise TrainingError(f"{model_dir} already holds a trained model ({', '.join(found)}); add "
                            f"--resume to continue its training, --overwrite to replace it, or "
                            f"choose another --model-dir")
    if found:
        remove_trained_files(model_dir)
    return lock


def refuse_own_config(config_path: Path, model_dir: Path) -> None:
    """A new run writes ``config.yaml`` into ``model_dir``: never over the config it reads."""
    if (model_dir / CONFIG_FILE).resolve() == Path(config_path).resolve():
        raise TrainingError(f"--config {config_path} is the file that training writes in --model-dir "
                            f"{model_dir}; keep your config elsewhere, or choose another --model-dir")


def resolve_data_paths(config: Config, data_dir: str | Path | None) -> None:
    """Make the data section's paths absolute, relative to ``data_dir`` (default: cwd)."""
    base = Path(data_dir) if data_dir is not None else Path.cwd()
    for field in ("train_src", "train_tgt", "valid_src", "valid_tgt", "test_src", "test_tgt", "prepared"):
        value = getattr(config.data, field)
        if value:
            setattr(config.data, field, str((base / value).resolve()))


def prepare_config(config: Config, model_dir: Path, data_dir: str | Path | None, resume: bool,
                   is_main: bool) -> Config:
    """The config of this session. A resumed run keeps its saved data and model sections (a
    different value is an error naming it) and takes the new train and decode sections."""
    resolve_data_paths(config, data_dir)
    if not resume:
        if is_main:
            config.save(model_dir / CONFIG_FILE)
        return config
    saved = Config.load(model_dir / CONFIG_FILE)
    for section in ("data", "model"):
        mine, theirs = getattr(config, section), getattr(saved, section)
        for field in dataclasses.fields(mine):
            a, b = getattr(mine, field.name), getattr(theirs, field.name)
            if a != b and not (section == "data" and field.name.endswith(("_src", "_tgt")) and not a):
                raise ConfigError(f"--resume: {section}.{field.name} is {a!r} but the run in "
                                  f"{model_dir} was started with {b!r}")
    saved.train, saved.decode = config.train, config.decode
    return saved


@dataclass
class RunData:
    """The tokenizers, and the training and validation data as token ids."""

    src_tok: Tokenizer
    tgt_tok: Tokenizer
    train: PreparedCorpus  # token ids read from the prepared files (binarize.py)
    valid_src: list[str]  # validation sources and references as text, for BLEU
    valid_ref: list[str]
    valid: EncodedCorpus | None  # None without validation files


def load_data(config: Config, model_dir: Path, resume: bool, dist, log: Callable[[str], None]) -> RunData:
    """The training data, prepared on rank 0 (tokenizers included) and read from its files on every
    rank (``binarize.training_corpus``); the validation data, read and encoded in memory."""
    data = config.data
    # prepared once (on rank 0, the others waiting) into arrays of token ids, or reused
    train, src_tok, tgt_tok = training_corpus(config, model_dir, dist, resume, log)
    if not data.valid_src:
        return RunData(src_tok, tgt_tok, train, [], [], None)
    valid_src, valid_ref = read_parallel(data.valid_src, data.valid_tgt or None, data.max_line_chars)
    if not valid_src:
        raise DataError(f"{data.valid_src}: the validation data is empty; give data.valid_src some "
                        f"lines, or leave it empty to train without validation")
    valid = encode_corpus(valid_src, valid_ref, src_tok, tgt_tok, data.max_len, "truncate",
                          log=lambda _msg: None)
    return RunData(src_tok, tgt_tok, train, valid_src, valid_ref, valid)


def build_model(config: Config, src_tok: Tokenizer, tgt_tok: Tokenizer) -> Seq2Seq:
    return Seq2Seq(config.model, src_vocab=len(src_tok), tgt_vocab=len(tgt_tok), pad_id=PAD_ID)


def check_model_size(config: Config, src_tok: Tokenizer, tgt_tok: Tokenizer, device: torch.device) -> None:
    """Refuse a model that the device's memory cannot train, before allocating any of it."""
    try:
        with shapes_only():
            parameters = build_model(config, src_tok, tgt_tok).num_parameters()
    except (RuntimeError, ValueError, OverflowError) as error:  # sizes past int64
        raise ConfigError(f"the model section describes a model that cannot be built: {error}") from None
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if parameters * BYTES_PER_PARAMETER > memory:
        raise ConfigError(
            f"the model section describes {parameters:,} parameters, "
            f"{parameters * BYTES_PER_PARAMETER / 2**30:,.1f} GiB to train with Adam, more than the "
            f"{memory / 2**30:,.1f} GiB of {device}: lower model.embed_size, model.hidden_size "
            f"or the layers")
