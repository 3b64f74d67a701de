"""Fail when pytest skipped a test for a reason outside scripts/allowed_skips.txt.

    python scripts/check_skips.py REPORT.xml [ALLOWED.txt]

REPORT.xml is pytest's JUnit report (``--junitxml``). Prints every skip with its reason and
whether it is allowed; exits 1 if one is not, or if the report holds no test at all.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def allowed_patterns(path: Path) -> list[re.Pattern[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [re.compile(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def skips(report: Path) -> tuple[int, list[tuple[str, str]]]:
    """The number of test cases, and (test id, reason) for each skipped one."""
    root = ElementTree.parse(report).getroot()
    cases = list(root.iter("testcase"))
    skipped = []
    for case in cases:
        for skip in case.findall("skipped"):
            reason = skip.get("message", "") or (skip.text or "")
            skipped.append((f"{case.get('classname')}::{case.get('name')}", reason))
    return len(cases), skipped


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    report = Path(argv[0])
    allowed_file = Path(argv[1]) if len(argv) == 2 else Path(__file__).with_name("allowed_skips.txt")
    patterns = allowed_patterns(allowed_file)
    count, skipped = skips(report)
    if count == 0:
        print(f"{report}: no test ran", file=sys.stderr)
        return 1
    refused = []
    for test, reason in skipped:
        ok = any(p.search(reason) for p in patterns)
        print(f"{'allowed' if ok else 'NOT ALLOWED'} skip: {test}: {reason}")
        if not ok:
            refused.append(test)
    print(f"{count} tests, {len(skipped)} skipped, {len(refused)} skipped for a reason not in {allowed_file}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
