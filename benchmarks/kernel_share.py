"""What each fast path buys end to end: training and decoding with it off, the others on.

    python benchmarks/kernel_share.py --config configs/multi30k_en_de_joey.yaml \
        --model-dir runs/joey [--rounds 2] [--steps 120]

For every fast path (``seq2seq.kernels.FastPaths``) that the policy turns on for the config on
this CPU, in the precision ``train.precision`` resolves to here, it trains ``--steps`` updates
(``train_speed.py --without PATH``) and decodes test_2016_flickr greedily and with beam 5
(``decode_speed.py --without PATH``, fp32 as ``decode.precision`` is by default) with that
path off, each in its own process, against the same with every path on. Runs alternate in
rounds (the order reversed each round) so that the machine's drift hits every variant alike;
a variant's figure is the mean of its rounds. A path's gain is all-on over all-but-it.
``--model-dir``: a model trained with the config, for decoding (without it: training only).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import fields
from pathlib import Path

from common import ROOT, alternate, print_header, record, run_json

# the paths that run while training (train mode) and while decoding (eval mode, fp32); six
# more were measured with this script on 2026-12-04 and removed (benchmarks/RESULTS.md)
TRAINING = ("fused_gru", "stepwise", "fused_loss", "bf16_output", "bf16_products", "uniform_dropout")
DECODING = ("fused_gru",)
BENCHMARKS = Path(__file__).resolve().parent


def paths_on(config_path: str, overrides: list[str]) -> tuple[list[str], str]:
    """The fast paths the policy turns on for the config on this CPU, and the precision."""
    import torch

    from seq2seq import kernels
    from seq2seq.config import Config
    from seq2seq.device import resolve_precision
    from seq2seq.models.builder import build_model

    config = Config.load(config_path).override(overrides)
    precision = resolve_precision(config.train.precision, torch.device("cpu"))
    model = build_model(config.model, 64, 64, 0)
    policy = kernels.resolve("fast", "cpu", precision, model)
    return [f.name for f in fields(policy) if getattr(policy, f.name)], precision


def without(variant: str) -> str:  # alternate()'s label of a variant
    return f"without {variant or 'nothing'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/multi30k_en_de.yaml"))
    parser.add_argument("--model-dir", default="", help="a model of the config, for decoding")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--paths", default="", help="measure only these paths, comma-separated "
                        "(default: every one the policy turns on)")
    args = parser.parse_args()
    only = [name for name in args.paths.split(",") if name]
    unknown = sorted(set(only) - set(TRAINING) - set(DECODING))
    if unknown:
        parser.error(f"--paths: no fast path named {', '.join(unknown)} "
                     f"(measured: {', '.join(dict.fromkeys(TRAINING + DECODING))})")
    print_header()
    on, precision = paths_on(args.config, args.overrides)
    print(f"paths on: {', '.join(on)}; training precision {precision}", flush=True)
    sets = [x for item in args.overrides for x in ("--set", item)]

    def train(without: str) -> dict:
        return run_json([str(BENCHMARKS / "train_speed.py"), "--config", args.config, "--steps",
                    str(args.steps), "--json", "--without", without, *sets])

    def measured(paths: tuple[str, ...]) -> list[str]:  # '' (all on), then each path to turn off
        return [""] + [p for p in paths if p in on and (not only or p in only)]

    rows = [("paths on", ", ".join(on)), ("training precision", precision)]
    training = alternate(measured(TRAINING), args.rounds, train, without)
    base = statistics.mean(r["sentences_per_s"] for r in training[""])
    rows.append(("training, every path on: sentences/s",
                 " / ".join(f"{r['sentences_per_s']:.0f}" for r in training[""]) + f" (mean {base:.0f})"))
    for path, runs in list(training.items())[1:]:
        mean = statistics.mean(r["sentences_per_s"] for r in runs)
        rows.append((f"training without {path}: sentences/s",
                     " / ".join(f"{r['sentences_per_s']:.0f}" for r in runs)
                     + f" (mean {mean:.0f}); **the path's gain {100 * (base / mean - 1):+.1f}%**"))

    if args.model_dir:
        for variant in ("greedy", "beam5"):
            def decode(without: str, variant: str = variant) -> dict:
                return run_json([str(BENCHMARKS / "decode_speed.py"), "--model-dir", args.model_dir,
                            "--one", variant, "--batch-size", "0", "--repeat", "3", "--without", without])

            decoding = alternate(measured(DECODING), args.rounds, decode, without)
            base = statistics.mean(r["sentences_per_s"] for r in decoding[""])
            rows.append((f"decoding {variant} (fp32), every path on: sentences/s",
                         " / ".join(f"{r['sentences_per_s']:.0f}" for r in decoding[""])
                         + f" (mean {base:.0f}; BLEU {decoding[''][0]['bleu']:.2f})"))
            for path, runs in list(decoding.items())[1:]:
                mean = statistics.mean(r["sentences_per_s"] for r in runs)
                rows.append((f"decoding {variant} without {path}: sentences/s",
                             " / ".join(f"{r['sentences_per_s']:.0f}" for r in runs)
                             + f" (mean {mean:.0f}; BLEU {runs[0]['bleu']:.2f}); "
                             f"**the path's gain {100 * (base / mean - 1):+.1f}%**"))
    title = f"What each fast path buys, {Path(args.config).name} {' '.join(args.overrides)}".strip()
    record(title, rows)


if __name__ == "__main__":
    main()
