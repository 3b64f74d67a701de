"""``seq2seq prepare``: a training corpus encoded once, on all cores, into flat arrays of token ids.

``binarize`` (after fairseq's binarizer) reads the training files twice, streaming, so that
memory does not grow with the corpus (a pipe, which can be read once, is first copied to a
temporary file), after hashing them for the manifest: first to check every line (the
reader's checks, with file and line), count the pairs and draw a reproducible sample for the
tokenizers; then to encode chunks of pairs in worker processes, in order, appending the ids
to the arrays that ``corpus.py`` describes.
Everything is written into a temporary folder beside the output (``.NAME.partial-XXXXXXXX``)
and renamed into place when complete: a killed or failed preparation leaves nothing that looks
prepared, and the next one removes what it left. Before anything is deleted or written, the
output folder's ``prepare.lock`` is taken (``files.FileLock``): a second preparation of it is
refused. A rebuild replaces the whole folder, so one holding files that ``prepare`` did not
write is refused, naming one. An output that is a symlink is followed: the folder it points to
is built, beside itself, and the link stays. Worker processes die with their parent
(``PR_SET_PDEATHSIG``).

Training calls ``binarize`` through ``data.cache`` (in a child process), from ``training.setup``,
which coordinates the ranks of a run; by default its output is an entry of the cache.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from seq2seq.config import Config, ConfigError, DataConfig
from seq2seq.data import prepared as fmt
from seq2seq.data.prepared import MANIFEST, SIDES, file_record, mismatch, read_manifest
from seq2seq.data.text import DataError, iter_parallel
from seq2seq.data.tokenizers import Tokenizer, load_tokenizers, train_tokenizers
from seq2seq.files import FileError, FileLock, LockBusy, atomic_write_json
from seq2seq.model_dir import TOKENIZER_FILE

CHUNK_PAIRS = 20_000  # pairs per task sent to an encoding worker
SAMPLE_SEED = 1  # the tokenizers' sample of the training pairs
PREPARED_DIR = "prepared"  # in the model folder, when data.prepared is not set
_PARTIAL = ".partial"  # in the names of unfinished (and replaced) folders beside the output
LOCK_FILE = "prepare.lock"  # in the prepared folder: held while a process prepares it
ARRAY_FILES = tuple(f"{side}.{kind}" for side in SIDES for kind in ("ids", "lengths", "offsets"))
SPOOL_DIR = "spool"  # in the unfinished folder: copies of training files that are pipes

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
Chunk = tuple[list[str], list[str]]


def binarize(config: Config, output: str | Path, workers: int | None = None, *, rebuild: bool = True,
             tokenizers_from: Path | None = None, chunk_pairs: int = CHUNK_PAIRS,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare ``config.data``'s training files into ``output``; returns its manifest.

    A complete ``output`` that fits the files and settings is kept as it is. One that does not
    fit is rebuilt, or with ``rebuild=False`` refused with a DataError saying why. ``workers``
    processes encode (default: one per core). The tokenizers are trained on a sample of
    ``data.tokenizer_sample`` sentences each (``sample_pairs``), or copied from the model folder
    ``tokenizers_from``.
    A training file that can be read only once (a FIFO, ``<(...)``, ``/dev/stdin``) is first
    copied into the preparation's temporary folder (``_spool``), and the copy is read twice.
    """
    data = config.data
    if not data.train_src:
        raise ConfigError("data.train_src is not set: there is nothing to prepare")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    given = output
    # A symlink is followed: its target folder is (re)built, beside itself, and the link stays.
    output = Path(os.path.realpath(output))
    if output.exists() and not output.is_dir():
        raise DataError(f"{given}: exists and is not a folder; choose another --output")
    created = not output.exists()
    lock: FileLock | None = None
    try:
        if created:
            output.mkdir(parents=True)
        lock = _lock(output, given)
    except OSError as error:
        if created or error.errno not in (errno.EROFS, errno.EACCES):
            raise DataError(f"cannot write the prepared corpus {given}: {error.strerror or error}") from None
        unlocked = f"{error.strerror} ({error.filename})"  # a folder we may read, not write: use it as it is
    manifest = None
    try:
        manifest = _prepare_locked(data, output, workers, rebuild, tokenizers_from, chunk_pairs, log,
                                   unlocked="" if lock is not None else unlocked)
        return manifest
    finally:
        if created and manifest is None:  # a failed first preparation leaves no folder behind
            with contextlib.suppress(OSError):
                (output / LOCK_FILE).unlink()
                output.rmdir()
        if lock is not None:
            lock.release()


def _prepare_locked(data: DataConfig, output: Path, workers: int, rebuild: bool,
                    tokenizers_from: Path | None, chunk_pairs: int, log: Callable[[str], None],
                    unlocked: str = "") -> dict[str, Any]:
    """``binarize`` into ``output``, a folder whose lock this process holds; or, where the lock
    cannot be made (``unlocked`` says why: a read-only folder), one that is only read: used when
    it fits, refused otherwise, never written."""
    folder, copies = None, {}
    try:
        manifest = read_manifest(output)
        readable_twice = all(_is_regular(path) for path in fmt.source_paths(data).values())
        if unlocked and (manifest is None or not readable_twice or mismatch(manifest, data)
                         or fmt.tokenizer_mismatch(manifest, output)):
            raise DataError(f"cannot write the prepared corpus {output}: {unlocked}; it is used only "
                            f"when it fits the config, and it does not")
        if manifest is None:
            _refuse_foreign(output, set(), f"exists and is not a prepared corpus (no {MANIFEST})")
        if not readable_twice:
            folder = _partial_folder(output)
            data, copies = _spool(data, folder / SPOOL_DIR)
        if manifest is not None:
            reason = mismatch(manifest, data) or fmt.tokenizer_mismatch(manifest, output)
            if not reason:
                log(f"prepared data in {output} is up to date ({manifest['pairs']:,} pairs)")
                return manifest
            if not rebuild:
                raise DataError(f"{output} does not fit the config: {reason}. Run seq2seq prepare to "
                                f"rebuild it, or set data.prepared to another folder")
            _refuse_foreign(output, set(manifest["tokenizer_files"]), f"it must be rebuilt ({reason})")
            log(f"rebuilding {output}: {reason}")
        folder = folder or _partial_folder(output)
        return _build(data, copies, output, folder, workers, tokenizers_from, chunk_pairs, log)
    except OSError as error:  # disk full, quota, read-only folder
        where = f" (writing {Path(error.filename).name})" if error.filename else ""
        raise DataError(f"cannot write the prepared corpus {output}: {error.strerror or error}{where}; "
                        f"nothing was kept") from None
    except DataError as error:  # one found in a copy names the file it was copied from
        if not copies:
            raise
        message = str(error)
        for copy, original in copies.items():
            message = message.replace(copy, original)
        raise DataError(message) from None
    finally:
        if folder is not None:  # renamed to output when complete: then nothing is left here
            shutil.rmtree(folder, ignore_errors=True)


def _lock(output: Path, given: str | Path) -> FileLock:
    """The lock of the prepared folder ``output``, taken before anything in it (or beside it) is
    deleted or written; a DataError when another process holds it."""
    try:
        return FileLock(output / LOCK_FILE)
    except LockBusy as busy:
        raise DataError(f"{given} is in use: {busy.holder} is preparing it; wait for it to end, or "
                        f"choose another folder") from None
    except FileError as error:
        raise DataError(f"{given}: {error}; nothing was changed") from None


def _refuse_foreign(output: Path, tokenizer_files: set[str], why: str) -> None:
    """A rebuild replaces the whole folder: refuse one that holds a file seq2seq prepare did not
    write (the arrays, the manifest, the tokenizer files it names, the lock), naming it."""
    own = {MANIFEST, LOCK_FILE, *ARRAY_FILES, *tokenizer_files}
    foreign = sorted(set(os.listdir(output)) - own)
    if foreign:
        raise DataError(f"{output}: {why}, and it holds {output / foreign[0]}, which seq2seq prepare "
                        f"did not write ({len(foreign)} such file(s)); nothing was changed: move them "
                        f"out, or choose another folder")


def _build(data: DataConfig, copies: dict[str, str], output: Path, folder: Path, workers: int,
           tokenizers_from: Path | None, chunk_pairs: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Tokenizers, arrays and manifest written into the temporary ``folder``, renamed to ``output``."""
    start = time.monotonic()
    sources = {name: file_record(path) for name, path in fmt.source_paths(data).items()}
    for record in sources.values():  # a copied pipe is recorded under its own name
        record["path"] = copies.get(record["path"], record["path"])
    lines, sample = _scan(data, sample_pairs(data))
    _check_capacity(data, lines)
    log(f"read and checked {lines:,} pairs in {time.monotonic() - start:.1f} s")
    workers = min(workers, -(-lines // chunk_pairs))  # no idle worker processes to start
    if tokenizers_from is not None:
        _copy_tokenizers(Path(tokenizers_from), folder)
    else:
        log(f"training {data.tokenizer} tokenizer(s) on {len(sample):,} of {lines:,} pairs ...")
        began = time.monotonic()
        train_tokenizers(data, [s for _, s, _ in sample], [t for _, _, t in sample], folder, log=log)
        log(f"trained the tokenizer(s) in {time.monotonic() - began:.1f} s")
    del sample
    tokenizer_files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted(folder.iterdir()) if p.name != SPOOL_DIR}
    src_tok, tgt_tok = load_tokenizers(folder)
    ids_dtype = fmt.smallest_unsigned(max(len(src_tok), len(tgt_tok)) - 1)
    lengths_dtype = fmt.smallest_unsigned(data.max_len + 1)
    encoder = _Encoder(folder, data.max_len, data.long_pairs, ids_dtype, lengths_dtype)
    from seq2seq.data import batches  # noqa: F401 - torch loads here, outside the encoding's time
    encoding = time.monotonic()
    counts = _write_arrays(_chunks(data, chunk_pairs), encoder, workers, folder)
    encoding = time.monotonic() - encoding
    if counts["pairs"] == 0:
        raise DataError(f"{data.train_src}: no usable training pairs (all empty or too long)")
    shutil.rmtree(folder / SPOOL_DIR, ignore_errors=True)
    manifest = {"format": fmt.FORMAT,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "sources": sources, "settings": fmt.settings_of(data), "tokenizer_files": tokenizer_files,
                "tokenizer_sample_pairs": min(lines, sample_pairs(data)),
                "arrays": {"ids_dtype": ids_dtype.str, "lengths_dtype": lengths_dtype.str,
                           "offsets_dtype": fmt.OFFSET_DTYPE.str},
                "lines": lines, **counts}
    atomic_write_json(folder / MANIFEST, manifest)  # last: it marks the folder complete
    _replace(folder, output)
    seconds = time.monotonic() - start
    log(f"prepared {counts['pairs']:,} of {lines:,} pairs in {seconds:.1f} s (encoding {encoding:.1f} s "
        f"with {workers} worker(s), {lines / max(encoding, 1e-9):,.0f} pairs/s): skipped "
        f"{counts['skipped_empty']:,} with an empty side, {counts['skipped_long']:,} longer than "
        f"{data.max_len} tokens; truncated {counts['truncated']:,}; in {output}")
    return manifest


def _partial_folder(output: Path) -> Path:
    """A new temporary folder beside ``output``, after removing those a killed preparation of
    ``output`` left (the caller holds its lock). Names are compared, never globbed: ``output``'s
    name may hold ``*`` or ``[``."""
    prefix = _partial_prefix(output)
    for name in os.listdir(output.parent):
        rest = name[len(prefix):]
        if name.startswith(prefix) and len(rest) == 8 and rest.isascii() and rest.replace("_", "").isalnum():
            shutil.rmtree(output.parent / name, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent))


def _partial_prefix(output: Path) -> str:
    """Temporary folders of ``output`` are named ``.NAME.partial-`` and mkdtemp's 8 characters."""
    return f".{output.name}{_PARTIAL}-"


def _is_regular(path: str) -> bool:
    """Whether ``path`` can be read twice; a missing file counts as regular (the reader names it)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def _spool(data: DataConfig, folder: Path) -> tuple[DataConfig, dict[str, str]]:
    """``data`` reading its training files that are not regular files from copies in ``folder``,
    and the copies' original paths, by copy.

    Every pair is read once, streaming, through the reader (its checks and ``data.max_line_chars``
    name the original file and line; ``data.max_lines`` bounds an endless pipe). The copies
    begin with a BOM and end each line with ``\r\n``, the one of each that the reader drops:
    every line reads back exactly as it came, a leading BOM or a final ``\r`` included.
    """
    folder.mkdir()
    names = {setting: path for setting, path in fmt.source_paths(data).items() if not _is_regular(path)}
    copies = {setting: str(folder / setting) for setting in names}
    tsv = not data.train_tgt
    with contextlib.ExitStack() as stack:
        files = {setting: stack.enter_context(open(path, "w", encoding="utf-8", newline=""))
                 for setting, path in copies.items()}
        for handle in files.values():
            handle.write("\ufeff")
        for src, tgt in iter_parallel(data.train_src, data.train_tgt or None, data.max_line_chars,
                                      data.max_lines):
            for setting, handle in files.items():
                handle.write(f"{src}\t{tgt}\r\n" if tsv else f"{src if setting == 'train_src' else tgt}\r\n")
    return dataclasses.replace(data, **copies), {copies[s]: names[s] for s in copies}


# -- the first pass: check, count, sample ------------------------------------------------------
def sample_pairs(data: DataConfig) -> int:
    """Pairs in the tokenizers' sample: ``data.tokenizer_sample`` sentences for each tokenizer,
    so half as many pairs for a joint one, which learns from both sides of each."""
    joint = data.tokenizer == "sentencepiece" and data.joint_vocab
    return max(1, data.tokenizer_sample // 2) if joint else data.tokenizer_sample


def _scan(data: DataConfig, size: int) -> tuple[int, list[tuple[int, str, str]]]:
    """Read every pair once (the reader's checks raise here, naming file and line); returns the
    number of pairs and a uniform sample of ``size`` of them, in corpus order.

    The sample is Li's reservoir algorithm L ("Reservoir-sampling algorithms of time complexity
    O(n(1 + log(N/n)))", 1994): random numbers only for the pairs it keeps, seeded, so the same
    files give the same sample; a corpus no larger than the sample is taken whole.
    """
    rng = random.Random(SAMPLE_SEED)
    reservoir: list[tuple[int, str, str]] = []
    weight = math.exp(math.log(1.0 - rng.random()) / size)
    pick = size + _skip(rng, weight)
    count = 0
    for count, (src, tgt) in enumerate(iter_parallel(data.train_src, data.train_tgt or None,
                                                     data.max_line_chars, data.max_lines), start=1):
        index = count - 1
        if index < size:
            reservoir.append((index, src, tgt))
        elif index == pick:
            reservoir[rng.randrange(size)] = (index, src, tgt)
            weight *= math.exp(math.log(1.0 - rng.random()) / size)
            pick += 1 + _skip(rng, weight)
    if count == 0:
        raise DataError(f"{data.train_src}: the training data is empty")
    reservoir.sort()
    return count, reservoir


def _skip(rng: random.Random, weight: float) -> int:
    """Pairs to pass over before the reservoir's next replacement."""
    if weight >= 1.0:
        return 0
    return int(math.log(1.0 - rng.random()) / math.log1p(-weight))


def _check_capacity(data: DataConfig, lines: int) -> None:
    """Refuse, before any work, a corpus whose ids could overflow the offsets' type."""
    bound = lines * (data.max_len + 1)  # EOS included
    limit = int(np.iinfo(fmt.OFFSET_DTYPE).max)
    if bound > limit:
        raise DataError(f"{data.train_src}: {lines:,} pairs of up to {data.max_len + 1:,} tokens "
                        f"(data.max_len + EOS) could hold {bound:,} tokens a side, more than the "
                        f"index type {fmt.OFFSET_DTYPE} holds ({limit:,}); lower data.max_len or "
                        f"split the corpus")


# -- the second pass: encode in order, on worker processes -------------------------------------
def _chunks(data: DataConfig, size: int) -> Iterator[Chunk]:
    pairs = iter_parallel(data.train_src, data.train_tgt or None, data.max_line_chars, data.max_lines)
    while chunk := list(itertools.islice(pairs, size)):
        yield [src for src, _ in chunk], [tgt for _, tgt in chunk]


class _Encoder:
    """Encodes one chunk into flat arrays with ``data.encode_corpus``, the rules of the
    in-memory path; loads the tokenizers from ``folder`` on its first chunk (in its process)."""

    def __init__(self, folder: Path, max_len: int, long_pairs: str, ids_dtype: np.dtype,
                 lengths_dtype: np.dtype) -> None:
        self.folder, self.max_len, self.long_pairs = folder, max_len, long_pairs
        self.ids_dtype, self.lengths_dtype = ids_dtype, lengths_dtype
        self.tokenizers: tuple[Tokenizer, Tokenizer] | None = None

    def __call__(self, chunk: Chunk) -> dict[str, Any]:
        from seq2seq.data.batches import encode_corpus  # loads torch: only where a corpus is encoded

        if self.tokenizers is None:
            self.tokenizers = load_tokenizers(self.folder)
        encoded = encode_corpus(*chunk, *self.tokenizers, self.max_len, self.long_pairs,
                                log=lambda _message: None)
        result: dict[str, Any] = {"skipped_empty": encoded.skipped_empty,
                                  "skipped_long": encoded.skipped_long, "truncated": encoded.truncated}
        for side, examples in zip(SIDES, (encoded.src, encoded.tgt)):
            lengths = np.fromiter(map(len, examples), dtype=self.lengths_dtype, count=len(examples))
            result[f"{side}.lengths"] = lengths
            result[f"{side}.ids"] = np.fromiter(itertools.chain.from_iterable(examples),
                                                dtype=self.ids_dtype, count=int(lengths.sum()))
        return result


_worker_encoder: _Encoder | None = None  # set in each pool worker process by _start_worker


def _start_worker(encoder: _Encoder, parent: int) -> None:
    global _worker_encoder
    _die_with_parent(parent)
    _worker_encoder = encoder


def _die_with_parent(parent: int) -> None:
    """Have Linux send this worker SIGKILL when its parent ends, however it ends: a killed
    ``prepare`` (SIGKILL runs no cleanup) would otherwise leave its workers waiting for work on
    a pipe forever. A parent already gone by now ends the worker at once. Elsewhere, a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the pool's own checks remain
    if os.getppid() != parent:
        os._exit(1)


def _encode_in_worker(chunk: Chunk) -> dict[str, Any]:
    assert _worker_encoder is not None
    return _worker_encoder(chunk)


def _encoded(chunks: Iterator[Chunk], encoder: _Encoder, workers: int) -> Iterator[dict[str, Any]]:
    """Each chunk's arrays, in order; at most two chunks per worker in flight (bounded memory).

    A worker that dies (killed, out of memory, or unable to start) ends the preparation with an
    error, where a ``multiprocessing.Pool`` would wait for its chunk forever.
    """
    if workers == 1:
        yield from map(encoder, chunks)
        return
    # spawn: the caller may be a training process with threads, which fork would copy half-made
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(encoder, os.getpid()))
    try:
        pending: collections.deque[Future] = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as error:
        raise DataError(f"an encoding worker process stopped ({error}); nothing was kept. It may "
                        f"have been killed or run out of memory: try fewer --workers") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_arrays(chunks: Iterator[Chunk], encoder: _Encoder, workers: int,
                  folder: Path) -> dict[str, int]:
    """Append every chunk's ids, lengths and offsets to the files in ``folder``; the counts."""
    counts = {"pairs": 0, "src_tokens": 0, "tgt_tokens": 0, "skipped_empty": 0, "skipped_long": 0,
              "truncated": 0}
    files = {name: open(folder / name, "wb") for name in ARRAY_FILES}  # noqa: SIM115 (closed below)
    try:
        for side in SIDES:
            files[f"{side}.offsets"].write(np.zeros(1, fmt.OFFSET_DTYPE).tobytes())
        for result in _encoded(chunks, encoder, workers):
            for side in SIDES:
                lengths = result[f"{side}.lengths"]
                offsets = np.cumsum(lengths, dtype=fmt.OFFSET_DTYPE) + counts[f"{side}_tokens"]
                for name, array in (("ids", result[f"{side}.ids"]), ("lengths", lengths),
                                    ("offsets", offsets)):
                    _append(files[f"{side}.{name}"], array)
                counts[f"{side}_tokens"] += len(result[f"{side}.ids"])
            counts["pairs"] += len(result["src.lengths"])
            for key in ("skipped_empty", "skipped_long", "truncated"):
                counts[key] += result[key]
        for handle in files.values():
            _append(handle, None)
            os.fsync(handle.fileno())
    finally:
        for handle in files.values():
            try:
                handle.close()
            except OSError:
                pass  # the write's own error is the one to report
    return counts


def _append(handle: Any, array: np.ndarray | None) -> None:
    """Write ``array``'s bytes (None: flush); a failure names the file, which write() does not."""
    try:
        if array is None:
            handle.flush()
        else:
            handle.write(array.tobytes())
    except OSError as error:
        raise OSError(error.errno, error.strerror, handle.name) from None


# -- files -------------------------------------------------------------------------------------
def _copy_tokenizers(source: Path, target: Path) -> None:
    """The tokenizers of the model folder ``source``, saved in ``target`` as training saves them."""
    src_tok, tgt_tok = load_tokenizers(source)  # checks the files
    spec = json.loads((source / TOKENIZER_FILE).read_text(encoding="utf-8"))
    src_tok.save(target, spec["src"])
    if spec["tgt"] != spec["src"]:
        tgt_tok.save(target, spec["tgt"])
    atomic_write_json(target / TOKENIZER_FILE, spec)


def _replace(folder: Path, output: Path) -> None:
    """Rename the complete ``folder`` to ``output``, moving an older ``output`` aside first."""
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=_partial_prefix(output), dir=output.parent))
        os.replace(output, old)
        os.replace(folder, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, output)
    fd = os.open(output.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
