"""files.py's reader of files named by data: plain names, regular files, no links, bounded."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import within

from seq2seq.files import plain_name, read_named_file


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc/passwd", "..", ".", "", "a\0b", 7, None])
def test_a_name_that_is_not_a_plain_file_name_is_refused_naming_it_and_its_source(name):
    with pytest.raises(ValueError, match=r"^manifest\.json: tokenizer_files .* is not a plain file name"):
        plain_name(name, "manifest.json", "tokenizer_files")


@pytest.mark.parametrize("name", ["src.vocab.json", "..x", "x..", "a b", "-rf", "\u00e9.model"])
def test_plain_names_are_accepted(name):
    assert plain_name(name, "manifest.json") == name


def _read_in_thread(folder: Path, name: str) -> BaseException | bytes:
    """``read_named_file`` run in a thread that must end within 10 s (a FIFO must not block)."""
    return within(lambda: read_named_file(folder, name, folder / "manifest.json", limit=1000), 10,
                  "read_named_file")


def test_links_fifos_devices_and_big_files_are_refused_naming_the_file_and_its_source(tmp_path):
    (tmp_path / "ok").write_bytes(b"x" * 1000)
    (tmp_path / "big").write_bytes(b"x" * 1001)
    (tmp_path / "to_zero").symlink_to("/dev/zero")
    (tmp_path / "to_ok").symlink_to(tmp_path / "ok")  # even a link to a good file: links are refused
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    assert _read_in_thread(tmp_path, "ok") == b"x" * 1000
    expected = {"to_zero": "a symbolic link", "to_ok": "a symbolic link",
                "fifo": r"not a regular file \(a FIFO\)", "folder": r"not a regular file \(a folder\)",
                "big": "1001 bytes, more than the 1000"}
    for name, what in expected.items():
        error = _read_in_thread(tmp_path, name)
        assert isinstance(error, ValueError), (name, error)
        assert str(error).startswith(f"{tmp_path / name} (named by {tmp_path / 'manifest.json'}): ")
        assert re.search(what, str(error)), (name, str(error))
    assert isinstance(_read_in_thread(tmp_path, "missing"), FileNotFoundError)
    assert isinstance(_read_in_thread(tmp_path, "../ok"), ValueError)


def test_a_link_to_dev_zero_is_refused_at_once_with_the_default_limit(tmp_path):
    """The default bound (64 MB) is never reached: the link is refused before anything is read."""
    (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="a symbolic link"):
        read_named_file(tmp_path, "zero", "config.yaml")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="a FIFO"):
        read_named_file(tmp_path, "fifo", "config.yaml")  # blocks forever if opened blocking
