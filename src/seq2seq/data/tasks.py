"""Generated sequence tasks for demos, examples and tests.

Each task is a list of (source text, target text) pairs, character-level friendly: every text
is printable, one line, no tabs or newlines.

- ``dates``: a date written by a human in one of ``DATE_FORMATS`` -> ISO ``YYYY-MM-DD``.
  Dates are uniform over 1950-01-01 .. 2049-12-31. Dotted and dashed numeric dates are
  day-first (European, ``03.03.2021``, ``3.3.21``, ``03-03-2021``); slashed dates are US
  month-first (``3/3/2021``, ``03/03/21``) unless the year comes first (``2021/3/3``).
  Two-digit years stand for 1950-2049: ``50``..``99`` -> 19xx, ``00``..``49`` -> 20xx.
  Weekday names are the true weekday of the date. About one source in ten is lowercased
  and one in ten uppercased; ISO itself appears rarely.
- ``reversal``: lowercase letters, length 3..12 -> the same letters reversed.
- ``copy``: lowercase letters, length 3..12 -> the same letters.
- ``progression``: the seed example's task as text. A sequence ``x, m*x, m*m*x, ...`` mod 50
  with start ``x`` in 0..49 and multiplier ``m`` in ``PROGRESSION_MULTIPLIERS`` (all coprime
  to 50; the seed uses m = 3); the source is its first 5..10 numbers, the target the same
  numbers shifted by one (the next number appended), space-separated.

Sources are unique across train and test together, so no test source is seen in training.
The test split is drawn first, so for one seed it does not depend on ``n_train``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

TASKS = ("dates", "reversal", "copy", "progression")

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# str.format templates; fields are described in _date_fields. Shown for 2021-03-03.
DATE_FORMATS = (
    "{dth} of {Month} {yyyy}",  # 3rd of March 2021
    "the {dth} of {Month}, {yyyy}",  # the 3rd of March, 2021
    "{Month} {dth}, {yyyy}",  # March 3rd, 2021
    "{Month} {d}, {yyyy}",  # March 3, 2021
    "{Mon} {d}, {yy}",  # Mar 3, 21
    "{Mon} {dth} {yyyy}",  # Mar 3rd 2021
    "{d} {Month} {yyyy}",  # 3 March 2021
    "{d} {Mon} {yyyy}",  # 3 Mar 2021
    "{d}-{Mon}-{yyyy}",  # 3-Mar-2021
    "{dd}-{Mon}-{yy}",  # 03-Mar-21
    "{Weekday}, {Month} {d} {yyyy}",  # Wednesday, March 3 2021
    "{Weekday} {d} {Month} {yyyy}",  # Wednesday 3 March 2021
    "{Wkd}, {d} {Mon} {yyyy}",  # Wed, 3 Mar 2021
    "{Wkd} {Mon} {dd} {yyyy}",  # Wed Mar 03 2021
    "{dd}.{mm}.{yyyy}",  # 03.03.2021 (day first)
    "{d}.{m}.{yy}",  # 3.3.21 (day first)
    "{dd}-{mm}-{yyyy}",  # 03-03-2021 (day first)
    "{m}/{d}/{yyyy}",  # 3/3/2021 (US, month first)
    "{mm}/{dd}/{yy}",  # 03/03/21 (US, month first)
    "{yyyy}/{m}/{d}",  # 2021/3/3
    "{yyyy}{mm}{dd}",  # 20210303
    "{yyyy}-{mm}-{dd}",  # 2021-03-03 (ISO, the answer itself: rare)
)
_DATE_WEIGHTS = tuple(0.25 if f == "{yyyy}-{mm}-{dd}" else 1.0 for f in DATE_FORMATS)
_FIRST_DAY, _END_DAY = date(1950, 1, 1), date(2050, 1, 1)

PROGRESSION_MODULUS = 50
PROGRESSION_MULTIPLIERS = (3, 7, 9, 11, 13, 17, 19, 21, 23)
PROGRESSION_LENGTHS = range(5, 11)  # numbers in the source

LETTERS = "abcdefghijklmnopqrstuvwxyz"
LETTER_LENGTHS = (3, 12)  # inclusive bounds for reversal and copy


@dataclass
class TaskData:
    """A generated task: train and held-out test pairs of (source text, target text)."""

    name: str
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]  # no source here appears in train


def make_task(name: str, n_train: int, n_test: int = 1000, seed: int = 0) -> TaskData:
    """Generate ``n_train`` training and ``n_test`` test pairs of task ``name``, deterministically.

    Raises ValueError for an unknown task, a negative size, or more pairs than there are
    distinct sources (progression has 2,364).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {TASKS}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    rng = random.Random(seed)
    if name == "progression":
        pairs = _all_progressions()
        if n_train + n_test > len(pairs):
            raise ValueError(
                f"progression has {len(pairs)} distinct sources, asked for "
                f"n_train + n_test = {n_train + n_test}"
            )
        rng.shuffle(pairs)
    else:
        sample = {"dates": _sample_date, "reversal": _sample_reversal, "copy": _sample_copy}[name]
        pairs = _unique_samples(sample, n_test + n_train, rng)
    return TaskData(name, train=pairs[n_test:n_test + n_train], test=pairs[:n_test])


def write_task(data: TaskData, directory: str | Path, valid_size: int = 200) -> dict[str, str]:
    """Write the task as parallel text files in ``directory``, one example per line (UTF-8).

    valid.* holds the first ``valid_size`` test pairs and test.* the rest, so model selection
    on valid never touches the test set. Returns the DataConfig-style mapping of file names,
    relative to ``directory``.
    """
    if not 0 <= valid_size < len(data.test):
        raise ValueError(f"valid_size must be in [0, {len(data.test)}) for {len(data.test)} test pairs, "
                         f"got {valid_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {"train": data.train, "valid": data.test[:valid_size], "test": data.test[valid_size:]}
    files = {}
    for split, pairs in splits.items():
        for side, index in (("src", 0), ("tgt", 1)):
            lines = [pair[index] for pair in pairs]
            if any("\n" in line or "\r" in line for line in lines):
                raise ValueError(f"{split}.{side}: a text holds a line break")
            (directory / f"{split}.{side}").write_text("".join(f"{line}\n" for line in lines),
                                                        encoding="utf-8", newline="\n")
            files[f"{split}_{side}"] = f"{split}.{side}"
    return files


def progression_arrays(max_num: int = 50, sequence_len: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The seed example's training arrays for F(x) = 3x mod max_num, one sequence per start.

    Returns X (max_num, sequence_len), the inputs divided by max_num, and
    Y (max_num, sequence_len, max_num, 1), the next numbers one-hot.
    """
    sequences = [_progression(start, 3, sequence_len + 1, max_num) for start in range(max_num)]
    x = np.array([[n / max_num for n in seq[:-1]] for seq in sequences])
    eye = np.eye(max_num)
    y = np.array([[eye[n].reshape(-1, 1) for n in seq[1:]] for seq in sequences])
    return x, y


def _unique_samples(sample: Callable[[random.Random], tuple[str, str]], n: int,
                    rng: random.Random) -> list[tuple[str, str]]:
    """Draw ``n`` pairs with distinct sources; give up if the space looks exhausted."""
    pairs: dict[str, str] = {}
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ValueError(f"could not draw {n} distinct sources (got {len(pairs)})")
        source, target = sample(rng)
        pairs.setdefault(source, target)
    return list(pairs.items())


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _date_fields(day: date) -> dict[str, str]:
    month, weekday = MONTHS[day.month - 1], WEEKDAYS[day.weekday()]
    return {
        "d": str(day.day), "dd": f"{day.day:02d}", "dth": _ordinal(day.day),
        "m": str(day.month), "mm": f"{day.month:02d}", "Month": month, "Mon": month[:3],
        "yyyy": str(day.year), "yy": f"{day.year % 100:02d}",
        "Weekday": weekday, "Wkd": weekday[:3],
    }


def _sample_date(rng: random.Random) -> tuple[str, str]:
    day = _FIRST_DAY + timedelta(days=rng.randrange((_END_DAY - _FIRST_DAY).days))
    template = rng.choices(DATE_FORMATS, weights=_DATE_WEIGHTS)[0]
    source = template.format(**_date_fields(day))
    case = rng.random()
    if case < 0.1:
        source = source.lower()
    elif case < 0.2:
        source = source.upper()
    return source, day.isoformat()


def _letters(rng: random.Random) -> str:
    return "".join(rng.choices(LETTERS, k=rng.randint(*LETTER_LENGTHS)))


def _sample_reversal(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng)
    return text, text[::-1]


def _sample_copy(rng: random.Random) -> tuple[str, str]:
    text = _letters(rng)
    return text, text


def _progression(start: int, multiplier: int, length: int, modulus: int) -> list[int]:
    seq = [start]
    while len(seq) < length:
        seq.append(seq[-1] * multiplier % modulus)
    return seq


def _all_progressions() -> list[tuple[str, str]]:
    """Every distinct (source, target) of the text progression task, in a fixed order.

    Different (start, multiplier) pairs can give the same numbers (0 and 25 are fixed
    points); the target is then the same too, so deduplicating by source loses nothing.
    """
    pairs: dict[str, str] = {}
    for length in PROGRESSION_LENGTHS:
        for multiplier in PROGRESSION_MULTIPLIERS:
            for start in range(PROGRESSION_MODULUS):
                seq = _progression(start, multiplier, length + 1, PROGRESSION_MODULUS)
                pairs.setdefault(" ".join(map(str, seq[:-1])), " ".join(map(str, seq[1:])))
    return list(pairs.items())
