"""The device a model runs on, by name, and the precision it computes in: shared by training,
decoding and the NumPy API."""

from __future__ import annotations

import functools
from pathlib import Path

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


CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags of CPUs that compute in bf16


def cpu_fields(cpuinfo: Path = CPUINFO) -> dict[str, str]:
    """The first CPU's fields in the kernel's ``cpuinfo`` ('model name', 'flags', ...), by
    name; empty where it cannot be read (not Linux)."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU computes bf16 products natively (AVX-512 BF16 or AMX), read from its
    flags (``cpu_fields``); False where they cannot be read."""
    flags = cpu_fields(cpuinfo).get("flags", "").split()
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` made concrete for ``device``: 'auto' is 'bf16' on a CPU with native
    BF16 (``cpu_has_native_bf16``) and 'fp32' elsewhere (a GPU included: ask for bf16 there);
    'fp32' and 'bf16' stay as they are."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def describe_precision(precision: str, resolved: str, resumed: bool = False) -> str:
    """The log's words for the precision in force, saying why where 'auto' chose it."""
    if precision != "auto":
        return resolved
    if resumed:
        why = "the run's own, kept on resume"
    else:
        why = "this CPU has native BF16" if resolved == "bf16" else "no native BF16 on this device"
    return f"{resolved} (auto: {why})"
