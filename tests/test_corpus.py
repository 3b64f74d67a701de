"""The prepared corpus as training reads it: mapped arrays, and resident memory that does not
grow with what has been read."""

from __future__ import annotations

import json
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
                "arrays": {"ids_dtype": ids_dtype, "lengths_dtype": "<u1"}}
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
