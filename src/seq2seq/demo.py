"""``seq2seq demo``: train a small attention model on a generated task, in about 30 seconds.

Everything goes through the library's real path: ``tasks.make_task`` and ``write_task`` put
the data in ``OUTPUT_DIR/data``, ``seq2seq.training.loop.train`` trains a character-level model into
``OUTPUT_DIR/model`` (progress bar and validation lines included), and ``Translator`` decodes
the held-out test set and draws the attention of one example. The output folder then holds:

    data/           train.*, valid.*, test.* (one example a line)
    model/          a model directory that ``seq2seq translate --model-dir`` reads
    attention.png   where each output character looked in the input
    losses.png      train and validation loss (and validation BLEU) against step

Running the demo again into the same folder starts a fresh run. A folder that the demo did not
make (it lacks the marker file) is refused rather than overwritten. The marker is also the
demo's lock (``files.FileLock``): a second demo into a folder where one is running is refused
before it deletes or writes anything.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from seq2seq.config import Config, ConfigError
from seq2seq.data.tasks import make_task, write_task
from seq2seq.decoding.translator import Translator
from seq2seq.files import FileError, FileLock, LockBusy
from seq2seq.model_dir import METRICS_FILE, RECORD_FILE, trained_files
from seq2seq.plot import plot_losses
from seq2seq.training.loop import train
from seq2seq.training.setup import record_run_files

MARKER = ".seq2seq-demo"  # marks an output folder as the demo's own, and is its lock
DATA_FILES = tuple(f"{split}.{side}" for split in ("train", "valid", "test") for side in ("src", "tgt"))
PICTURES = ("attention.png", "losses.png")
SHOWN_EXAMPLES, SHOWN_MISTAKES = 8, 3


@dataclass(frozen=True)
class DemoTask:
    """One task's demo: data sizes, time budget, the example to plot and config overrides."""

    n_train: int
    n_test: int  # held-out pairs scored at the end (valid pairs come on top)
    n_valid: int
    max_seconds: float  # default training budget
    example: str  # the source whose attention is plotted
    settings: tuple[str, ...] = ()  # section.key=value, applied over DEMO_SETTINGS
    validate: bool = True  # False where BLEU says nothing: one "word" per line scores 0


# Shared by every task: a small character-level GRU with attention. One thread: a model this
# small gains little from a second, and loses much when the cores are busy with other work.
# fp32 on every CPU (not train.precision's auto): the same run everywhere, and a character
# vocabulary's output layer is too small for bf16 to pay.
DEMO_SETTINGS = (
    "data.tokenizer=char",
    "model.cell=gru", "model.embed_size=64", "model.hidden_size=128", "model.bidirectional=true",
    "model.attention=general", "model.input_feeding=false", "model.dropout=0.1",
    "train.lr=0.003", "train.warmup_steps=50", "train.label_smoothing=0", "train.batch_tokens=1000",
    "train.epochs=2", "train.valid_every=50", "train.patience=3", "train.log_every=10",
    "train.threads=1", "train.precision=fp32",
    "decode.beam=1",
)

# ``--arch transformer``: these in place of the model settings above and of a task's. Learned
# positions: the characters' places are what these tasks are about.
TRANSFORMER_SETTINGS = (
    "model.arch=transformer", "model.d_model=64", "model.heads=4", "model.ff_size=256",
    "model.encoder_layers=2", "model.decoder_layers=2", "model.dropout=0.0", "model.positions=learned",
    "train.lr=0.005", "train.schedule=inverse_sqrt", "train.warmup_steps=80", "train.epochs=4",
)

# Reversal and copy are one "word" a line, so BLEU (hence validation) says nothing about them;
# without validation's learning-rate drops they need input feeding's sense of position.
_STEPWISE = ("model.attention=bahdanau", "model.input_feeding=true", "train.lr=0.002")
DEMO_TASKS = {
    "dates": DemoTask(n_train=20_000, n_test=1000, n_valid=1000, max_seconds=60,
                      example="Saturday 14 September 1985"),
    "reversal": DemoTask(n_train=20_000, n_test=1000, n_valid=1000, max_seconds=45,
                         example="attention", settings=_STEPWISE, validate=False),
    "copy": DemoTask(n_train=20_000, n_test=1000, n_valid=1000, max_seconds=45,
                     example="attention", settings=_STEPWISE, validate=False),
    "progression": DemoTask(n_train=1764, n_test=500, n_valid=100, max_seconds=60,
                            example="3 9 27 31 43",
                            settings=("train.batch_tokens=500", "train.epochs=40", "train.valid_every=100")),
}


@dataclass
class DemoResult:
    """What a demo run produced; ``accuracy`` is the exact-match share of the test pairs."""

    task: str
    accuracy: float
    correct: int
    total: int
    output_dir: Path
    model_dir: Path
    attention_png: Path
    losses_png: Path | None  # None when training stopped before logging anything
    seconds: float


def demo_config(task: str, max_seconds: float | None = None, seed: int = 1, arch: str = "rnn") -> Config:
    """The config the demo trains ``task`` with (``arch``: rnn or transformer); data paths are
    relative to the data folder."""
    spec = _task(task)
    config = Config()
    settings = [*DEMO_SETTINGS, *spec.settings]
    if arch == "transformer":
        settings = [*(s for s in settings if not s.startswith("model.")), *TRANSFORMER_SETTINGS]
    elif arch != "rnn":
        raise ConfigError(f"--arch must be rnn or transformer, got {arch!r}")
    config.override(settings)
    config.train.seed = seed
    config.train.max_minutes = (spec.max_seconds if max_seconds is None else max_seconds) / 60
    return config.validate()  # a seed of -1 or a budget of nan is named here, before any work


def run_demo(task: str = "dates", output_dir: str | Path = "seq2seq-demo", seed: int = 1,
             max_seconds: float | None = None, arch: str = "rnn") -> DemoResult:
    """Generate ``task``, train on it, score the held-out examples and draw two pictures.

    ``arch``: the model family, 'rnn' (a GRU with attention) or 'transformer'.

    ``max_seconds`` is the training budget (default: the task's ``max_seconds``). Progress goes
    to stderr (from training), the results to stdout.
    """
    start = time.monotonic()
    spec = _task(task)
    if max_seconds is not None and not 0 < max_seconds < float("inf"):
        raise ConfigError(f"max_seconds must be > 0, got {max_seconds}")
    demo_config(task, max_seconds, seed, arch)  # the settings checked before any work
    out = Path(output_dir)
    lock = _claim(out)
    try:
        return _run(task, spec, out, seed, max_seconds, start, arch)
    finally:
        lock.release()


def _run(task: str, spec: DemoTask, out: Path, seed: int, max_seconds: float | None,
         start: float, arch: str = "rnn") -> DemoResult:
    """``run_demo`` in the folder ``out``, claimed and locked."""
    data_dir, model_dir = out / "data", out / "model"
    data = make_task(task, n_train=spec.n_train, n_test=spec.n_valid + spec.n_test, seed=seed)
    files = write_task(data, data_dir, valid_size=spec.n_valid)
    config = demo_config(task, max_seconds, seed, arch)
    for key, name in files.items():
        if spec.validate or not key.startswith("valid_"):
            setattr(config.data, key, name)
    print(f"seq2seq demo: {task}, {len(data.train):,} generated training pairs in {data_dir}; "
          f"for example {data.train[0][0]!r} -> {data.train[0][1]!r}", flush=True)
    train(config, model_dir, data_dir=data_dir, overwrite=True)  # an earlier demo's model

    translator = Translator.load(model_dir)
    test = data.test[spec.n_valid:]
    predictions = translator.translate([src for src, _ in test], beam=1)
    right = [pred == tgt for pred, (_, tgt) in zip(predictions, test)]
    _print_table(test, predictions, right)
    accuracy = sum(right) / len(test)
    what = "dates" if task == "dates" else "examples"
    print(f"\nexact match on {len(test):,} held-out {what}: {accuracy:.1%}")

    attention_png = translator.plot_attention(spec.example, out / PICTURES[0])
    translation = translator.translate([spec.example], beam=1)[0]
    print(f"attention of {spec.example!r} -> {translation!r}: {attention_png}")
    losses_png: Path | None = None
    if (model_dir / METRICS_FILE).is_file():
        losses_png = plot_losses(model_dir / METRICS_FILE, out / PICTURES[1])
        print(f"loss curves: {losses_png}")
    else:  # a budget of a few seconds can end training before its first logged step
        print("no loss curve: training stopped before its first logged step")
    seconds = time.monotonic() - start
    print(f"done in {seconds:.0f} s. Try the model yourself:")
    print(f"  echo {shlex.quote(spec.example)} | seq2seq translate --model-dir {shlex.quote(str(model_dir))}")
    print("or serve it, with a page that shows its attention at http://127.0.0.1:8000 (needs the serve "
          "extra):")
    print(f"  seq2seq serve --model-dir {shlex.quote(str(model_dir))}")
    sys.stdout.flush()
    return DemoResult(task, accuracy, sum(right), len(test), out, model_dir, attention_png,
                      losses_png, seconds)


def _task(name: str) -> DemoTask:
    if name not in DEMO_TASKS:
        raise ConfigError(f"unknown demo task {name!r}: expected one of {', '.join(DEMO_TASKS)}")
    return DEMO_TASKS[name]


def _claim(out: Path) -> FileLock:
    """Lock ``out`` as the demo's folder, then clear what an earlier demo run left there.

    The lock (on the marker file) comes first: a demo running there keeps its files, and this
    one is refused. Only the files the demo itself writes are removed (the model's, through
    training's ``--overwrite``, which deletes only files a training recorded); a folder with
    other contents and no marker belongs to someone else and is refused, untouched.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not os.path.lexists(out / MARKER):
        raise ConfigError(f"--output-dir {out} is not empty and was not made by `seq2seq demo`; "
                          f"choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(out / MARKER)
    except LockBusy as busy:
        raise ConfigError(f"--output-dir {out} is in use: {busy.holder} is running `seq2seq demo` in "
                          f"it; wait for it to end, or choose another folder") from None
    except FileError as error:
        raise ConfigError(f"--output-dir {out}: {error}") from None
    try:
        for folder, names in ((out / "data", DATA_FILES), (out, PICTURES)):
            for name in names:
                (folder / name).unlink(missing_ok=True)
        model = out / "model"
        if trained_files(model) and not os.path.lexists(model / RECORD_FILE):
            record_run_files(model)  # a model an older demo trained here, before records: the demo's
    except BaseException:
        lock.release()
        raise
    return lock


def _print_table(test: list[tuple[str, str]], predictions: list[str], right: list[bool]) -> None:
    """A few held-out examples, then (if any) a few mistakes, each with a right/wrong mark."""
    shown = list(range(min(SHOWN_EXAMPLES, len(test))))
    shown += [i for i, ok in enumerate(right) if not ok and i not in shown][:SHOWN_MISTAKES]
    rows = [(test[i][0], predictions[i], test[i][1], "✓" if right[i] else "✗") for i in shown]
    header = ("input", "prediction", "target", "")
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(3)]
    print()
    for n, row in enumerate([header, *rows]):
        if n == SHOWN_EXAMPLES + 1 and len(rows) > SHOWN_EXAMPLES:
            print("  mistakes:")
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
