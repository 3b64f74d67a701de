"""Shared by the benchmark scripts: machine facts, the matmul peak, alternating runs, and RESULTS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from seq2seq.device import cpu_fields

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DATA_DIR = Path(os.environ.get("DATA_DIR", ROOT.parent / "shared" / "data" / "multi30k"))


# The CPU features that decide which kernels run fast: AVX-512 (and its BF16 and Intel's AMX
# tile units) or only AVX2. Figures made on CPUs with different flags are not comparable.
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")


def machine_facts() -> dict[str, str]:
    """The CPU model, its speed-relevant flags, the threads and the torch version, by name."""
    fields = cpu_fields()
    cpu, flags = fields.get("model name", ""), set(fields.get("flags", "").split())
    cpu = cpu or platform.processor() or "unknown CPU"
    present = [flag for flag in CPU_FLAGS if flag in flags]
    facts = {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "flags": (" ".join(present) or "none of " + " ".join(CPU_FLAGS))
                 + f" (torch uses {torch.backends.cpu.get_cpu_capability()})",
        "threads": f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def machine() -> str:
    """One line of :func:`machine_facts`, for a header or a log."""
    return "; ".join(f"{key}: {value}" for key, value in machine_facts().items())


def print_header() -> None:
    """Print the machine facts first, so that a run's output says where it ran."""
    print("machine: " + machine(), flush=True)


def matmul_peak(seconds: float = 2.0, size: int = 2048, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of a square matrix product (``torch.mm``): the machine's practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def turn_off_paths(names: list[str]) -> None:
    """Run this process with the fast paths ``names`` (``seq2seq.kernels.FastPaths`` fields)
    off and every other one as the policy decides: what each path buys is measured against
    its absence, the others on (``kernel_share.py``). Wraps the policy's ``resolve``, which
    ``seq2seq.kernels.apply`` and ``policy`` call; a benchmark-only switch."""
    import dataclasses

    import seq2seq.kernels as kernels

    known = {field.name for field in dataclasses.fields(kernels.FastPaths)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(f"--without: no fast path named {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    if not names:
        return
    resolve = kernels.resolve

    def resolve_without(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return dataclasses.replace(resolve(*args, **kwargs), **dict.fromkeys(names, False))

    kernels.resolve = resolve_without


def run_json(command: list[str]) -> dict:
    """Run ``python command`` in its own process; the JSON object its last output line prints."""
    out = subprocess.run([sys.executable, *command], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(variants: list[str], rounds: int, measure: Callable[[str], dict],
              name: Callable[[str], str] = str) -> dict[str, list[dict]]:
    """``measure(variant)`` for every variant, in rounds whose order reverses each round, so that
    the machine's drift hits every variant alike; each result is printed as it comes."""
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for number in range(rounds):
        for variant in variants if number % 2 == 0 else variants[::-1]:
            results[variant].append(measure(variant))
            print(f"round {number + 1}, {name(variant)}: {results[variant][-1]}", flush=True)
    return results


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def git_commit() -> str:
    """The checkout's commit, with "+ uncommitted changes" when tracked files other than
    RESULTS.md (which the runs themselves append to) differ from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short=7", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    ":(exclude)benchmarks/RESULTS.md")
    except OSError:
        return "unknown (git not found)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def entry_anchor(title: str, when: datetime.datetime) -> str:
    """An HTML id for a RESULTS.md entry, so that the table at the top can link to it."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60].rstrip("-")
    return f"e{when:%Y%m%d-%H%M}-{slug}"


def record(title: str, rows: list[tuple[str, str]]) -> None:
    """Print the figures and append them to RESULTS.md with date, commit, command and machine."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f'<a id="{entry_anchor(title, now)}"></a>', "", f"### {title}", "",
             f"- date: {now:%Y-%m-%d %H:%M} UTC", f"- commit: {git_commit()}",
             *[f"- {key}: {value}" for key, value in machine_facts().items()],
             f"- command: `{command}`", ""]
    lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    text = "\n".join(lines) + "\n"
    print(text)
    if os.environ.get("NO_RECORD"):
        return
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in this folder.\n\n")
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(text)
