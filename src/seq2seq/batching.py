"""Batching across requests: one decoding worker per model, fed by many requests at once.

A request puts its sentences in the worker's queue with its decoding options and waits. The
worker, one thread, takes the sentences that wait with the same options as the oldest one: up to
``max_batch`` of them, or as many as came within ``max_wait_ms`` of the oldest one's arrival.
It decodes them in one ``Translator.hypotheses`` call (which sorts them by length) and hands
each request its own sentences' hypotheses, in its order. A request finishes when all of its
sentences have been decoded, whichever batches they went in.

A sentence's result does not depend on its batch-mates: the model masks padding explicitly
(tests/test_serve.py compares a sentence served alone, among concurrent requests, and through
``Translator.translate``).

The queue is bounded (``max_queue`` sentences): a request that would overflow it is refused
with ``QueueFull`` at once, so a caller sees back-pressure rather than a growing wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from seq2seq.search import Hypothesis
from seq2seq.translator import Translator

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker's queue cannot take a request's sentences now."""


class WorkerStopped(Exception):
    """The worker was stopped before it decoded a request's sentences."""


@dataclass(frozen=True)
class DecodeOptions:
    """What one ``Translator.hypotheses`` call shares: sentences are batched only with equals."""

    beam: int
    n_best: int = 1
    attention: bool = False


class Job:
    """One request's sentences and, once ``on_done`` is called, their hypotheses or an error."""

    def __init__(self, sentences: Sequence[str], options: DecodeOptions,
                 on_done: Callable[[Job], None]) -> None:
        self.sentences = list(sentences)
        self.options = options
        self.results: list[list[Hypothesis]] = [[] for _ in self.sentences]
        self.error: BaseException | None = None
        self.arrival = time.monotonic()
        self._remaining = len(self.sentences)
        self._on_done = on_done
        self.cancelled = False


class DecodingWorker:
    """One thread that decodes the queued sentences of one model in batches.

    ``max_batch``: sentences per ``hypotheses`` call (also its ``batch_size``);
    ``max_wait_ms``: how long the oldest waiting sentence may wait for batch-mates;
    ``max_queue``: sentences waiting, across requests, before ``submit`` raises ``QueueFull``.
    """

    def __init__(self, translator: Translator, max_batch: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 2000, name: str = "model") -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_ms >= 0")
        self.translator = translator
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self._pending: deque[tuple[Job, int]] = deque()  # (job, sentence index), oldest first
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self.batches = 0  # decoding calls made; read by tests and the load benchmark

    def start(self) -> DecodingWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Decode what is queued, then end the thread; later ``submit`` calls are refused."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        """Sentences waiting to be decoded."""
        with self._lock:
            return len(self._pending)

    def submit(self, sentences: Sequence[str], options: DecodeOptions,
               on_done: Callable[[Job], None]) -> Job:
        """Queue ``sentences``; ``on_done(job)`` is called from the worker thread when all are
        decoded (``job.results``) or decoding failed (``job.error``)."""
        job = Job(sentences, options, on_done)
        if not job.sentences:
            on_done(job)
            return job
        with self._lock:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            if len(self._pending) + len(job.sentences) > self.max_queue:
                raise QueueFull(f"the queue holds {len(self._pending)} sentences; with these "
                                f"{len(job.sentences)} it would pass its limit of {self.max_queue}")
            self._pending.extend((job, i) for i in range(len(job.sentences)))
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job's sentences that are still queued (a timed-out request's); those in the
        batch being decoded finish, and their results are dropped."""
        with self._lock:
            job.cancelled = True
            self._pending = deque(item for item in self._pending if item[0] is not job)

    # -- the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            self._decode(batch)

    def _take(self) -> list[tuple[Job, int]]:
        """The next batch: waits for a first sentence, then for batch-mates until the oldest
        has waited ``max_wait``; empty when stopping with nothing queued."""
        with self._lock:
            while True:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if not self._pending:
                    return []
                oldest = self._pending[0][0]
                same = sum(1 for job, _ in self._pending if job.options == oldest.options)
                left = oldest.arrival + self.max_wait - time.monotonic()
                if same >= self.max_batch or left <= 0 or self._stopping:
                    break
                self._lock.wait(left)
            batch: list[tuple[Job, int]] = []
            rest: deque[tuple[Job, int]] = deque()
            for item in self._pending:
                if item[0].options == oldest.options and len(batch) < self.max_batch:
                    batch.append(item)
                else:
                    rest.append(item)
            self._pending = rest
            return batch

    def _decode(self, batch: list[tuple[Job, int]]) -> None:
        options = batch[0][0].options
        failure: Exception | None = None
        try:
            found = self.translator.hypotheses(
                [job.sentences[i] for job, i in batch], beam=options.beam, n_best=options.n_best,
                batch_size=self.max_batch, return_attention=options.attention)
        except Exception as error:  # handed to each request, which reports it
            failure = error
        self.batches += 1
        finished: list[Job] = []
        for n, (job, i) in enumerate(batch):
            job._remaining -= 1
            if failure is None:
                job.results[i] = found[n]
                if job._remaining == 0 and job.error is None:
                    finished.append(job)
            elif job.error is None:
                job.error = failure
                finished.append(job)
        for job in finished:
            if job.error is not None:
                self.cancel(job)  # its other queued sentences would be decoded for nothing
            try:
                job._on_done(job)
            except Exception:  # a callback's fault must not end the worker
                log.exception("decoding worker: a request's callback failed")
