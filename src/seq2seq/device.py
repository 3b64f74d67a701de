"""The device a model runs on, by name: shared by training, decoding and the NumPy API."""

from __future__ import annotations

import torch

from seq2seq.config import ConfigError, check_device


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' is the first GPU when there is one, else the CPU."""
    if check_device(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available")
    return device
