"""The ``seq2seq`` command: demo, train, prepare, translate, evaluate, attention, serve, configs,
data.

Each command imports its modules when it runs (the function-level imports below), so that
parsing the arguments (``--help``, a wrong flag) and the light commands (``configs``, ``data``)
load none of the heavy ones: torch, the server (fastapi), the plots (matplotlib). The module
level imports only torch-free modules; ``tests/test_cli.py`` checks it.

Errors: the project's own (``OWN_ERRORS``: a bad input, setting, file or state, which the
message explains) print one line and exit 1; any other exception is a bug and keeps its
traceback. ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from seq2seq import __version__
from seq2seq.config import Config, ConfigError, check_device
from seq2seq.data.text import DataError
from seq2seq.files import atomic_write_text, atomic_writer, check_output
from seq2seq.model_dir import CONFIG_FILE, LAST

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130
LIGHT_COMMANDS = ("configs", "data")  # they load no torch
# The project's errors, by module. A module that a command did not import raised none of its
# errors, so matching an error imports nothing (a light command never loads torch).
OWN_ERRORS = {
    "seq2seq.config": ("ConfigError",), "seq2seq.files": ("FileError",),
    "seq2seq.data.text": ("DataError",), "seq2seq.models.checkpoint": ("CheckpointError",),
    "seq2seq.training.setup": ("TrainingError",), "seq2seq.training.distributed": ("DistributedError",),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq", description="RNN encoder-decoder models with attention.")
    parser.add_argument("--version", action="version", version=f"seq2seq {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error, not only its message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a small attention model on a generated task")
    demo.add_argument("--task", default="dates", help="dates | reversal | copy | progression")
    demo.add_argument("--output-dir", default="seq2seq-demo", type=Path)
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--arch", choices=("rnn", "transformer"), default="rnn",
                      help="the model family (default: rnn, a GRU with attention)")
    demo.add_argument("--max-seconds", type=float, default=None,
                      help="training time budget (default: the task's own)")

    train = commands.add_parser("train", help="train a translation model")
    train.add_argument("--config", type=Path, help="YAML config (optional with --resume)")
    train.add_argument("--model-dir", type=Path, required=True)
    train.add_argument("--data-dir", type=Path, help="folder the config's data paths are relative to")
    train.add_argument("--max-minutes", type=float, help="time budget (train.max_minutes)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--init-from", type=Path, metavar="DIR",
                       help="fine-tune the trained model in DIR: its weights and tokenizers, a fresh "
                            "optimizer, schedule and step count (the config defaults to DIR's)")
    train.add_argument("--init-checkpoint", choices=("best", "last", "averaged"), default="best",
                       help="which of DIR's weights --init-from starts from (default: best)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace a trained model that --model-dir holds (else an error)")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override a config setting")

    prepare = commands.add_parser(
        "prepare", help="encode a training corpus once into arrays of token ids for train",
        description="Encode the config's training files into arrays of token ids: into --output, or "
                    "(without it) into the cache of prepared corpora that train reuses ($SEQ2SEQ_CACHE, "
                    "else $XDG_CACHE_HOME/seq2seq, else ~/.cache/seq2seq). --list and --clean manage "
                    "the cache.")
    prepare.add_argument("--config", type=Path, help="YAML config")
    prepare.add_argument("--data-dir", type=Path, help="folder the config's data paths are relative to")
    prepare.add_argument("--output", type=Path,
                         help="folder to write (train reads it with --set data.prepared=FOLDER); "
                              "default: the cache")
    prepare.add_argument("--list", action="store_true",
                         help="print the cache's entries: key, size, pairs, last use, inputs, settings")
    prepare.add_argument("--clean", nargs="*", metavar="KEY",
                         help="remove the cache's entries: those whose keys start with KEY, or all")
    prepare.add_argument("--workers", type=int, default=None,
                         help="encoding processes (default: one per core)")
    prepare.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="SECTION.KEY=VALUE", help="override a config setting")

    translate = commands.add_parser("translate", help="translate lines (stdin to stdout)")
    _model_args(translate)
    translate.add_argument("--input", type=Path, help="input file (default: stdin)")
    translate.add_argument("--output", type=Path, help="output file (default: stdout)")
    translate.add_argument("--n-best", type=int, default=None,
                           help="print the N best translations of each line, tab-separated with "
                                "scores (default: the config's decode.n_best)")

    evaluate = commands.add_parser(
        "evaluate", help="BLEU and chrF against references, on one test set or several")
    _model_args(evaluate)
    evaluate.add_argument("--src", type=Path, action="append", default=[],
                          help="source file; repeat with --ref for several test sets (paired in order)")
    evaluate.add_argument("--ref", type=Path, action="append", default=[], help="reference file")
    evaluate.add_argument("--test-dir", type=Path, metavar="FOLDER",
                          help="evaluate every NAME.src / NAME.ref pair in FOLDER")
    evaluate.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU")

    average = commands.add_parser(
        "average", help="average the last checkpoints a training kept (train.keep_checkpoints)")
    average.add_argument("--model-dir", type=Path, required=True)
    average.add_argument("--last", type=int, required=True, help="how many of the last kept checkpoints")

    attention = commands.add_parser("attention", help="plot the attention of one translation")
    _model_args(attention)
    attention.add_argument("--text", required=True)
    _attention_args(attention)
    attention.add_argument("--output", type=Path, help="PNG file to write")
    attention.add_argument("--html", type=Path,
                           help="HTML page to write: the heatmap to hover, as `seq2seq serve` shows it")

    serve = commands.add_parser("serve", help="serve models over HTTP: a REST API and a page")
    _model_args(serve)
    serve.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=DIR",
                       help="serve the model in DIR as NAME; repeat for several (the first is the default); "
                            "NAME=DIR,DIR serves an ensemble")
    _attention_args(serve)
    serve.add_argument("--n-best", type=int, help="alternatives per sentence (default: decode.n_best)")
    serve.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--api-key-env", metavar="NAME",
                       help="require 'Authorization: Bearer KEY' (KEY from environment variable NAME)")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    _serve_limits(serve)

    configs = commands.add_parser("configs", help="list the packaged configs, or print one")
    configs.add_argument("name", nargs="?", help="print this config's YAML (to copy and edit)")

    data = commands.add_parser("data", help="download a public corpus and check its checksums")
    data.add_argument("corpus", choices=("multi30k",), help="multi30k: Multi30k task 1, en/de/fr")
    data.add_argument("--output", type=Path, required=True, help="folder to put the files in")
    data.add_argument("--base-url", help="a mirror of the files (default: the corpus's GitHub source)")
    for command in commands.choices.values():  # after the command too: `seq2seq train --debug`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error, not only its message")
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, action="append", default=[],
                        help="the model's folder; repeat it to decode with an ensemble of models")
    parser.add_argument("--ensemble", metavar="DIR,DIR,...",
                        help="an ensemble of these model folders (as --model-dir repeated)")
    parser.add_argument("--ensemble-weights", metavar="W,W,...",
                        help="one weight per ensemble member (default: equal)")
    parser.add_argument("--beam", type=int, help="beam size (1 = greedy; default from the config)")
    parser.add_argument("--batch-size", type=int,
                        help="sentences per greedy batch (beam search: 2 * N / beam)")
    parser.add_argument("--checkpoint", choices=("best", "last", "averaged"), default="best",
                        help="which weights: the best validation BLEU, the last, or seq2seq average's")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="decoding precision (default: the model's decode.precision, fp32)")
    parser.add_argument("--kernels", choices=("fast", "reference"),
                        help="fast paths or plain PyTorch (default: the model's train.kernels)")
    parser.add_argument("--quantize", action="store_true",
                        help="int8 dynamic quantization of the linear layers (CPU)")


def _attention_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention-layer", type=int, metavar="N",
                        help="a Transformer's decoder layer whose cross-attention is shown (default: "
                             "decode.attention_layer, -1: the last)")
    parser.add_argument("--attention-head", type=int, metavar="H",
                        help="one head of that layer (default: decode.attention_head, -1: their mean)")


def _serve_limits(parser: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from seq2seq.serving.settings import ServeConfig, flag

    for field in fields(ServeConfig):
        parser.add_argument(flag(field.name), type=type(field.default),
                            metavar="N" if field.type != "str" else "NAMES",
                            help=f"{field.metadata['help']} (default: {field.default})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in LIGHT_COMMANDS and not _manages_cache(args):
        from seq2seq.kernels.ops import keep_freed_memory

        keep_freed_memory()  # process-wide, so the command does it, not the library: see ops.py
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("seq2seq: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `seq2seq translate ... | head -1`: the reader has had enough
        _silence_stdout()
        return EXIT_ERROR
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, own_errors()):
            # a TrainingInterrupted exits 130 after Ctrl-C, 143 after SIGTERM, and is no error
            code = getattr(error, "exit_code", EXIT_ERROR)
            print(f"seq2seq: {'' if code != EXIT_ERROR else 'error: '}{error}", file=sys.stderr)
            return code
        if isinstance(error, OSError):  # disk full, read-only folder, missing file ...
            where = f" ({error.filename})" if error.filename else ""
            print(f"seq2seq: error: {error.strerror or error}{where}", file=sys.stderr)
            return EXIT_ERROR
        raise  # a bug: its traceback


def own_errors() -> tuple[type[Exception], ...]:
    """The classes of ``OWN_ERRORS`` whose modules are loaded (the others cannot have raised)."""
    return tuple(getattr(sys.modules[module], name) for module, names in OWN_ERRORS.items()
                 if module in sys.modules for name in names)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail again on the
    closed pipe (the Python documentation's advice for SIGPIPE)."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _stdout() -> TextIO:
    """sys.stdout, or a clear error when the command was started with it closed (``>&-``)."""
    if sys.stdout is None:
        raise ConfigError("standard output is closed: give --output FILE, or redirect it")
    return sys.stdout


def _apply_flags(config: Config, flags: list[tuple[str, str, Any]]) -> None:
    """Copy the flags given (``--beam``) into their settings (``decode.beam``), checked as the
    config checks them, so a bad one is an error naming both: ``--beam 0: decode.beam must be
    > 0, got 0``. A flag not given (None) leaves its setting as it is."""
    for flag, key, value in flags:
        if value is None:
            continue
        try:
            config.set(key, value, source=flag)
            config.validate()
        except ConfigError as error:
            raise ConfigError(f"{flag} {value}: {error}") from None


def run_train(args: argparse.Namespace) -> int:
    from seq2seq.training.loop import train
    from seq2seq.training.setup import refuse_own_config

    if args.resume and args.init_from is not None:
        raise ConfigError("--init-from starts a new run from a trained model; --resume continues a run: "
                          "give one of them")
    restarted = not args.resume and _restarted_by_torchrun(args.model_dir)
    resume = args.resume or restarted
    init_from = None if restarted else args.init_from  # a restarted worker resumes its own run
    if args.config is not None:
        if not resume:
            refuse_own_config(args.config, args.model_dir)
        config = Config.load(args.config)
    elif resume:
        if not (args.model_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume: {args.model_dir} is not a model directory (no {CONFIG_FILE})")
        config = Config.load(args.model_dir / CONFIG_FILE)
    elif init_from is not None:
        if not (init_from / CONFIG_FILE).is_file():
            raise ConfigError(f"--init-from: {init_from} is not a model directory (no {CONFIG_FILE})")
        config = Config.load(init_from / CONFIG_FILE)  # its data paths are absolute
    else:
        raise ConfigError("train needs --config FILE (or --resume with an existing --model-dir, or "
                          "--init-from DIR)")
    _apply_flags(config, [("--max-minutes", "train.max_minutes", args.max_minutes)])
    config.override(args.overrides)
    data_dir = args.data_dir
    if data_dir is None and args.config is None and init_from is None:
        data_dir = Path("/")  # a resumed run's saved paths are absolute
    train(config, args.model_dir, data_dir=data_dir, resume=resume, overwrite=args.overwrite,
          init_from=init_from, init_checkpoint=args.init_checkpoint)
    return 0


def _restarted_by_torchrun(model_dir: Path) -> bool:
    """torchrun --max-restarts starts failed workers again: they resume from the last checkpoint
    of the run (if it got that far) instead of refusing a model directory that holds one."""
    text = os.environ.get("TORCHELASTIC_RESTART_COUNT", "").strip()
    attempt = int(text) if text.isdigit() else 0  # a bad value: distributed.setup names it
    if attempt == 0 or not (model_dir / LAST).is_file():
        return False
    if os.environ.get("RANK", "0") == "0":
        print(f"seq2seq: restart {attempt} by torchrun: resuming from {model_dir / LAST}",
              file=sys.stderr)
    return True


def _model_dirs(args: argparse.Namespace) -> list[Path]:
    """The model folders of --model-dir (repeated) and --ensemble A,B: one, or an ensemble's."""
    folders = list(args.model_dir)
    if args.ensemble is not None:
        named = [part.strip() for part in args.ensemble.split(",")]
        if not all(named):
            raise ConfigError(f"--ensemble {args.ensemble!r}: expected model folders separated by commas")
        folders += [Path(part) for part in named]
    if not folders:
        raise ConfigError(f"{args.command} needs --model-dir DIR (repeated, or --ensemble DIR,DIR, for "
                          f"an ensemble)")
    return folders


def _ensemble_weights(args: argparse.Namespace, members: int) -> list[float] | None:
    if args.ensemble_weights is None:
        return None
    try:
        weights = [float(part) for part in args.ensemble_weights.split(",")]
    except ValueError:
        raise ConfigError(f"--ensemble-weights {args.ensemble_weights!r}: expected numbers separated "
                          f"by commas") from None
    if len(weights) != members:
        raise ConfigError(f"--ensemble-weights: {len(weights)} weight(s) for {members} model(s)")
    return weights


def _load(args: argparse.Namespace):
    from seq2seq.decoding.translator import Translator, check_attention_choice

    check_device(args.device, "--device")
    folders = _model_dirs(args)
    weights = _ensemble_weights(args, len(folders))
    options = dict(checkpoint=args.checkpoint, device=args.device, quantize=args.quantize or None,
                   precision=args.precision, kernels=args.kernels)
    if len(folders) == 1 and weights is None:
        translator = Translator.load(folders[0], **options)
    else:
        translator = Translator.load_ensemble(folders, weights, **options)
    _apply_flags(translator.config, [("--beam", "decode.beam", args.beam),
                                     ("--n-best", "decode.n_best", getattr(args, "n_best", None)),
                                     ("--batch-size", "decode.batch_size", args.batch_size),
                                     ("--attention-layer", "decode.attention_layer",
                                      getattr(args, "attention_layer", None)),
                                     ("--attention-head", "decode.attention_head",
                                      getattr(args, "attention_head", None))])
    check_attention_choice(translator)
    return translator


def run_translate(args: argparse.Namespace) -> int:
    """Lines in, translations out, a chunk at a time (``Translator.hypothesis_chunks``): each
    chunk is written and flushed before the next is read, so memory stays flat on an endless
    pipe. An --output file appears whole when all is done (``files.atomic_writer``)."""
    from seq2seq.data.text import iter_lines

    if args.output is not None:
        check_output(args.output)  # a read-only or impossible target, refused before the work
    translator = _load(args)
    stdout = _stdout() if args.output is None else None
    max_line_chars = translator.config.data.max_line_chars
    if args.input is not None:
        lines, source = iter_lines(args.input, max_line_chars), str(args.input)
    else:
        lines, source = _stdin_lines(max_line_chars), "<stdin>"
    decode, n_best = translator.tgt_tok.decode, translator.config.decode.n_best
    chunks = translator.hypothesis_chunks(lines, beam=translator.config.decode.beam, n_best=n_best,
                                          source=source)
    with _text_output(args.output, stdout) as write:
        for results in chunks:
            if n_best > 1:
                rows = ["\t".join(f"{decode(h.tokens)}\t{h.score:.4f}" for h in hyps) for hyps in results]
            else:
                rows = [decode(hyps[0].tokens) for hyps in results]
            write("".join(row + "\n" for row in rows))
    return 0


@contextlib.contextmanager
def _text_output(path: Path | None, stdout: TextIO | None) -> Iterator[Callable[[str], None]]:
    """``write(text)``: into ``path`` atomically (a temporary file renamed when the block ends
    without an error), or to ``stdout`` at once, flushed."""
    if path is None:
        def write(text: str) -> None:
            stdout.write(text)
            stdout.flush()

        yield write
        return
    with atomic_writer(path) as write_bytes:
        yield lambda text: write_bytes(text.encode("utf-8"))


def _stdin_lines(max_line_chars: int) -> Iterator[str]:
    """The lines of stdin, one at a time, read as a file is (``data.text.iter_stream_lines``):
    gzip recognised, UTF-8 checked, a leading BOM dropped, ``max_line_chars`` held; memory stays
    bounded on a huge line and on endless input."""
    from seq2seq.data.text import iter_stream_lines

    if sys.stdin is None:
        raise ConfigError("standard input is closed: give --input FILE")
    yield from iter_stream_lines(sys.stdin.buffer, "<stdin>", max_line_chars)


def run_evaluate(args: argparse.Namespace) -> int:
    """Each test set decoded and scored in turn: one JSON line per set on stdout (its name, files,
    scores, sacreBLEU signatures, speed), as it is done, and one table of all on stderr."""
    translator = _load(args)
    test_sets = _test_sets(args)
    stdout = _stdout()
    results = []
    for name, src, ref in test_sets:
        result = {"set": name, "src": str(src), "ref": str(ref),
                  **translator.evaluate(src, ref, lowercase=args.lowercase)}
        print(json.dumps(result), file=stdout, flush=True)
        results.append(result)
    print(_score_table(results), file=sys.stderr)
    return 0


def _test_sets(args: argparse.Namespace) -> list[tuple[str, Path, Path]]:
    """(name, source, reference) of each test set: the --src/--ref pairs in order, then the
    NAME.src/NAME.ref pairs of --test-dir by name; every file checked to exist before decoding."""
    if len(args.src) != len(args.ref):
        raise ConfigError(f"evaluate: --src given {len(args.src)} time(s) and --ref {len(args.ref)}: "
                          f"each --src pairs with the --ref in the same place")
    sets = [(src.name, src, ref) for src, ref in zip(args.src, args.ref)]
    if args.test_dir is not None:
        if not args.test_dir.is_dir():
            raise ConfigError(f"--test-dir {args.test_dir}: not a folder")
        sources = sorted(p for p in args.test_dir.iterdir() if p.suffix == ".src")
        if not sources:
            raise DataError(f"--test-dir {args.test_dir}: no NAME.src files (with NAME.ref beside them)")
        sets += [(src.stem, src, src.with_suffix(".ref")) for src in sources]
    if not sets:
        raise ConfigError("evaluate needs --src FILE --ref FILE (repeated for several sets) or --test-dir")
    for _, src, ref in sets:
        for path in (src, ref):
            if not os.path.exists(path):
                why = f" (the reference of {src})" if path == ref else ""
                raise DataError(f"{path}: no such file{why}")
    names = [name for name, _, _ in sets]
    return [(name if names.count(name) == 1 else str(src), src, ref) for name, src, ref in sets]


def _score_table(results: list[dict[str, Any]]) -> str:
    """The test sets' BLEU, chrF and speed as a table, with the sacreBLEU signatures."""
    width = max(len("test set"), *(len(r["set"]) for r in results))
    rows = [f"{'test set':<{width}}  {'sentences':>9}  {'BLEU':>6}  {'chrF':>6}  {'sent/s':>8}"]
    rows += [f"{r['set']:<{width}}  {r['sentences']:>9}  {r['bleu']:>6.2f}  {r['chrf']:>6.2f}  "
             f"{r['sentences_per_s']:>8.1f}" for r in results]
    rows += [f"BLEU: {results[0]['signature']}", f"chrF: {results[0]['chrf_signature']}"]
    return "\n".join(rows)


def run_average(args: argparse.Namespace) -> int:
    from seq2seq.training.average import average_last

    path = average_last(args.model_dir, args.last)
    print(f"averaged the last {args.last} checkpoint(s) into {path}; decode it with --checkpoint averaged")
    return 0


def run_attention(args: argparse.Namespace) -> int:
    if args.output is None and args.html is None:
        raise ConfigError("attention needs --output FILE.png, --html FILE.html, or both")
    for target in (args.output, args.html):
        if target is not None:
            check_output(target)  # refused before the model is loaded
    translator = _load(args)
    beam = 1 if args.beam is None else translator.config.decode.beam
    if args.output is not None:
        path = translator.plot_attention(args.text, args.output, beam=beam)
        print(f"attention heatmap written to {path}")
    if args.html is not None:
        from seq2seq.serving.results import attention_page

        atomic_write_text(args.html, attention_page(translator, args.text, beam=beam,
                                                    model="+".join(d.name for d in _model_dirs(args))))
        print(f"attention page written to {args.html}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from seq2seq.serving.settings import ServeConfig, require_extra

    require_extra()
    from seq2seq.serving.app import run_server

    models = _served_models(args)
    config = ServeConfig(**{name: getattr(args, name) for name in ServeConfig.names()
                            if getattr(args, name) is not None}).validate()
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is unset "
                              f"or empty")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    # each model loads as `translate` loads one, with the same flags (beam, precision ...)
    loaders = {name: functools.partial(_load, argparse.Namespace(**{**vars(args), "model_dir": folders,
                                                                    "ensemble": None}))
               for name, folders in models.items()}
    run_server(loaders, config, host=args.host, port=args.port, api_key=api_key, log_level=args.log_level)
    return 0


def _served_models(args: argparse.Namespace) -> dict[str, list[Path]]:
    """NAME -> model directories from --model NAME=DIR[,DIR...] (repeated) and --model-dir DIR
    (repeated, or --ensemble: one model named after the folders), each checked to be a model
    directory before the server starts. Several directories are an ensemble."""
    models: dict[str, list[Path]] = {}
    if args.model_dir or args.ensemble is not None:
        folders = _model_dirs(args)
        models["+".join(folder.name or "model" for folder in folders)] = folders
    for spec in args.models:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder or not all(part.strip() for part in folder.split(",")):
            raise ConfigError(f"--model {spec!r}: expected NAME=DIR or NAME=DIR,DIR (an ensemble)")
        if name in models:
            raise ConfigError(f"--model {spec!r}: the name {name!r} is given twice")
        models[name] = [Path(part.strip()) for part in folder.split(",")]
    if not models:
        raise ConfigError("serve needs --model-dir DIR or --model NAME=DIR")
    for name, folders in models.items():
        for folder in folders:
            if not (folder / CONFIG_FILE).is_file():
                raise ConfigError(f"model {name!r}: {folder} is not a model directory (no {CONFIG_FILE})")
    return models


def run_prepare(args: argparse.Namespace) -> int:
    from seq2seq.data import cache

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    if _manages_cache(args):
        if args.config is not None or args.output is not None:
            raise ConfigError("prepare --list and --clean manage the cache: no --config, no --output")
        if args.list:
            found = cache.entries()
            print(f"{cache.prepared_root()}: {len(found)} prepared corpora, "
                  f"{sum(e['bytes'] for e in found) / 1e6:,.1f} MB", file=_stdout())
            for entry in found:
                print(cache.describe(entry), file=_stdout())
        if args.clean is not None:
            removed = cache.clean(args.clean or None, log=log)
            log(f"removed {removed} prepared corpora from {cache.prepared_root()}")
        return 0
    if args.config is None:
        raise ConfigError("prepare needs --config FILE (or --list, or --clean)")
    from seq2seq.data.prepare import binarize
    from seq2seq.training.setup import resolve_data_paths

    config = Config.load(args.config).override(args.overrides)
    resolve_data_paths(config, args.data_dir)
    if args.output is None:
        folder, _ = cache.prepare_cached(config, workers=args.workers, log=log)
        print(folder, file=_stdout())
    else:
        binarize(config, args.output, workers=args.workers, log=log)
    return 0


def _manages_cache(args: argparse.Namespace) -> bool:
    """``prepare --list`` or ``--clean``: light, they load no torch."""
    return args.command == "prepare" and (args.list or args.clean is not None)


def run_demo(args: argparse.Namespace) -> int:
    from seq2seq.demo import run_demo as demo

    demo(task=args.task, output_dir=args.output_dir, seed=args.seed, max_seconds=args.max_seconds,
         arch=args.arch)
    return 0


def run_configs(args: argparse.Namespace) -> int:
    from seq2seq.config import packaged_configs

    configs = packaged_configs()
    if args.name is None:
        for name, path in configs.items():
            first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
            print(f"{name:24} {first.split('. ')[0].rstrip(':.')}")
        return 0
    if args.name not in configs:
        raise ConfigError(f"no packaged config {args.name!r}; the configs are: {', '.join(configs)}")
    _stdout().write(configs[args.name].read_text(encoding="utf-8"))
    return 0


def run_data(args: argparse.Namespace) -> int:
    from seq2seq.data.downloads import MULTI30K_URL, DownloadError, download_multi30k

    try:
        download_multi30k(args.output, base_url=args.base_url or MULTI30K_URL)
    except DownloadError as error:
        raise DataError(str(error)) from None
    return 0


COMMANDS = {"demo": run_demo, "train": run_train, "prepare": run_prepare, "translate": run_translate,
            "evaluate": run_evaluate, "average": run_average, "attention": run_attention,
            "serve": run_serve, "configs": run_configs, "data": run_data}
