"""Checkpoint averaging: the last checkpoints of a run kept, and their weights averaged.

``train.keep_checkpoints: N`` keeps the weights of the last N saves as
``step-00001200.safetensors`` (written atomically, as every checkpoint). ``seq2seq average
--model-dir D --last N`` writes their mean to ``averaged.safetensors``, which ``translate`` and
``evaluate`` select with ``--checkpoint averaged``. Averaging the last checkpoints of a run
smooths the noise of the final updates, as fairseq's ``average_checkpoints.py`` and Marian's
exponential smoothing do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from seq2seq.files import atomic_write_bytes
from seq2seq.model_dir import AVERAGED, KEPT
from seq2seq.models.checkpoint import FORMAT, MODEL_PREFIX, CheckpointError, model_tensors, read_checkpoint
from seq2seq.training.setup import record_files


def kept_name(step: int) -> str:
    """The file name of the checkpoint kept at ``step``."""
    return f"step-{step:08d}.safetensors"


def kept_checkpoints(model_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints ``train.keep_checkpoints`` kept in ``model_dir``, oldest first."""
    found = []
    for path in model_dir.iterdir():
        match = KEPT.fullmatch(path.name)
        if match and path.is_file() and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return sorted(found)


def keep_checkpoint(model_dir: Path, model: torch.nn.Module, step: int, keep: int,
                    meta: dict[str, Any]) -> None:
    """Save ``model``'s weights as the checkpoint of ``step`` and delete all but the last ``keep``."""
    path = model_dir / kept_name(step)
    record_files(model_dir, [path.name])  # --overwrite deletes it with the run's other files
    _write(path, {MODEL_PREFIX + k: v for k, v in model_tensors(model).items()}, {**meta, "step": step})
    for _, old in kept_checkpoints(model_dir)[:-keep]:
        old.unlink(missing_ok=True)


def average_checkpoints(paths: Sequence[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The element-wise mean of the model weights of ``paths`` (summed in float64, stored in
    each weight's own dtype), and a meta that names them. One checkpoint gives its weights bit
    for bit. Checkpoints whose weights differ in names, shapes or dtypes, or whose meta record
    different model settings, are refused with the file named."""
    if not paths:
        raise CheckpointError("no checkpoint to average")
    sums: dict[str, torch.Tensor] = {}
    first_meta: dict[str, Any] = {}
    reference: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for index, path in enumerate(paths):
        tensors, meta = read_checkpoint(path)
        weights = {k: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        layout = {k: (tuple(v.shape), v.dtype) for k, v in weights.items()}
        if index == 0:
            reference, first_meta = layout, meta
            sums = {k: v.to(torch.float64) if v.is_floating_point() else v.clone()
                    for k, v in weights.items()}
            continue
        _same_layout(layout, reference, path, paths[0])
        if meta.get("model") != first_meta.get("model"):
            raise CheckpointError(f"{path}: its model settings differ from those of {paths[0]}; "
                                  "only checkpoints of one model can be averaged")
        for name, tensor in weights.items():
            if tensor.is_floating_point():
                sums[name] += tensor.to(torch.float64)
            elif not torch.equal(tensor, sums[name]):
                raise CheckpointError(f"{path}: integer tensor {name!r} differs from {paths[0]}'s")
    averaged = {k: (v / len(paths)).to(reference[k][1]) if v.is_floating_point() else v
                for k, v in sums.items()}
    meta = {"averaged": [Path(p).name for p in paths]}
    if "model" in first_meta:
        meta["model"] = first_meta["model"]
    return averaged, meta


def _same_layout(layout: dict, reference: dict, path: Path, first: Path) -> None:
    for name in sorted(set(layout) | set(reference)):
        if name not in layout or name not in reference:
            where = path if name not in layout else first
            raise CheckpointError(f"{where}: has no weight {name[len(MODEL_PREFIX):]!r}; "
                                  f"{path} and {first} are not checkpoints of one model")
        if layout[name] != reference[name]:
            (shape, dtype), (ref_shape, ref_dtype) = layout[name], reference[name]
            raise CheckpointError(f"{path}: weight {name[len(MODEL_PREFIX):]!r} is {shape} {dtype}, "
                                  f"but {ref_shape} {ref_dtype} in {first}")


def average_last(model_dir: str | Path, last: int) -> Path:
    """Average the last ``last`` kept checkpoints of ``model_dir`` into ``averaged.safetensors``;
    returns its path."""
    model_dir = Path(model_dir)
    if last < 1:
        raise CheckpointError(f"--last must be at least 1, got {last}")
    kept = kept_checkpoints(model_dir)
    if len(kept) < last:
        raise CheckpointError(f"{model_dir}: {len(kept)} kept checkpoint(s), fewer than --last {last}; "
                              "train with train.keep_checkpoints set to keep them")
    tensors, meta = average_checkpoints([path for _, path in kept[-last:]])
    output = model_dir / AVERAGED
    record_files(model_dir, [AVERAGED])
    _write(output, tensors, meta)
    return output


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    header = {"format": FORMAT, "meta": json.dumps(meta)}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=header), cut_hard_links=True)
