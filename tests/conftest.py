"""Shared fixtures: a tiny generated corpus and one tiny model trained on it, once per session.

The corpus is the reversal of 3-8 letters among a-h, space-separated, so the word tokenizer
sees 8 words and BLEU (13a tokenization) counts one word per letter. The model is trained by
the command line in a subprocess, the way a user would, in about ten seconds on two cores
(GRU 32/64 with Bahdanau attention, no input feeding, five epochs); validation BLEU ends
near 99. Tests that need a model of their own with different settings train it themselves.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Property-based tests draw the same examples on every run (a seed derived from each test), so
# the suite passes or fails the same way each time: `python -m pytest -q` is what CI runs.
# HYPOTHESIS_PROFILE=explore searches with fresh random examples, for a developer's machine.
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the commands that the tests start. A shell that starts the suite in the
    background (``pytest &``, ``nohup``) has it ignore SIGINT, an ignored signal stays ignored
    in every child, and a Python that starts with SIGINT ignored never raises
    KeyboardInterrupt: the tests that press Ctrl-C on a real ``seq2seq`` would fail. A handled
    signal is reset to the default in a child, so the children's Python handles it again."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


LETTERS = "abcdefgh"
SPLITS = {"train": 3000, "valid": 200, "test": 200}

MODEL_CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, valid_src: valid.src, valid_tgt: valid.tgt,
       test_src: test.src, test_tgt: test.tgt, tokenizer: word, vocab_size: 100}
model: {embed_size: 32, hidden_size: 64, attention: bahdanau, input_feeding: false, dropout: 0.0}
train: {batch_tokens: 500, epochs: 5, lr: 0.01, log_every: 20, threads: 1, device: cpu, seed: 1,
        precision: fp32}
decode: {beam: 3}
"""


def reversal_pairs(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` pairs (letters, the same letters reversed), 3 to 8 letters, space-separated."""
    pairs = []
    for _ in range(n):
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]
        pairs.append((" ".join(letters), " ".join(reversed(letters))))
    return pairs


def long_line(chars: int = 5000, words: int = 80, seed: int = 7) -> str:
    """A line of exactly ``chars`` characters in ``words`` space-separated words: letters the
    model knows alternating with long runs of letters that it has never seen as a word."""
    rng = random.Random(seed)
    n_long = words // 2
    room = chars - (words - n_long) - (words - 1)  # characters left for the long words
    sizes = [room // n_long] * (n_long - 1) + [room - (room // n_long) * (n_long - 1)]
    longs = ["".join(rng.choice(LETTERS) for _ in range(size)) for size in sizes]
    line = " ".join(w for i in range(n_long) for w in (rng.choice(LETTERS), longs[i]))
    line = (line + " " + rng.choice(LETTERS)) if words % 2 else line
    assert len(line) == chars and len(line.split()) == words
    return line


def write_reversal(directory: Path, sizes: dict[str, int] = SPLITS, seed: int = 0) -> Path:
    """Write ``{split}.src`` and ``{split}.tgt`` for each split in ``sizes``; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in sizes.items():
        pairs = reversal_pairs(n, rng)
        (directory / f"{split}.src").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        (directory / f"{split}.tgt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return directory


def run_cli(*args: str | Path, input: str | bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m seq2seq ARGS`` in a subprocess; stdout and stderr captured as text."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    data = input.encode("utf-8") if isinstance(input, str) else input
    done = subprocess.run([sys.executable, "-m", "seq2seq", *map(str, args)], input=data,
                          capture_output=True, timeout=timeout, env=env)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8"),
                                       done.stderr.decode("utf-8", errors="replace"))


@pytest.fixture(autouse=True)
def prepared_data_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test's own cache of prepared corpora (``SEQ2SEQ_CACHE``, inherited by the commands it
    runs): no test writes to ~/.cache, and none finds what another prepared."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SEQ2SEQ_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def reversal_corpus(tmp_path_factory) -> Path:
    """train/valid/test .src/.tgt files of the reversal task and ``cfg.yaml`` (MODEL_CONFIG)."""
    directory = write_reversal(tmp_path_factory.mktemp("reversal"))
    (directory / "cfg.yaml").write_text(MODEL_CONFIG, encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def trained_model_dir(reversal_corpus, tmp_path_factory) -> Path:
    """A model directory trained on ``reversal_corpus`` by ``seq2seq train`` in a subprocess."""
    model_dir = tmp_path_factory.mktemp("runs") / "reversal"
    done = run_cli("train", "--config", reversal_corpus / "cfg.yaml", "--data-dir", reversal_corpus,
                   "--model-dir", model_dir)
    assert done.returncode == 0, f"training failed:\n{done.stderr[-3000:]}"
    assert "training finished: 5 epochs done" in done.stderr
    return model_dir


@pytest.fixture(scope="session")
def translator(trained_model_dir):
    """The trained model, loaded once for every test that translates in-process."""
    from seq2seq.decoding.translator import Translator

    return Translator.load(trained_model_dir, device="cpu")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """A model trained by ``seq2seq demo --task reversal`` in a few seconds (character-level
    GRU with attention), as a user would make one before ``seq2seq serve``."""
    out = tmp_path_factory.mktemp("demo") / "reversal"
    done = run_cli("demo", "--task", "reversal", "--max-seconds", "3", "--output-dir", out)
    assert done.returncode == 0, f"the demo failed:\n{done.stderr[-3000:]}"
    assert f"seq2seq serve --model-dir {out / 'model'}" in done.stdout  # its closing lines
    return out / "model"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(*args: str | Path, env: dict[str, str] | None = None,
            ready_within: float = 120) -> Iterator[tuple[subprocess.Popen, int]]:
    """A real ``seq2seq serve ARGS`` process on 127.0.0.1 and a free port; yields (process,
    port) once ``GET /health`` answers 200, and stops the process at the end if it still runs."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "seq2seq", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", *map(str, args)],
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + ready_within
        while True:
            if process.poll() is not None:
                raise AssertionError(f"seq2seq serve exited: {process.communicate()[1].decode()[-3000:]}")
            assert time.monotonic() < deadline, f"seq2seq serve not ready within {ready_within} s"
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            time.sleep(0.2)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def autograd_nodes(tensor) -> set[str]:
    """The names of the autograd nodes that made ``tensor``: which path of the model ran."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(fn for fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def in_threads(call: Callable[[int], object], count: int, seconds: float = 60) -> list:
    """``call(0) ... call(count - 1)`` at once, each in its own thread (concurrent clients):
    their results in order, once all have returned (each joined within ``seconds``)."""
    results: list = [None] * count

    def run(n: int) -> None:
        results[n] = call(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds)
    return results


def within(call: Callable[[], object], seconds: float, what: str) -> object:
    """``call()`` run in a daemon thread that must end within ``seconds`` (else the test fails
    naming ``what``): its result, or the exception it raised."""
    result: list = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as error:  # noqa: BLE001 - handed to the test
            result.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what} blocked"
    return result[0]
