"""The ``seq2seq`` command: demo, train, translate, evaluate, attention."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from seq2seq.checkpoint import CheckpointError, atomic_write_text
from seq2seq.config import Config, ConfigError
from seq2seq.data import DataError

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq", description="RNN encoder-decoder models with attention.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a small attention model on a generated task")
    demo.add_argument("--task", default="dates", help="dates | reversal | copy | progression")
    demo.add_argument("--output-dir", default="seq2seq-demo", type=Path)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--max-seconds", type=float, default=None,
                      help="training time budget (default: the task's own)")

    train = commands.add_parser("train", help="train a translation model")
    train.add_argument("--config", type=Path, help="YAML config (optional with --resume)")
    train.add_argument("--model-dir", type=Path, required=True)
    train.add_argument("--data-dir", type=Path, help="folder the config's data paths are relative to")
    train.add_argument("--max-minutes", type=float, help="time budget (train.max_minutes)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override a config setting")

    translate = commands.add_parser("translate", help="translate lines (stdin to stdout)")
    _model_args(translate)
    translate.add_argument("--input", type=Path, help="input file (default: stdin)")
    translate.add_argument("--output", type=Path, help="output file (default: stdout)")
    translate.add_argument("--n-best", type=int, default=None,
                           help="print the N best translations of each line, tab-separated with "
                                "scores (default: the config's decode.n_best)")

    evaluate = commands.add_parser("evaluate", help="BLEU and chrF against references")
    _model_args(evaluate)
    evaluate.add_argument("--src", type=Path, required=True)
    evaluate.add_argument("--ref", type=Path, required=True)
    evaluate.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU")

    attention = commands.add_parser("attention", help="plot the attention of one translation")
    _model_args(attention)
    attention.add_argument("--text", required=True)
    attention.add_argument("--output", type=Path, required=True, help="PNG file to write")
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--beam", type=int, help="beam size (1 = greedy; default from the config)")
    parser.add_argument("--batch-size", type=int,
                        help="sentences per greedy batch (beam search: 2 * N / beam)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="decoding precision (default: the model's train.precision)")
    parser.add_argument("--quantize", action="store_true",
                        help="int8 dynamic quantization of the linear layers (CPU)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from seq2seq.distributed import DistributedError
    from seq2seq.train import TrainingError, TrainingInterrupted

    try:
        return COMMANDS[args.command](args) or 0
    except TrainingInterrupted as error:
        print(f"seq2seq: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("seq2seq: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, DataError, CheckpointError, TrainingError, DistributedError, ValueError) as error:
        print(f"seq2seq: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # disk full, read-only folder, missing file ...
        where = f" ({error.filename})" if error.filename else ""
        print(f"seq2seq: error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_ERROR


def run_train(args: argparse.Namespace) -> int:
    from seq2seq.train import train

    resume = args.resume or _restarted_by_torchrun(args.model_dir)
    if args.config is not None:
        config = Config.load(args.config)
    elif resume:
        if not (args.model_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {args.model_dir} is not a model directory (no config.yaml)")
        config = Config.load(args.model_dir / "config.yaml")
    else:
        raise ConfigError("train needs --config FILE (or --resume with an existing --model-dir)")
    if args.max_minutes is not None:
        config.train.max_minutes = args.max_minutes
    config.override(args.overrides)
    data_dir = args.data_dir
    if data_dir is None and args.config is None:
        data_dir = Path("/")  # a resumed run's saved paths are absolute
    train(config, args.model_dir, data_dir=data_dir, resume=resume)
    return 0


def _restarted_by_torchrun(model_dir: Path) -> bool:
    """torchrun --max-restarts starts failed workers again: they resume from the last checkpoint
    of the run (if it got that far) instead of refusing a model directory that holds one."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or not (model_dir / "last.safetensors").is_file():
        return False
    if os.environ.get("RANK", "0") == "0":
        print(f"seq2seq: restart {attempt} by torchrun: resuming from {model_dir / 'last.safetensors'}",
              file=sys.stderr)
    return True


def _load(args: argparse.Namespace):
    from seq2seq.translator import Translator

    translator = Translator.load(args.model_dir, checkpoint=args.checkpoint, device=args.device,
                                 quantize=args.quantize or None, precision=args.precision)
    if args.batch_size:
        translator.config.decode.batch_size = args.batch_size
    return translator


def run_translate(args: argparse.Namespace) -> int:
    from seq2seq.data import read_lines

    translator = _load(args)
    if args.input is not None:
        lines = read_lines(args.input, translator.config.data.max_line_chars)
    else:
        lines = _read_stdin(translator.config.data.max_line_chars)
    source = str(args.input) if args.input is not None else "<stdin>"
    beam = args.beam or translator.config.decode.beam
    n_best = args.n_best or translator.config.decode.n_best
    if n_best > 1:
        results = translator.hypotheses(lines, beam=beam, n_best=n_best, source=source)
        out = [
            "\t".join(f"{translator.tgt_tok.decode(h.tokens)}\t{h.score:.4f}" for h in hyps)
            for hyps in results
        ]
    else:
        out = translator.translate(lines, beam=beam, source=source)
    text = "".join(line + "\n" for line in out)
    if args.output is not None:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def _read_stdin(max_line_chars: int) -> list[str]:
    lines = []
    limit = 4 * max_line_chars + 6  # bytes: as read_lines, memory stays bounded on a huge line
    for number, raw in enumerate(iter(lambda: sys.stdin.buffer.readline(limit), b""), start=1):
        if len(raw) == limit and not raw.endswith(b"\n"):
            raise DataError(f"<stdin>:{number}: line longer than the limit of {max_line_chars} "
                            f"characters (data.max_line_chars)")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"<stdin>:{number}: invalid UTF-8 ({error.reason})") from None
        if number == 1 and line == "\ufeff":
            break  # stdin of just a BOM is empty
        lines.append(line.removeprefix("\ufeff") if number == 1 else line)
    lines = [line.removesuffix("\n").removesuffix("\r") for line in lines]
    for number, line in enumerate(lines, start=1):
        if len(line) > max_line_chars:
            raise DataError(f"<stdin>:{number}: line of {len(line)} characters exceeds the limit "
                            f"of {max_line_chars} (data.max_line_chars)")
    return lines


def run_evaluate(args: argparse.Namespace) -> int:
    translator = _load(args)
    result = translator.evaluate(args.src, args.ref, beam=args.beam, lowercase=args.lowercase)
    print(json.dumps(result))
    return 0


def run_attention(args: argparse.Namespace) -> int:
    translator = _load(args)
    path = translator.plot_attention(args.text, args.output, beam=args.beam or 1)
    print(f"attention heatmap written to {path}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from seq2seq.demo import run_demo as demo

    demo(task=args.task, output_dir=args.output_dir, seed=args.seed, max_seconds=args.max_seconds)
    return 0


COMMANDS = {"demo": run_demo, "train": run_train, "translate": run_translate,
            "evaluate": run_evaluate, "attention": run_attention}
