"""metrics.jsonl: lines appended whole; a resume keeps the lines up to its checkpoint."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from seq2seq.data.text import DataError
from seq2seq.training.metrics_log import MetricsLog


def test_append_then_truncate_keeps_the_lines_up_to_the_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (5, 10, 15, 20):
        log.append({"step": step, "train_loss": 1.0 / step})
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 25, "train_lo')  # torn by a kill
    log.truncate(10)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [5, 10]
    log.append({"step": 15})
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [5, 10, 15]
    log.clear()
    assert not log.path.exists()


def test_a_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)  # every rank but 0
    log.append({"step": 1})
    log.truncate(0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step, shown", [('"12"', "'12'"), ("1.5", "1.5"), ("null", "None"), ("true", "True"),
                                         ("[3]", r"\[3\]")])
def test_a_line_whose_step_is_not_an_integer_is_named_and_the_file_kept(tmp_path, step, shown):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 5})
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write(f'{{"step": {step}, "train_loss": 1.0}}\n')
    log.append({"step": 15})
    before = log.path.read_bytes()
    with pytest.raises(DataError, match=rf"^{re.escape(str(log.path))}:2: field 'step' must be an integer, "
                                        rf"got {shown}"):
        log.truncate(10)
    assert log.path.read_bytes() == before


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero"])
def test_a_metrics_file_that_is_a_fifo_or_dev_zero_is_left_alone_at_once(tmp_path, kind):
    """Not a regular file: nothing to keep, as when there is none; never read (a FIFO would
    block, /dev/zero never end)."""
    path = tmp_path / "metrics.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    MetricsLog(path).truncate(10)
    assert stat.S_ISFIFO(os.lstat(path).st_mode) if kind == "fifo" else os.readlink(path) == "/dev/zero"


def test_a_metrics_file_past_the_bound_is_refused_naming_it(tmp_path, monkeypatch):
    from seq2seq.training import metrics_log

    monkeypatch.setattr(metrics_log, "MAX_METRICS_BYTES", 100)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(20):
        log.append({"step": step})
    with pytest.raises(DataError, match=r"metrics\.jsonl: \d+ bytes, more than the 100"):
        log.truncate(10)
