"""Checkpoints: safetensors files written atomically, read without running any code.

A checkpoint is one ``.safetensors`` file: the model's weights under ``model.*``, and for a
training checkpoint also the optimizer's tensors under ``optim.*`` and the random generators'
states under ``rng.*``. Everything that is not a tensor (step, epoch, schedule, optimizer
hyper-parameters) is JSON in the file's metadata. One file means one atomic rename: a reader
sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.overrides import TorchFunctionMode

MODEL_PREFIX, OPTIM_PREFIX, RNG_PREFIX = "model.", "optim.", "rng."
FORMAT = "seq2seq-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the model."""


# -- writing files -------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes, delay_s: float = 0.0, *,
                       cut_hard_links: bool = False) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never partial, whatever is there now.

    - Nothing there, or a regular file: the bytes go to a temporary file in the same folder,
      are flushed and fsync'ed, then renamed over ``path``. An existing file keeps its mode
      (and, for root, its owner); a new one gets ``0666`` less the umask.
    - A symlink: its target is written as above; the link stays a link.
    - A character device or a FIFO (``/dev/null``, ``<(...)``, a named pipe): written straight
      into, not replaced. A FIFO blocks until it has a reader, as the shell's ``>`` does.
    - A read-only file (no write bit, even for root) is refused: ``PermissionError``.
    - A file with other hard links is rewritten in place, so every name sees the new bytes,
      as ``>`` and ``rsync --inplace`` do (not atomic: a crash can leave it partial). Files a
      run owns (checkpoints) pass ``cut_hard_links`` and are replaced as usual: a snapshot
      made with ``cp -al`` keeps the old version.
    - A folder, socket or block device is refused.

    Errors are ``OSError``s whose filename is ``path``, never the temporary file. ``delay_s``
    sleeps half-way through the write: a test hook that makes the write window reachable for
    a kill.
    """
    target, info, how = check_output(path, cut_hard_links=cut_hard_links)
    if how != "replace":
        return _write_into(target, data, path, sync=how == "in place")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:  # a read-only or missing folder
        raise _naming(error, path) from None
    try:
        # mkstemp's 0600 would hide the files from other users; an existing file keeps its mode
        os.fchmod(fd, stat.S_IMODE(info.st_mode) if info else 0o666 & ~_UMASK)
        if info is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, info.st_uid, info.st_gid)
        with os.fdopen(fd, "wb") as handle:
            half = len(data) // 2
            handle.write(data[:half])
            if delay_s > 0:
                handle.flush()
                time.sleep(delay_s)
            handle.write(data[half:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # disk full: the message must say which file
            raise _naming(error, path) from None
        raise
    _fsync_dir(target.parent)


def check_output(path: str | Path, cut_hard_links: bool = False
                 ) -> tuple[Path, os.stat_result | None, str]:
    """How ``atomic_write_bytes`` would write ``path``, or the error it would raise, without
    writing: (the symlink-resolved target, its stat or None when new, 'replace' | 'in place' |
    'straight'). Commands call it before long work, so a bad target is refused up front."""
    target = Path(os.path.realpath(path))
    try:
        info: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        return target, None, "replace"
    except OSError as error:
        raise _naming(error, path) from None
    kind = stat.S_IFMT(info.st_mode)
    if kind in (stat.S_IFCHR, stat.S_IFIFO):
        return target, info, "straight"
    if kind == stat.S_IFDIR:
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    if kind != stat.S_IFREG:
        raise OSError(errno.EINVAL, "not a regular file, character device or FIFO; not written",
                      str(path))
    if not info.st_mode & 0o222 or not os.access(target, os.W_OK):
        if os.statvfs(target.parent).f_flag & os.ST_RDONLY:  # the whole file system is
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        raise PermissionError(errno.EACCES, "read-only file, not replaced (make it writable or "
                                            "remove it first)", str(path))
    return target, info, "in place" if info.st_nlink > 1 and not cut_hard_links else "replace"


def _write_into(target: Path, data: bytes, path: str | Path, sync: bool) -> None:
    """Write ``data`` into the existing ``target`` (a device, FIFO or hard-linked file)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:  # a regular file: drop what is left of the old content, then sync
                handle.truncate(len(data))
                os.fsync(handle.fileno())
    except OSError as error:
        raise _naming(error, path) from None


def _naming(error: OSError, path: Path) -> OSError:
    """The same error (same errno and class) with ``path``, the file being written, as its filename."""
    return OSError(error.errno, error.strerror or str(error), str(path))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading model files -------------------------------------------------------------------
MAX_FILE_BYTES = 64 << 20  # settings, tokenizers, vocabularies: a 256k-piece model is ~5 MB


def read_regular_file(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` when it is a regular file (symlinks followed) of at most ``limit``.

    A model folder may come from anyone: a ``config.yaml`` that is a symlink to ``/dev/zero``
    or a FIFO would otherwise be read until memory runs out, or block forever. The file is
    opened without blocking and checked before anything is read. Raises ``FileNotFoundError``
    (or another ``OSError``) naming the file, or a ``ValueError`` naming it and what it is.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise _naming(error, Path(path)) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file ({_file_kind(info.st_mode)}); model "
                             f"files are read only from regular files")
        if info.st_size > limit:
            raise ValueError(f"{path}: {info.st_size} bytes, more than the {limit} that a file "
                             f"of this kind may have")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise ValueError(f"{path}: more than the {limit} bytes that a file of this kind may have")
    return data


def _file_kind(mode: int) -> str:
    kinds = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
             stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}
    return kinds.get(stat.S_IFMT(mode), "not a regular file")


def _regular_checkpoint(path: Path) -> None:
    """Refuse a checkpoint that is missing or not a regular file (a FIFO, a device)."""
    try:
        info = os.stat(path)
    except OSError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file ({_file_kind(info.st_mode)})")


# -- model weights -------------------------------------------------------------------------
def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without repeats: a tied weight is stored once, under its first name."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_quantized:  # packed int8 weights
            raise CheckpointError(f"a quantized model is not saved ({name!r}): --quantize applies "
                                  "when a model is loaded; save the float32 model")
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``, checking every name and shape against the model."""
    expected = model.state_dict()
    stored = model_tensors(model)  # the names a save of this model would hold
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise CheckpointError(f"{source}: unknown weight {unknown[0]!r} (not in this model)")
    missing = sorted(set(stored) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: weight {missing[0]!r} is missing")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype:
            raise CheckpointError(f"{source}: weight {name!r} has dtype {tensor.dtype}, "
                                  f"expected {expected[name].dtype}")
    model.load_state_dict(tensors, strict=False)


# -- checkpoint files ----------------------------------------------------------------------
def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    delay_s: float = 0.0) -> None:
    """Write the model (and, for training checkpoints, optimizer and RNG states) atomically.

    ``meta`` is any JSON-serialisable training state (step, epoch, schedule...).
    """
    tensors = {MODEL_PREFIX + k: v for k, v in model_tensors(model).items()}
    meta = dict(meta)
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
        meta["optimizer"] = optim_meta
        rng_tensors, rng_meta = _rng_state()
        tensors.update(rng_tensors)
        meta["rng"] = rng_meta
    header = {"format": FORMAT, "meta": json.dumps(meta)}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=header), delay_s=delay_s,
                       cut_hard_links=True)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file: (tensors by full name, meta). Never unpickles anything."""
    path = Path(path)
    _regular_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a seq2seq checkpoint (format {header.get('format')!r})")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: metadata is nested too deeply") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object")
    return tensors, meta


class _SkipMetaInit(TorchFunctionMode):
    """Skips in-place initialisation (normal_, uniform_ ...) of meta tensors, which have no data:
    on meta, ``normal_`` alone would import torch's compiler stack (seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes tensor=
        if (name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor)
                and target.is_meta):
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Modules built inside get meta tensors: their shapes, without memory or initialisation.

    For ``check_shapes`` before a real build: settings read from an untrusted file (say
    hidden_size: 10**9) are compared with the weights' shapes before anything is allocated.
    """
    with torch.device("meta"), _SkipMetaInit():
        yield


def check_shapes(path: str | Path, model: nn.Module, prefix: str = MODEL_PREFIX) -> None:
    """Compare the weight names and shapes in ``path``'s header with ``model``, reading no tensor.

    ``model`` may live on the meta device (see ``shapes_only``). ``prefix`` is the one the
    file's weight names carry (``model.`` in checkpoints).
    """
    path = Path(path)
    _regular_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shapes = {name[len(prefix):]: tuple(handle.get_slice(name).get_shape())
                      for name in handle.keys() if name.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    unknown = sorted(set(shapes) - set(expected))
    if unknown:
        raise CheckpointError(f"{path}: unknown weight {unknown[0]!r} (not in this model)")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise CheckpointError(f"{path}: weight {name!r} has shape {shape}, the model that the "
                                  f"settings describe expects {expected[name]}")
    # named_parameters() gives a tied weight once, under the name a save stores it by
    stored = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    missing = sorted((stored & set(expected)) - set(shapes))
    if missing:
        raise CheckpointError(f"{path}: weight {missing[0]!r} is missing")


def load_model(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load only the model weights of a checkpoint into ``model``; returns its meta."""
    tensors, meta = read_checkpoint(path)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    for name, tensor in weights.items():  # NaN weights would decode to nothing, silently
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: weight {name!r} holds NaN or infinite values")
    load_model_tensors(model, weights, str(path))
    return meta


def load_training_state(path: str | Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and random generators; returns the training meta."""
    tensors, meta = read_checkpoint(path)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    load_model_tensors(model, weights, str(path))
    if "optimizer" not in meta or "rng" not in meta:
        raise CheckpointError(f"{path}: holds no training state (optimizer, rng) to resume from")
    _restore_optimizer(optimizer, tensors, meta["optimizer"], str(path))
    _restore_rng(tensors, meta["rng"])
    return meta


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any], source: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith(OPTIM_PREFIX):
            index, _, key = name[len(OPTIM_PREFIX):].partition(".")
            state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    try:
        # JSON made tuples (Adam's betas) into lists; 'params' is the one list a group holds.
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v
                   for k, v in group.items()} for group in meta["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{source}: optimizer state does not match the model ({error})") from None


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {RNG_PREFIX + "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{RNG_PREFIX}cuda.{i}"] = cuda_state
    version, values, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return tensors, {"python": [version, list(values), gauss], "numpy": _jsonable(np_state)}


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors[RNG_PREFIX + "torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith(RNG_PREFIX + "cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    version, values, gauss = meta["python"]
    random.setstate((version, tuple(values), gauss))
    np_state = dict(meta["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
