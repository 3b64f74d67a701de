"""Data-parallel training: two gloo processes on CPU train exactly as one process with gradient
accumulation; a rank that dies ends the others with a clear error, not a hang; a restarted run
resumes from its last checkpoint.

The runs are real processes (torchrun, or two ranks started by hand with the environment torchrun
would give them) on a tiny reversal corpus: word tokenizer, GRU 16/32, dropout 0.3, so that the
equality of the weights also proves the per-micro-batch seeding of the dropout masks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_reversal
from safetensors import safe_open
from safetensors.torch import load_file

from seq2seq.config import ConfigError
from seq2seq.training import distributed

CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, valid_src: valid.src, valid_tgt: valid.tgt,
       tokenizer: word, vocab_size: 100}
model: {embed_size: 16, hidden_size: 32, attention: bahdanau, dropout: 0.3}
train: {seed: 3, batch_tokens: 60, max_steps: 16, valid_every: 8, log_every: 1, lr: 0.005,
        threads: 1, device: cpu, epochs: 100}
"""
# Stray variables of an enclosing torchrun would make the children join the wrong group.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = write_reversal(tmp_path_factory.mktemp("dist"), {"train": 400, "valid": 16})
    (directory / "cfg.yaml").write_text(CONFIG, encoding="utf-8")
    return directory


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "PYTHONIOENCODING": "utf-8", **extra}


def train_args(corpus: Path, model_dir: Path, *settings: str) -> list[str]:
    args = ["-m", "seq2seq", "train", "--config", str(corpus / "cfg.yaml"), "--data-dir", str(corpus),
            "--model-dir", str(model_dir)]
    for setting in settings:
        args += ["--set", setting]
    return args


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(model_dir / "last.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def checkpoint_step(model_dir: Path) -> int:
    with safe_open(str(model_dir / "last.safetensors"), framework="pt") as handle:
        return json.loads(handle.metadata()["meta"])["train_state"]["step"]


def train_losses(model_dir: Path) -> list[float]:
    lines = (model_dir / "metrics.jsonl").read_text("utf-8").splitlines()
    return [entry["train_loss"] for entry in map(json.loads, lines) if "train_loss" in entry]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ranks(args: list[str], logs: Path, world_size: int = 2, **extra: str) -> list[subprocess.Popen]:
    """The ranks of one run, started as torchrun would start them on one node."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                        LOCAL_WORLD_SIZE=str(world_size), **extra)
        with open(logs / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=log))
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the behaviour -----------------------------------------------------------------------------
def test_two_processes_train_as_one_with_accumulation(corpus, tmp_path):
    """2 ranks x accumulate 1 == 1 rank x accumulate 2: same batches, dropout masks and weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, *train_args(corpus, one, "train.accumulate=2")],
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = subprocess.run([*launcher, *train_args(corpus, two)], env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]

    assert "2 process(es) x 1 accumulation = effective batch of 2" in double.stderr
    assert double.stderr.count("training finished: 16 steps done") == 1  # rank 0 alone reports
    assert (two / "best.safetensors").is_file() and (two / "config.yaml").is_file()
    losses = train_losses(two)
    assert len(losses) == 16  # one line per step, written once
    assert sum(losses[-4:]) / 4 < losses[0] - 0.2
    assert_same_training(one, two)


def assert_same_training(one: Path, two: Path) -> None:
    """The same logged losses and the same last checkpoint (weights and Adam moments), exactly.
    Only the torch random state differs: rank 0 draws the seed of the first micro-batch of
    each update, a single process ends on the last's."""
    assert train_losses(one) == train_losses(two)
    a, b = load_file(str(one / "last.safetensors")), load_file(str(two / "last.safetensors"))
    assert a.keys() == b.keys() and any(name.startswith("model.") for name in a)
    for name in a:
        if not name.startswith("rng."):
            assert torch.equal(a[name], b[name]), name


def can_mount_privately() -> bool:
    """Whether this process may make a mount namespace of its own (root, with ``unshare``)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount_privately(), reason="needs `unshare --mount` (root) to give a "
                                                     "process a disk of its own")
def test_a_node_that_does_not_see_the_prepared_folder_prepares_its_own(corpus, tmp_path):
    """Two ranks as on two nodes, each the first of its node: the model folder is shared, but
    data.prepared is on each node's own disk. Rank 1 runs in a mount namespace where that disk
    is an empty tmpfs, so it cannot see what rank 0 prepared: it prepares its copy with rank 0's
    tokenizers, and the run trains exactly as one process with accumulation does."""
    disk = tmp_path / "node-disk"
    disk.mkdir()
    one, two = tmp_path / "one", tmp_path / "two"
    setting = f"data.prepared={disk / 'prepared'}"
    single = subprocess.run([sys.executable, *train_args(corpus, one, "train.accumulate=2")],
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port, procs = str(free_port()), []
    for rank in range(2):
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                        LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        command = [sys.executable, *train_args(corpus, two, setting)]
        if rank == 1:  # its own disk at the same path
            command = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"',
                       str(disk), *command]
        with open(tmp_path / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        stop(procs)
    logs = [(tmp_path / f"rank{rank}.log").read_text("utf-8", "replace") for rank in range(2)]
    assert codes == [0, 0], logs[1][-3000:] + logs[0][-3000:]
    assert "is not on this node; preparing it here" in logs[1]
    assert (disk / "prepared" / "manifest.json").is_file()  # rank 0's copy, on this disk
    assert_same_training(one, two)


def test_lost_rank_ends_the_survivor_with_an_error_naming_it(corpus, tmp_path):
    """Killing rank 1 makes rank 0 exit with an error naming it, well within the 60 s timeout."""
    model_dir = tmp_path / "run"
    args = train_args(corpus, model_dir, "train.max_steps=1000", "train.valid_every=2",
                      "train.max_minutes=2")
    procs = start_ranks(args, tmp_path)
    try:
        metrics = model_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not ((model_dir / "last.safetensors").is_file() and metrics.is_file()
                   and metrics.read_text("utf-8").count("\n") >= 4):
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        code = procs[0].wait(timeout=90)  # a bound on the test; the message below shows why it ended
    finally:
        stop(procs)
    log = (tmp_path / "rank0.log").read_text("utf-8", errors="replace")
    assert code == 1, log[-3000:]
    assert "seq2seq: error: rank 0 lost contact with the other processes (rank 1 stopped" in log
    assert "resume with --resume" in log
    assert "Traceback" not in log



def worker_of_rank(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker process of ``rank`` (its environment says RANK), if it runs."""
    children = []
    for task in Path(f"/proc/{launcher.pid}/task").glob("*"):
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers in /proc (Linux)")
def test_torchrun_max_restarts_restarts_a_killed_worker_and_the_run_resumes(corpus, tmp_path):
    """torchrun --max-restarts 1, and rank 1 killed (SIGKILL) once a checkpoint exists: torchrun
    starts both ranks again, they resume from the last checkpoint without --resume, and the
    run ends at its step budget."""
    model_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=1", "--monitor-interval=0.1"]
    args = train_args(corpus, model_dir, "train.max_steps=30", "train.valid_every=2",
                      "train.patience=100")[2:]  # without "-m seq2seq"
    with open(tmp_path / "torchrun.log", "wb") as log:
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: restarts need it with current torch (the README says why)
        run = subprocess.Popen([*launcher, "-m", "seq2seq", *args], stdout=log, stderr=log,
                               env=clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    try:
        metrics, deadline = model_dir / "metrics.jsonl", time.monotonic() + 120
        while not ((model_dir / "last.safetensors").is_file() and metrics.is_file()
                   and metrics.read_text("utf-8").count("\n") >= 4):
            assert run.poll() is None, (tmp_path / "torchrun.log").read_text("utf-8", "replace")[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        victim = worker_of_rank(run, 1)
        assert victim is not None, "no worker of rank 1 under torchrun"
        os.kill(victim, signal.SIGKILL)
        code = run.wait(timeout=240)
    finally:
        stop([run])
    log = (tmp_path / "torchrun.log").read_text("utf-8", errors="replace")
    assert code == 0, log[-3000:]
    assert "restart 1 by torchrun: resuming from" in log, log[-3000:]
    resumed = re.search(r"resuming from step (\d+) ", log)
    assert resumed and 2 <= int(resumed.group(1)) < 30, log[-3000:]
    assert checkpoint_step(model_dir) == 30
    assert "Traceback" not in log.split("restart 1 by torchrun")[-1]  # the restarted run is clean


def test_two_processes_stopped_and_resumed_train_as_one_uninterrupted(corpus, tmp_path):
    """Two ranks stopped at step 8 (a checkpoint) and resumed to step 16 end exactly where one
    process with accumulate 2 ends, uninterrupted: resuming is exact with gloo too."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, *train_args(corpus, one, "train.accumulate=2")],
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for steps, resume in ((8, ()), (16, ("--resume",))):
        procs = start_ranks([*train_args(corpus, two, f"train.max_steps={steps}"), *resume], tmp_path)
        try:
            codes = [p.wait(timeout=300) for p in procs]
        finally:
            stop(procs)
        assert codes == [0, 0], (tmp_path / "rank0.log").read_text("utf-8", errors="replace")[-3000:]
        assert checkpoint_step(two) == steps
    assert "resuming from step 8" in (tmp_path / "rank0.log").read_text("utf-8")
    assert_same_training(one, two)


def test_two_ranks_into_a_locked_model_dir_both_stop_with_the_lock_error(corpus, tmp_path):
    """Rank 0 alone takes the lock; when another process holds it, every rank stops at once with
    the same error (none waits in a collective for a rank 0 that has left)."""
    from seq2seq.training.setup import ModelDirLock

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    holder = ModelDirLock(model_dir)  # this test process trains there, as far as they can tell
    try:
        procs = start_ranks(train_args(corpus, model_dir), tmp_path)
        try:
            codes = [p.wait(timeout=120) for p in procs]
        finally:
            stop(procs)
    finally:
        holder.release()
    logs = [(tmp_path / f"rank{r}.log").read_text("utf-8", errors="replace") for r in range(2)]
    assert codes == [1, 1], logs
    for log in logs:
        assert f"seq2seq: error: {model_dir} is in use: pid {os.getpid()} on" in log, log[-3000:]
        assert "Traceback" not in log
    assert sorted(p.name for p in model_dir.iterdir()) == ["train.lock"]


# -- the pieces --------------------------------------------------------------------------------
def test_one_process_needs_no_process_group(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    dist = distributed.setup("gloo", "cpu")
    assert not dist.enabled and dist.is_main
    cpu = torch.device("cpu")
    assert dist.broadcast({"a": 1}) == {"a": 1}
    assert dist.maximum(3, cpu) == 3 and dist.any(True, cpu) and not dist.any(False, cpu)
    assert dist.sum([1.5, 2.0], cpu) == [1.5, 2.0]
    assert dist.on_failure(RuntimeError("boom")) == ""
    dist.barrier()
    dist.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_nccl_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="nccl"):
        distributed.setup("nccl", "cpu")


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "2"}, r"sets WORLD_SIZE=2 but not RANK: start the processes with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": ""}, r"sets WORLD_SIZE=2 but not RANK"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, r"WORLD_SIZE='two' must be an integer from 1 to"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE='0' must be an integer from 1 to"),
    ({"WORLD_SIZE": "99999999999999999999"}, r"WORLD_SIZE='99999999999999999999' must be an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK='2' must be an integer from 0 to 1 \(WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK='-1' must be an integer from 0 to 1"),
    ({"WORLD_SIZE": "2", "RANK": "0.5"}, r"RANK='0.5' must be an integer"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "3"},
     r"LOCAL_WORLD_SIZE='3' must be an integer from 1 to 2"),
    ({"WORLD_SIZE": "4", "RANK": "0", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "2"},
     r"LOCAL_RANK='2' must be an integer from 0 to 1 \(LOCAL_WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2", "RANK": "0", "TORCHELASTIC_RESTART_COUNT": "x"}, r"TORCHELASTIC_RESTART_COUNT='x'"),
])
def test_bad_launch_variables_are_a_config_error_naming_the_variable(monkeypatch, variables, message):
    """Checked before any process group is made: nothing waits for peers that will never come."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        distributed.setup("gloo", "cpu")


def test_launch_variables_in_range_give_the_place(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.place_from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.place_from_environment() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert distributed.place_from_environment() == (3, 4, 0, 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", " 1 ")
    assert distributed.place_from_environment() == (3, 4, 1, 2)


def test_the_train_command_names_a_missing_rank_without_a_traceback(corpus, tmp_path):
    env = clean_env(WORLD_SIZE="2")
    result = subprocess.run([sys.executable, *train_args(corpus, tmp_path / "model")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "seq2seq: error: the environment sets WORLD_SIZE=2 but not RANK" in result.stderr


def test_communication_errors_are_told_apart():
    gloo = RuntimeError("[/src/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:5339: Connection reset by peer. This is typically caused by ...")
    assert distributed.is_communication_error(gloo)
    assert distributed._first_line(gloo) == "Read error [127.0.0.1]:5339: Connection reset by peer"
    assert not distributed.is_communication_error(RuntimeError("shape mismatch"))
    assert not distributed.is_communication_error(ValueError("gloo"))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_on_two_gpus(corpus, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, *train_args(corpus, tmp_path / "gpu", "train.device=cuda")],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device cuda:0" in done.stderr
    assert len(train_losses(tmp_path / "gpu")) == 16
