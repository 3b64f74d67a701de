"""A model directory is never lost: one training at a time (a lock the OS releases when its
holder dies), no trained model replaced without ``--overwrite``, no config written over itself,
and a model too big for memory or empty validation files refused before training starts.

The concurrent runs are real processes; the tiny runs go through ``cli.main`` in-process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, write_reversal

from seq2seq import cli
from seq2seq.training.loop import TrainingError, train_translator

CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, tokenizer: word, vocab_size: 100}
model: {embed_size: 16, hidden_size: 24, attention: bahdanau, dropout: 0.0}
train: {batch_tokens: 100, epochs: 1, lr: 0.01, log_every: 1, threads: 1, device: cpu, seed: 4}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = write_reversal(tmp_path_factory.mktemp("safety"), {"train": 300}, seed=3)
    (directory / "cfg.yaml").write_text(CONFIG, encoding="utf-8")
    return directory


def args(corpus: Path, model_dir: Path | str, *extra: str) -> list[str]:
    return ["train", "--config", str(corpus / "cfg.yaml"), "--data-dir", str(corpus),
            "--model-dir", str(model_dir), *extra]


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the first run ended (exit {process.returncode}) or hung before {what}")
        time.sleep(0.01)


def test_a_second_training_into_a_locked_directory_is_refused_and_a_kill_leaves_no_lock(corpus, tmp_path):
    model_dir = tmp_path / "model"
    with open(tmp_path / "first.txt", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "seq2seq", *args(corpus, model_dir, "--set",
                                                                         "train.epochs=1000")],
                                 stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for(lambda: (model_dir / "last.safetensors").is_file(), first, "its first checkpoint")
        config = (model_dir / "config.yaml").read_bytes()
        holder = f"pid {first.pid} on {socket.gethostname()}"
        for extra in ((), ("--overwrite",), ("--resume",)):
            second = run_cli(*args(corpus, model_dir, *extra), timeout=120)
            assert second.returncode == 1 and "Traceback" not in second.stderr
            assert f"seq2seq: error: {model_dir} is in use: {holder} is training into it" in second.stderr
        assert first.poll() is None, "the first run was disturbed"
        assert (model_dir / "config.yaml").read_bytes() == config
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert holder in (model_dir / "train.lock").read_text()  # the dead holder's note stays ...
    # ... but the OS released its lock: the run resumes at once
    assert cli.main(args(corpus, model_dir, "--resume", "--set", "train.epochs=2")) == 0
    assert (model_dir / "train.lock").read_text().strip() == ""  # blanked by a run that ended


def test_a_trained_model_is_replaced_only_with_overwrite(corpus, tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert cli.main(args(corpus, model_dir, "--set", "train.max_steps=2")) == 0
    (model_dir / "last.safetensors").unlink()  # as when a model is shipped
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli.main(args(corpus, model_dir, "--set", "train.max_steps=2")) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert (f"seq2seq: error: {model_dir} already holds a trained model (config.yaml, tokenizer.json, "
            f"best.safetensors, src.vocab.json, tgt.vocab.json); add --resume") in err
    assert "--overwrite to replace it" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before

    assert cli.main(args(corpus, model_dir, "--overwrite", "--set", "train.max_steps=2",
                         "--set", "train.seed=5")) == 0
    assert (model_dir / "best.safetensors").read_bytes() != before["best.safetensors"]
    assert (model_dir / "last.safetensors").is_file()


def test_the_config_in_the_model_directory_is_never_written_over(corpus, tmp_path, monkeypatch, capsys):
    own = tmp_path / "project"
    own.mkdir()
    (own / "config.yaml").write_text("# my settings\n" + CONFIG, encoding="utf-8")
    monkeypatch.chdir(own)
    for extra in ((), ("--overwrite",)):
        capsys.readouterr()
        code = cli.main(["train", "--config", "config.yaml", "--data-dir", str(corpus),
                         "--model-dir", ".", *extra])
        err = capsys.readouterr().err
        assert code == cli.EXIT_ERROR and "Traceback" not in err
        assert "--config config.yaml is the file that training writes in --model-dir ." in err
    with pytest.raises(TrainingError, match="is the file that training writes"):
        train_translator(own / "config.yaml", own, data_dir=corpus)
    assert (own / "config.yaml").read_text(encoding="utf-8").startswith("# my settings")
    assert sorted(p.name for p in own.iterdir()) == ["config.yaml"]


def test_a_model_too_big_for_memory_is_refused_before_allocating(corpus, tmp_path, capsys):
    # No clock: the message is the size check's, made on a skeleton before any weight exists
    # (an allocation would fail inside torch with another error).
    code = cli.main(args(corpus, tmp_path / "model", "--set", "model.embed_size=999999999999"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "Traceback" not in err
    assert "seq2seq: error: the model section describes" in err and "GiB to train with Adam" in err
    assert "lower model.embed_size" in err
    assert not (tmp_path / "model" / "last.safetensors").exists()
    transformer = tmp_path / "tf.yaml"
    transformer.write_text(CONFIG.replace("embed_size: 16, hidden_size: 24, attention: bahdanau",
                                          "arch: transformer, d_model: 999999996, heads: 4"))
    code = cli.main(["train", "--config", str(transformer), "--data-dir", str(corpus),
                     "--model-dir", str(tmp_path / "tf")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "lower model.d_model, model.ff_size or the layers" in err


def test_empty_validation_files_are_a_clear_error(corpus, tmp_path, capsys):
    (tmp_path / "valid.src").write_text("")
    (tmp_path / "valid.tgt").write_text("")
    code = cli.main(args(corpus, tmp_path / "model", "--set", f"data.valid_src={tmp_path / 'valid.src'}",
                         "--set", f"data.valid_tgt={tmp_path / 'valid.tgt'}"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "Traceback" not in err
    assert f"seq2seq: error: {tmp_path / 'valid.src'}: the validation data is empty" in err


# -- lock files and what --overwrite may delete ----------------------------------------------------
@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_never_changes(corpus, tmp_path, capsys, link):
    """A ``train.lock`` planted as a link to someone's file: the file is left byte for byte, by a
    run into an empty folder and by one into a folder with a trained model (once refused after
    truncating the lock); nothing else is written either."""
    victim = tmp_path / "someones.txt"
    victim.write_text("precious\n")
    trained = tmp_path / "trained"
    assert cli.main(args(corpus, trained, "--set", "train.max_steps=1")) == 0
    for model_dir in (tmp_path / "empty", trained):
        model_dir.mkdir(exist_ok=True)
        (model_dir / "train.lock").unlink(missing_ok=True)
        if link == "symlink":
            (model_dir / "train.lock").symlink_to(victim)
        else:
            os.link(victim, model_dir / "train.lock")
        before = sorted(p.name for p in model_dir.iterdir())
        for extra in ((), ("--overwrite",), ("--resume",)):
            capsys.readouterr()
            assert cli.main(args(corpus, model_dir, *extra, "--set", "train.max_steps=1")) == cli.EXIT_ERROR
            err = capsys.readouterr().err
            what = "is a symbolic link" if link == "symlink" else "is a file with "
            assert "Traceback" not in err
            if extra != ("--resume",) or model_dir == trained:  # --resume into nothing: no checkpoint
                assert f"seq2seq: error: {model_dir / 'train.lock'}: the lock file {what}" in err
            assert victim.read_text() == "precious\n"
            assert sorted(p.name for p in model_dir.iterdir()) == before


def test_the_lock_note_is_written_without_truncating_and_a_held_lock_refuses(corpus, tmp_path, capsys):
    from seq2seq.files import LOCK_NOTE_BYTES, FileLock

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "train.lock").write_text("pid 1234567 on an-old-host-with-a-long-name\n")
    with FileLock(model_dir / "train.lock"):  # another process, as far as the run can tell
        note = (model_dir / "train.lock").read_text()
        assert note.startswith(f"pid {os.getpid()} on {socket.gethostname()} ") and note.endswith(" \n")
        assert len(note) == LOCK_NOTE_BYTES  # written over at full width, never cut
        assert cli.main(args(corpus, model_dir, "--overwrite")) == cli.EXIT_ERROR
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        assert f"is in use: {holder} is training" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == ["train.lock"]
    assert (model_dir / "train.lock").read_text().strip() == ""
    # whoever holds it next, however many digits its pid has, leaves the file as it found it
    released = (model_dir / "train.lock").read_bytes()
    assert len(released) == LOCK_NOTE_BYTES
    done = subprocess.run([sys.executable, "-c", "import sys; from seq2seq.files import FileLock\n"
                           "FileLock(sys.argv[1]).release()", str(model_dir / "train.lock")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (model_dir / "train.lock").read_bytes() == released


def test_overwrite_deletes_only_files_a_training_wrote(corpus, tmp_path, capsys):
    """``--overwrite`` into a folder where a user keeps files of the same names as a model's
    (no record of a training) deletes nothing and names one; in a trained folder, it replaces
    the model and keeps the user's other files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my own config\n")
    (mine / "best.safetensors").write_bytes(b"my weights")
    (mine / "notes.txt").write_text("notes")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert cli.main(args(corpus, mine, "--overwrite", "--set", "train.max_steps=1")) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert (f"seq2seq: error: --overwrite: {mine / 'config.yaml'} was not written by a seq2seq training "
            f"(it has no record of the files seq2seq wrote)") in err and "Nothing was deleted" in err
    assert {p.name: p.read_bytes() for p in mine.iterdir() if p.name != "train.lock"} == before

    model_dir = tmp_path / "model"
    assert cli.main(args(corpus, model_dir, "--set", "train.max_steps=1")) == 0
    assert json.loads((model_dir / "written.json").read_text())["files"] == sorted(
        ["config.yaml", "tokenizer.json", "last.safetensors", "best.safetensors", "metrics.jsonl"])
    (model_dir / "notes.txt").write_text("notes")
    (model_dir / "extra.vocab.json").write_text("{}")  # looks like a model's, is not named by it
    assert cli.main(args(corpus, model_dir, "--overwrite", "--set", "train.max_steps=1")) == cli.EXIT_ERROR
    assert f"--overwrite: {model_dir / 'extra.vocab.json'} was not written" in capsys.readouterr().err
    (model_dir / "extra.vocab.json").unlink()
    best = (model_dir / "best.safetensors").read_bytes()
    assert cli.main(args(corpus, model_dir, "--overwrite", "--set", "train.max_steps=1",
                         "--set", "train.seed=5")) == 0
    assert (model_dir / "best.safetensors").read_bytes() != best
    assert (model_dir / "notes.txt").read_text() == "notes"


@pytest.mark.parametrize("kind", ["fifo", "folder", "someone's file"])
def test_a_lock_file_that_is_not_a_small_regular_file_is_refused_untouched(corpus, tmp_path, capsys, kind):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    lock = model_dir / "train.lock"
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "folder":
        lock.mkdir()
    else:
        lock.write_text("a user's long notes\n" * 100)
    assert cli.main(args(corpus, model_dir, "--set", "train.max_steps=1")) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    what = {"fifo": "not a regular file (a FIFO)", "folder": "not a regular file (a folder)",
            "someone's file": "2000 bytes, more than a lock file's note"}[kind]
    assert f"seq2seq: error: {lock}: the lock file is {what}" in err and "Traceback" not in err
    assert sorted(p.name for p in model_dir.iterdir()) == ["train.lock"]
    if kind == "someone's file":
        assert lock.read_text() == "a user's long notes\n" * 100
