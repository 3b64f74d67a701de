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
from seq2seq.files import read_regular_file

FORMAT = "seq2seq-prepared-1"
MANIFEST = "manifest.json"
SIDES = ("src", "tgt")
OFFSET_DTYPE = np.dtype("<i8")  # the index type: total tokens per side must fit in it
# The data settings that change the arrays: a prepared folder made with others is not used.
SETTINGS = ("tokenizer", "vocab_size", "joint_vocab", "lowercase", "max_len", "long_pairs",
            "max_line_chars", "tokenizer_sample")
_HASH_BLOCK = 1 << 20


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
    return manifest


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


def tokenizer_mismatch(manifest: dict[str, Any], directory: Path) -> str:
    """Why the tokenizer files in ``directory`` are not the ones the ids were made with; "" if
    they are (the prepared folder's own, or a model folder's copies)."""
    for name, digest in manifest.get("tokenizer_files", {}).items():
        path = Path(directory) / name
        try:
            found = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return f"{path} is missing"
        if found != digest:
            return f"{path} is not the tokenizer the ids were made with"
    return ""


class PreparedSide(Sequence):
    """One side's examples: ``side[i]`` is example i's ids as a list, read from the files;
    ``lengths`` is in memory."""

    def __init__(self, ids_path: Path, offsets_path: Path, lengths: np.ndarray, dtype: np.dtype) -> None:
        self.ids_path, self.offsets_path, self.lengths, self.dtype = ids_path, offsets_path, lengths, dtype
        self._ids = ids_path.open("rb", buffering=0)
        self._offsets = offsets_path.open("rb", buffering=0)
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


class PreparedCorpus:
    """A prepared folder, opened. ``src``/``tgt`` index like ``EncodedCorpus``'s lists, so
    ``data.collate`` gathers batches from them; ``manifest`` says what it was made from."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise DataError(f"{self.directory}: not a prepared corpus (no {MANIFEST}; a preparation "
                            f"that did not finish leaves none): run seq2seq prepare")
        self.manifest = manifest
        arrays = manifest["arrays"]
        n = manifest["pairs"]
        sides = [self._side(side, n, np.dtype(arrays["ids_dtype"]), np.dtype(arrays["lengths_dtype"]))
                 for side in SIDES]
        self.src, self.tgt = sides

    def _side(self, side: str, n: int, ids_dtype: np.dtype, lengths_dtype: np.dtype) -> PreparedSide:
        ids = self._checked(f"{side}.ids", ids_dtype, self.manifest[f"{side}_tokens"])
        offsets = self._checked(f"{side}.offsets", OFFSET_DTYPE, n + 1)
        lengths = np.fromfile(self._checked(f"{side}.lengths", lengths_dtype, n), dtype=lengths_dtype,
                              count=n)
        return PreparedSide(ids, offsets, lengths, ids_dtype)

    def _checked(self, name: str, dtype: np.dtype, count: int) -> Path:
        """The path of the array file ``name``, checked to hold ``count`` values of ``dtype``."""
        path = self.directory / name
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"{path}: missing from the prepared corpus: prepare the data again") from None
        if size != count * dtype.itemsize:
            raise DataError(f"{path}: {size} bytes, the manifest says {count} x {dtype.itemsize}: "
                            f"the prepared corpus is damaged; prepare the data again")
        return path

    def __len__(self) -> int:
        return len(self.src)

    def __repr__(self) -> str:
        return f"PreparedCorpus({str(self.directory)!r}, pairs={len(self)})"
