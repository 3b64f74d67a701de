"""metrics.jsonl: lines appended whole; a resume keeps the lines up to its checkpoint."""

from __future__ import annotations

import json

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
