"""Generated tasks: determinism, held-out test sets, correct targets, the seed's arrays."""

import re
from datetime import date, datetime

import numpy as np
import pytest

from seq2seq.data.tasks import DATE_FORMATS, TASKS, make_task, progression_arrays, write_task

# How a reader would parse each documented format, independently of the generator: strptime
# patterns, after ordinal suffixes are dropped ("3rd" -> "3"). %y is re-pivoted to 1950-2049.
DATE_PATTERNS = (
    "%d of %B %Y", "the %d of %B, %Y", "%B %d, %Y", "%b %d, %y", "%b %d %Y", "%d %B %Y",
    "%d %b %Y", "%d-%b-%Y", "%d-%b-%y", "%A, %B %d %Y", "%A %d %B %Y", "%a, %d %b %Y",
    "%a %b %d %Y", "%d.%m.%Y", "%d.%m.%y", "%d-%m-%Y", "%m/%d/%Y", "%m/%d/%y", "%Y/%m/%d",
    "%Y%m%d", "%Y-%m-%d",
)
ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)


def parse_date(source: str) -> set[date]:
    """Every date that some documented pattern reads from ``source``."""
    text = ORDINAL.sub(r"\1", source)
    found = set()
    for pattern in DATE_PATTERNS:
        try:
            parsed = datetime.strptime(text, pattern).date()
        except ValueError:
            continue
        if "%y" in pattern:
            yy = parsed.year % 100
            parsed = parsed.replace(year=1900 + yy if yy >= 50 else 2000 + yy)
        found.add(parsed)
    return found


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_per_seed_and_test_held_out(name):
    first = make_task(name, 300, 200, seed=3)
    assert first == make_task(name, 300, 200, seed=3)
    assert first != make_task(name, 300, 200, seed=4)
    assert (len(first.train), len(first.test)) == (300, 200)
    sources = [src for src, _ in first.train + first.test]
    assert len(set(sources)) == len(sources)  # no overlap, no duplicates
    # The test split does not depend on how much training data is asked for.
    assert make_task(name, 50, 200, seed=3).test == first.test


@pytest.mark.parametrize("name", TASKS)
def test_texts_are_printable_single_lines(name):
    data = make_task(name, 300, 100)
    for src, tgt in data.train + data.test:
        assert src.isprintable() and tgt.isprintable() and src and tgt
        assert "\t" not in src + tgt


def test_dates_targets_are_the_dates_in_the_sources():
    data = make_task("dates", 3000, 500, seed=1)
    seen_formats = set()
    for src, tgt in data.train + data.test:
        assert len(src) <= 40
        assert parse_date(src) == {date.fromisoformat(tgt)}, src
        day = date.fromisoformat(tgt)
        assert date(1950, 1, 1) <= day <= date(2049, 12, 31)
        weekday = day.strftime("%A").lower()
        for name in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"):
            if name[:3] in src.lower():
                assert name == weekday, src
        for number, suffix in ORDINAL.findall(src):
            n = int(number)
            want = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
            assert suffix.lower() == want, src
        seen_formats.add(re.sub(r"[A-Za-z]+", "a", re.sub(r"\d+", "0", src)))
    assert len(seen_formats) >= 15
    assert any(src.isupper() for src, _ in data.train) and any(src.islower() for src, _ in data.train)


def test_date_conventions_documented_in_examples():
    # Same date, many ways: the format list's comments are the documentation.
    assert len(DATE_FORMATS) >= 20
    for src, iso in [("3rd of March 2021", "2021-03-03"), ("03.04.2021", "2021-04-03"),
                     ("4/3/2021", "2021-04-03"), ("Mar 3, 49", "2049-03-03"), ("3.3.50", "1950-03-03")]:
        assert parse_date(src) == {date.fromisoformat(iso)}


@pytest.mark.parametrize("name", ["reversal", "copy"])
def test_letter_tasks(name):
    data = make_task(name, 500, 100)
    lengths = set()
    for src, tgt in data.train + data.test:
        assert re.fullmatch("[a-z]{3,12}", src)
        assert tgt == (src[::-1] if name == "reversal" else src)
        lengths.add(len(src))
    assert lengths == set(range(3, 13))


def test_progression_text():
    data = make_task("progression", 1000, 1000)
    for src, tgt in data.train + data.test:
        xs, ys = [int(t) for t in src.split()], [int(t) for t in tgt.split()]
        assert 5 <= len(xs) <= 10 and len(ys) == len(xs)
        assert ys[:-1] == xs[1:]
        assert all(0 <= n < 50 for n in xs + ys)
        # Some multiplier of the documented set explains the whole sequence.
        assert any(all((a * m) % 50 == b for a, b in zip(xs, ys)) for m in (3, 7, 9, 11, 13, 17, 19, 21, 23))
    with pytest.raises(ValueError, match="distinct sources"):
        make_task("progression", 2000, 1000)


def test_progression_arrays_match_seed_example():
    # The seed example's code, as written there.
    max_num, sequence_len = 50, 10

    def normalize_seq(xs):
        return [x / max_num for x in xs]

    def one_hot_encode(x):
        s = np.zeros(max_num)
        s[x] = 1
        return s.reshape(-1, 1)

    def generate_sequence(start, seq_len):
        seq = [start]
        for _ in range(seq_len):
            seq += [(seq[-1] * 3) % max_num]
        return seq

    train_sequences = [generate_sequence(i, sequence_len) for i in range(max_num)]
    x_seed = np.array([normalize_seq(seq[:-1]) for seq in train_sequences])
    y_seed = np.array([[one_hot_encode(x) for x in seq[1:]] for seq in train_sequences])

    x, y = progression_arrays()
    assert x.shape == (50, 10) and y.shape == (50, 10, 50, 1)
    assert x.dtype == x_seed.dtype and y.dtype == y_seed.dtype
    np.testing.assert_array_equal(x, x_seed)
    np.testing.assert_array_equal(y, y_seed)
    assert progression_arrays(20, 4)[1].shape == (20, 4, 20, 1)


def test_write_task(tmp_path):
    data = make_task("dates", 120, 50)
    files = write_task(data, tmp_path / "dates", valid_size=20)
    assert files == {f"{split}_{side}": f"{split}.{side}" for split in ("train", "valid", "test")
                     for side in ("src", "tgt")}
    expected = {"train": data.train, "valid": data.test[:20], "test": data.test[20:]}
    for key, name in files.items():
        split, side = key.split("_")
        lines = (tmp_path / "dates" / name).read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and len(lines) - 1 == len(expected[split])
        assert lines[:-1] == [pair[side == "tgt"] for pair in expected[split]]
    with pytest.raises(ValueError, match="valid_size"):
        write_task(data, tmp_path, valid_size=50)


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="reversal"):
        make_task("sorting", 10)
    with pytest.raises(ValueError, match=">= 0"):
        make_task("copy", -1)
