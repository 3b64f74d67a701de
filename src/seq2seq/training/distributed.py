"""Data-parallel training with torch.distributed, as launched by ``torchrun``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; without them
training runs in one process and every collective here is a no-op.

Two process groups. The default one (NCCL on CUDA, gloo on CPU) carries the gradients and the
per-update scalars, in lock step, with a short timeout (``TIMEOUT_S``). A second, gloo group
with a long timeout (``PATIENT_TIMEOUT_S``) carries ``barrier`` and ``broadcast``: there the
other ranks wait while rank 0 works alone (training the tokenizers, validating, writing a
checkpoint), which may take longer than a lock step should. A process that dies closes its
connections, so its peers fail at their next collective at once, in either group; the timeouts
only matter for a process that hangs.

When a collective fails, ``on_failure`` names the lost rank: every rank beats a counter in the
rendezvous store, and the lost one is the rank whose counter stands still (``Heartbeat``).

Every collective below must be called by every rank, the same number of times, in the same
order: the training loop calls them on paths that all ranks take together.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from seq2seq.config import ConfigError
from seq2seq.device import resolve_device

MAX_PROCESSES = 1 << 20  # the largest WORLD_SIZE taken from the environment
TIMEOUT_S = 60.0  # a lock-step collective that waits longer has lost a process
PATIENT_TIMEOUT_S = 3600.0  # waiting for rank 0 to validate or write a checkpoint
HEARTBEAT_S = 1.0  # each rank counts up in the rendezvous store this often ...
HEARTBEAT_CHECK_S = 3.0  # ... and after a failure, a count that stands still this long is lost
_LOST_KEY = "seq2seq/lost"  # the lost ranks, as the first rank to find them saw them
# torchrun shares its rendezvous store with the workers by default, and keeps their keys across
# restarts: restarted workers then read the addresses of the dead ones (pytorch issue 135712).
SHARED_STORE_HINT = ("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                     "torchrun's environment, or restarted processes may not find each other")


class DistributedError(RuntimeError):
    """The process group is broken: a peer died, hung, or could not be reached."""


@dataclass
class Distributed:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""
    control: Any = None  # the patient gloo group of barrier and broadcast
    heartbeat: Heartbeat | None = None
    failed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, requested: str) -> torch.device:
        """Each process of a CUDA run takes the GPU of its local rank."""
        device = resolve_device(requested)
        if self.enabled and device.type == "cuda":
            device = _local_gpu(self.local_rank)
        return device

    # -- collectives: every rank calls each of them at the same point --------------------------
    def barrier(self) -> None:
        """Wait until every rank is here (patiently: rank 0 may be working alone)."""
        if self.enabled:
            dist.barrier(group=self.control)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (anything picklable) on every rank, waiting patiently for rank 0."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def maximum(self, value: int, device: torch.device) -> int:
        """The largest ``value`` over all ranks."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        return self.maximum(int(flag), device) > 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums over all ranks, in one collective."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    # -- failures ------------------------------------------------------------------------------
    def on_failure(self, error: BaseException) -> str:
        """This rank stops on ``error``. When ``error`` is a lost contact, the message that says
        which rank is lost: one whose heartbeat stopped. "" when the error is this rank's own."""
        if not self.enabled:
            return ""
        self.failed = True
        if not is_communication_error(error):
            return ""
        lost = self.heartbeat.lost_ranks() if self.heartbeat is not None else None
        if lost is None and self.world_size == 2:  # no store (its host died): the other one
            lost = [1 - self.rank]
        if lost:
            who = f"{_ranks(lost)} stopped: killed, crashed, failed on an error or hung"
        elif lost == []:
            who = "every other rank is still running: one of them is stuck"
        else:
            who = "torchrun's log names the rank that failed"
        return f"rank {self.rank} lost contact with the other processes ({who}; {_first_line(error)})"

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if not (self.enabled and dist.is_initialized()):
            return
        if self.failed and self.backend == "nccl":
            return  # destroying a broken NCCL group can block; the process is about to exit
        dist.destroy_process_group()


def setup(backend: str = "auto", device: str = "auto", timeout_s: float = TIMEOUT_S,
          patient_timeout_s: float = PATIENT_TIMEOUT_S) -> Distributed:
    """Join the process group that torchrun describes in the environment, if any."""
    place = place_from_environment()
    if place is None:
        return Distributed()
    rank, world_size, local_rank, local_world = place
    shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restart = _environment_int("TORCHELASTIC_RESTART_COUNT", 0, 0, MAX_PROCESSES)
    if (shared_store and rank == 0 and restart == 0
            and _environment_int("TORCHELASTIC_MAX_RESTARTS", 0, 0, MAX_PROCESSES) > 0):
        print(f"seq2seq: warning: {SHARED_STORE_HINT}", file=sys.stderr, flush=True)
    if backend == "auto":
        wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if wants_cuda else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("train.backend is nccl, but CUDA is not available; use gloo")
        _local_gpu(local_rank)
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=patient_timeout_s))
    except Exception as error:  # noqa: BLE001 - rendezvous and store errors vary by version
        if dist.is_initialized():
            dist.destroy_process_group()
        hint = f" ({SHARED_STORE_HINT})" if shared_store and restart > 0 else ""
        raise DistributedError(f"rank {rank} could not join the other {world_size - 1} process(es): "
                               f"{_first_line(error)}{hint}") from None
    store = _store()
    heartbeat = Heartbeat(store, rank, world_size) if store is not None else None
    return Distributed(rank, world_size, local_rank, local_world, backend, control, heartbeat)


def place_from_environment() -> tuple[int, int, int, int] | None:
    """(rank, world size, local rank, local world size) from torchrun's variables; None for one
    process (``WORLD_SIZE`` unset or 1). Each must be an integer in its range, and ``RANK`` is
    required with a ``WORLD_SIZE`` over 1: a ``ConfigError`` names the variable otherwise."""
    world_size = _environment_int("WORLD_SIZE", 1, 1, MAX_PROCESSES)
    if world_size == 1:
        return None
    if os.environ.get("RANK", "").strip() == "":
        raise ConfigError(f"the environment sets WORLD_SIZE={world_size} but not RANK: start the "
                          f"processes with torchrun, which sets RANK, LOCAL_RANK and "
                          f"LOCAL_WORLD_SIZE, or unset WORLD_SIZE to train in one process")
    rank = _environment_int("RANK", 0, 0, world_size - 1, f"(WORLD_SIZE={world_size})")
    local_world = _environment_int("LOCAL_WORLD_SIZE", world_size, 1, world_size,
                                   f"(WORLD_SIZE={world_size})")
    local_rank = _environment_int("LOCAL_RANK", 0, 0, local_world - 1, f"(LOCAL_WORLD_SIZE={local_world})")
    return rank, world_size, local_rank, local_world


def _environment_int(name: str, default: int, low: int, high: int, why: str = "") -> int:
    """The environment variable ``name`` as an integer in [low, high]; ``default`` when unset or
    empty. Otherwise a ConfigError naming the variable, its value and the range."""
    text = os.environ.get(name, "").strip()
    if text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ConfigError(f"environment variable {name}={shown!r} must be an integer from {low} to "
                          f"{high}{' ' + why if why else ''}; torchrun sets it")
    return value


class Heartbeat:
    """A thread that counts up this rank's key in the rendezvous store every ``HEARTBEAT_S``.

    A rank blocked in a collective keeps beating (gloo and NCCL release the GIL); a rank that is
    dead, or stuck holding the GIL, does not. That tells the lost rank from those merely waiting
    for it, which a failed collective alone cannot.
    """

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="seq2seq-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(self._key(self.rank), 1)
            except Exception:  # noqa: BLE001 - the store is gone: nothing left to tell
                return
            self._stop.wait(HEARTBEAT_S)

    def _key(self, rank: int) -> str:
        return f"seq2seq/heartbeat/{rank}"

    def stop(self) -> None:
        self._stop.set()

    def lost_ranks(self) -> list[int] | None:
        """The other ranks whose count stands still for ``HEARTBEAT_CHECK_S``; None without a store.

        The first rank to find them records them: a rank that learns of the failure later, when
        the first one exits, names the same ranks rather than the one that just left.
        """
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            if self.store.check([_LOST_KEY]):
                return _parse_ranks(self.store.get(_LOST_KEY).decode())
            before = [self.store.add(self._key(r), 0) for r in others]
            time.sleep(HEARTBEAT_CHECK_S)
            after = [self.store.add(self._key(r), 0) for r in others]
            lost = [r for r, a, b in zip(others, before, after) if a == b]
            if not lost:
                return []
            first = self.store.compare_set(_LOST_KEY, "", ",".join(map(str, lost)))
            return _parse_ranks(first.decode())
        except Exception:  # noqa: BLE001 - the store's host (rank 0, without torchrun) died
            return None


def _parse_ranks(text: str) -> list[int]:
    return [int(r) for r in text.split(",") if r.strip().isdigit()]


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because a peer is gone or silent."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(mark in text for mark in (
        "gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "Timed out"))


def _local_gpu(local_rank: int) -> torch.device:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"local rank {local_rank} has no GPU: this node has {count}; start at "
                          f"most {count} processes per node (torchrun --nproc_per_node)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _store() -> Any:
    """The rendezvous store of the default group (torchrun's agent hosts it), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private helper: without it, ranks are not named
        return None


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _first_line(error: BaseException) -> str:
    """The gist of a torch.distributed error, without gloo's source location or advice."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]  # "[.../pair.cc:537] Read error ..." -> "Read error ..."
    return text.split(". This is typically", 1)[0]
