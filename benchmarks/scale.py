"""Corpora larger than memory: preparation speed, time to the first step, and memory.

    python benchmarks/scale.py --pairs 2000000
    python benchmarks/scale.py --pairs 20000000 --skip-workers

Generates a synthetic corpus of ``--pairs`` pairs in a temporary folder: Multi30k's training
set over and over, with two words swapped per line in every copy after the first, so that the
lines differ. Then, each a command run as a user would run it:
- ``seq2seq prepare`` with 1 and with 2 workers: wall time, pairs/s, and each phase (reading
  and checking, training the tokenizer on its sample, encoding on the workers);
- ``seq2seq train`` with the shipped ``multi30k_en_de`` config for ``--train-seconds``: the time
  from the command's start to the first training step, cold (an empty cache of prepared data:
  it prepares, as every run did before the cache) and warm (a second run with a new
  ``--model-dir``: the cache's entry is reused), and the peak RSS of training;
- the same warm run as two gloo processes (torchrun): their RSS and PSS together, from
  ``/proc/PID/smaps_rollup`` (RSS counts the shared page cache once per process, PSS shares it).
Every wait is bounded by ``--timeout``; the temporary folder is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import DATA_DIR, print_header, record

from seq2seq.config import packaged_configs
from seq2seq.data.cache import entries
from seq2seq.data.text import read_lines

GIB = 2**30


def make_corpus(folder: Path, pairs: int) -> tuple[Path, Path]:
    """``pairs`` lines of Multi30k's train.en/train.de, repeated, two words swapped per copy."""
    base = [read_lines(DATA_DIR / f"train.{lang}.gz") for lang in ("en", "de")]
    paths = (folder / "train.en", folder / "train.de")
    with paths[0].open("w", encoding="utf-8") as en, paths[1].open("w", encoding="utf-8") as de:
        for start in range(0, pairs, len(base[0])):
            copy = start // len(base[0])
            for i in range(min(len(base[0]), pairs - start)):
                rng = random.Random(start + i)
                for handle, lines in ((en, base[0]), (de, base[1])):
                    words = lines[i].split(" ")
                    if copy and len(words) > 1:
                        a, b = rng.sample(range(len(words)), 2)
                        words[a], words[b] = words[b], words[a]
                    handle.write(" ".join(words) + "\n")
    return paths


class Memory:
    """Samples the RSS, PSS and USS (kB) of a process tree's processes, summed, every 0.2 s, and
    the RSS of its first process alone (``Top``); ``only`` keeps the processes whose command line
    contains it."""

    def __init__(self, pid: int, only: str = "") -> None:
        self.pid, self.only = pid, only
        self.peak = {"Rss": 0, "Pss": 0, "Uss": 0, "Top": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _tree(self) -> list[int]:
        parents: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(parents.get(pid, []))
        return tree

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            total = {"Rss": 0, "Pss": 0, "Uss": 0, "Top": 0}
            for pid in self._tree():
                try:
                    if self.only and self.only not in Path(f"/proc/{pid}/cmdline").read_text():
                        continue
                    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                except OSError:
                    continue
                fields = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
                total["Rss"] += fields.get("Rss", 0)
                if pid == self.pid:
                    total["Top"] = fields.get("Rss", 0)
                total["Pss"] += fields.get("Pss", 0)
                total["Uss"] += fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
            for key, value in total.items():
                self.peak[key] = max(self.peak[key], value)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        return {key: value * 1024 / GIB for key, value in self.peak.items()}


def run(command: list[str], timeout: float, first_step: Path | None = None, after: float = 0.0,
        only: str = "") -> dict[str, float]:
    """Run ``command``; with ``first_step`` (a metrics.jsonl), stop it ``after`` seconds past
    the first line there. Returns wall seconds, seconds to the first step, and peak memory."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    memory = Memory(process.pid, only)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    first = None
    while process.poll() is None and time.monotonic() - start < timeout:
        if first is None and first_step is not None and first_step.is_file() and first_step.read_text():
            first = time.monotonic() - start
        if first is not None and time.monotonic() - start > first + after:
            break
        time.sleep(0.05)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    reader.join(timeout=10)
    figures = {"wall_s": time.monotonic() - start, "first_step_s": first or float("nan"),
               **{k + "_gib": v for k, v in memory.finish().items()}}
    if process.returncode not in (0, -signal.SIGKILL) or (first_step is not None and first is None):
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{''.join(stderr[-20:])}")
    figures["log"] = "".join(stderr)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2_000_000)
    parser.add_argument("--train-seconds", type=float, default=60.0,
                        help="how long each training run goes on after its first step")
    parser.add_argument("--timeout", type=float, default=3600.0, help="limit for each command")
    parser.add_argument("--skip-workers", action="store_true",
                        help="skip the 1- and 2-worker preparations (only the training runs)")
    parser.add_argument("--skip-gloo", action="store_true", help="skip the two-process run")
    args = parser.parse_args()
    print_header()

    config = str(packaged_configs()["multi30k_en_de"])
    seq2seq = [sys.executable, "-m", "seq2seq"]
    rows: list[tuple[str, str]] = [("pairs", f"{args.pairs:,}")]
    with tempfile.TemporaryDirectory(prefix="seq2seq-scale-") as tmp:
        folder = Path(tmp)
        began = time.monotonic()
        make_corpus(folder, args.pairs)
        size = sum(p.stat().st_size for p in folder.iterdir())
        rows.append(("synthetic corpus", f"{size / GIB:.2f} GiB of text, made in "
                                         f"{time.monotonic() - began:.0f} s"))
        common = ["--config", config, "--data-dir", str(folder),
                  "--set", "data.train_src=train.en", "--set", "data.train_tgt=train.de",
                  "--set", f"data.valid_src={DATA_DIR / 'val.en.gz'}",
                  "--set", f"data.valid_tgt={DATA_DIR / 'val.de.gz'}"]
        if not args.skip_workers:
            speeds, walls = {}, {}
            for workers in (1, 2):
                result = run([*seq2seq, "prepare", *common, "--output", str(folder / f"prepared{workers}"),
                              "--workers", str(workers)], args.timeout)
                encoding, tokenizer, checking = (
                    float(re.search(pattern, result["log"]).group(1))
                    for pattern in (r"encoding ([\d.]+) s", r"trained the tokenizer\(s\) in ([\d.]+) s",
                                    r"read and checked [\d,]+ pairs in ([\d.]+) s"))
                speeds[workers], walls[workers] = args.pairs / encoding, result["wall_s"]
                rows.append((f"prepare, {workers} worker(s)",
                             f"{result['wall_s']:.1f} s, {args.pairs / result['wall_s']:,.0f} pairs/s: "
                             f"reading and checking {checking:.1f} s, tokenizer {tokenizer:.1f} s, encoding "
                             f"{encoding:.1f} s ({speeds[workers]:,.0f} pairs/s); peak RSS "
                             f"{result['Rss_gib']:.2f} GiB (all processes)"))
            rows.append(("speed-up, 2 workers / 1", f"whole preparation {walls[1] / walls[2]:.2f}x, encoding "
                                                    f"{speeds[2] / speeds[1]:.2f}x (target 1.7x)"))
        os.environ["SEQ2SEQ_CACHE"] = str(folder / "cache")  # the runs' cache of prepared data, empty
        for phase in ("cold", "warm"):
            model_dir = folder / f"model-{phase}"
            result = run([*seq2seq, "train", *common, "--model-dir", str(model_dir),
                          "--set", "train.log_every=1"], args.timeout,
                         first_step=model_dir / "metrics.jsonl", after=args.train_seconds)
            rows.append((f"train, {phase}: first step",
                         f"{result['first_step_s']:.1f} s after the start (target "
                         f"{'60' if phase == 'cold' else '10'} s at 2M pairs)"))
            rows.append((f"train, {phase}: peak memory",
                         f"RSS {result['Rss_gib']:.2f} GiB, PSS {result['Pss_gib']:.2f} GiB "
                         f"(every process of the command; target RSS 1.2 GiB)"))
            child = re.search(r"data prepared in process \d+ \(its peak memory ([\d,]+) MB\)", result["log"])
            rows.append((f"train, {phase}: the training process alone; the preparation's process",
                         f"peak RSS {result['Top_gib']:.2f} GiB; {child.group(1) if child else '?'} MB"))
        [entry] = entries()
        prepared = str(entry["folder"])
        if not args.skip_gloo:
            model_dir = folder / "model-gloo"
            result = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "seq2seq", "train", *common,
                          "--model-dir", str(model_dir), "--set", f"data.prepared={prepared}",
                          "--set", "train.log_every=1", "--set", "train.backend=gloo",
                          "--set", "train.device=cpu"],
                         args.timeout, first_step=model_dir / "metrics.jsonl", after=args.train_seconds,
                         only="seq2seq")
            rows.append(("two gloo processes: first step", f"{result['first_step_s']:.1f} s"))
            rows.append(("two gloo processes: peak memory, together",
                         f"RSS {result['Rss_gib']:.2f} GiB, PSS {result['Pss_gib']:.2f} GiB, "
                         f"USS {result['Uss_gib']:.2f} GiB (target RSS 2.5 GiB at 20M pairs)"))
        manifest = json.loads((Path(prepared) / "manifest.json").read_text())
        rows.append(("prepared corpus", f"{manifest['pairs']:,} pairs, {manifest['src_tokens']:,} + "
                                        f"{manifest['tgt_tokens']:,} tokens, ids "
                                        f"{manifest['arrays']['ids_dtype']}"))
    record(f"Scale: {args.pairs:,} synthetic pairs (prepare, first step, memory)", rows)


if __name__ == "__main__":
    main()
