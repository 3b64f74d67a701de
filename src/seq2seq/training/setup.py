"""Setting up a training run, before its first update: the model directory (its lock, a trained
model already in it), the config of a resumed run, the data and tokenizers (prepared by
``data.prepare``, on rank 0 while the other ranks wait), and the model, its size checked
against the device's memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq.config import Config, ConfigError
from seq2seq.data import prepared as fmt
from seq2seq.data.batches import EncodedCorpus, encode_corpus
from seq2seq.data.cache import prepare_in_child
from seq2seq.data.prepare import PREPARED_DIR
from seq2seq.data.prepared import MANIFEST, PreparedCorpus, read_manifest
from seq2seq.data.text import DataError, read_parallel
from seq2seq.data.tokenizers import PAD_ID, Tokenizer, load_tokenizers
from seq2seq.decoding.translator import CHECKPOINTS
from seq2seq.device import resolve_precision
from seq2seq.files import (
    FileError,
    FileLock,
    LockBusy,
    atomic_write_bytes,
    atomic_write_json,
    read_plain_json,
    replace_file,
)
from seq2seq.model_dir import (
    CONFIG_FILE,
    INIT_FILE,
    LAST,
    LOCK_FILE,
    METRICS_FILE,
    RECORD_FILE,
    RUN_FILES,
    TOKENIZER_FILE,
    tokenizer_file_names,
    trained_files,
)
from seq2seq.models.builder import build_model
from seq2seq.training.distributed import Distributed

RECORD_FORMAT = "seq2seq-written-1"
INIT_FORMAT = "seq2seq-init-1"
# the data settings that make the vocabulary: a fine-tuning run keeps its start's tokenizers
VOCABULARY_KEYS = ("tokenizer", "vocab_size", "joint_vocab", "lowercase")
BYTES_PER_PARAMETER = 16  # float32 weight, gradient and Adam's two moments, activations aside


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class ModelDirLock:
    """An exclusive ``flock`` on ``train.lock`` in a model directory, for one training process.

    The OS releases it when the process ends, however it ends: a SIGKILL leaves no stale lock.
    The file names the holder (pid and host) for the error that a second run gets. It is opened
    as ``files.FileLock`` opens lock files: never through a symlink, never when it has other
    hard links, never truncated; a refused run changes nothing.
    """

    def __init__(self, model_dir: Path) -> None:
        path = model_dir / LOCK_FILE
        try:
            self._lock = FileLock(path)
        except LockBusy as busy:
            raise TrainingError(f"{model_dir} is in use: {busy.holder} is training into it (it holds "
                                f"{path}); wait for it to end, or choose another --model-dir") from None
        except FileError as error:
            raise TrainingError(f"{error}; nothing was changed") from None

    def release(self) -> None:
        self._lock.release()  # blanks the note; closing releases the lock


def claim_model_dir(model_dir: Path, resume: bool, overwrite: bool) -> ModelDirLock:
    """Lock ``model_dir`` for this run (rank 0 only), refusing to overwrite a trained model.

    The lock comes first: nothing is written or deleted before it is held. ``overwrite``
    deletes only the files a seq2seq training wrote there (``owned_files``); a folder where a
    model file was not written by one is refused, naming it, before anything is deleted. The
    names this run writes are recorded in ``written.json`` before it writes them.
    """
    if resume and not (model_dir / LAST).is_file():
        raise TrainingError(f"--resume: no checkpoint to resume from at {model_dir / LAST} (the run "
                            f"stopped before its first one); start it again without --resume")
    model_dir.mkdir(parents=True, exist_ok=True)
    lock = ModelDirLock(model_dir)
    try:
        found = [] if resume else trained_files(model_dir)
        if found and not overwrite:
            raise TrainingError(f"{model_dir} already holds a trained model ({', '.join(found)}); add "
                                f"--resume to continue its training, --overwrite to replace it, or "
                                f"choose another --model-dir")
        if found:
            remove_owned_files(model_dir)
        record_run_files(model_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def owned_files(model_dir: Path) -> set[str]:
    """The names in ``model_dir`` that a seq2seq training wrote, by its record (``written.json``)
    and the tokenizer files that a recorded ``tokenizer.json`` names. No record: none."""
    record = _read_record(model_dir)
    owned = set(record)
    if TOKENIZER_FILE in owned:
        spec = _read_json(model_dir / TOKENIZER_FILE)
        if isinstance(spec, dict):
            stems = [spec.get(side) for side in ("src", "tgt")]
            owned.update(tokenizer_file_names([s for s in stems if isinstance(s, str) and "/" not in s]))
    return owned


def remove_owned_files(model_dir: Path) -> None:
    """Delete a trained model from ``model_dir`` (``--overwrite``), after checking that every one
    of its files is the project's (``owned_files``); otherwise a TrainingError naming one, and
    nothing deleted. Other files in the folder stay."""
    owned = owned_files(model_dir)
    present = [*trained_files(model_dir), *(n for n in (METRICS_FILE,) if os.path.lexists(model_dir / n))]
    present += [n for n in sorted(owned) if n.endswith(".model") and os.path.lexists(model_dir / n)]
    foreign = [name for name in present if name not in owned]
    if foreign:
        why = ("it has no record of the files seq2seq wrote" if not owned
               else f"it is not in {model_dir / RECORD_FILE}, the record of the files seq2seq wrote")
        raise TrainingError(f"--overwrite: {model_dir / foreign[0]} was not written by a seq2seq training "
                            f"({why}); --overwrite deletes only those: move it away, or choose another "
                            f"--model-dir. Nothing was deleted")
    folders = [name for name in present if stat.S_ISDIR(os.lstat(model_dir / name).st_mode)]
    if folders:  # unlink would fail half-way, after deleting the others
        raise TrainingError(f"--overwrite: {model_dir / folders[0]} is a folder, not a file a training "
                            f"wrote; move it away. Nothing was deleted")
    for name in dict.fromkeys(present):
        (model_dir / name).unlink(missing_ok=True)


def record_run_files(model_dir: Path) -> None:
    """Add the names a training run writes (``model_dir.RUN_FILES``) to ``written.json``, before
    the run writes any of them."""
    record_files(model_dir, RUN_FILES)


def record_files(model_dir: Path, written: Sequence[str]) -> None:
    """Add ``written`` (plain names) to ``model_dir``'s ``written.json``, before they are written."""
    recorded = _read_record(model_dir)
    if set(written) <= set(recorded):  # a resumed run: nothing to add (its folder may be read-only)
        return
    names = sorted(set(recorded) | set(written))
    replace_file(model_dir / RECORD_FILE, (json.dumps({"format": RECORD_FORMAT, "files": names},
                                                      indent=1) + "\n").encode())


def _read_record(model_dir: Path) -> list[str]:
    path = model_dir / RECORD_FILE
    record = _read_json(path)
    if record is None:
        return []
    files = record.get("files") if isinstance(record, dict) else None
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not isinstance(files, list)
            or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in files)):
        raise TrainingError(f"{path}: not a record of the files seq2seq wrote (expected "
                            f'{{"format": "{RECORD_FORMAT}", "files": [plain file names]}}); remove it '
                            f"if nothing here is a trained model")
    return files


def _read_json(path: Path) -> object:
    try:
        return read_plain_json(path)
    except FileError as error:
        raise TrainingError(str(error)) from None


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
                   is_main: bool, device: torch.device) -> Config:
    """The config of this session. A resumed run keeps its saved data and model sections (a
    different value is an error naming it) and takes the new train and decode sections.

    ``train.precision: auto`` becomes the precision it stands for on ``device``
    (``resolve_precision``), written so into the run's ``config.yaml``; a resumed run keeps
    the precision it was started with, so that it goes on exactly as it would have."""
    resolve_data_paths(config, data_dir)
    if not resume:
        config.train.precision = resolve_precision(config.train.precision, device)
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
    if config.train.precision == "auto":
        config.train.precision = saved.train.precision
    config.train.precision = resolve_precision(config.train.precision, device)
    saved.train, saved.decode = config.train, config.decode
    return saved


@dataclass(frozen=True)
class InitFrom:
    """Where a fine-tuning run (``train --init-from``) starts: a trained model's folder, the
    checkpoint whose weights it takes, and that file's SHA-256 (recorded in ``init.json``)."""

    model_dir: Path
    checkpoint: Path
    sha256: str

    def record(self) -> dict[str, str]:
        return {"format": INIT_FORMAT, "init_from": str(self.model_dir), "checkpoint": self.checkpoint.name,
                "sha256": self.sha256}


def init_from(config: Config, model_dir: str | Path, checkpoint: str = "best") -> InitFrom:
    """The start of a fine-tuning run from the trained model in ``model_dir``, checked against
    ``config``: the model section and the vocabulary settings (``VOCABULARY_KEYS``) must be
    the folder's, else a ConfigError naming the first key that differs. ``checkpoint``: 'best'
    (or 'last' where there is no best), 'last' or 'averaged'."""
    folder = Path(model_dir).resolve()
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"--init-from {model_dir}: not a model directory (no {CONFIG_FILE})")
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--init-checkpoint must be 'best', 'last' or 'averaged', got {checkpoint!r}")
    weights = folder / CHECKPOINTS[checkpoint]
    if checkpoint == "best" and not weights.is_file():
        weights = folder / LAST
    if not weights.is_file():
        raise ConfigError(f"--init-from {model_dir}: no {weights.name} to start from"
                          + (" (run seq2seq average first)" if checkpoint == "averaged" else ""))
    saved = Config.load(folder / CONFIG_FILE)
    config.validate()
    for field in dataclasses.fields(saved.model):
        mine, theirs = getattr(config.model, field.name), getattr(saved.model, field.name)
        if mine != theirs:
            raise ConfigError(f"--init-from {model_dir}: model.{field.name} is {mine!r} but that model has "
                              f"{theirs!r}; fine-tuning keeps the architecture")
    for key in VOCABULARY_KEYS:
        mine, theirs = getattr(config.data, key), getattr(saved.data, key)
        if mine != theirs:
            raise ConfigError(f"--init-from {model_dir}: data.{key} is {mine!r} but that model has "
                              f"{theirs!r}; fine-tuning keeps the model's vocabulary (its tokenizers)")
    digest = hashlib.sha256()
    with open(weights, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return InitFrom(folder, weights, digest.hexdigest())


def record_init(model_dir: Path, start: InitFrom) -> None:
    """Write ``init.json`` (recorded in ``written.json`` first)."""
    record_files(model_dir, [INIT_FILE])
    atomic_write_json(model_dir / INIT_FILE, start.record())


@dataclass
class RunData:
    """The tokenizers, and the training and validation data as token ids."""

    src_tok: Tokenizer
    tgt_tok: Tokenizer
    train: PreparedCorpus  # token ids read from the prepared files (data/prepare.py)
    valid_src: list[str]  # validation sources and references as text, for BLEU
    valid_ref: list[str]
    valid: EncodedCorpus | None  # None without validation files


def training_corpus(config: Config, model_dir: Path, dist: Distributed, resume: bool,
                    log: Callable[[str], None] = print, start: InitFrom | None = None
                    ) -> tuple[PreparedCorpus, Tokenizer, Tokenizer]:
    """The run's training data, prepared (``data.prepare.binarize``), and its tokenizers (saved in
    ``model_dir``).

    ``data.prepared`` names a prepared folder: used when it fits the config, refused when it
    does not, made when it does not exist. Unset, the run's data comes from the cache of
    prepared corpora (``data.cache``), reused across runs; a resumed run that prepared into
    ``MODEL_DIR/prepared`` (before the cache, or from a pipe) keeps it. Rank 0 prepares, in a
    child process (``data.cache.prepare_in_child``), while the others wait; then every rank
    reads the same files, so the page cache holds them once per node. Where the prepared folder
    is on each node's own disk (the model folder being shared), the first process of each other
    node prepares its copy, with the tokenizers rank 0 made. A fine-tuning run (``start``)
    takes its start's tokenizers.
    """
    model_dir = Path(model_dir)
    directory = Path(config.data.prepared) if config.data.prepared else model_dir / PREPARED_DIR
    if dist.is_main:
        # A resumed run keeps its tokenizers: the data is encoded with them, never with new ones.
        tokenizers_from = model_dir if resume else start.model_dir if start is not None else None
        directory, manifest = prepare_in_child(config, model_dir, resume, tokenizers_from, log)
        if start is not None and not resume:
            reason = fmt.tokenizer_mismatch(manifest, start.model_dir)
            if reason:
                raise DataError(f"--init-from: {reason} (the tokenizers of {start.model_dir} differ from "
                                f"those of {directory}): point data.prepared at data prepared with them, "
                                f"or remove {directory}")
        if resume:
            reason = fmt.tokenizer_mismatch(manifest, model_dir)
            if reason:
                raise DataError(f"--resume: {reason} (the run's tokenizers differ from those of "
                                f"{directory}): point data.prepared at data prepared for this run")
        else:
            for name in manifest["tokenizer_files"]:  # plain names, checked by read_manifest
                atomic_write_bytes(model_dir / name, fmt.read_tokenizer_file(directory, name,
                                                                            directory / MANIFEST))
    directory = Path(dist.broadcast(str(directory)))  # rank 0's folder: the cache's entry, or the run's
    if not dist.is_main and dist.local_rank == 0:
        # A node that does not see rank 0's folder has data.prepared on a disk of its own: its
        # first process prepares it there, with the run's tokenizers, while the others wait.
        manifest = read_manifest(directory)  # None where the folder or its manifest is missing
        if manifest is None:
            log(f"rank {dist.rank}: {directory} is not on this node; preparing it here")
            _, manifest = prepare_in_child(config, model_dir, True, model_dir, log, directory=directory)
        reason = fmt.tokenizer_mismatch(manifest, model_dir)
        if reason:
            raise DataError(f"{directory} on the node of rank {dist.rank}: {reason} (it was not "
                            f"prepared with this run's tokenizers): remove it or point data.prepared "
                            f"elsewhere")
    dist.barrier()
    src_tok, tgt_tok = load_tokenizers(model_dir)
    return PreparedCorpus(directory, (len(src_tok), len(tgt_tok))), src_tok, tgt_tok


def load_data(config: Config, model_dir: Path, resume: bool, dist: Distributed,
              log: Callable[[str], None], start: InitFrom | None = None) -> RunData:
    """The training data, prepared on rank 0 (tokenizers included) and read from its files on every
    rank (``training_corpus``); the validation data, read and encoded in memory."""
    data = config.data
    # prepared once (on rank 0, the others waiting) into arrays of token ids, or reused
    train, src_tok, tgt_tok = training_corpus(config, model_dir, dist, resume, log, start)
    if not data.valid_src:
        return RunData(src_tok, tgt_tok, train, [], [], None)
    valid_src, valid_ref = read_parallel(data.valid_src, data.valid_tgt or None, data.max_line_chars)
    if not valid_src:
        raise DataError(f"{data.valid_src}: the validation data is empty; give data.valid_src some "
                        f"lines, or leave it empty to train without validation")
    valid = encode_corpus(valid_src, valid_ref, src_tok, tgt_tok, data.max_len, "truncate",
                          log=lambda _msg: None)
    return RunData(src_tok, tgt_tok, train, valid_src, valid_ref, valid)


SIZE_KEYS = {"rnn": "model.embed_size, model.hidden_size or the layers",
             "transformer": "model.d_model, model.ff_size or the layers"}


def check_model_size(config: Config, src_tok: Tokenizer, tgt_tok: Tokenizer, device: torch.device) -> None:
    """Refuse a model that the device's memory cannot train, before allocating any of it."""
    try:
        parameters = build_model(config.model, len(src_tok), len(tgt_tok), PAD_ID, meta=True).num_parameters()
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
            f"{memory / 2**30:,.1f} GiB of {device}: lower {SIZE_KEYS[config.model.arch]}")
