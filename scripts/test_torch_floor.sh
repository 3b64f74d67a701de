#!/usr/bin/env bash
# The README's test command on another torch (by default the floor that pyproject.toml
# allows), in a virtual environment of its own with a regular install, as CI makes, and one
# dated line about the run appended to scripts/TORCH_FLOOR.md. A floor is claimed only on a
# whole-suite run (no test paths given) that passes.
#
#   scripts/test_torch_floor.sh                 # the floor (2.13.0) in /tmp/venv-floor
#   FLOOR=2.7.1 VENV=/tmp/venv-2.7 scripts/test_torch_floor.sh          # a candidate floor
#
# PyPI's Linux wheels of torch pull the CUDA libraries (about 2.7 GB to download); the tests
# run on the CPU all the same.
set -euo pipefail
FLOOR="${FLOOR:-2.13.0}"
VENV="${VENV:-/tmp/venv-floor}"
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==$FLOOR"
# torch named again, so that pip never upgrades it; a candidate below pyproject.toml's floor is
# refused by pip: lower the floor in a scratch checkout first.
"$VENV/bin/python" -m pip install -q ".[test]" "torch==$FLOOR"
version="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
case "$version" in "$FLOOR"|"$FLOOR"+*) ;; *) echo "expected torch $FLOOR, got $version" >&2; exit 1;; esac
python_version="$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
commit="$(git rev-parse --short=7 HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit + uncommitted changes"; fi
log="$(mktemp)"
trap 'rm -f -- "$log"' EXIT
status=0
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$log" || status=$?
summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed|error)' "$log" | tail -1 | tr -d '=' | sed 's/^ *//')"
printf -- '- %s UTC, commit %s, Python %s, torch %s: `python -m pytest -q %s`: %s\n' \
  "$(date -u '+%Y-%m-%d %H:%M')" "$commit" "$python_version" "$version" "$*" "${summary:-no summary}" \
  >> scripts/TORCH_FLOOR.md
exit "$status"
