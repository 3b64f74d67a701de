"""``seq2seq serve``: its settings, and the check that FastAPI and uvicorn are there.

The server itself is ``app.py`` (the FastAPI application and ``run_server``), fed by one
``worker.DecodingWorker`` per model; the page it serves is ``page.html``. FastAPI and uvicorn
come with the ``serve`` extra: this module imports neither, so that the command's flags and
``--help`` work without them, and ``require_extra`` says what to install.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from seq2seq.config import ConfigError

INSTALL = "pip install 'seq2seq-rnn[serve]'"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_SECONDS = 86_400.0  # a day: any timeout beyond it is a typo, and asyncio refuses some
MAX_COUNT = 2**62


@dataclass
class ServeConfig:
    """The server's limits, timeouts and batching wait; each field is a flag of ``seq2seq serve``
    (``max_chars`` is ``--max-chars``). The batch itself is the model's ``decode.batch_size``
    (``--batch-size``).

    A request's cost is bounded before it is decoded: ``max_decode_tokens`` bounds the sum over
    its sentences of the output-length limit (``decode.max_len_ratio`` x source tokens + 5)
    times the beam, ``max_attention_cells`` the sum of output-length limit x source tokens of
    a ``return_attention`` request, ``max_n_best`` the alternatives per sentence.
    """

    max_chars: int = field(default=1000, metadata={"help": "characters per sentence"})
    max_sentences: int = field(default=100, metadata={"help": "sentences per request"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "bytes of a request body"})
    max_queue: int = field(default=2000, metadata={
        "help": "sentences waiting per model, across requests; beyond it requests get 503"})
    timeout: float = field(default=30.0, metadata={
        "help": "seconds per request, the wait in the queue included; beyond it 504, and its "
                "decoding stops"})
    max_beam: int = field(default=10, metadata={"help": "the largest beam a request may ask for"})
    max_n_best: int = field(default=5, metadata={"help": "the most alternatives a request may ask for"})
    max_decode_tokens: int = field(default=100_000, metadata={
        "help": "a request's decoding cost: the sum over its sentences of the output-length limit "
                "(decode.max_len_ratio x source tokens + 5) x beam"})
    max_attention_cells: int = field(default=1_000_000, metadata={
        "help": "attention weights a return_attention request may get: the sum over its sentences "
                "of the output-length limit x source tokens"})
    max_wait_ms: float = field(default=5.0, metadata={
        "help": "milliseconds the worker waits for one more sentence to share a batch"})
    header_timeout: float = field(default=10.0, metadata={
        "help": "seconds a connection may take to send a request's headers; then it is closed"})
    body_timeout: float = field(default=10.0, metadata={
        "help": "seconds a request may take to send its body; then 408"})
    drain_timeout: float = field(default=20.0, metadata={
        "help": "seconds SIGTERM waits for the requests in flight; those left then get 503"})
    allowed_hosts: str = field(default="", metadata={
        "help": "comma-separated Host names the server answers, '*' for any (default: "
                "127.0.0.1,localhost,::1 when bound to a loopback address, else any)"})

    def validate(self) -> ServeConfig:
        """Every number finite and in its range; a ConfigError naming the flag otherwise."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{flag(f.name)} must be a whole number, got {value!r}")
                if not 1 <= value <= MAX_COUNT:
                    raise ConfigError(f"{flag(f.name)} must be between 1 and 2**62, got {value}")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"{flag(f.name)} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ConfigError(f"{flag(f.name)} must be a finite number, got {value}")
        for name in ("timeout", "header_timeout", "body_timeout"):
            _within(name, getattr(self, name), 0, MAX_SECONDS, low_open=True)
        _within("drain_timeout", self.drain_timeout, 2, 3600)
        _within("max_wait_ms", self.max_wait_ms, 0, 60_000)
        if self.max_queue < self.max_sentences:
            raise ConfigError(f"--max-queue ({self.max_queue}) must be >= --max-sentences "
                              f"({self.max_sentences}), or a full request could never be queued")
        if not isinstance(self.allowed_hosts, str):
            raise ConfigError(f"--allowed-hosts must be a string, got {self.allowed_hosts!r}")
        for host in self.host_list():
            if not host or any(c in host for c in "/ \t@?#") or (host.count("*") and host != "*"
                                                                 and not host.startswith("*.")):
                raise ConfigError(f"--allowed-hosts: {host!r} is not a host name (give names such as "
                                  f"example.com, *.example.com or 127.0.0.1, comma-separated, or *)")
        return self

    def host_list(self) -> list[str]:
        """``allowed_hosts`` as a list; empty when it is the default."""
        if not self.allowed_hosts.strip():
            return []
        return [h.strip().lower() for h in self.allowed_hosts.split(",")]

    def hosts_for(self, bound_to: str) -> list[str]:
        """The Host names answered when bound to ``bound_to``: ``allowed_hosts``, else the
        loopback names on a loopback address, else any ("*")."""
        if self.host_list():
            return self.host_list()
        return list(LOOPBACK_HOSTS) if is_loopback(bound_to) else ["*"]

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(ServeConfig)]


def is_loopback(host: str) -> bool:
    """Whether an address to bind (name or IP) is a loopback one."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _within(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if (value <= low if low_open else value < low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{flag(name)} must be in {interval}, got {value:g}")


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
