"""Crashes, Ctrl-C, full or read-only disks and NaN losses: a run is never lost, never torn.

Every test trains a tiny model (reversal of 3-8 letters, word tokenizer, GRU 16/32, dropout on)
and compares its final checkpoints with one uninterrupted run of the same seed: resuming must
give the same tensors exactly, wherever the run was stopped.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seq2seq import cli
from seq2seq.models.checkpoint import read_checkpoint
from seq2seq.training.loop import _Run

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
    train_until_interrupted_at_20(corpus, model_dir)
    return model_dir


def train_until_interrupted_at_20(corpus: Path, model_dir: Path, *settings: str) -> None:
    """Train in this process, interrupted (as by Ctrl-C) once step 20 is done."""
    original = _Run._should_stop

    def stop_at_20(self):
        self.interrupted = self.interrupted or self.state.step == 20
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Run, "_should_stop", stop_at_20)
        assert cli.main(train_args(corpus, model_dir, *settings)) == cli.EXIT_INTERRUPTED
    assert step_of(model_dir / "last.safetensors") == 20


def copy_run(partial_run: Path, tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    shutil.copytree(partial_run, model_dir)
    return model_dir


# -- atomic writes ------------------------------------------------------------------------
# A child process whose files may not grow past 1,000 bytes (RLIMIT_FSIZE, with SIGXFSZ ignored
# so that write() fails with EFBIG instead of killing it): a real write error, from the kernel.
_WRITE_PAST_FSIZE = """
import json, resource, signal, sys
from seq2seq.files import atomic_write_bytes
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    atomic_write_bytes(sys.argv[1], b"y" * 5000)
except OSError as error:
    print(json.dumps({"errno": error.errno, "filename": error.filename, "message": str(error)}))
"""


def test_atomic_writes_follow_the_umask_and_name_the_file_on_error(tmp_path):
    from seq2seq.files import atomic_write_bytes

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x" * 10)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600

    done = subprocess.run([sys.executable, "-c", _WRITE_PAST_FSIZE, str(tmp_path / "a.bin")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout, done.stderr
    error = json.loads(done.stdout)
    assert error["errno"] == errno.EFBIG and error["filename"] == str(tmp_path / "a.bin"), error
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
def stop_by_signal_then_resume(corpus: Path, reference: Path, tmp_path: Path, signum: int,
                               interrupted: str) -> None:
    """Send ``signum`` at step 15 or later: a checkpoint, exit 128 + signum; resume is exact."""
    model_dir = tmp_path / "model"
    process = start(train_args(corpus, model_dir), tmp_path / "run1.txt")
    wait_for(lambda: max(logged_steps(model_dir), default=0) >= 15, process, "step 15")
    process.send_signal(signum)
    assert process.wait(60) == 128 + signum
    err = (tmp_path / "run1.txt").read_text()
    assert "Traceback" not in err
    assert "--resume" in err and str(model_dir) in err
    stopped_at = step_of(model_dir / "last.safetensors")
    assert stopped_at >= 15 and f"{interrupted} at step {stopped_at}" in err
    metrics(model_dir)

    code, err = finish(train_args(corpus, model_dir, "--resume"), tmp_path / "run2.txt")
    assert code == 0, err
    assert_same_run(model_dir, reference)


def test_ctrl_c_writes_a_checkpoint_exits_130_and_resume_is_exact(corpus, reference, tmp_path):
    stop_by_signal_then_resume(corpus, reference, tmp_path, signal.SIGINT, "interrupted")


def test_sigterm_writes_a_checkpoint_exits_143_and_resume_is_exact(corpus, reference, tmp_path):
    """Slurm and Kubernetes stop jobs with SIGTERM: it is handled as Ctrl-C is."""
    stop_by_signal_then_resume(corpus, reference, tmp_path, signal.SIGTERM, "interrupted by SIGTERM")


def test_resume_in_process_without_config_is_exact(partial_run, reference, tmp_path, capsys):
    """--resume alone reads the saved config; in-process runs match the child-process reference."""
    model_dir = copy_run(partial_run, tmp_path)
    assert cli.main(["train", "--model-dir", str(model_dir), "--resume"]) == 0
    assert_same_run(model_dir, reference)


@pytest.mark.parametrize("setting", ["model.cell=lstm", "model.input_feeding=false", "train.precision=bf16"],
                         ids=["lstm", "no input feeding", "bf16"])
def test_resume_is_exact_for_lstm_without_input_feeding_and_in_bf16(corpus, tmp_path, capsys, setting):
    """The runs above are GRU, input feeding, fp32: stopped by a real Ctrl-C (SIGINT to a
    training process) and resumed, the other cell, the plain decoder and bf16 training (the
    output layer's products in bf16 on CPU) end as an uninterrupted run does, exactly."""
    settings = ["--set", setting, "--set", "train.max_steps=40", "--set", "train.valid_every=20"]
    reference = tmp_path / "reference"
    assert cli.main(train_args(corpus, reference, *settings)) == 0
    model_dir = tmp_path / "model"
    process = start(train_args(corpus, model_dir, *settings), tmp_path / "run1.txt")
    wait_for(lambda: max(logged_steps(model_dir), default=0) >= 10, process, "step 10")
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == cli.EXIT_INTERRUPTED, (tmp_path / "run1.txt").read_text()
    stopped_at = step_of(model_dir / "last.safetensors")
    assert 10 <= stopped_at < 40, "the run ended before Ctrl-C reached it"
    capsys.readouterr()
    assert cli.main(train_args(corpus, model_dir, "--resume", *settings)) == 0
    assert f"resuming from step {stopped_at}" in capsys.readouterr().err
    assert step_of(model_dir / "last.safetensors") == 40
    assert_same_run(model_dir, reference)


# -- disk full, read-only model directory -------------------------------------------------
def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("failing", ["last.safetensors", "every file"])
def test_disk_full_at_fsync_is_a_clear_error_and_keeps_the_last_checkpoint(
        partial_run, reference, corpus, tmp_path, capsys, monkeypatch, failing):
    """ENOSPC reported by fsync (as network and copy-on-write file systems do, after write()
    succeeded), simulated; the real full disk, failing write(), is the next test."""
    model_dir = copy_run(partial_run, tmp_path)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
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


# Runs in a private mount namespace (see ``mount_namespace``): mounts a small tmpfs or makes a
# read-only bind mount, runs one ``seq2seq`` command there, and (tmpfs) copies the model folder
# out before the namespace, and the tmpfs with it, goes away.
MOUNT_DRIVER = r"""
import json, os, shutil, subprocess, sys
spec = json.loads(sys.argv[1])
model = spec["model"]
if spec["kind"] == "full disk":
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", spec["mount"]], check=True)
    model = shutil.copytree(spec["model"], os.path.join(spec["mount"], "model"))
    room = os.statvfs(spec["mount"])
    with open(os.path.join(spec["mount"], "filler"), "wb") as filler:  # leave spec["free"] bytes
        filler.write(bytes(room.f_bavail * room.f_frsize - spec["free"]))
else:
    subprocess.run(["mount", "--bind", model, model], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", model], check=True)
done = subprocess.run([sys.executable, "-m", "seq2seq", *spec["args"], "--model-dir", model],
                      capture_output=True, text=True)
if spec["kind"] == "full disk":
    shutil.copytree(model, spec["copy_to"])
print(json.dumps({"code": done.returncode, "stderr": done.stderr, "model": model}))
"""


def mount_namespace() -> list[str]:
    """The command prefix that runs a command in a private mount namespace where it may mount
    file systems: root's own, or a user namespace's for others. Skips the test, saying why,
    where neither is allowed (a container without CAP_SYS_ADMIN, user namespaces disabled)."""
    tried = []
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        if shutil.which(prefix[0]) is None:
            pytest.skip("unshare (util-linux) is not installed: no real full or read-only file "
                        "system can be made; the simulated tests above still run")
        probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return prefix
        tried.append(f"{' '.join(prefix)}: {probe.stderr.strip()}")
    pytest.skip("no mount namespace may be made here, so no real full or read-only file system: "
                + "; ".join(tried))


def run_in_mount_namespace(kind: str, model_dir: Path, args: list[str], tmp_path: Path,
                           free: int = 0) -> tuple[int, str, Path]:
    """``seq2seq ARGS --model-dir`` on ``model_dir`` put on a tmpfs with ``free`` bytes left
    (``kind`` 'full disk') or made read-only by a bind mount ('read-only'). Returns the exit
    code, stderr and the model folder's path as the command saw it."""
    spec = {"kind": kind, "model": str(model_dir), "args": args, "free": free,
            "mount": str(tmp_path / "mnt"), "copy_to": str(tmp_path / "after")}
    (tmp_path / "mnt").mkdir()
    done = subprocess.run([*mount_namespace(), sys.executable, "-c", MOUNT_DRIVER, json.dumps(spec)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    return result["code"], result["stderr"], Path(result["model"])


@pytest.mark.parametrize("free", [0, 64 * 1024], ids=["no room at all", "room for logs, not a checkpoint"])
def test_a_real_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(partial_run, reference, corpus,
                                                                         tmp_path, free):
    """The model folder on a real tmpfs that is full (write() fails with ENOSPC): with no room
    the first file written (metrics.jsonl, rewritten up to the checkpoint) is named; with room
    for the logs only, the first checkpoint is. Then, on a disk with room, --resume is exact."""
    model_dir = copy_run(partial_run, tmp_path)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    args = [a for a in train_args(corpus, model_dir, "--resume") if a not in ("--model-dir", str(model_dir))]
    code, err, seen = run_in_mount_namespace("full disk", model_dir, args, tmp_path, free=free)
    assert code == cli.EXIT_ERROR and "Traceback" not in err, err[-3000:]
    named = re.search(r"^seq2seq: error: No space left on device \((.+)\)$", err, re.MULTILINE)
    assert named, err[-3000:]
    if free == 0:
        assert named[1] == str(seen / "metrics.jsonl")
    else:
        assert named[1] in (str(seen / "last.safetensors"), str(seen / "best.safetensors"))
    after = tmp_path / "after"
    assert not list(after.glob(".*.tmp")), "temporary files left behind"
    for name in ("last.safetensors", "best.safetensors", "config.yaml"):
        assert (after / name).read_bytes() == before[name], name
    metrics(after)  # no torn line

    assert cli.main(train_args(corpus, after, "--resume")) == 0  # a disk with room
    assert_same_run(after, reference)


def test_a_read_only_file_system_is_a_clear_error(partial_run, reference, corpus, tmp_path):
    """The model folder bind-mounted read-only (EROFS, whoever runs the test, root too)."""
    model_dir = copy_run(partial_run, tmp_path)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    args = [a for a in train_args(corpus, model_dir, "--resume") if a not in ("--model-dir", str(model_dir))]
    code, err, _ = run_in_mount_namespace("read-only", model_dir, args, tmp_path)
    assert code == cli.EXIT_ERROR and "Traceback" not in err, err[-3000:]
    assert f"seq2seq: error: Read-only file system ({model_dir / 'metrics.jsonl'})" in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before

    assert cli.main(train_args(corpus, model_dir, "--resume")) == 0
    assert_same_run(model_dir, reference)


def test_a_model_directory_without_write_permission_is_a_clear_error(partial_run, reference, corpus,
                                                                     tmp_path):
    """A folder the user may not write to (mode 0555: EACCES). Root writes through mode bits, so
    as root the run is made in a user namespace of its own (``unshare --user``), where root's
    powers over the files outside are gone and the mode bits apply to it as to anyone."""
    model_dir = copy_run(partial_run, tmp_path)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    prefix = []
    if os.geteuid() == 0:
        prefix = ["unshare", "--user"]
        probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
        if shutil.which("unshare") is None or probe.returncode != 0:
            pytest.skip(f"root cannot give up its powers here (unshare --user: {probe.stderr.strip()}), "
                        "so nothing is write-protected from it; the read-only mount test still runs")
    model_dir.chmod(0o555)
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "seq2seq",
                               *train_args(corpus, model_dir, "--resume")],
                              capture_output=True, text=True, timeout=300)
    finally:
        model_dir.chmod(0o755)
    assert done.returncode == cli.EXIT_ERROR and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"seq2seq: error: Permission denied ({model_dir / 'metrics.jsonl'})" in done.stderr
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before

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


class _HugeGradient(torch.autograd.Function):
    """The identity, whose gradient is 1e30 times the true one: every gradient stays finite,
    their squares do not, so the loss is finite and the gradient norm infinite."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e30


def test_a_finite_loss_with_a_non_finite_gradient_norm_is_skipped(partial_run, corpus, tmp_path,
                                                                  monkeypatch):
    model_dir = copy_run(partial_run, tmp_path)
    original, norms = _Run._loss, []
    real_clip = torch.nn.utils.clip_grad_norm_

    def loss(self, batch):
        result = original(self, batch)
        return _HugeGradient.apply(result) if self.state.step + 1 in {23, 24} else result

    def clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        norms.append((all(bool(p.grad.isfinite().all()) for p in parameters if p.grad is not None),
                      float(real_clip(parameters, *args, **kwargs))))
        return torch.tensor(norms[-1][1])

    monkeypatch.setattr(_Run, "_loss", loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert cli.main(train_args(corpus, model_dir, "--resume", "--set", "train.epochs=1")) == 0
    assert norms[2] == (True, float("inf")) and norms[3] == (True, float("inf"))  # updates 23, 24
    assert all(math.isfinite(norm) for i, (_, norm) in enumerate(norms) if i not in (2, 3))
    events = [m for m in metrics(model_dir) if "event" in m]
    assert [(m["step"], m["bad_steps"]) for m in events] == [(22, 1), (23, 2)]
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
