"""Two half-batches trained at once by two threads of one core each, against one batch on two threads.

    python benchmarks/thread_halves_probe.py --config configs/multi30k_en_de_joey.yaml \
        [--set train.precision=fp32] [--rounds 3] [--steps 60]

Issue 24's lever 5 asked about threads against processes on two cores. Processes lost (the
gradient exchange, RESULTS.md); this probes the threads' other arrangement: each update's
batch is cut into two halves (every other sentence), one thread of one intra-op thread each
trains one half (forward and backward into the same gradients), then clipping and Adam run
as usual. It is not in the package: the two threads draw their dropout masks from one
generator in whatever order they reach it, so a run would not repeat.

First it measures the CPU's own two-core concurrency: a one-thread matrix product loop run
twice in a row against in two threads at once. That ratio bounds what any split of the work
over the two cores can buy. Then it alternates ``train_speed.py --json`` runs of the plain
loop and of the halves (each in its own process, the order reversed each round) and records
the medians in RESULTS.md.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from common import ROOT, alternate, print_header, record, run_json

HERE = Path(__file__).resolve().parent


def concurrency(calls: int = 40) -> float:
    """Sequential over concurrent time of two one-thread loops of (576, 256) x (256, 4000) products."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(576, 256), torch.randn(256, 4000)

    def work() -> None:
        torch.set_num_threads(1)  # OpenMP's thread count is per thread
        for _ in range(calls):
            torch.mm(a, b)

    work()
    start = time.perf_counter()
    work()
    work()
    sequential = time.perf_counter() - start
    other = threading.Thread(target=work)
    start = time.perf_counter()
    other.start()
    work()
    other.join()
    concurrent = time.perf_counter() - start
    torch.set_num_threads(threads)
    return sequential / concurrent


def train_in_halves(argv: list[str]) -> None:
    """``train_speed.py argv`` with each update trained as two half-batches in two threads."""
    import train_speed

    from seq2seq.data.batches import collate
    from seq2seq.training import loop

    jobs: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def worker() -> None:
        torch.set_num_threads(1)
        while True:
            job = jobs.get()
            try:
                results.put((True, job()))
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                results.put((False, error))

    threading.Thread(target=worker, daemon=True).start()

    def update(run: loop._Run, batches: list, first_index: int) -> tuple[float, int]:
        run.net.train()
        for group in run.optimizer.param_groups:
            group["lr"] = run.schedule.learning_rate(run.state.step, run.state)
        torch.manual_seed(run.t.seed * 1_000_003 + first_index)
        (indices,) = batches  # train.accumulate 1
        halves = [collate(list(indices)[i::2], run.data.train.src, run.data.train.tgt) for i in (0, 1)]
        n_tokens = sum(half.n_tokens for half in halves)

        def half_loss(half) -> float:  # noqa: ANN001
            loss = run._loss(half)
            (loss / n_tokens).backward()
            return float(loss.detach())

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        jobs.put(lambda: half_loss(halves[1]))
        first = half_loss(halves[0])
        ok, second = results.get()
        torch.set_num_threads(threads)
        if not ok:
            raise second
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.t.clip_grad or float("inf"))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return first + second, n_tokens

    loop._Run._update = update
    sys.argv = ["train_speed.py", *argv]
    train_speed.main()


def speed(variant: str, args: argparse.Namespace) -> dict:
    """One ``train_speed.py --json`` run (``plain``) or the same in halves, in its own process."""
    sets = [x for item in args.overrides for x in ("--set", item)]
    common = ["--config", args.config, "--steps", str(args.steps), "--json", *sets]
    if variant == "halves":
        return run_json([str(HERE / "thread_halves_probe.py"), "--run-halves", *common])
    return run_json([str(HERE / "train_speed.py"), *common])


def main() -> None:
    if sys.argv[1:2] == ["--run-halves"]:
        train_in_halves(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/multi30k_en_de_joey.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    print_header()
    ratio = concurrency()
    print(f"two one-thread product loops at once: {ratio:.2f}x their sequential speed")
    runs = alternate(["plain", "halves"], args.rounds, lambda variant: speed(variant, args))
    figures = {v: [r["sentences_per_s"] for r in results] for v, results in runs.items()}
    listed = {v: ", ".join(f"{x:.1f}" for x in xs) for v, xs in figures.items()}
    plain, split = statistics.median(figures["plain"]), statistics.median(figures["halves"])
    title = f"Two half-batches in two threads, {Path(args.config).name} {' '.join(args.overrides)}".strip()
    record(title, [
        ("the CPU's two-core concurrency (one-thread products, two at once)", f"{ratio:.2f}x"),
        ("plain loop, one batch on two threads: sentences/s", listed["plain"]),
        ("two half-batches, two threads of one: sentences/s", listed["halves"]),
        ("medians", f"{split:.1f} against {plain:.1f} ({100 * (split / plain - 1):+.1f}%)"),
    ])


if __name__ == "__main__":
    main()
