"""CI's skip check (scripts/check_skips.py) fails on a skip outside the written list.

A real pytest run of a small generated test file writes the JUnit report the check reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

TESTS = '''
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="needs two GPUs")
def test_gpu():
    pass

def test_browser():
    pytest.skip("no Chromium here")
'''


def run_check(tmp_path: Path, allowed: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(TESTS)
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # CI's, for the outer run
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                    f"--junitxml={report}", "test_sample.py"], cwd=tmp_path, capture_output=True,
                   timeout=120, env=env)
    (tmp_path / "allowed.txt").write_text(allowed)
    return subprocess.run([sys.executable, str(SCRIPTS / "check_skips.py"), str(report),
                           str(tmp_path / "allowed.txt")], capture_output=True, text=True, timeout=60)


def test_a_skip_outside_the_list_fails(tmp_path):
    done = run_check(tmp_path, "# comment\n(?i)\\bgpus?\\b\n")
    assert done.returncode == 1, done.stdout
    assert "allowed skip: test_sample::test_gpu: needs two GPUs" in done.stdout
    assert "NOT ALLOWED skip: test_sample::test_browser: no Chromium here" in done.stdout
    assert "3 tests, 2 skipped, 1 skipped for a reason not in" in done.stdout


def test_skips_all_on_the_list_pass(tmp_path):
    done = run_check(tmp_path, "GPUs\nno Chromium\n")
    assert done.returncode == 0, done.stdout


def test_the_shipped_list_allows_no_gpu_and_refuses_a_missing_browser(tmp_path):
    done = run_check(tmp_path, (SCRIPTS / "allowed_skips.txt").read_text())
    assert done.returncode == 1
    assert "allowed skip: test_sample::test_gpu" in done.stdout
    assert "NOT ALLOWED skip: test_sample::test_browser" in done.stdout
