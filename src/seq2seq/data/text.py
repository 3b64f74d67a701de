"""Parallel text in: aligned files (plain or gzip, strict UTF-8) read line by line, with
errors that name the file and line. ``data.batches`` turns the lines into padded batches."""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import itertools
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A problem in an input file; the message names the file (and line)."""


# -- reading ----------------------------------------------------------------------------------
def read_lines(path: str | Path, max_line_chars: int = 100_000,
               max_lines: int | None = 100_000_000) -> list[str]:
    """The lines of a UTF-8 text file (gzip'ed or not), without line endings or a leading BOM.

    ``path`` may be a pipe (``<(cat f)``, ``/dev/stdin``, a FIFO): it is opened once and read
    once. A line over ``max_line_chars`` characters, or more than ``max_lines`` lines, is a
    ``DataError``: memory stays bounded even on ``/dev/zero`` or an endless pipe.
    """
    return list(_iter_lines(Path(path), max_line_chars, max_lines))


def iter_lines(path: str | Path, max_line_chars: int = 100_000,
               max_lines: int | None = None) -> Iterator[str]:
    """``read_lines`` one line at a time, with the same checks: memory stays flat however many
    lines a file or an endless pipe has (``max_lines``: None for no limit)."""
    return _iter_lines(Path(path), max_line_chars, max_lines)


def iter_stream_lines(stream: BinaryIO, name: str = "<stdin>", max_line_chars: int = 100_000,
                      max_lines: int | None = None) -> Iterator[str]:
    """``iter_lines`` for an open binary stream (standard input), named ``name`` in errors: gzip
    is recognised by its magic bytes as in a file, so ``gzip -c f | seq2seq translate`` reads
    as ``--input /dev/stdin`` does. The stream is read once and not closed."""
    return _iter_lines(Path(name), max_line_chars, max_lines, stream=stream)


class _Replayed(io.RawIOBase):
    """``stream`` with ``head``, the bytes already read from its start, given back first.

    A pipe cannot seek back: the bytes read to sniff for gzip must not be lost."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        super().__init__()
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        return self._stream.readinto(buffer)


def _open_sniffed(path: Path, stack: contextlib.ExitStack,
                  stream: BinaryIO | None = None) -> tuple[BinaryIO, bool]:
    """``path`` opened once (or ``stream``, already open, read as ``path``), as a binary stream
    of its text: gunzipped when it starts with gzip's magic bytes (or is named ``.gz``). Works
    on pipes, which can be read only once."""
    raw = stream if stream is not None else stack.enter_context(path.open("rb", buffering=0))
    head = b""
    while len(head) < len(GZIP_MAGIC) and (more := raw.read(len(GZIP_MAGIC) - len(head))):
        head += more
    stream = stack.enter_context(io.BufferedReader(_Replayed(head, raw), 1 << 16))
    if path.suffix == ".gz" or head == GZIP_MAGIC:
        return stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb")), True
    return stream, False


def _iter_lines(path: Path, max_line_chars: int, max_lines: int | None = None,
                stream: BinaryIO | None = None) -> Iterator[str]:
    # A line of N characters has at most 4N bytes in UTF-8 (+3 for a BOM, +2 for "\r\n"): reading
    # that much at a time keeps memory bounded however long a broken file's lines are.
    limit = 4 * max_line_chars + 6
    number = 0
    with contextlib.ExitStack() as stack:
        try:
            handle, zipped = _open_sniffed(path, stack, stream)
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except OSError as error:
            raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
        readline = handle.readline
        try:
            while raw := readline(limit):
                number += 1
                if max_lines is not None and number > max_lines:
                    raise DataError(f"{path}: more than {max_lines} lines (data.max_lines)")
                if raw[-1:] == b"\n":  # the common case: a whole line
                    raw = raw[:-2] if raw[-2:-1] == b"\r" else raw[:-1]
                elif len(raw) == limit:  # a line too long to read whole
                    n, endless = _line_chars(raw, handle, limit)
                    n -= number == 1 and raw.startswith(UTF8_BOM)
                    raise DataError(_too_long(path, number, n, max_line_chars, endless))
                elif number == 1 and raw == UTF8_BOM:  # a file of just a BOM is empty, as an editor shows it
                    break
                elif raw[-1:] == b"\r":  # the last line, without a final newline
                    raw = raw[:-1]
                if number == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid UTF-8 at byte {error.start} of the "
                                    f"line ({raw[error.start:error.start + 4]!r})") from None
                if len(line) > max_line_chars:
                    raise DataError(_too_long(path, number, len(line), max_line_chars))
                yield line
        except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            what = "corrupt or truncated gzip file" if zipped else "read error"
            raise DataError(f"{path}:{number + 1}: {what}: {error}") from None


def _line_chars(start: bytes, handle: BinaryIO, limit: int) -> tuple[int, bool]:
    """Characters in the line that begins with ``start``, reading the rest in chunks; its line
    ending (\\n, \\r\\n, or a last \\r) is not counted, as ``read_lines`` drops it. Past
    ``16 * limit`` bytes (an endless line: ``/dev/zero``) the count stops: (count, True)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    count = len(decoder.decode(start))
    tail = start[-2:]
    read = len(start)
    while not tail.endswith(b"\n") and (chunk := handle.readline(1 << 20)):
        count += len(decoder.decode(chunk))
        tail = (tail + chunk)[-2:]
        read += len(chunk)
        if read > 16 * limit and not tail.endswith(b"\n"):
            return count, True
    count += len(decoder.decode(b"", final=True))
    return count - (2 if tail == b"\r\n" else 1 if tail[-1:] in (b"\n", b"\r") else 0), False


def _too_long(path: Path, number: int, n: int, limit: int, endless: bool = False) -> str:
    n_text = f"more than {n}" if endless else str(n)
    return (f"{path}:{number}: line of {n_text} characters exceeds the limit of {limit} "
            f"(data.max_line_chars)")


def read_parallel(src_path: str | Path, tgt_path: str | Path | None,
                  max_line_chars: int = 100_000) -> tuple[list[str], list[str]]:
    """Aligned (source, target) lines: two files, or one TSV of ``src<TAB>tgt`` when no target."""
    pairs = list(iter_parallel(src_path, tgt_path, max_line_chars))
    return [src for src, _ in pairs], [tgt for _, tgt in pairs]


def iter_parallel(src_path: str | Path, tgt_path: str | Path | None, max_line_chars: int = 100_000,
                  max_lines: int | None = 100_000_000) -> Iterator[tuple[str, str]]:
    """``read_parallel``'s pairs one at a time, with the same checks: memory stays bounded
    however large the files are. A length mismatch is found when the shorter file ends."""
    if not tgt_path:
        for number, line in enumerate(_iter_lines(Path(src_path), max_line_chars, max_lines), start=1):
            if line.count("\t") != 1:
                raise DataError(f"{src_path}:{number}: expected source<TAB>target, found "
                                f"{line.count(chr(9))} tabs")
            left, right = line.split("\t")
            yield left, right
        return
    src = _iter_lines(Path(src_path), max_line_chars, max_lines)
    tgt = _iter_lines(Path(tgt_path), max_line_chars, max_lines)
    number = 0
    for number, pair in enumerate(itertools.zip_longest(src, tgt), start=1):
        if pair[0] is None or pair[1] is None:
            rest = number + sum(1 for _ in (src if pair[1] is None else tgt))
            src_count, tgt_count = (number - 1, rest) if pair[0] is None else (rest, number - 1)
            raise DataError(f"parallel files differ in length: {src_path} has {src_count} lines, "
                            f"{tgt_path} has {tgt_count}")
        yield pair


# -- encoding ---------------------------------------------------------------------------------
