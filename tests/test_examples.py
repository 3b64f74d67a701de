"""Every script in ``examples/`` runs, as a user runs it, and does what its docstring says.

``progression.py`` (the seed example) is run by ``tests/test_seed_example.py``. The others run
here in a child process, from an empty folder; ``dates.py`` with a short training budget
(``SEQ2SEQ_EXAMPLE_SECONDS``), so it learns less than its minute would teach it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTED_HERE = {"dates.py", "reversal_attention.py"}


def run_example(name: str, cwd: Path, **env: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == TESTED_HERE | {"progression.py"}


@pytest.mark.slow
def test_reversal_attention_reverses_unseen_sequences_and_looks_at_the_mirror(tmp_path):
    out = run_example("reversal_attention.py", tmp_path)
    accuracy = float(re.search(r"token accuracy on unseen sequences: ([\d.]+)%", out).group(1))
    assert accuracy > 90, out
    digits = re.search(r"input: +([\d ]+)\nreversed: +([\d ]+)\n", out)
    assert digits and digits.group(2).split() == digits.group(1).split()[::-1], out
    # The attention table: output step t looks hardest at input 9 - t (or a neighbour).
    table = out.split("attention (rows")[1].splitlines()[2:]  # after the title and the column numbers
    rows = [line.split(maxsplit=1) for line in table if line.strip()]
    assert len(rows) == 10
    for t, row in rows:
        weights = [int(w) for w in row.split()]
        assert abs(weights.index(max(weights)) - (9 - int(t))) <= 1, (t, row)


@pytest.mark.slow
def test_dates_example_trains_translates_and_plots(tmp_path):
    out = run_example("dates.py", tmp_path, SEQ2SEQ_EXAMPLE_SECONDS="4")
    assert re.search(r"exact match on 1,000 held-out dates: [\d.]+%", out), out
    assert out.count(" -> ") == 4
    assert (tmp_path / "dates-example" / "model" / "best.safetensors").is_file()
    assert (tmp_path / "dates-example" / "attention.png").read_bytes()[:4] == b"\x89PNG"
    # A second run reuses the model, as its docstring says: no training the second time.
    before = (tmp_path / "dates-example" / "model" / "best.safetensors").stat().st_mtime_ns
    run_example("dates.py", tmp_path, SEQ2SEQ_EXAMPLE_SECONDS="4")
    assert (tmp_path / "dates-example" / "model" / "best.safetensors").stat().st_mtime_ns == before
