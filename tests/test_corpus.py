"""The prepared corpus as training reads it: mapped arrays, and resident memory that does not
grow with what has been read."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from seq2seq.data import prepared as corpus
from seq2seq.data.prepared import FORMAT, MANIFEST, OFFSET_DTYPE, PreparedCorpus


def write_prepared(folder: Path, lengths: np.ndarray, ids_dtype: str = "<u2") -> None:
    """A prepared folder whose example i, on each side, is ``lengths[i]`` copies of ``i % 251``."""
    folder.mkdir()
    ids = np.repeat(np.arange(len(lengths)) % 251, lengths).astype(ids_dtype)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(OFFSET_DTYPE)
    for side in corpus.SIDES:
        ids.tofile(folder / f"{side}.ids")
        offsets.tofile(folder / f"{side}.offsets")
        lengths.astype("<u1").tofile(folder / f"{side}.lengths")
    manifest = {"format": FORMAT, "pairs": len(lengths), "src_tokens": len(ids), "tgt_tokens": len(ids),
                "arrays": {"ids_dtype": np.dtype(ids_dtype).str, "lengths_dtype": "|u1",
                           "offsets_dtype": OFFSET_DTYPE.str},
                "settings": {}, "sources": {}, "tokenizer_files": {}}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def resident_kib() -> int:
    """This process's resident memory (VmRSS), from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_examples_read_back_as_written(tmp_path):
    lengths = np.array([3, 1, 5, 2], dtype=np.int64)
    write_prepared(tmp_path / "prepared", lengths)
    prepared = PreparedCorpus(tmp_path / "prepared")
    assert len(prepared) == 4 and prepared.src.lengths.tolist() == [3, 1, 5, 2]
    assert [prepared.tgt[i] for i in range(4)] == [[0] * 3, [1], [2] * 5, [3] * 2]
    with pytest.raises(IndexError):
        prepared.src[4]
    with pytest.raises(IndexError):
        prepared.src[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("reader", ["prepared", "memory map"])
def test_reading_examples_does_not_grow_resident_memory(tmp_path, reader):
    """20,000 random examples read from 60 MB of ids: the prepared corpus's reads leave the
    process's resident memory as it was. The control reads the same examples through a memory
    map, which maps at least a page per read into the process, and grows by far more."""
    lengths = np.full(1_500_000, 20, dtype=np.int64)  # 30M ids, 60 MB a side
    write_prepared(tmp_path / "prepared", lengths)
    prepared = PreparedCorpus(tmp_path / "prepared")
    ids = np.memmap(tmp_path / "prepared" / "src.ids", dtype="<u2", mode="r")
    if reader == "prepared":
        def example(i: int) -> list[int]:
            return prepared.src[i]
    else:
        def example(i: int) -> list[int]:
            return ids[20 * i:20 * i + 20].tolist()
    indices = np.random.default_rng(0).integers(0, len(lengths), 20_000).tolist()
    example(indices[0])
    before = resident_kib()
    for index in indices:
        assert example(index) == [index % 251] * 20
    grown = resident_kib() - before
    if reader == "prepared":
        assert grown <= 4 * 1024, f"resident memory grew by {grown} KiB"
    else:
        assert grown >= 40 * 1024, f"resident memory grew by only {grown} KiB"


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, field", [
    (lambda m: m.pop("arrays"), r"'arrays' must be an object, missing"),
    (lambda m: m.update(arrays=[1]), r"'arrays' must be an object, got \[1\]"),
    (lambda m: m["arrays"].update(ids_dtype="<f8"), r"'arrays.ids_dtype' must be one of .*got '<f8'"),
    (lambda m: m["arrays"].pop("lengths_dtype"), r"'arrays.lengths_dtype' must be one of .*missing"),
    (lambda m: m["arrays"].update(offsets_dtype="<i4"), r"'arrays.offsets_dtype' must be '<i8'"),
    (lambda m: m.update(pairs="4"), r"'pairs' must be an integer >= 0, got '4'"),
    (lambda m: m.update(pairs=-1), r"'pairs' must be an integer >= 0, got -1"),
    (lambda m: m.update(src_tokens=1.5), r"'src_tokens' must be an integer >= 0, got 1.5"),
    (lambda m: m.update(tgt_tokens=True), r"'tgt_tokens' must be an integer >= 0, got True"),
    (lambda m: m.update(sources=[]), r"'sources' must be an object, got \[\]"),
    (lambda m: m.update(sources={"train_src": "x"}), r"'sources.train_src' must be an object"),
    (lambda m: m.update(settings=None), r"'settings' must be an object, got None"),
    (lambda m: m.update(tokenizer_files="src.vocab.json"), r"'tokenizer_files' must be an object"),
    (lambda m: m.update(tokenizer_files={"../x": "0" * 64}), r"names '\.\./x' is not a plain"),
    (lambda m: m.update(tokenizer_files={"/etc/x": "0" * 64}), r"'/etc/x' is not a plain file name"),
    (lambda m: m.update(tokenizer_files={"a": 5}), r"maps 'a' to 5, not a SHA-256"),
])
def test_a_manifest_with_missing_or_mistyped_fields_is_refused_naming_the_field(tmp_path, change, field):
    folder = tmp_path / "prepared"
    write_prepared(folder, np.array([3, 1, 5, 2], dtype=np.int64))
    _edit_manifest(folder, change)
    with pytest.raises(corpus.DataError, match=rf"^{re.escape(str(folder / MANIFEST))}: .*{field}"):
        PreparedCorpus(folder)


def _damage(folder: Path, name: str, index: int, value: int, dtype: str) -> None:
    values = np.fromfile(folder / name, dtype=dtype)
    values[index] = value
    values.tofile(folder / name)


@pytest.mark.parametrize("name, index, value, message", [
    ("src.offsets", 0, 1, r"src\.offsets: the first offset is 1, not 0"),
    ("tgt.offsets", 2, 2, r"tgt\.offsets: example 1 spans offsets 3 to 2, but its length in .*s is 1"),
    ("src.offsets", 2, 99, r"src\.offsets: example 1 spans offsets 3 to 99"),
    ("src.offsets", 4, 12, r"src\.offsets: example 3 spans offsets 9 to 12, but its length"),
    ("tgt.lengths", 3, 1, r"tgt\.offsets: example 3 spans offsets 9 to 11, but its length .* is 1"),
])
def test_offsets_that_disagree_with_the_lengths_are_refused_naming_file_and_example(
        tmp_path, name, index, value, message):
    folder = tmp_path / "prepared"
    write_prepared(folder, np.array([3, 1, 5, 2], dtype=np.int64))
    _damage(folder, name, index, value, "<u1" if name.endswith("lengths") else "<i8")
    with pytest.raises(corpus.DataError, match=message):
        PreparedCorpus(folder)


def test_ids_outside_the_vocabulary_are_refused_naming_file_and_example(tmp_path):
    folder = tmp_path / "prepared"
    write_prepared(folder, np.array([3, 1, 5, 2], dtype=np.int64))  # ids 0 to 3
    assert PreparedCorpus(folder, vocab_sizes=(4, 4)).src[3] == [3, 3]
    with pytest.raises(corpus.DataError, match=r"tgt\.ids: example 3 holds id 3, outside the vocabulary"):
        PreparedCorpus(folder, vocab_sizes=(4, 3))
    _damage(folder, "src.ids", 4, 60_000, "<u2")  # example 2's first id
    with pytest.raises(corpus.DataError, match=r"src\.ids: example 2 holds id 60000, outside the vocab"):
        PreparedCorpus(folder, vocab_sizes=(8, 8))


def test_ids_are_checked_in_blocks_across_many_examples(tmp_path, monkeypatch):
    """A bad id and a bad offset far into the files, past several check blocks, are found."""
    monkeypatch.setattr(corpus, "_CHECK_BLOCK", 1000)
    lengths = np.random.default_rng(0).integers(1, 30, 5000).astype(np.int64)
    folder = tmp_path / "prepared"
    write_prepared(folder, lengths)
    PreparedCorpus(folder, vocab_sizes=(251, 251))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    _damage(folder, "tgt.ids", int(offsets[4321]) + 1, 251, "<u2")
    with pytest.raises(corpus.DataError, match=r"tgt\.ids: example 4321 holds id 251"):
        PreparedCorpus(folder, vocab_sizes=(251, 251))
    _damage(folder, "src.offsets", 3001, int(offsets[3001]) + 1, "<i8")
    with pytest.raises(corpus.DataError, match=r"src\.offsets: example 3000 spans offsets"):
        PreparedCorpus(folder, vocab_sizes=(251, 251))


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "symlink to a good copy"])
def test_array_files_are_opened_only_as_regular_files(tmp_path, kind):
    folder = tmp_path / "prepared"
    write_prepared(folder, np.array([3, 1, 5, 2], dtype=np.int64))
    path = folder / "src.ids"
    if kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        target = Path("/dev/zero") if kind == "symlink to /dev/zero" else tmp_path / "copy"
        if kind == "symlink to a good copy":
            path.rename(target)
        else:
            path.unlink()
        path.symlink_to(target)
    what = "not a regular file" if kind == "fifo" else "a symbolic link"
    with pytest.raises(corpus.DataError, match=rf"{re.escape(str(path))}: {what}"):
        PreparedCorpus(folder)
