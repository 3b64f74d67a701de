"""Batching across requests: one decoding worker per model, fed by many requests at once.

A request puts its sentences (source ids, ``Translator.encode_source``'s) in the worker's queue
with its decoding options and waits. The worker, one thread, takes the sentences that wait with
the same options as the oldest one, up to ``max_batch`` of them, decodes them in one
``Translator.decode_ids`` call (which sorts them by length) and hands each request its own
sentences' hypotheses, in its order. A request finishes when all of its sentences have been
decoded, whichever batches they went in.

When a batch starts: as soon as the number of sentences the worker expects wait; else after a
lull of ``max_wait_ms`` with no new sentence, or once the oldest has waited as long as the last
batch took to decode (``max_wait_ms`` if that is more); waits count from the end of the last
batch at the earliest. The worker expects the sentences that waited when its last batch ended
plus as many as that batch decoded (before a first batch, ``max_batch``): clients that get an
answer often send their next request at once, and since the answers leave one by one, those
requests come spread out. A deadline from each sentence's arrival alone would start the next
batch without them, and the clients would split into groups that take turns, each in a smaller
batch, slower per sentence. A lone client's requests are decoded without a wait.

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

from seq2seq.decoding.search import Hypothesis
from seq2seq.decoding.translator import Translator

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker's queue cannot take a request's sentences now."""


class WorkerStopped(Exception):
    """The worker was stopped before it decoded a request's sentences."""


@dataclass(frozen=True)
class DecodeOptions:
    """What one ``Translator.decode_ids`` call shares: sentences are batched only with equals."""

    beam: int
    n_best: int = 1
    attention: bool = False


class Job:
    """One request's sentences and, once ``on_done`` is called, their hypotheses or an error.

    ``sources``: each sentence's ids, eos included (``Translator.encode_source``).
    ``cancelled``: set by ``DecodingWorker.cancel``; such a job gets no results and no call.
    """

    def __init__(self, sources: Sequence[list[int]], options: DecodeOptions,
                 on_done: Callable[[Job], None]) -> None:
        self.sources = list(sources)
        self.options = options
        self.results: list[list[Hypothesis]] = [[] for _ in self.sources]
        self.error: BaseException | None = None
        self.arrival = time.monotonic()
        self.cancelled = False
        self._remaining = len(self.sources)
        self._on_done = on_done


class DecodingWorker:
    """One thread that decodes the queued sentences of one model in batches.

    ``max_batch``: sentences per ``decode_ids`` call (also its ``batch_size``);
    ``max_wait_ms``: how long the worker waits for one more sentence before it decodes those
    that wait (a batch starts at once when the expected number wait);
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
        self._free_since = time.monotonic()  # when the last batch ended (the worker's start)
        self._last_took = 0.0  # seconds the last batch took to decode
        self._last_arrival = 0.0  # when the newest queued request came
        self._expected = max_batch  # sentences to wait for: those queued when the last batch
        # ended plus those it decoded, at most max_batch; before a first batch, max_batch
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

    def submit(self, sources: Sequence[list[int]], options: DecodeOptions,
               on_done: Callable[[Job], None]) -> Job:
        """Queue sentences (their ids, ``Translator.encode_source``'s); ``on_done(job)`` is
        called from the worker thread when all are decoded (``job.results``) or decoding failed
        (``job.error``)."""
        job = Job(sources, options, on_done)
        if not job.sources:
            on_done(job)
            return job
        with self._lock:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            if len(self._pending) + len(job.sources) > self.max_queue:
                raise QueueFull(f"the queue holds {len(self._pending)} sentences; with these "
                                f"{len(job.sources)} it would pass its limit of {self.max_queue}")
            idle = not self._pending  # else the worker is decoding, or waits for these
            self._last_arrival = job.arrival
            self._pending.extend((job, i) for i in range(len(job.sources)))
            if idle or len(self._pending) >= self._expected:  # one wake-up where it may start
                self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop the job's sentences that are still queued (a timed-out request's); those in the
        batch being decoded finish, and their results are dropped."""
        with self._lock:
            job.cancelled = True
            self._drop(job)

    def _drop(self, job: Job) -> None:
        """Take the job's sentences out of the queue (holding the lock)."""
        self._pending = deque(item for item in self._pending if item[0] is not job)

    # -- the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            start = time.monotonic()
            self._decode(batch)
            with self._lock:
                self._free_since = time.monotonic()
                self._last_took = self._free_since - start
                self._expected = min(self.max_batch, len(self._pending) + len(batch))

    def _take(self) -> list[tuple[Job, int]]:
        """The next batch: waits for a first sentence, then for batch-mates (see the module's
        docstring) until the expected number wait with its options; empty when stopping with
        nothing queued."""
        with self._lock:
            while True:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if not self._pending:
                    return []
                oldest = self._pending[0][0]
                same = sum(1 for job, _ in self._pending if job.options == oldest.options)
                lull = max(self._last_arrival, self._free_since) + self.max_wait
                limit = (max(oldest.arrival, self._free_since)
                         + max(self.max_wait, self._last_took))
                left = min(lull, limit) - time.monotonic()
                if same >= self._expected or left <= 0 or self._stopping:
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
            found = self.translator.decode_ids(
                [job.sources[i] for job, i in batch], beam=options.beam, n_best=options.n_best,
                batch_size=self.max_batch, return_attention=options.attention)
        except Exception as error:  # handed to each request, which reports it
            failure = error
        self.batches += 1
        finished: list[Job] = []
        with self._lock:  # against cancel(): a cancelled job is neither filled nor called
            for n, (job, i) in enumerate(batch):
                if job.cancelled:
                    continue
                job._remaining -= 1
                if failure is None:
                    job.results[i] = found[n]
                    if job._remaining == 0 and job.error is None:
                        finished.append(job)
                elif job.error is None:
                    job.error = failure
                    self._drop(job)  # its other queued sentences would be decoded for nothing
                    finished.append(job)
        for job in finished:
            try:
                job._on_done(job)
            except Exception:  # a callback's fault must not end the worker
                log.exception("decoding worker: a request's callback failed")
