"""Prepared training data: token ids in flat files, read from the page cache by every training process.

``seq2seq prepare`` (``binarize.py``) writes a folder, as fairseq's ``.bin``/``.idx`` pairs:
    src.ids, tgt.ids          every example's token ids, one after another, in the smallest
                              unsigned type that holds the vocabulary (uint16 up to 65,536)
    src.offsets, tgt.offsets  int64, examples + 1 of them: example i is ids[offsets[i]:offsets[i + 1]]
    src.lengths, tgt.lengths  each example's length, in the smallest unsigned type holding max_len + 1
    tokenizer.json, ...       the tokenizers the ids were made with
    manifest.json             what the folder was made from; written last, so a folder without it
                              is not a prepared corpus
The arrays are raw little-endian binary. ``PreparedCorpus`` reads only the lengths into memory,
for bucketing; an example's ids are read when a batch needs them, with two positioned reads
(``os.pread``: its offsets, then its ids). The files stay in the page cache, once for all the
processes that read them, and a process holds only the examples it is using. (A memory map
would serve the same reads, but each random read through it maps a whole cached block of the
file into the process, up to 2 MiB where the kernel caches files in large folios, so the
process's resident memory would grow with every batch: tests/test_corpus.py measures both.)
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seq2seq.config import DataConfig
from seq2seq.data.text import DataError
from seq2seq.files import open_regular_nofollow, plain_name, read_named_file, read_regular_file

FORMAT = "seq2seq-prepared-1"
MANIFEST = "manifest.json"
SIDES = ("src", "tgt")
OFFSET_DTYPE = np.dtype("<i8")  # the index type: total tokens per side must fit in it
# The data settings that change the arrays: a prepared folder made with others is not used.
SETTINGS = ("tokenizer", "vocab_size", "joint_vocab", "lowercase", "max_len", "long_pairs",
            "max_line_chars", "tokenizer_sample")
_HASH_BLOCK = 1 << 20
ARRAY_DTYPES = ("|u1", "<u2", "<u4", "<u8")  # ids and lengths: what smallest_unsigned gives
_COUNTS = ("pairs", "src_tokens", "tgt_tokens")
_SHA256_HEX = frozenset("0123456789abcdef")
_CHECK_BLOCK = 1 << 22  # values per read when an array is checked: bounded memory, any size


def settings_of(data: DataConfig) -> dict[str, Any]:
    return {name: getattr(data, name) for name in SETTINGS}


def source_paths(data: DataConfig) -> dict[str, str]:
    """The training files, by setting name: two aligned files, or one TSV."""
    paths = {"train_src": data.train_src}
    if data.train_tgt:
        paths["train_tgt"] = data.train_tgt
    return paths


def file_record(path: str | Path) -> dict[str, Any]:
    """Size, modification time and SHA-256 of a file, read in blocks (any size)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": digest.hexdigest()}


def smallest_unsigned(largest: int) -> np.dtype:
    """The smallest little-endian unsigned integer type that holds ``largest``."""
    for name in ("<u1", "<u2", "<u4", "<u8"):
        if largest <= np.iinfo(np.dtype(name)).max:
            return np.dtype(name)
    raise ValueError(f"{largest} does not fit in 64 bits")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete prepared folder; None when there is none (not prepared, or
    a preparation that did not finish)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(read_regular_file(path).decode("utf-8"))  # never /dev/zero, a FIFO
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:  # JSON, UTF-8, not a regular file
        raise DataError(f"{path}: not a valid manifest: {str(error)[:200] or 'nested too deeply'}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise DataError(f"{path}: format {found!r:.60}, expected {FORMAT!r}: prepare the data again")
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a manifest whose fields are missing or of the wrong type, naming the field: a
    prepared folder may be shared or downloaded, and a damaged one must not end in a traceback.
    Tokenizer file names must be plain names (``files.plain_name``): they are copied into
    model folders."""
    def bad(field: str, expected: str) -> DataError:
        value = manifest
        for part in field.split("."):
            value = value.get(part, "<missing>") if isinstance(value, dict) else "<missing>"
        shown = "missing" if value == "<missing>" else f"got {_short(value)}"
        return DataError(f"{path}: field {field!r} must be {expected}, {shown}: prepare the data again")

    for name in _COUNTS:
        value = manifest.get(name)
        if type(value) is not int or value < 0:
            raise bad(name, "an integer >= 0")
    arrays = manifest.get("arrays")
    if not isinstance(arrays, dict):
        raise bad("arrays", "an object")
    for name in ("ids_dtype", "lengths_dtype"):
        if arrays.get(name) not in ARRAY_DTYPES:
            raise bad(f"arrays.{name}", f"one of {', '.join(ARRAY_DTYPES)}")
    if arrays.get("offsets_dtype") != OFFSET_DTYPE.str:
        raise bad("arrays.offsets_dtype", repr(OFFSET_DTYPE.str))
    for name in ("settings", "sources", "tokenizer_files"):
        if not isinstance(manifest.get(name), dict):
            raise bad(name, "an object")
    for name, record in manifest["sources"].items():
        if not isinstance(record, dict):
            raise bad(f"sources.{name}", "an object")
    for name, digest in manifest["tokenizer_files"].items():
        try:
            plain_name(name, path, "tokenizer_files names")
        except ValueError as error:
            raise DataError(str(error)) from None
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            raise DataError(f"{path}: field 'tokenizer_files' maps {name!r} to {_short(digest)}, "
                            f"not a SHA-256 hex digest: prepare the data again")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def mismatch(manifest: dict[str, Any], data: DataConfig) -> str:
    """Why a prepared folder does not fit ``data`` (its files and settings); "" when it fits.

    A source counts as unchanged when its path, size and modification time are the recorded
    ones; otherwise its SHA-256 decides (a copied or touched file with the same bytes fits).
    """
    recorded = manifest.get("settings", {})
    for name, value in settings_of(data).items():
        if recorded.get(name) != value:
            return f"it was made with data.{name}={recorded.get(name)!r}, the config has {value!r}"
    sources = manifest.get("sources", {})
    paths = source_paths(data)
    if set(sources) != set(paths):
        return f"it was made from {sorted(sources)}, the config names {sorted(paths)}"
    for name, path in paths.items():
        record = sources[name]
        try:
            stat = Path(path).stat()
        except OSError:
            raise DataError(f"{path}: no such file (data.{name})") from None
        if (record.get("path"), record.get("size"), record.get("mtime_ns")) == (
                path, stat.st_size, stat.st_mtime_ns):
            continue
        if record.get("size") != stat.st_size or file_record(path)["sha256"] != record.get("sha256"):
            return (f"data.{name} {path} is not the file it was made from ({record.get('path')}, "
                    f"{record.get('size')} bytes, sha256 {str(record.get('sha256'))[:12]}...)")
    return ""


def tokenizer_mismatch(manifest: dict[str, Any], directory: Path, source: str | Path = "") -> str:
    """Why the tokenizer files in ``directory`` are not the ones the ids were made with; "" if
    they are (the prepared folder's own, or a model folder's copies). ``source``: the manifest's
    path, for errors (a tokenizer file that is a link, a FIFO or a device is a DataError)."""
    for name, digest in manifest["tokenizer_files"].items():
        path = Path(directory) / name
        try:
            found = hashlib.sha256(read_tokenizer_file(directory, name, source)).hexdigest()
        except FileNotFoundError:
            return f"{path} is missing"
        if found != digest:
            return f"{path} is not the tokenizer the ids were made with"
    return ""


def read_tokenizer_file(directory: Path, name: str, source: str | Path = "") -> bytes:
    """The bytes of the tokenizer file ``name`` (a key of a manifest's ``tokenizer_files``; the
    manifest's path is ``source``) in ``directory``: a plain name, a regular file (not a link,
    FIFO or device) of bounded size. Otherwise a ``DataError`` naming the file and ``source``;
    ``FileNotFoundError`` if missing."""
    try:
        return read_named_file(directory, name, f"{source or MANIFEST}, tokenizer_files")
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise DataError(str(error)) from None


class PreparedSide(Sequence):
    """One side's examples: ``side[i]`` is example i's ids as a list, read from the files;
    ``lengths`` is in memory. The files are opened as regular files, never through a link."""

    def __init__(self, ids_path: Path, offsets_path: Path, lengths: np.ndarray, dtype: np.dtype) -> None:
        self.ids_path, self.offsets_path, self.lengths, self.dtype = ids_path, offsets_path, lengths, dtype
        self._ids = os.fdopen(_open_array(ids_path), "rb", buffering=0)
        try:
            self._offsets = os.fdopen(_open_array(offsets_path), "rb", buffering=0)
        except BaseException:
            self._ids.close()
            raise
        self._typecode = {1: "B", 2: "H", 4: "I", 8: "Q"}[dtype.itemsize]
        assert array.array(self._typecode).itemsize == dtype.itemsize
        self._swap = sys.byteorder != "little"  # the files are little-endian

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> list[int]:  # type: ignore[override]
        if not 0 <= index < len(self.lengths):
            raise IndexError(f"example {index} of {len(self.lengths)}")
        width = OFFSET_DTYPE.itemsize
        try:
            start, end = struct.unpack("<2q", os.pread(self._offsets.fileno(), 2 * width, index * width))
            data = os.pread(self._ids.fileno(), (end - start) * self.dtype.itemsize,
                            start * self.dtype.itemsize)
        except struct.error:
            raise DataError(f"{self.offsets_path}: shorter than its manifest says: the prepared corpus "
                            f"was changed while in use; prepare the data again") from None
        if len(data) != (end - start) * self.dtype.itemsize:
            raise DataError(f"{self.ids_path}: shorter than its offsets say: the prepared corpus was "
                            f"changed while in use; prepare the data again")
        ids = array.array(self._typecode, data)
        if self._swap:
            ids.byteswap()
        return ids.tolist()

    def check(self, tokens: int, vocab_size: int | None, lengths_path: Path) -> None:
        """Refuse files that disagree with each other, naming the file and the example: offsets
        that do not start at 0, step by the example's length and end at ``tokens``; ids not below
        ``vocab_size`` (when given). One sequential pass over each file, vectorised, in blocks of
        ``_CHECK_BLOCK`` values: memory stays bounded, and the files then sit in the page cache
        that training reads them from."""
        n, offsets_fd = len(self.lengths), self._offsets.fileno()
        previous: np.ndarray | None = None
        for start, block in _blocks(offsets_fd, OFFSET_DTYPE, n + 1, self.offsets_path):
            if start == 0 and block[0] != 0:
                raise DataError(f"{self.offsets_path}: the first offset is {block[0]}, not 0: the prepared "
                                f"corpus is damaged; prepare the data again")
            steps = np.diff(block if previous is None else np.concatenate((previous, block)))
            first = start - (previous is not None)
            wrong = np.flatnonzero(steps != self.lengths[first:first + len(steps)])
            if len(wrong):
                i = first + int(wrong[0])
                raise DataError(f"{self.offsets_path}: example {i} spans offsets "
                                f"{_offset(offsets_fd, i)} to {_offset(offsets_fd, i + 1)}, but its "
                                f"length in {lengths_path} is {self.lengths[i]}: the prepared corpus is "
                                f"damaged; prepare the data again")
            previous = block[-1:]
        if previous is None or int(previous[0]) != tokens:
            last = None if previous is None else int(previous[0])
            raise DataError(f"{self.offsets_path}: the last offset is {last}, the manifest says "
                            f"{tokens} tokens: the prepared corpus is damaged; prepare the data again")
        if vocab_size is None:
            return
        for start, block in _blocks(self._ids.fileno(), self.dtype, tokens, self.ids_path):
            if len(block) and int(block.max()) >= vocab_size:
                position = start + int(np.flatnonzero(block >= vocab_size)[0])
                example = _example_at(offsets_fd, position, n)
                raise DataError(f"{self.ids_path}: example {example} holds id {block.max()}, outside "
                                f"the vocabulary of {vocab_size}: the prepared corpus does not belong to "
                                f"these tokenizers or is damaged; prepare the data again")

    def close(self) -> None:
        self._ids.close()
        self._offsets.close()


def _open_array(path: Path) -> int:
    """A prepared array file opened read-only, as a regular file: not a link, FIFO or device."""
    try:
        return open_regular_nofollow(path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing from the prepared corpus: prepare the data again") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{str(error)}: prepare the data again") from None


def _blocks(fd: int, dtype: np.dtype, count: int, path: Path):  # noqa: ANN202 - a generator
    """(index of the first value, values) of the ``count`` values of ``dtype`` in ``fd``, in blocks."""
    for start in range(0, count, _CHECK_BLOCK):
        size = min(_CHECK_BLOCK, count - start) * dtype.itemsize
        data = os.pread(fd, size, start * dtype.itemsize)
        if len(data) != size:
            raise DataError(f"{path}: shorter than its manifest says: the prepared corpus was changed "
                            f"while in use; prepare the data again")
        yield start, np.frombuffer(data, dtype)


def _offset(fd: int, index: int) -> int:
    return struct.unpack("<q", os.pread(fd, 8, index * 8))[0]


def _example_at(fd: int, position: int, n: int) -> int:
    """The example whose ids hold ``position``: the last i < n with offsets[i] <= position."""
    low, high = 0, n - 1
    while low < high:
        middle = (low + high + 1) // 2
        if _offset(fd, middle) <= position:
            low = middle
        else:
            high = middle - 1
    return low


class PreparedCorpus:
    """A prepared folder, opened. ``src``/``tgt`` index like ``EncodedCorpus``'s lists, so
    ``data.collate`` gathers batches from them; ``manifest`` says what it was made from.

    Opening it checks what a damaged or planted folder could get wrong, once, naming the file
    and field: the manifest's fields (``check_manifest``), each array's size, that the offsets
    agree with the lengths, and, given ``vocab_sizes`` (source, target), that every id is inside
    its vocabulary. The arrays are read once for it, sequentially.
    """

    def __init__(self, directory: str | Path, vocab_sizes: tuple[int, int] | None = None) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise DataError(f"{self.directory}: not a prepared corpus (no {MANIFEST}; a preparation "
                            f"that did not finish leaves none): run seq2seq prepare")
        self.manifest = manifest
        arrays = manifest["arrays"]
        n = manifest["pairs"]
        sides = []
        for side, vocab in zip(SIDES, vocab_sizes or (None, None)):
            sides.append(self._side(side, n, np.dtype(arrays["ids_dtype"]),
                                    np.dtype(arrays["lengths_dtype"]), vocab))
        self.src, self.tgt = sides

    def _side(self, side: str, n: int, ids_dtype: np.dtype, lengths_dtype: np.dtype,
              vocab_size: int | None) -> PreparedSide:
        tokens = self.manifest[f"{side}_tokens"]
        lengths_path = self.directory / f"{side}.lengths"
        with os.fdopen(_open_array(lengths_path), "rb") as handle:
            self._check_size(lengths_path, handle.fileno(), lengths_dtype, n)
            lengths = np.fromfile(handle, dtype=lengths_dtype, count=n)
        prepared = PreparedSide(self.directory / f"{side}.ids", self.directory / f"{side}.offsets",
                                lengths, ids_dtype)
        try:
            self._check_size(prepared.ids_path, prepared._ids.fileno(), ids_dtype, tokens)
            self._check_size(prepared.offsets_path, prepared._offsets.fileno(), OFFSET_DTYPE, n + 1)
            prepared.check(tokens, vocab_size, lengths_path)
        except BaseException:
            prepared.close()
            raise
        return prepared

    @staticmethod
    def _check_size(path: Path, fd: int, dtype: np.dtype, count: int) -> None:
        """Refuse the array file ``path`` unless it holds ``count`` values of ``dtype``."""
        size = os.fstat(fd).st_size
        if size != count * dtype.itemsize:
            raise DataError(f"{path}: {size} bytes, the manifest says {count} x {dtype.itemsize}: "
                            f"the prepared corpus is damaged; prepare the data again")

    def __len__(self) -> int:
        return len(self.src)

    def __repr__(self) -> str:
        return f"PreparedCorpus({str(self.directory)!r}, pairs={len(self)})"
