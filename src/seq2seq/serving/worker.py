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

A job has a deadline (its request's timeout) and can be cancelled (its client hung up). Dead
jobs are dropped from the queue, and a batch whose jobs are all dead stops at its next
decoding step (``decode_ids``'s ``should_stop``), so a hostile or abandoned request frees the
worker within a step. Batches that return attention are cut to ``max_attention_cells``
padded cells (sentences x longest output limit x longest source), so their memory follows
what was asked for, not ``max_batch``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from seq2seq.decoding.search import Hypothesis
from seq2seq.decoding.translator import Translator

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker's queue cannot take a request's sentences now."""


class WorkerStopped(Exception):
    """The worker was stopped (or died) before it decoded a request's sentences."""


@dataclass(frozen=True)
class DecodeOptions:
    """What one ``Translator.decode_ids`` call shares: sentences are batched only with equals."""

    beam: int
    n_best: int = 1
    attention: bool = False


class Job:
    """One request's sentences and, once ``on_done`` is called, their hypotheses or an error.

    ``sources``: each sentence's ids, eos included (``Translator.encode_source``).
    ``deadline``: ``time.monotonic()`` past which nobody waits for the results.
    ``cancelled``: set by ``DecodingWorker.cancel``; such a job gets no results and no call,
    and neither does one past its deadline.
    """

    def __init__(self, sources: Sequence[list[int]], options: DecodeOptions,
                 on_done: Callable[[Job], None], timeout: float | None = None) -> None:
        self.sources = list(sources)
        self.options = options
        self.results: list[list[Hypothesis]] = [[] for _ in self.sources]
        self.error: BaseException | None = None
        self.arrival = time.monotonic()
        self.deadline = math.inf if timeout is None else self.arrival + timeout
        self.cancelled = False
        self._remaining = len(self.sources)
        self._on_done = on_done

    def dead(self, now: float | None = None) -> bool:
        """Cancelled, or past its deadline: its results would reach nobody."""
        return self.cancelled or (time.monotonic() if now is None else now) >= self.deadline


class DecodingWorker:
    """One thread that decodes the queued sentences of one model in batches.

    ``max_batch``: sentences per ``decode_ids`` call (also its ``batch_size``);
    ``max_wait_ms``: how long the worker waits for one more sentence before it decodes those
    that wait (a batch starts at once when the expected number wait);
    ``max_queue``: sentences waiting, across requests, before ``submit`` raises ``QueueFull``;
    ``max_attention_cells``: the padded attention cells of one batch that returns attention
    (one sentence at least).
    """

    def __init__(self, translator: Translator, max_batch: int = 64, max_wait_ms: float = 5.0,
                 max_queue: int = 2000, name: str = "model",
                 max_attention_cells: int = 1_000_000) -> None:
        if max_batch < 1 or max_queue < 1 or max_attention_cells < 1:
            raise ValueError("max_batch, max_queue and max_attention_cells must be >= 1")
        if not 0 <= max_wait_ms <= 60_000:  # inf and NaN too: Condition.wait refuses inf
            raise ValueError(f"max_wait_ms must be between 0 and 60000, got {max_wait_ms}")
        self.translator = translator
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.max_attention_cells = max_attention_cells
        self.name = name
        self._pending: deque[tuple[Job, int]] = deque()  # (job, sentence index), oldest first
        self._lock = threading.Condition()
        self._stopping = False
        self._free_since = time.monotonic()  # when the last batch ended (the worker's start)
        self._last_took = 0.0  # seconds the last batch took to decode
        self._last_arrival = 0.0  # when the newest queued request came
        self._expected = max_batch  # sentences to wait for: those queued when the last batch
        # ended plus those it decoded, at most max_batch; before a first batch, max_batch
        self._thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self.error: BaseException | None = None  # what ended the thread, if not stop()
        self.batches = 0  # decoding calls made
        self.stopped_batches = 0  # batches stopped because all their requests were gone
        self.batches_after_wait = 0  # batches started because a wait ran out, not full
        self.decoding = False  # a batch is being decoded
        self.sentences = 0  # sentences decoded
        self.largest_batch = (0, 0)  # (sentences, requests) of the batch with most requests

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
    def alive(self) -> bool:
        """The thread runs (started, not stopped, not dead of an error)."""
        return self._thread.is_alive() and self.error is None

    @property
    def busy(self) -> bool:
        """The thread still runs (after ``stop``: it has not finished its batch yet)."""
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Sentences waiting to be decoded."""
        with self._lock:
            return len(self._pending)

    def stats(self) -> dict[str, Any]:
        """Counts for /health and the tests: batches, sentences, the largest batch."""
        sentences, requests = self.largest_batch
        return {"alive": self.alive, "decoding": self.decoding, "queued": self.queued,
                "batches": self.batches, "batches_after_wait": self.batches_after_wait,
                "stopped_batches": self.stopped_batches, "sentences": self.sentences,
                "largest_batch": {"sentences": sentences, "requests": requests}}

    def submit(self, sources: Sequence[list[int]], options: DecodeOptions,
               on_done: Callable[[Job], None], timeout: float | None = None) -> Job:
        """Queue sentences (their ids, ``Translator.encode_source``'s); ``on_done(job)`` is
        called from the worker thread when all are decoded (``job.results``) or decoding failed
        (``job.error``), unless the job died first (``cancel``, or ``timeout`` seconds passed)."""
        job = Job(sources, options, on_done, timeout)
        if not job.sources:
            on_done(job)
            return job
        with self._lock:
            if self._stopping or self.error is not None:
                raise WorkerStopped("the server is shutting down" if self.error is None
                                    else f"the decoding worker stopped: {self.error}")
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
        """Drop the job's sentences that are still queued (a timed-out or abandoned request's);
        a batch being decoded stops at its next step if no live job is left in it."""
        with self._lock:
            job.cancelled = True
            self._drop(job)

    def _drop(self, job: Job) -> None:
        """Take the job's sentences out of the queue (holding the lock)."""
        self._pending = deque(item for item in self._pending if item[0] is not job)

    # -- the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                batch = self._take()
                if not batch:
                    return
                start = time.monotonic()
                self.decoding = True
                try:
                    self._decode(batch)
                finally:
                    self.decoding = False
                with self._lock:
                    self._free_since = time.monotonic()
                    self._last_took = self._free_since - start
                    self._expected = min(self.max_batch, len(self._pending) + len(batch))
        except BaseException as error:  # a fault of the worker itself: fail what waits, say so
            log.error("decoding worker %r stopped: %s", self.name, error, exc_info=error)
            with self._lock:
                self.error = error
                waiting = list(dict.fromkeys(job for job, _ in self._pending))
                self._pending.clear()
            for job in waiting:
                job.error = WorkerStopped(f"the decoding worker stopped: {error}")
                self._call(job)

    def _take(self) -> list[tuple[Job, int]]:
        """The next batch: waits for a first sentence, then for batch-mates (see the module's
        docstring) until the expected number wait with its options; empty when stopping with
        nothing queued. Dead jobs are dropped first."""
        with self._lock:
            while True:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                now = time.monotonic()
                if any(job.dead(now) for job, _ in self._pending):
                    self._pending = deque(item for item in self._pending if not item[0].dead(now))
                    continue
                if not self._pending:
                    return []
                oldest = self._pending[0][0]
                same = sum(1 for job, _ in self._pending if job.options == oldest.options)
                lull = max(self._last_arrival, self._free_since) + self.max_wait
                limit = (max(oldest.arrival, self._free_since)
                         + max(self.max_wait, self._last_took))
                left = min(lull, limit, min(job.deadline for job, _ in self._pending)) - now
                if same >= self._expected or self._stopping:
                    break
                if left <= 0:
                    self.batches_after_wait += 1
                    break
                self._lock.wait(left)
            batch: list[tuple[Job, int]] = []
            rest: deque[tuple[Job, int]] = deque()
            longest_source = longest_output = 0
            for item in self._pending:
                job, i = item
                fits = job.options == oldest.options and len(batch) < self.max_batch
                if fits and job.options.attention and batch:  # padded cells within the budget
                    source = max(longest_source, len(job.sources[i]))
                    output = max(longest_output, self._output_limit(job.sources[i]))
                    fits = (len(batch) + 1) * source * output <= self.max_attention_cells
                if fits:
                    batch.append(item)
                    longest_source = max(longest_source, len(job.sources[i]))
                    longest_output = max(longest_output, self._output_limit(job.sources[i]))
                else:
                    rest.append(item)
            self._pending = rest
            return batch

    def _output_limit(self, source: list[int]) -> int:
        """The most steps a sentence may decode (``search.max_output_lengths``, eos included)."""
        return math.ceil(len(source) * self.translator.config.decode.max_len_ratio) + 5

    def _decode(self, batch: list[tuple[Job, int]]) -> None:
        options = batch[0][0].options
        jobs = list(dict.fromkeys(job for job, _ in batch))

        stopped = False

        def should_stop() -> bool:  # checked by the search at each step
            nonlocal stopped
            now = time.monotonic()
            stopped = all(job.dead(now) for job in jobs)
            return stopped

        failure: Exception | None = None
        found: list[list[Hypothesis]] = []
        try:
            found = self.translator.decode_ids(
                [job.sources[i] for job, i in batch], beam=options.beam, n_best=options.n_best,
                batch_size=self.max_batch, return_attention=options.attention,
                should_stop=should_stop)
        except Exception as error:  # handed to each request, which reports it
            failure = error
        self.batches += 1
        self.sentences += len(batch)
        if len(jobs) > self.largest_batch[1]:
            self.largest_batch = (len(batch), len(jobs))
        finished: list[Job] = []
        with self._lock:  # against cancel(): a dead job is neither filled nor called
            now = time.monotonic()
            if all(job.dead(now) for job in jobs):  # stopped, or finished for nobody
                self.stopped_batches += stopped
                return
            for n, (job, i) in enumerate(batch):
                if job.dead(now):
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
            self._call(job)

    @staticmethod
    def _call(job: Job) -> None:
        try:
            job._on_done(job)
        except Exception:  # a callback's fault must not end the worker
            log.exception("decoding worker: a request's callback failed")
