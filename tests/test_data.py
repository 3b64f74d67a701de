"""Reading parallel text, encoding it, length-bucketed batching and padding."""

from __future__ import annotations

import gzip
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq.data.batches import EncodedCorpus, collate, encode_corpus, make_batches
from seq2seq.data.text import GZIP_MAGIC, DataError, read_lines, read_parallel
from seq2seq.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Tokenizer


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# -- read_lines -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["text.txt", "text.gz"])
def test_read_lines_plain_and_gzip(tmp_path, name):
    path = _write(tmp_path / name, "\ufeffEin Hund.\r\nZwei Katzen\n\nüber\x00all\r".encode())
    assert read_lines(path) == ["Ein Hund.", "Zwei Katzen", "", "über\x00all"]


def test_gzip_is_detected_by_its_magic_bytes(tmp_path):
    path = tmp_path / "zipped.txt"
    path.write_bytes(gzip.compress(b"a\nb\n"))
    assert read_lines(path) == ["a", "b"]


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = _write(tmp_path / "latin1.txt", "ok\nstill ok\nMädchen\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:3: invalid UTF-8"):
        read_lines(path)


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress("".join(f"line {i} with some text\n" for i in range(20000)).encode())
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.gz:\d+: corrupt or truncated gzip"):
        read_lines(path)
    path.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match=r"cut\.gz"):
        read_lines(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.txt: no such file"):
        read_lines(tmp_path / "nothing.txt")
    with pytest.raises(DataError, match="cannot read"):
        read_lines(tmp_path)  # a folder


@pytest.mark.parametrize("line", ["x" * 11, "é" * 11, "😀" * 30, "y" * 200_000])
def test_overlong_line_names_file_line_and_limit(tmp_path, line):
    path = _write(tmp_path / "long.txt", f"short\n{line}\nshort\n".encode())
    message = rf"long\.txt:2: line of {len(line)} characters exceeds the limit of 10 \(data.max_line_chars\)"
    with pytest.raises(DataError, match=message):
        read_lines(path, max_line_chars=10)
    assert read_lines(path, max_line_chars=len(line))[1] == line


def test_long_lines_and_files_are_fine(tmp_path):
    lines = ["w" * 100_000, "", "kurz"] * 3
    path = _write(tmp_path / "big.gz", ("\n".join(lines) + "\n").encode())
    assert read_lines(path) == lines


LINE = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=50)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, max_size=10), gz_name=st.booleans(), zipped=st.booleans(),
       limit=st.integers(1, 50))
def test_read_lines_returns_every_line_within_the_limit(tmp_path, lines, gz_name, zipped, limit):
    """Valid text, plain or gzip'ed (named .gz or not): exactly its lines, or, where one is
    longer than ``limit`` characters, an error naming the first such line."""
    path = tmp_path / ("any.gz" if gz_name else "any.txt")
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if zipped or gz_name else data)
    too_long = [n for n, line in enumerate(lines, start=1) if len(line) > limit]
    if too_long:
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{too_long[0]}: line of "):
            read_lines(path, max_line_chars=limit)
    else:
        assert read_lines(path, max_line_chars=limit) == lines


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=10), cut=st.floats(0, 1, exclude_max=True),
       garbage=st.binary(max_size=100), broken=st.sampled_from(["cut short", "magic then garbage"]))
def test_broken_gzip_is_refused_naming_the_file(tmp_path, lines, cut, garbage, broken):
    """A gzip stream cut short (one byte or more gone), or gzip's magic bytes followed by
    anything: an error naming the file and the line where the stream broke."""
    whole = gzip.compress("".join(line + "\n" for line in lines).encode())
    data = whole[:int((len(whole) - 1) * cut)] if broken == "cut short" else GZIP_MAGIC + garbage
    path = tmp_path / ("any.gz" if broken == "cut short" else "any.txt")  # a stub has no magic
    path.write_bytes(data)
    if not data:
        assert read_lines(path) == []  # an empty file, not a broken one
        return
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:\d+: corrupt or truncated gzip file"):
        read_lines(path)


# -- read_parallel ----------------------------------------------------------------------------
def test_read_parallel_files_must_have_the_same_length(tmp_path):
    src = _write(tmp_path / "a.en", b"one\ntwo\nthree\n")
    tgt = _write(tmp_path / "b.de.gz", b"eins\nzwei\n")
    with pytest.raises(DataError) as error:
        read_parallel(src, tgt)
    assert all(part in str(error.value) for part in ("a.en", "b.de.gz", "3", "2"))
    _write(tgt, b"eins\nzwei\ndrei\n")
    assert read_parallel(src, tgt) == (["one", "two", "three"], ["eins", "zwei", "drei"])


def test_read_parallel_tsv(tmp_path):
    path = _write(tmp_path / "pairs.tsv", b"a dog\tein Hund\n\t\nx\ty\n")
    assert read_parallel(path, None) == (["a dog", "", "x"], ["ein Hund", "", "y"])
    assert read_parallel(path, "") == read_parallel(path, None)
    for bad in (b"a\tb\nno tab here\n", b"a\tb\nthree\tfields\there\n"):
        _write(path, bad)
        with pytest.raises(DataError, match=r"pairs\.tsv:2: expected source<TAB>target"):
            read_parallel(path, None)


# -- encode_corpus ----------------------------------------------------------------------------
WORDS = Tokenizer("word", tokens=[*SPECIALS, "a", "b", "c"])


def test_encode_corpus_counts_skipped_and_truncated():
    src = ["a b", "", "a a a a a", "c", "b b b b b b", "  "]
    tgt = ["c", "b", "b", "a a a a a a", "a", "a"]
    logged = []
    corpus = encode_corpus(src, tgt, WORDS, WORDS, max_len=4, log=logged.append)
    assert (corpus.skipped_empty, corpus.skipped_long, corpus.truncated) == (2, 3, 0)
    assert corpus.src == [[4, 5, EOS_ID]] and corpus.tgt == [[6]]
    assert len(logged) == 1 and "2 with an empty side" in logged[0] and "3 longer than 4" in logged[0]

    corpus = encode_corpus(src, tgt, WORDS, WORDS, max_len=4, long_pairs="truncate", log=logged.append)
    assert (corpus.skipped_empty, corpus.skipped_long, corpus.truncated) == (2, 0, 3)
    assert corpus.src[1] == [4, 4, 4, 4, EOS_ID] and corpus.tgt[2] == [4, 4, 4, 4]
    assert all(len(s) <= 5 and s[-1] == EOS_ID for s in corpus.src)

    corpus = encode_corpus(src, tgt, WORDS, WORDS, max_len=10, drop_empty=False, log=logged.append)
    assert len(corpus.src) == 6 and corpus.src[1] == [EOS_ID] and corpus.skipped_empty == 0
    assert encode_corpus(["zzz"], ["a"], WORDS, WORDS, 4, log=logged.append).src == [[UNK_ID, EOS_ID]]


# -- make_batches -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi30k_lengths() -> tuple[list[int], list[int]]:
    """Lengths of 29,000 sentence pairs spread as Multi30k's are (4 to 40 words, about 12 on
    average, the target about as long as the source), made by the test."""
    rng = random.Random(0)
    src = [min(40, max(4, round(rng.lognormvariate(2.45, 0.35)))) for _ in range(29_000)]
    tgt = [min(40, max(2, round(n * rng.uniform(0.8, 1.3)))) for n in src]
    return src, tgt


def test_batches_cover_every_example_once_within_budget(multi30k_lengths):
    src, tgt = multi30k_lengths
    batches = make_batches(src, tgt, batch_tokens=2000, max_sentences=128, seed=1, epoch=0)
    assert Counter(i for batch in batches for i in batch) == Counter(range(len(tgt)))
    for batch in batches:
        assert len(batch) <= 128
        assert len(batch) * max(tgt[i] + 1 for i in batch) <= 2000
    real = sum(tgt) + len(tgt)
    padded = sum(len(b) * max(tgt[i] + 1 for i in b) for b in batches)
    print(f"Multi30k target padding: {real / padded:.4f} real tokens per padded position, "
          f"{len(batches)} batches")
    assert real / padded >= 0.9


def test_batches_are_deterministic_per_seed_and_epoch(multi30k_lengths):
    src, tgt = multi30k_lengths
    first = _lists(make_batches(src, tgt, 2000, 256, seed=3, epoch=1))
    assert _lists(make_batches(src, tgt, 2000, 256, seed=3, epoch=1)) == first
    assert _lists(make_batches(src, tgt, 2000, 256, seed=3, epoch=2)) != first
    assert _lists(make_batches(src, tgt, 2000, 256, seed=4, epoch=1)) != first
    unshuffled = make_batches(src, tgt, 2000, 256, seed=3, epoch=1, shuffle=False)
    longest = [max(tgt[i] for i in batch) for batch in unshuffled]
    assert longest == sorted(longest)  # without shuffling, batches go from short to long
    # ties in length are broken at random, so the same lengths group differently each epoch
    groups = [_lists(make_batches([5] * 40, [5] * 40, 24, 64, seed=3, epoch=e, shuffle=False))
              for e in (1, 2)]
    assert groups[0] != groups[1] and sorted(map(len, groups[0])) == [4] * 10


def test_an_overlong_example_gets_its_own_batch():
    batches = make_batches([3, 50, 4], [2, 99, 3], batch_tokens=10, max_sentences=8, seed=0, epoch=0,
                           shuffle=False)
    assert _lists(batches) == [[0, 2], [1]]
    assert len(make_batches([1] * 5, [1] * 5, 100, 2, seed=0, epoch=0)) == 3
    assert sorted(map(len, make_batches([1] * 5, [1] * 5, 100, 2, seed=0, epoch=0))) == [1, 2, 2]
    assert len(make_batches([], [], 100, 2, seed=0, epoch=0)) == 0


def _lists(batches) -> list[list[int]]:
    return [batch.tolist() for batch in batches]


def _one_by_one(order, tgt, batch_tokens, max_sentences):
    """The batches of ``order`` cut example by example, as make_batches cut them before it
    worked per distinct length."""
    batches, batch, longest = [], [], 0
    for index in order:
        length = tgt[index] + 1
        grown = max(longest, length)
        if batch and ((len(batch) + 1) * grown > batch_tokens or len(batch) >= max_sentences):
            batches.append(batch)
            batch, grown = [], length
        batch.append(index)
        longest = grown
    return [*batches, batch] if batch else batches


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 60)), max_size=300),
       st.integers(1, 400), st.integers(1, 50), st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_batches_are_sorted_and_cut_per_length_as_example_by_example(pairs, batch_tokens,
                                                                     max_sentences, epoch):
    src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
    cut = _lists(make_batches(src, tgt, batch_tokens, max_sentences, seed=5, epoch=epoch, shuffle=False))
    order = [i for batch in cut for i in batch]
    assert sorted(order) == list(range(len(pairs)))  # every example once
    keys = [(tgt[i], src[i]) for i in order]
    assert keys == sorted(keys)  # by target length, then source length
    assert cut == _one_by_one(order, tgt, batch_tokens, max_sentences)


def test_batches_hold_a_few_bytes_per_example():
    n = 200_000
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 80, n).astype(np.uint8), rng.integers(1, 80, n).astype(np.uint8)
    batches = make_batches(src, tgt, batch_tokens=2000, max_sentences=128, seed=1, epoch=0)
    held = batches.order.nbytes + batches.bounds.nbytes + batches.sequence.nbytes
    assert held <= 4.5 * n  # an int32 index per example, and 12 bytes per batch of ~48
    assert sorted(np.concatenate(list(batches)).tolist()) == list(range(n))


# -- collate ----------------------------------------------------------------------------------
def test_collate_pads_and_places_bos_eos():
    corpus = EncodedCorpus(src=[[4, 5, EOS_ID], [6, EOS_ID], [4, 4, 4, 4, EOS_ID]],
                           tgt=[[7], [8, 9, 10], []])
    batch = collate([1, 0], corpus.src, corpus.tgt)
    assert batch.indices == [1, 0] and len(batch) == 2
    assert batch.src.tolist() == [[6, EOS_ID, PAD_ID], [4, 5, EOS_ID]]
    assert batch.src_lengths.tolist() == [2, 3]
    assert batch.tgt_in.tolist() == [[BOS_ID, 8, 9, 10], [BOS_ID, 7, PAD_ID, PAD_ID]]
    assert batch.tgt_out.tolist() == [[8, 9, 10, EOS_ID], [7, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.n_tokens == int((batch.tgt_out != PAD_ID).sum()) == 6
    assert all(t.dtype == torch.long for t in (batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out))
    assert collate([2], corpus.src, corpus.tgt).tgt_out.tolist() == [[EOS_ID]]
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_in, batch.tgt_in) and moved.n_tokens == 6


def test_collate_without_targets():
    batch = collate([0, 2], [[4, EOS_ID], [5, EOS_ID], [6, 6, 6, EOS_ID]])
    assert batch.src.shape == (2, 4) and batch.tgt_in.shape == (2, 0) == batch.tgt_out.shape
    assert batch.n_tokens == 0
