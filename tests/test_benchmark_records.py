"""Every benchmark entry says where it ran: CPU model, its flags, threads and torch.

``benchmarks/common.record`` writes each RESULTS.md entry; figures from CPUs with other flags
(AVX-512 against AVX2) are not comparable, so each entry must carry them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common

    return common


def test_an_entry_records_the_cpu_its_flags_the_threads_and_torch(common, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NO_RECORD", "1")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(sys, "argv", ["bench.py", "--steps", "3"])
    common.record("A title", [("figure", "1 / 2")])
    entry = capsys.readouterr().out
    assert not (tmp_path / "RESULTS.md").exists()  # NO_RECORD: printed only
    lines = {line.split(":", 1)[0]: line for line in entry.splitlines() if line.startswith("- ")}
    for key in ("- cpu", "- flags", "- threads", "- torch", "- date", "- commit", "- command"):
        assert key in lines, entry
    assert lines["- torch"] == f"- torch: {torch.__version__}"
    assert f"{torch.get_num_threads()} torch threads" in lines["- threads"]
    assert f"(torch uses {torch.backends.cpu.get_cpu_capability()})" in lines["- flags"]
    assert "| figure | 1 / 2 |" in entry


def test_the_flags_are_read_from_the_cpu(common, monkeypatch):
    cpuinfo = "model name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f amx_tile\n"
    real_read_text = Path.read_text

    def read_text(path, *args, **kwargs):
        return cpuinfo if str(path) == "/proc/cpuinfo" else real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    facts = common.machine_facts()
    assert facts["cpu"].startswith("Some CPU, ")
    assert facts["flags"].startswith("avx512f amx_tile avx2 (torch uses ")
    assert "avx512_bf16" not in facts["flags"]


def test_the_commit_is_dirty_for_any_tracked_file_but_results(common, monkeypatch, tmp_path):
    """The runs append to benchmarks/RESULTS.md, so a change there alone leaves the commit
    clean; a change to any other tracked file is named."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("# Benchmark results\n")
    (tmp_path / "train.py").write_text("print(1)\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "start")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    head = common.git_commit()
    assert len(head) == 7 and "uncommitted" not in head
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("# Benchmark results\n\nan entry\n")
    assert common.git_commit() == head
    (tmp_path / "train.py").write_text("print(2)\n")
    assert common.git_commit() == head + " + uncommitted changes"
