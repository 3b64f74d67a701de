"""The user's seed example runs unchanged and learns the progression.

The example lives outside the repository, in ``../shared/seed`` beside the clone, so the test
runs where that folder is and is skipped, saying why, in a plain clone. It trains 500 epochs
and prints as it goes; its printing is silenced here.
"""

from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

SEED_EXAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / "progression_example.py"


@pytest.mark.slow
@pytest.mark.skipif(not SEED_EXAMPLE.is_file(),
                    reason=f"the user's own example is not part of the repository: {SEED_EXAMPLE} "
                           "is absent (a plain clone); examples/ holds the package's own")
def test_seed_example_predicts_every_last_number():
    # The example seeds nothing; fixing the global generators makes this test repeatable.
    torch.manual_seed(0)
    np.random.seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        namespace = runpy.run_path(str(SEED_EXAMPLE), run_name="seed_example")
    assert "predicted last number" in printed.getvalue()  # its periodic_test ran

    rnn = namespace["rnn"]
    generate, normalize_seq = namespace["generate_sequence"], namespace["normalize_seq"]
    max_num, length = namespace["max_num"], namespace["sequence_len"]
    wrong = []
    for start in range(max_num):
        seq = generate(start, length)
        y_pred = rnn.predict(normalize_seq(seq[:-1]))
        assert len(y_pred) == length and y_pred[0].shape == (max_num, 1)
        if int(np.argmax(y_pred[-1])) != seq[-1]:
            wrong.append(start)
    assert wrong == [], f"wrong last number for starts {wrong}"
