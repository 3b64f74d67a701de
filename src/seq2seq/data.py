"""Parallel text in, padded batches of token ids out.

``read_parallel`` reads aligned files (plain or gzip, strict UTF-8) with errors that name the
file and line; ``encode_corpus`` turns the lines into ids and drops or truncates what the model
should not train on; ``make_batches`` groups examples of similar length under a token budget
(length bucketing as in OpenNMT-py and fairseq); ``collate`` pads one batch into tensors.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import itertools
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from seq2seq.tokenize import BOS_ID, EOS_ID, PAD_ID, Tokenizer

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


def _open_sniffed(path: Path, stack: contextlib.ExitStack) -> tuple[BinaryIO, bool]:
    """``path`` opened once, as a binary stream of its text: gunzipped when it starts with gzip's
    magic bytes (or is named ``.gz``). Works on pipes, which can be read only once."""
    raw = stack.enter_context(path.open("rb", buffering=0))
    head = b""
    while len(head) < len(GZIP_MAGIC) and (more := raw.read(len(GZIP_MAGIC) - len(head))):
        head += more
    stream = stack.enter_context(io.BufferedReader(_Replayed(head, raw), 1 << 16))
    if path.suffix == ".gz" or head == GZIP_MAGIC:
        return stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb")), True
    return stream, False


def _iter_lines(path: Path, max_line_chars: int, max_lines: int | None = None) -> Iterator[str]:
    # A line of N characters has at most 4N bytes in UTF-8 (+3 for a BOM, +2 for "\r\n"): reading
    # that much at a time keeps memory bounded however long a broken file's lines are.
    limit = 4 * max_line_chars + 6
    number = 0
    with contextlib.ExitStack() as stack:
        try:
            handle, zipped = _open_sniffed(path, stack)
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
@dataclass
class EncodedCorpus:
    """Token ids of a parallel corpus, and what was left out or cut to get them."""

    src: list[list[int]]  # source ids, each ending with EOS_ID (so length >= 1)
    tgt: list[list[int]]  # target ids without bos/eos
    skipped_empty: int = 0
    skipped_long: int = 0
    truncated: int = 0


def encode_corpus(src_lines: Sequence[str], tgt_lines: Sequence[str], src_tok: Tokenizer,
                  tgt_tok: Tokenizer, max_len: int, long_pairs: str = "skip", drop_empty: bool = True,
                  log: Callable[[str], None] = print) -> EncodedCorpus:
    """Encode aligned lines; pairs with an empty side or a side over ``max_len`` tokens are
    dropped (or, for long ones with ``long_pairs='truncate'``, cut), counted and logged."""
    if long_pairs not in ("skip", "truncate"):
        raise ValueError(f"long_pairs must be 'skip' or 'truncate', got {long_pairs!r}")
    corpus = EncodedCorpus([], [])
    for src_line, tgt_line in zip(src_lines, tgt_lines, strict=True):
        src, tgt = src_tok.encode(src_line), tgt_tok.encode(tgt_line)
        if drop_empty and not (src_line.strip() and tgt_line.strip() and src and tgt):
            corpus.skipped_empty += 1
            continue
        if len(src) > max_len or len(tgt) > max_len:
            if long_pairs == "skip":
                corpus.skipped_long += 1
                continue
            src, tgt = src[:max_len], tgt[:max_len]
            corpus.truncated += 1
        corpus.src.append(src + [EOS_ID])
        corpus.tgt.append(tgt)
    log(f"encoded {len(corpus.src)} of {len(src_lines)} pairs: skipped {corpus.skipped_empty} "
        f"with an empty side, {corpus.skipped_long} longer than {max_len} tokens; "
        f"truncated {corpus.truncated}")
    return corpus


# -- batching ---------------------------------------------------------------------------------
class Batches(Sequence):
    """An epoch's batches: ``batches[i]`` is batch i's example indices, an integer array.

    Held as one array of every example index, grouped batch by batch (``order``), where each
    batch starts in it (``bounds``), and the order the batches are served in (``sequence``):
    a few bytes per example, however many batches there are.
    """

    def __init__(self, order: np.ndarray, bounds: np.ndarray, sequence: np.ndarray) -> None:
        self.order, self.bounds, self.sequence = order, bounds, sequence

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, index):  # int -> np.ndarray; slice -> list[np.ndarray]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        batch = int(self.sequence[index])
        return self.order[self.bounds[batch]:self.bounds[batch + 1]]


def make_batches(src_lengths: Sequence[int], tgt_lengths: Sequence[int], batch_tokens: int,
                 max_sentences: int, seed: int, epoch: int, shuffle: bool = True) -> Batches:
    """Group example indices into batches of similar length.

    Examples are ordered by (target length, source length), ties broken at random, and cut into
    consecutive runs with ``len(batch) * longest_target <= batch_tokens`` (target length + 1 for
    EOS) and ``len(batch) <= max_sentences``; an example over the budget alone forms its own
    batch. The batches' order is then shuffled. Deterministic for a given (seed, epoch).
    Memory: the lengths (NumPy arrays are used as they are), an index per example, and while
    sorting, a few arrays the size of the largest group of one target length.
    """
    if len(src_lengths) != len(tgt_lengths):
        raise ValueError(f"{len(src_lengths)} source lengths but {len(tgt_lengths)} target lengths")
    rng = np.random.default_rng([seed, epoch])
    tgt = np.asarray(tgt_lengths)
    src = np.asarray(src_lengths)
    order = np.empty(len(tgt), dtype=np.int32 if len(tgt) < 2**31 else np.int64)
    counts = np.bincount(tgt) if len(tgt) else np.zeros(0, np.int64)  # examples per target length
    lengths = np.flatnonzero(counts).tolist()  # the distinct target lengths, ascending
    placed = 0
    for length in lengths:  # one target length at a time: temporaries the size of its group
        group = np.flatnonzero(tgt == length)
        rng.shuffle(group)  # ties at random ...
        group = group[np.argsort(src[group], kind="stable")]  # ... among equal source lengths
        order[placed:placed + len(group)] = group
        placed += len(group)
    # Sorted by target length, a batch's longest target is its last one: a run of examples of
    # one length L fills batches of cap(L) = max(1, min(max_sentences, batch_tokens // (L+1))).
    # Walking the distinct lengths (at most max_len + 1 of them) gives the same cuts as
    # walking the examples one by one.
    sizes: list[int] = []
    current = 0  # examples in the open batch
    for length in lengths:
        count = int(counts[length])
        cap = max(1, min(max_sentences, batch_tokens // (length + 1)))
        if current >= cap:
            sizes.append(current)
            current = 0
        take = min(count, cap - current)
        current, count = current + take, count - take
        if count:
            sizes.append(current)
            sizes.extend([cap] * (count // cap))
            current = count % cap
    if current:
        sizes.append(current)
    bounds = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
    sequence = (rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))).astype(np.int32)
    return Batches(order, bounds, sequence)


@dataclass
class Batch:
    """One padded batch. ``tgt_in``/``tgt_out`` are (batch, 0) when there is no target."""

    src: Tensor  # (batch, src_len) long, PAD_ID padded
    src_lengths: Tensor  # (batch,) long
    tgt_in: Tensor  # (batch, tgt_len + 1): BOS + target, PAD_ID padded
    tgt_out: Tensor  # (batch, tgt_len + 1): target + EOS, PAD_ID padded
    n_tokens: int  # real target tokens, EOS included: (tgt_out != PAD_ID).sum()
    indices: list[int]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.src.to(device), self.src_lengths.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.n_tokens, self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(indices: Sequence[int], src: Sequence[list[int]],
            tgt: Sequence[list[int]] | None = None) -> Batch:
    """Pad the examples ``indices`` of ``src`` (and ``tgt``) into a ``Batch``."""
    indices = [int(i) for i in indices]  # a batch of make_batches is an array
    sources = [src[i] for i in indices]
    src_lengths = torch.tensor([len(s) for s in sources], dtype=torch.long)
    if tgt is None:
        empty = torch.zeros(len(indices), 0, dtype=torch.long)
        return Batch(_pad(sources), src_lengths, empty, empty.clone(), 0, indices)
    targets = [tgt[i] for i in indices]
    tgt_in = _pad([[BOS_ID, *t] for t in targets])
    tgt_out = _pad([[*t, EOS_ID] for t in targets])
    n_tokens = sum(len(t) + 1 for t in targets)
    return Batch(_pad(sources), src_lengths, tgt_in, tgt_out, n_tokens, indices)


def _pad(sequences: list[list[int]]) -> Tensor:
    """(len(sequences), longest) long tensor, PAD_ID after each sequence."""
    if not sequences:
        return torch.zeros(0, 0, dtype=torch.long)
    longest = max(map(len, sequences))
    # one tensor from padded lists: a tensor per row costs about 1 ms a training batch
    return torch.tensor([[*s, *[PAD_ID] * (longest - len(s))] for s in sequences],
                        dtype=torch.long)
