"""Where a training step's time goes: its phases and the operators that take the most, from torch.profiler.

    python benchmarks/profile_step.py --config configs/multi30k_en_de_fast.yaml [--steps 30]

Trains ``warmup + steps`` updates on Multi30k (no validation) and profiles the last ``steps``
(torch.profiler's schedule, moved on by a hook after each optimizer step). The training loop
labels the phases of a step (``training/loop.py``'s ``phase``): ``batch`` (collating and
moving the batch), ``forward`` (model and loss), ``backward``, ``clip`` (the gradient norm)
and ``optimizer`` (Adam's step and zeroing the gradients). What the phases leave of the
window's wall time is the loop's own Python between them (logging, the progress bar,
bookkeeping). The operators are ranked by their own time (``self_cpu_time_total``).
"""

from __future__ import annotations

import argparse
import tempfile

from common import DATA_DIR, ROOT, print_header, record
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

from seq2seq.config import Config
from seq2seq.kernels.ops import keep_freed_memory
from seq2seq.training.loop import train

PHASES = ("batch", "forward", "backward", "clip", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/multi30k_en_de.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="operators to list")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print_header()
    keep_freed_memory()  # as the seq2seq command does

    config = Config.load(args.config).override(args.overrides)
    config.train.max_steps = args.warmup + args.steps
    config.data.valid_src = config.data.valid_tgt = ""
    plan = schedule(wait=args.warmup - 1, warmup=1, active=args.steps, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=plan) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            with tempfile.TemporaryDirectory() as model_dir:
                train(config, model_dir, data_dir=DATA_DIR)
        finally:
            hook.remove()
    events = prof.events()
    wall_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    phase_us = {name: sum(e.cpu_time_total for e in events if e.name == f"seq2seq.{name}")
                for name in PHASES}
    rows = [("profiled", f"{args.steps} updates after {args.warmup}: "
                         f"{wall_us / 1e3 / args.steps:.1f} ms an update")]
    for name in PHASES:
        rows.append((f"phase: {name}", f"{phase_us[name] / 1e3 / args.steps:.1f} ms an update "
                                       f"({100 * phase_us[name] / wall_us:.1f}%)"))
    rest = wall_us - sum(phase_us.values())
    rows.append(("between the phases (the loop's Python)",
                 f"{rest / 1e3 / args.steps:.1f} ms an update ({100 * rest / wall_us:.1f}%)"))
    ops = sorted((a for a in prof.key_averages() if not a.key.startswith("seq2seq.")),
                 key=lambda a: a.self_cpu_time_total, reverse=True)
    for average in ops[:args.top]:
        rows.append((f"operator: {average.key}",
                     f"{average.self_cpu_time_total / 1e3 / args.steps:.2f} ms an update "
                     f"({100 * average.self_cpu_time_total / wall_us:.1f}%), "
                     f"{average.count // args.steps} calls"))
    title = f"Profile of a training step, {config.train.precision} (train.precision as given), " \
            f"{args.config.split('/')[-1]} {' '.join(args.overrides)}".strip()
    record(title, rows)


if __name__ == "__main__":
    main()
