"""Checkpoints: safetensors files written atomically, read without running any code.

A checkpoint is one ``.safetensors`` file: the model's weights under ``model.*``, and for a
training checkpoint also the optimizer's tensors under ``optim.*`` and the random generators'
states under ``rng.*``. Everything that is not a tensor (step, epoch, schedule, optimizer
hyper-parameters) is JSON in the file's metadata. One file means one atomic rename: a reader
sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.overrides import TorchFunctionMode

from seq2seq.files import atomic_write_bytes, file_kind

MODEL_PREFIX, OPTIM_PREFIX, RNG_PREFIX = "model.", "optim.", "rng."
FORMAT = "seq2seq-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the model."""


def _regular_checkpoint(path: Path) -> None:
    """Refuse a checkpoint that is missing or not a regular file (a FIFO, a device)."""
    try:
        info = os.stat(path)
    except OSError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file ({file_kind(info.st_mode)})")


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


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state_fields: dict[str, type] | None = None) -> dict[str, Any]:
    """Restore model, optimizer and random generators; returns the training meta.

    The metadata is checked before anything is restored (a refused checkpoint changes nothing):
    the optimizer's and the random generators' states (each tried on a fresh generator first),
    and, given ``state_fields`` (name -> int, float, bool or str), the object ``train_state``
    whose fields must have those types. A ``CheckpointError`` names the file and the field.
    """
    tensors, meta = read_checkpoint(path)
    if "optimizer" not in meta and "rng" not in meta:
        raise CheckpointError(f"{path}: holds no training state (optimizer, rng) to resume from")
    _check_training_meta(meta, tensors, Path(path), state_fields)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    load_model_tensors(model, weights, str(path))
    _restore_optimizer(optimizer, tensors, meta["optimizer"], str(path))
    _restore_rng(tensors, meta["rng"])
    return meta


def _check_training_meta(meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path,
                         state_fields: dict[str, type] | None) -> None:
    """Refuse training metadata that a run did not write, naming the field (see
    ``load_training_state``)."""
    def bad(field: str, expected: str) -> CheckpointError:
        value: Any = meta
        for part in field.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        shown = "missing" if value is _MISSING else f"got {_short(value)}"
        return CheckpointError(f"{path}: metadata field {field!r} must be {expected}, {shown}")

    if state_fields is not None:
        state = meta.get("train_state")
        if not isinstance(state, dict):
            raise bad("train_state", "an object")
        for name, kind in state_fields.items():
            if name in state and not _is_of(state[name], kind):
                raise bad(f"train_state.{name}", f"of type {kind.__name__}")
    optimizer = meta.get("optimizer")
    if not isinstance(optimizer, dict):
        raise bad("optimizer", "an object")
    groups = optimizer.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad("optimizer.param_groups", "a list of objects")
    if not isinstance(optimizer.get("scalars", {}), dict):
        raise bad("optimizer.scalars", "an object")
    rng = meta.get("rng")
    if not isinstance(rng, dict):
        raise bad("rng", "an object")
    try:  # each state tried on a generator of its own: the process's are untouched if one fails
        version, values, gauss = rng["python"]
        random.Random().setstate((version, tuple(values), gauss))
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, AttributeError):
        raise bad("rng.python", "Python's random state [version, 625 integers, gauss]") from None
    try:
        np.random.RandomState().set_state(_numpy_state(rng["numpy"]))
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, AttributeError):
        raise bad("rng.numpy", "NumPy's MT19937 state") from None
    torch_state = tensors.get(RNG_PREFIX + "torch")
    try:
        torch.Generator().set_state(torch_state)
    except (TypeError, RuntimeError):
        found = "nothing" if torch_state is None else f"shape {tuple(torch_state.shape)}"
        raise CheckpointError(f"{path}: tensor {RNG_PREFIX}torch must be torch's random state, "
                              f"got {found}") from None


_MISSING = object()


def _is_of(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return type(value) is int
    return isinstance(value, kind)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _numpy_state(saved: Any) -> dict[str, Any]:
    """NumPy's state dict from its JSON form (the key as a uint32 array)."""
    state = dict(saved)
    state["state"] = {**state["state"], "key": np.asarray(state["state"]["key"], dtype=np.uint32)}
    return state


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
    np.random.set_state(_numpy_state(meta["numpy"]))


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
