"""Pictures: attention heatmaps and training curves.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot,
so importing or calling this module leaves matplotlib's global backend and state alone.
Files are written atomically: a reader sees the old picture or the new one, never half.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from seq2seq.files import atomic_write_bytes

SPACE = "\u2423"  # '␣', shown for a space so character-level labels stay visible
_CELL_INCHES = 0.3  # one attention cell, before clamping the figure size
_MIN_INCHES, _MAX_INCHES = 3.0, 24.0


def plot_attention(weights: np.ndarray, src_labels: Sequence[str], tgt_labels: Sequence[str],
                   path: str | Path, title: str | None = None) -> Path:
    """Draw attention ``weights`` as a heatmap and write it to ``path`` (format from the suffix).

    weights: shape (len(tgt_labels), len(src_labels)); row i is where target token i looked.
    Source tokens label the top x axis, target tokens the y axis, one tick per token.
    """
    weights = np.asarray(weights, dtype=float)
    expected = (len(tgt_labels), len(src_labels))
    if weights.shape != expected:
        raise ValueError(f"weights has shape {weights.shape} but the labels give "
                         f"(len(tgt_labels), len(src_labels)) = {expected}")
    if weights.size == 0:
        raise ValueError("nothing to plot: no source or no target tokens")
    src = [_visible(label) for label in src_labels]
    tgt = [_visible(label) for label in tgt_labels]
    # Words and subwords stand on end; characters stay upright (one '</s>' among them fits).
    rotate = sum(map(len, src)) > 2 * len(src)
    # Room for the labels: rotated source labels grow down, target labels grow left.
    label_in = 0.09 * max(map(len, src)) if rotate else 0.25
    width = _clamp(len(src) * _CELL_INCHES + 0.09 * max(map(len, tgt)) + 1.8)
    height = _clamp(len(tgt) * _CELL_INCHES + label_in + (1.3 if title else 0.9))
    # Font fits the cell the clamped figure leaves, within readable bounds.
    cell_pt = 72 * min((width - 1.8) / len(src), (height - 1.2) / len(tgt))
    fontsize = min(11.0, max(5.0, 0.7 * cell_pt))

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", aspect="auto", vmin=0.0, interpolation="nearest")
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xticks(range(len(src)), labels=src, fontsize=fontsize, rotation=90 if rotate else 0)
    ax.set_yticks(range(len(tgt)), labels=tgt, fontsize=fontsize)
    ax.tick_params(length=0)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, aspect=30).ax.tick_params(labelsize=8)
    return _save(fig, path)


def plot_losses(metrics: str | Path | Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Plot train and validation loss against step, and validation BLEU on a second axis.

    ``metrics`` is a metrics.jsonl file (one JSON object a line; lines that are torn or not
    objects are skipped) or a list of such dicts. Training lines carry "step" and
    "train_loss", validation lines "step", "valid_loss" and maybe "valid_bleu".
    """
    records = _read_jsonl(Path(metrics)) if isinstance(metrics, str | os.PathLike) else list(metrics)
    train = _series(records, "train_loss")
    valid = _series(records, "valid_loss")
    bleu = _series(records, "valid_bleu")
    if not train and not valid:
        raise ValueError("nothing to plot: no record has a numeric step with train_loss or valid_loss")

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    lines = []
    if train:
        lines += ax.plot(*zip(*train), color="C0", linewidth=1, label="train loss")
    if valid:
        lines += ax.plot(*zip(*valid), "o-", color="C1", markersize=3, label="valid loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if bleu:
        twin = ax.twinx()
        lines += twin.plot(*zip(*bleu), "s--", color="C2", markersize=3, label="valid BLEU")
        twin.set_ylabel("BLEU")
    # Above the axes: inside, the twin axis would draw the BLEU line over it.
    ax.legend(handles=lines, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(lines), frameon=False)
    return _save(fig, path)


def _visible(label: str) -> str:
    return str(label).replace(" ", SPACE)


def _clamp(inches: float) -> float:
    return min(_MAX_INCHES, max(_MIN_INCHES, inches))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: Sequence[Any], key: str) -> list[tuple[float, float]]:
    """(step, value) points of ``key``, sorted by step; records without both are skipped."""
    return sorted(
        (r["step"], r[key]) for r in records
        if isinstance(r, dict) and _is_number(r.get("step")) and _is_number(r.get(key))
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects in ``path``, one a line; a torn line (a writer died mid-line) is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as ``files.atomic_write_bytes`` writes any output: atomically
    for a new or regular file, through a symlink, straight into a device or FIFO."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    picture = io.BytesIO()
    fig.savefig(picture, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    atomic_write_bytes(path, picture.getvalue())
    return path
