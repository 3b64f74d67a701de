"""The memory of `yes "..." | seq2seq translate` along an endless pipe: RSS at each checkpoint.

`translate` reads, decodes and writes a chunk of lines at a time (``Translator.hypothesis_chunks``),
so its resident memory should stay flat however many lines go through. This script feeds it
an endless pipe (``yes``), counts the translations that come out, and reads the translating
process's VmRSS (and VmHWM, its peak) from /proc when the count passes each checkpoint.

    python benchmarks/translate_stream.py                      # 10k and 1M lines
    python benchmarks/translate_stream.py --lines 10000        # a quick look
    python benchmarks/translate_stream.py --model-dir runs/en_de --text "A man rides a bike."

Without --model-dir, ``seq2seq demo --task reversal`` trains a small character-level model
first (20 s), and `yes` repeats "attention", which it learned to reverse.
Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_header


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process ``pid``, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def demo_model(folder: Path) -> Path:
    out = folder / "demo"
    subprocess.run([sys.executable, "-m", "seq2seq", "demo", "--task", "reversal", "--max-seconds", "20",
                    "--output-dir", str(out)], check=True, capture_output=True)
    return out / "model"


def measure(model_dir: Path, text: str, checkpoints: list[int], extra: list[str]) -> None:
    yes = subprocess.Popen(["yes", text], stdout=subprocess.PIPE)
    translate = subprocess.Popen([sys.executable, "-m", "seq2seq", "translate", "--model-dir", str(model_dir),
                                  *extra], stdin=yes.stdout, stdout=subprocess.PIPE)
    yes.stdout.close()
    start, lines = time.perf_counter(), 0
    try:
        for checkpoint in checkpoints:
            while lines < checkpoint:
                if not translate.stdout.readline():
                    raise SystemExit(f"translate ended after {lines:,} lines (exit {translate.wait()})")
                lines += 1
            seconds = time.perf_counter() - start
            memory = memory_kib(translate.pid)
            print(f"{lines:>12,} lines  {seconds:8.1f} s  {lines / seconds:10,.0f} lines/s  "
                  f"RSS {memory['VmRSS'] / 1024:8.1f} MiB  peak {memory['VmHWM'] / 1024:8.1f} MiB",
                  flush=True)
    finally:
        translate.kill()
        yes.kill()
        translate.wait()
        yes.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default="10000,1000000", help="checkpoints, comma-separated")
    parser.add_argument("--model-dir", type=Path, help="default: a demo reversal model, trained first")
    parser.add_argument("--text", default="attention", help="the line `yes` repeats")
    parser.add_argument("translate_args", nargs="*", help="more flags for translate (after --)")
    args = parser.parse_args()
    print_header()
    checkpoints = sorted(int(n) for n in args.lines.split(","))
    extra = args.translate_args or ["--device", "cpu", "--beam", "1"]
    with tempfile.TemporaryDirectory() as folder:
        model_dir = args.model_dir or demo_model(Path(folder))
        print(f"yes {args.text!r} | seq2seq translate --model-dir {model_dir} {' '.join(extra)}")
        measure(model_dir, args.text, checkpoints, extra)


if __name__ == "__main__":
    main()
