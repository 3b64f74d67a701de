"""NumPy in, float32 batches out: the checks and shapes behind ``EncoderDecoderRNN``.

A batch ``X`` is ``(n, T)`` when there is one feature, ``(n, T, features)``, ``(n, T,
features, 1)`` (column vectors), or a list of sequences of different lengths. Targets ``Y``
are ``(n, T_out, size)``, ``(n, T_out, size, 1)`` or integer classes ``(n, T_out)``. Every
error names the argument, its shape and what was expected; a value that is not finite once
converted (1e39 becomes inf in float32) is named by its position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def finite(arr: np.ndarray, name: str, dtype: type = np.float32) -> np.ndarray:
    """``arr`` converted to ``dtype``; NaN, inf or a value past ``dtype``'s range is an error
    naming its first position."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype)
    bad = ~np.isfinite(out)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        value = arr[where]
        why = (f", past {np.dtype(dtype).name}'s largest value {np.finfo(dtype).max:.3g}"
               if np.isfinite(value) else "")
        raise ValueError(f"{name} contains NaN or infinite values: expected finite numbers; "
                         f"{name}[{', '.join(map(str, where))}] is {value}{why}")
    return out


def regular_array(value: Any) -> np.ndarray | None:
    """The value as one array, or None when its sequences have different lengths."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    try:
        arr = np.asarray(value)
    except ValueError:  # numpy refuses ragged nested lists
        return None
    ragged = arr.dtype == object and arr.ndim >= 1 and any(
        isinstance(item, Sequence | np.ndarray) for item in arr.flat)
    return None if ragged else arr


def numeric(value: Any, name: str) -> np.ndarray:
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must contain numbers, got dtype {arr.dtype}")
    return arr


def _steps_by_features(arr: np.ndarray, features: int) -> np.ndarray:
    """(n, T, features, 1) column vectors -> (n, T, features); (n, T) -> (n, T, 1) when
    there is one feature. Other shapes are returned as they are, for the caller to refuse."""
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2 and features == 1:
        arr = arr[..., None]
    return arr


def input_batch(X: Any, name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Any accepted X -> padded float32 (n, T_max, size), int64 lengths (n,)."""
    regular = regular_array(X)
    if regular is None:
        if len(X) == 0:
            raise ValueError(f"{name} is empty: expected at least one sequence")
        seqs = [sequence(x, size, f"{name}[{i}]") for i, x in enumerate(X)]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        padded = np.zeros((len(seqs), int(lengths.max()), size), dtype=np.float32)
        for i, s in enumerate(seqs):
            padded[i, :len(s)] = s
        return padded, lengths
    arr = numeric(regular, name)
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): expected at least one sequence of "
                         "at least one step")
    arr = finite(arr, name)
    arr = _steps_by_features(arr, size)
    if arr.ndim != 3:
        raise ValueError(f"{name} has shape {arr.shape}: expected (n, T, {size}) or (n, T, {size}, 1)"
                         + (", or (n, T) since input_size is 1" if size == 1 else ""))
    if arr.shape[2] != size:
        raise ValueError(f"{name} has {arr.shape[2]} features per step (shape {arr.shape}) but the "
                         f"model's input_size is {size}")
    return arr, np.full(len(arr), arr.shape[1], dtype=np.int64)


def target_batch(Y: Any, size: int, classes: bool) -> np.ndarray:
    """Any accepted Y -> float32 (n, T_out, size) vectors; integer classes when ``classes``."""
    regular = regular_array(Y)
    if regular is None:
        raise ValueError("Y's sequences have different lengths: expected every target sequence to "
                         "have the same length T_out")
    arr = numeric(regular, "Y")
    if arr.ndim == 2 and arr.dtype.kind in "iu" and classes:
        if arr.size == 0:
            raise ValueError(f"Y is empty (shape {arr.shape})")
        return one_hot(arr, size, "Y")
    arr = _steps_by_features(arr, size)
    if arr.ndim != 3:
        raise ValueError(f"Y has shape {arr.shape}: expected (n, T_out, {size}), (n, T_out, {size}, 1)"
                         + (" or integer classes (n, T_out)" if classes else ""))
    if arr.size == 0:
        raise ValueError(f"Y is empty (shape {arr.shape}): expected at least one sequence of at "
                         "least one step")
    if arr.shape[2] != size:
        raise ValueError(f"Y has {arr.shape[2]} values per step (shape {arr.shape}) but the model's "
                         f"output_size is {size}")
    arr = finite(arr, "Y")
    if classes and ((arr < 0).any() or not np.allclose(arr.sum(-1), 1.0, atol=1e-3)):
        raise ValueError("cross-entropy targets must be probability vectors (one-hot or soft: "
                         "non-negative, summing to 1 at each step) or integer classes")
    return arr


def sequence(x: Any, size: int, name: str, hint: str = "") -> np.ndarray:
    """One sequence -> float32 (T, size): from (T,) when size is 1, (T, size), (T, size, 1)."""
    regular = regular_array(x)
    if regular is None:
        raise ValueError(f"{name} has steps of different sizes: expected {size} features each")
    arr = numeric(regular, name)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 1 and size == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} has shape {arr.shape}: expected one sequence (T, {size}) or "
                         f"(T, {size}, 1)" + (", or (T,) since input_size is 1" if size == 1 else "")
                         + hint)
    if len(arr) == 0:
        raise ValueError(f"{name} is empty: expected a sequence of at least one step")
    if arr.shape[1] != size:
        raise ValueError(f"{name} has {arr.shape[1]} features per step (shape {arr.shape}) but "
                         f"the model's input_size is {size}{hint}")
    return finite(arr, name)


def vectors(value: Any, size: int, name: str) -> np.ndarray:
    """Steps of ``size`` values, column-vector axes removed: (..., size) float64."""
    regular = regular_array(value)
    if regular is None:
        raise ValueError(f"{name} has sequences or steps of different sizes")
    arr = numeric(regular, name)
    if arr.ndim >= 2 and arr.shape[-1] == 1 and arr.shape[-2] == size:
        arr = arr[..., 0]
    if arr.ndim == 0 or arr.shape[-1] != size:
        raise ValueError(f"{name} has shape {arr.shape}: expected steps of {size} values, "
                         f"(..., {size}) or (..., {size}, 1)")
    return finite(arr, name, np.float64)


def one_hot(classes: np.ndarray, size: int, name: str) -> np.ndarray:
    if classes.size and (classes.min() < 0 or classes.max() >= size):
        raise ValueError(f"{name} has class ids from {classes.min()} to {classes.max()}: "
                         f"expected 0 to {size - 1} (output_size {size})")
    return np.eye(size, dtype=np.float32)[classes]
