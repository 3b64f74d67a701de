"""Crashes, Ctrl-C, full or read-only disks and NaN losses: a run is never lost, never torn.

Every test trains a tiny model (reversal of 3-8 letters, word tokenizer, GRU 16/32, dropout on)
and compares its final checkpoints with one uninterrupted run of the same seed: resuming must
give the same tensors exactly, wherever the run was stopped.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seq2seq import cli
from seq2seq.checkpoint import read_checkpoint
from seq2seq.train import _Run

CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, valid_src: valid.src, valid_tgt: valid.tgt,
       tokenizer: word, vocab_size: 100}
model: {embed_size: 16, hidden_size: 32, attention: bahdanau, dropout: 0.1}
train: {batch_tokens: 300, epochs: 2, lr: 0.005, log_every: 5, valid_every: 10, threads: 1,
        device: cpu, seed: 3}
decode: {beam: 1}
"""
TMP_LAST = ".last.safetensors.*.tmp"  # atomic_write_bytes's temporary file for last.safetensors


def write_corpus(directory: Path) -> Path:
    """2,000 training and 100 validation pairs of letters and their reversal, and cfg.yaml."""
    rng = random.Random(0)
    for name, n in (("train", 2000), ("valid", 100)):
        words = [[rng.choice("abcdefgh") for _ in range(rng.randint(3, 8))] for _ in range(n)]
        (directory / f"{name}.src").write_text("".join(" ".join(w) + "\n" for w in words))
        (directory / f"{name}.tgt").write_text("".join(" ".join(w[::-1]) + "\n" for w in words))
    (directory / "cfg.yaml").write_text(CONFIG)
    return directory


def train_args(corpus: Path, model_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(corpus / "cfg.yaml"), "--data-dir", str(corpus),
            "--model-dir", str(model_dir), *extra]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``seq2seq ARGS`` in a child process, its stderr going to ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "seq2seq", *args], stdout=subprocess.DEVNULL,
                                stderr=err)


def finish(args: list[str], log: Path, timeout: float = 120) -> tuple[int, str]:
    process = start(args, log)
    return process.wait(timeout), log.read_text(errors="replace")


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def logged_steps(model_dir: Path) -> list[int]:
    try:
        text = (model_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]


def metrics(model_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl, parsed: a torn line fails the test."""
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def validations(model_dir: Path) -> list[tuple]:
    return [(m["step"], m["tokens"], m["valid_loss"], m["valid_bleu"]) for m in metrics(model_dir)
            if "valid_loss" in m]


def step_of(checkpoint: Path) -> int:
    return read_checkpoint(checkpoint)[1]["train_state"]["step"]


def assert_same_run(model_dir: Path, reference: Path) -> None:
    """Same tensors in best and last (weights, optimizer, torch RNG), same validations."""
    for name in ("best.safetensors", "last.safetensors"):
        mine, my_meta = read_checkpoint(model_dir / name)
        theirs, their_meta = read_checkpoint(reference / name)
        assert mine.keys() == theirs.keys(), name
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), f"{name}: {key} differs"
        if "train_state" in my_meta:
            ours, refs = my_meta["train_state"], their_meta["train_state"]
            ours.pop("elapsed_s"), refs.pop("elapsed_s")
            assert ours == refs
    assert validations(model_dir) == validations(reference)
    assert not list(model_dir.glob(".*.tmp")), "temporary files left behind"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """One uninterrupted run, in a child process like the runs it is compared with."""
    model_dir = tmp_path_factory.mktemp("reference") / "model"
    code, err = finish(train_args(corpus, model_dir), model_dir.parent / "stderr.txt")
    assert code == 0, err
    assert "training finished: 2 epochs done" in err
    return model_dir


@pytest.fixture(scope="module")
def partial_run(corpus, tmp_path_factory) -> Path:
    """A run stopped (as by Ctrl-C) at step 20, in this process; tests work on copies of it."""
    model_dir = tmp_path_factory.mktemp("partial") / "model"
    original = _Run._should_stop

    def stop_at_20(self):
        self.interrupted = self.interrupted or self.state.step == 20
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Run, "_should_stop", stop_at_20)
        assert cli.main(train_args(corpus, model_dir)) == cli.EXIT_INTERRUPTED
    assert step_of(model_dir / "last.safetensors") == 20
    return model_dir


def copy_run(partial_run: Path, tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    shutil.copytree(partial_run, model_dir)
    return model_dir


# -- atomic writes ------------------------------------------------------------------------
def test_atomic_writes_follow_the_umask_and_name_the_file_on_error(tmp_path, monkeypatch):
    from seq2seq.checkpoint import atomic_write_bytes

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x" * 10)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600

    def fail(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(tmp_path / "a.bin", b"y" * 10)
    assert caught.value.errno == errno.EIO and caught.value.filename == str(tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == b"x" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


# -- SIGKILL ------------------------------------------------------------------------------
def test_sigkill_mid_epoch_and_while_writing_a_checkpoint_then_resume_is_exact(corpus, reference,
                                                                               tmp_path):
    model_dir = tmp_path / "model"
    last = model_dir / "last.safetensors"

    # 1. Killed mid-epoch (epoch 1 has 45 updates), some steps after a checkpoint.
    process = start(train_args(corpus, model_dir), tmp_path / "run1.txt")
    wait_for(lambda: last.is_file() and max(logged_steps(model_dir), default=0) >= 25, process,
             "step 25")
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    metrics(model_dir)  # no torn line
    killed_at = step_of(last)  # loads: the checkpoint is whole
    assert 10 <= killed_at < 45 and killed_at % 10 == 0

    # 2. Resumed with slow checkpoint writes, killed while one is half written.
    process = start(train_args(corpus, model_dir, "--resume", "--set", "train.checkpoint_delay_s=2"),
                    tmp_path / "run2.txt")
    partial = lambda: [p for p in model_dir.glob(TMP_LAST) if p.stat().st_size > 0]  # noqa: E731
    wait_for(partial, process, "a checkpoint write")
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    assert partial(), "the half-written temporary file should still be there"
    assert step_of(last) == killed_at, "last.safetensors changed before its write completed"
    metrics(model_dir)

    # 3. Resumed again: it finishes, and cleans up the stale temporary file.
    code, err = finish(train_args(corpus, model_dir, "--resume"), tmp_path / "run3.txt")
    assert code == 0, err
    assert f"resuming from step {killed_at}" in err
    assert_same_run(model_dir, reference)


def test_resume_without_any_checkpoint_says_what_to_do(corpus, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    code, err = finish(train_args(corpus, model_dir, "--resume"), tmp_path / "err.txt")
    assert code == 1 and "Traceback" not in err
    assert "seq2seq: error: --resume: no checkpoint" in err and str(model_dir) in err


# -- Ctrl-C -------------------------------------------------------------------------------
def test_ctrl_c_writes_a_checkpoint_exits_130_and_resume_is_exact(corpus, reference, tmp_path):
    model_dir = tmp_path / "model"
    process = start(train_args(corpus, model_dir), tmp_path / "run1.txt")
    wait_for(lambda: max(logged_steps(model_dir), default=0) >= 15, process, "step 15")
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 130
    err = (tmp_path / "run1.txt").read_text()
    assert "Traceback" not in err
    assert "--resume" in err and str(model_dir) in err
    stopped_at = step_of(model_dir / "last.safetensors")
    assert stopped_at >= 15 and f"interrupted at step {stopped_at}" in err
    metrics(model_dir)

    code, err = finish(train_args(corpus, model_dir, "--resume"), tmp_path / "run2.txt")
    assert code == 0, err
    assert_same_run(model_dir, reference)


def test_resume_in_process_without_config_is_exact(partial_run, reference, tmp_path, capsys):
    """--resume alone reads the saved config; in-process runs match the child-process reference."""
    model_dir = copy_run(partial_run, tmp_path)
    assert cli.main(["train", "--model-dir", str(model_dir), "--resume"]) == 0
    assert_same_run(model_dir, reference)


# -- disk full, read-only model directory -------------------------------------------------
def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("failing", ["last.safetensors", "every file"])
def test_disk_full_is_a_clear_error_and_keeps_the_last_checkpoint(partial_run, reference, corpus,
                                                                   tmp_path, capsys, monkeypatch,
                                                                   failing):
    model_dir = copy_run(partial_run, tmp_path)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if failing == "every file" or ".last.safetensors." in _fd_path(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    capsys.readouterr()
    assert cli.main(train_args(corpus, model_dir, "--resume")) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "seq2seq: error: No space left on device" in err
    named = "last.safetensors" if failing == "last.safetensors" else "metrics.jsonl"
    assert str(model_dir / named) in err
    assert (model_dir / "last.safetensors").read_bytes() == before["last.safetensors"]
    assert step_of(model_dir / "last.safetensors") == 20
    assert not list(model_dir.glob(".*.tmp")), "temporary files left behind"

    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the run goes on
    assert cli.main(train_args(corpus, model_dir, "--resume")) == 0
    assert_same_run(model_dir, reference)


def test_read_only_model_directory_is_a_clear_error(partial_run, reference, corpus, tmp_path,
                                                    capsys, monkeypatch):
    model_dir = copy_run(partial_run, tmp_path)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    if os.geteuid() == 0:
        # root writes through any mode bits: make the folder refuse new files as a
        # read-only one would (every write here goes through a temporary file in the folder).
        import tempfile

        real_mkstemp = tempfile.mkstemp

        def read_only(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == model_dir.resolve():
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                                      str(Path(dir) / f"{kwargs.get('prefix', '')}x.tmp"))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    else:
        model_dir.chmod(0o555)
    try:
        capsys.readouterr()
        assert cli.main(train_args(corpus, model_dir, "--resume")) == cli.EXIT_ERROR
        err = capsys.readouterr().err
    finally:
        model_dir.chmod(0o755)
        monkeypatch.undo()
    assert "Traceback" not in err
    assert "seq2seq: error: Permission denied" in err
    assert str(model_dir / "metrics.jsonl") in err  # the first file a resume rewrites
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before

    assert cli.main(train_args(corpus, model_dir, "--resume")) == 0
    assert_same_run(model_dir, reference)


# -- NaN and inf ----------------------------------------------------------------------------
def _poison_loss(monkeypatch, bad_steps: set[int] | None, value: float) -> None:
    """The loss of the updates numbered ``bad_steps`` (1-based; None: all) becomes ``value``."""
    original = _Run._loss

    def loss(self, batch):
        result = original(self, batch)
        if bad_steps is None or self.state.step + 1 in bad_steps:
            return result * value
        return result

    monkeypatch.setattr(_Run, "_loss", loss)


def test_a_few_non_finite_losses_are_skipped_and_logged(partial_run, corpus, tmp_path, capsys,
                                                        monkeypatch):
    model_dir = copy_run(partial_run, tmp_path)
    _poison_loss(monkeypatch, {23, 24, 31}, float("nan"))
    assert cli.main(train_args(corpus, model_dir, "--resume", "--set", "train.max_bad_steps=3",
                               "--set", "train.epochs=1")) == 0
    events = [m for m in metrics(model_dir) if "event" in m]
    assert [(m["step"], m["bad_steps"]) for m in events] == [(22, 1), (23, 2), (30, 1)]
    assert all("non-finite" in m["event"] for m in events)
    last, _ = read_checkpoint(model_dir / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in last.values() if t.is_floating_point())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_losses_in_a_row_stop_the_run_and_keep_the_best(partial_run, corpus, tmp_path,
                                                                   capsys, monkeypatch, value):
    model_dir = copy_run(partial_run, tmp_path)
    best = (model_dir / "best.safetensors").read_bytes()
    last = (model_dir / "last.safetensors").read_bytes()
    _poison_loss(monkeypatch, None, value)
    capsys.readouterr()
    assert cli.main(train_args(corpus, model_dir, "--resume", "--set", "train.max_bad_steps=4")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "seq2seq: error: stopped: 4 updates in a row had a non-finite loss" in err
    assert str(model_dir / "last.safetensors") in err
    events = [m for m in metrics(model_dir) if "event" in m]
    assert [m["bad_steps"] for m in events] == [1, 2, 3, 4]
    assert (model_dir / "best.safetensors").read_bytes() == best
    assert (model_dir / "last.safetensors").read_bytes() == last


def test_huge_learning_rate_is_stopped_by_the_bad_step_limit(partial_run, corpus, tmp_path, capsys):
    model_dir = copy_run(partial_run, tmp_path)
    best = (model_dir / "best.safetensors").read_bytes()
    capsys.readouterr()
    # Adam moves every weight by about lr: 1e38 makes the next forward pass overflow float32.
    code = cli.main(train_args(corpus, model_dir, "--resume", "--set", "train.lr=1e38",
                               "--set", "train.max_bad_steps=2"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "non-finite loss" in err and "Lower train.lr" in err
    assert (model_dir / "best.safetensors").read_bytes() == best
    assert any("event" in m for m in metrics(model_dir))
