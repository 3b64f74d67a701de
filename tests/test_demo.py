"""The demo: a first command that trains, scores, draws and leaves a model ready to use."""

import re
import subprocess
import sys

import pytest

from seq2seq.demo import MARKER, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def seq2seq(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "seq2seq", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_demo_trains_scores_draws_and_can_run_again(tmp_path):
    out = tmp_path / "demo"
    run = seq2seq("demo", "--output-dir", str(out), "--max-seconds", "12")
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"exact match on 1,000 held-out dates: \d+\.\d%", run.stdout)
    assert "validation at step" in run.stderr  # train.py's own progress
    assert "✓" in run.stdout or "✗" in run.stdout
    for name in ("attention.png", "losses.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert str(out / name) in run.stdout
    assert f"seq2seq translate --model-dir {out / 'model'}" in run.stdout

    translated = seq2seq("translate", "--model-dir", str(out / "model"), stdin="3rd of March 2021\n")
    assert translated.returncode == 0, translated.stderr[-2000:]
    assert len(translated.stdout.splitlines()) == 1 and translated.stdout.strip()

    again = seq2seq("demo", "--task", "reversal", "--output-dir", str(out), "--max-seconds", "3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.search(r"exact match on 1,000 held-out examples: \d+\.\d%", again.stdout)
    assert (out / "data" / "train.src").read_text().split("\n")[0].isalpha()  # reversal's data now
    assert (out / "attention.png").read_bytes()[:8] == PNG_MAGIC


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not made by `seq2seq demo`"):
        run_demo(output_dir=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / MARKER).exists()


def test_demo_unknown_task_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="dates, reversal, copy, progression"):
        run_demo(task="sorting", output_dir=tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
