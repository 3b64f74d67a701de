"""``seq2seq serve``: its settings, and the check that FastAPI and uvicorn are there.

The server itself is ``rest.py`` (the FastAPI application and ``run_server``), fed by one
``batching.DecodingWorker`` per model; the page it serves is ``page.html``. FastAPI and uvicorn
come with the ``serve`` extra: this module imports neither, so that the command's flags and
``--help`` work without them, and ``require_extra`` says what to install.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from seq2seq.config import ConfigError

INSTALL = "pip install 'seq2seq-rnn[serve]'"


@dataclass
class ServeConfig:
    """The server's limits and batching wait; each field is a flag of ``seq2seq serve``
    (``max_chars`` is ``--max-chars``). The batch itself is the model's ``decode.batch_size``
    (``--batch-size``)."""

    max_chars: int = field(default=1000, metadata={"help": "characters per sentence"})
    max_sentences: int = field(default=100, metadata={"help": "sentences per request"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "bytes of a request body"})
    max_queue: int = field(default=2000, metadata={
        "help": "sentences waiting per model, across requests; beyond it requests get 503"})
    timeout: float = field(default=30.0, metadata={
        "help": "seconds per request, the wait in the queue included; beyond it 504"})
    max_beam: int = field(default=10, metadata={"help": "the largest beam a request may ask for"})
    max_wait_ms: float = field(default=5.0, metadata={
        "help": "milliseconds the worker waits for one more sentence to share a batch"})

    def validate(self) -> ServeConfig:
        for name in ("max_chars", "max_sentences", "max_body_bytes", "max_queue", "max_beam"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0, got {self.timeout}")
        if not self.max_wait_ms >= 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < self.max_sentences:
            raise ConfigError(f"--max-queue ({self.max_queue}) must be >= --max-sentences "
                              f"({self.max_sentences}), or a full request could never be queued")
        return self

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(ServeConfig)]


def flag(name: str) -> str:
    """A ``ServeConfig`` field's flag: ``max_chars`` -> ``--max-chars``."""
    return "--" + name.replace("_", "-")


def require_extra() -> None:
    """A one-line error naming what to install when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"seq2seq serve needs FastAPI and uvicorn ({error}): {INSTALL}") from None
