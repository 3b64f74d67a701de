"""The decoding worker: batches across callers, keeps each result its own, bounds its queue."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
from conftest import LETTERS, reversal_pairs

from seq2seq.decoding.translator import Translator
from seq2seq.serving.worker import DecodeOptions, DecodingWorker, Job, QueueFull, WorkerStopped


def ids(worker: DecodingWorker, sentences: list[str]) -> list[list[int]]:
    return [worker.translator.encode_source(s) for s in sentences]


def submit_and_wait(worker: DecodingWorker, sentences: list[str], options: DecodeOptions) -> Job:
    done = threading.Event()
    job = worker.submit(ids(worker, sentences), options, lambda job: done.set())
    assert done.wait(60), "the worker did not finish the job"
    return job


def test_concurrent_callers_share_batches_and_get_their_own_results(translator):
    sources = [s for s, _ in reversal_pairs(40, random.Random(5))]
    requests = [sources[i:i + 1 + i % 3] for i in range(0, 40, 3)]  # 14 requests of 1-3 sentences
    worker = DecodingWorker(translator, max_batch=64, max_wait_ms=300).start()
    jobs: list[Job | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def call(n: int) -> None:
        start.wait()
        jobs[n] = submit_and_wait(worker, requests[n], DecodeOptions(beam=3))

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    worker.stop()
    assert worker.batches < len(requests)  # decoded together, not one call per request
    for sentences, job in zip(requests, jobs):
        alone = [translator.hypotheses([s], beam=3)[0][0] for s in sentences]
        assert job.error is None
        assert [h[0].tokens for h in job.results] == [h.tokens for h in alone]
        assert [h[0].score for h in job.results] == pytest.approx([h.score for h in alone], rel=1e-5, abs=0)


def test_different_options_are_decoded_apart(translator):
    worker = DecodingWorker(translator, max_wait_ms=200)  # not started: both jobs wait together
    greedy = worker.submit(ids(worker, ["a b c", "d e f g"]), DecodeOptions(beam=1), lambda job: None)
    beam = worker.submit(ids(worker, ["a b c"]), DecodeOptions(beam=3, n_best=2, attention=True),
                         lambda job: None)
    worker.start().stop()
    assert worker.batches == 2
    assert [h[0].tokens for h in greedy.results] == [h[0].tokens for h in translator.hypotheses(
        ["a b c", "d e f g"], beam=1)]
    assert len(beam.results[0]) == 2 and beam.results[0][0].attention is not None
    assert greedy.results[0][0].attention is None


def test_queue_is_bounded_and_cancel_frees_it(translator):
    worker = DecodingWorker(translator, max_queue=3)  # not started: nothing leaves the queue
    first = worker.submit(ids(worker, ["a b", "c d"]), DecodeOptions(beam=1), lambda job: None)
    with pytest.raises(QueueFull, match="limit of 3"):
        worker.submit(ids(worker, ["e f", "g h"]), DecodeOptions(beam=1), lambda job: None)
    worker.cancel(first)
    assert worker.queued == 0 and first.cancelled
    worker.submit(ids(worker, ["e f", "g h"]), DecodeOptions(beam=1), lambda job: None)
    assert worker.queued == 2


def test_stop_decodes_what_is_queued_then_refuses(translator):
    worker = DecodingWorker(translator, max_wait_ms=10_000)
    finished = []
    job = worker.submit(ids(worker, ["a b c"]), DecodeOptions(beam=1), finished.append)
    worker.start().stop(timeout=60)  # does not wait out max_wait_ms
    assert finished == [job] and job.results[0][0].tokens
    with pytest.raises(WorkerStopped):
        worker.submit(ids(worker, ["a"]), DecodeOptions(beam=1), finished.append)


def test_a_failed_batch_reports_to_its_callers_and_the_worker_goes_on(trained_model_dir, monkeypatch):
    translator = Translator.load(trained_model_dir, device="cpu")
    worker = DecodingWorker(translator).start()
    decode_ids = translator.decode_ids

    def failing(sources, **settings):
        if len(sources[0]) > 4:
            raise ValueError("this batch fails")
        return decode_ids(sources, **settings)

    monkeypatch.setattr(translator, "decode_ids", failing)
    failed = submit_and_wait(worker, ["a b c d e"], DecodeOptions(beam=1))
    assert isinstance(failed.error, ValueError) and "this batch fails" in str(failed.error)
    fine = submit_and_wait(worker, ["a b c"], DecodeOptions(beam=1))
    worker.stop()
    assert fine.error is None and fine.results[0][0].tokens == translator.hypotheses(["a b c"])[0][0].tokens


def test_a_job_cancelled_while_decoded_gets_no_results_and_no_call(translator, monkeypatch):
    worker = DecodingWorker(translator)
    called: list[Job] = []
    jobs: list[Job] = []
    decode_ids = translator.decode_ids

    def cancelling(sources, **settings):
        worker.cancel(jobs[0])  # its request timed out meanwhile
        return decode_ids(sources, **settings)

    monkeypatch.setattr(translator, "decode_ids", cancelling)
    jobs.append(worker.submit(ids(worker, ["a b c"]), DecodeOptions(beam=1), called.append))
    worker.start().stop(timeout=60)
    assert worker.batches == 1 and called == [] and jobs[0].results == [[]]


def test_the_worker_waits_for_the_clients_it_answered_and_no_longer(translator):
    """After a batch the worker expects the sentences queued then plus those it answered:
    it starts once that many wait (max_wait at most), so a lone client's next request goes
    at once, and two requests answered together are batched together again. Each first batch
    waits out a short max_wait; then max_wait is made a minute, so an answer within 30 s, and
    ``batches_after_wait`` unchanged, show that no wait ran out."""
    worker = DecodingWorker(translator, max_wait_ms=300).start()
    submit_and_wait(worker, ["a b c"], DecodeOptions(beam=1))  # before a first batch: max_wait
    assert worker.batches_after_wait == 1
    worker.max_wait = 60.0
    for sentence in ["d e", "f g h"]:  # one after another, each the only one expected
        done = threading.Event()
        worker.submit(ids(worker, [sentence]), DecodeOptions(beam=1), lambda job, done=done: done.set())
        assert done.wait(30), "a lone client's request waited for batch-mates"
    assert worker.batches == 3 and worker.batches_after_wait == 1
    worker.stop()

    worker = DecodingWorker(translator, max_wait_ms=300)  # two requests answered together
    pair = [threading.Event(), threading.Event()]
    for n in range(2):
        worker.submit(ids(worker, ["a b"]), DecodeOptions(beam=1), lambda job, n=n: pair[n].set())
    worker.start()
    assert pair[0].wait(60) and pair[1].wait(60) and worker.batches == 1
    worker.max_wait = 60.0
    again = [threading.Event(), threading.Event()]
    worker.submit(ids(worker, ["c d"]), DecodeOptions(beam=1), lambda job: again[0].set())
    assert not again[0].wait(0.3)  # it waits for the second (a minute at most), not decoded alone
    worker.submit(ids(worker, ["e f"]), DecodeOptions(beam=1), lambda job: again[1].set())
    assert again[0].wait(30) and again[1].wait(30)
    worker.stop()
    assert worker.batches == 2 and worker.batches_after_wait == 1
    assert worker.stats()["largest_batch"] == {"sentences": 2, "requests": 2}


def long_sentences(n: int, words: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(LETTERS) for _ in range(words)) for _ in range(n)]


def test_a_batch_whose_requests_timed_out_stops_and_frees_the_worker(translator):
    """A request that would keep the worker busy for minutes times out after 0.5 s: its batch
    stops (``should_stop``), it gets no call, and the next request is answered at once."""
    sources = long_sentences(1000, 100)
    options = DecodeOptions(beam=5)
    worker = DecodingWorker(translator, max_batch=1000, max_wait_ms=0).start()  # one batch
    sample = 4  # its cost, per sentence, from a part of it decoded alone
    start = time.monotonic()
    translator.decode_ids(ids(worker, sources[:sample]), beam=5)
    whole = (time.monotonic() - start) * len(sources) / sample

    called = threading.Event()
    hostile = worker.submit(ids(worker, sources), options, lambda job: called.set(), timeout=0.5)
    free = threading.Event()
    start = time.monotonic()
    while not worker.stats()["decoding"]:  # bounded: the worker takes it at once
        assert time.monotonic() - start < 30, "the worker never took the request"
        time.sleep(0.01)
    worker.submit(ids(worker, ["a b c"]), DecodeOptions(beam=1), lambda job: free.set())
    assert free.wait(whole / 4), f"the worker stayed busy (the request would take {whole:.0f} s)"
    busy = time.monotonic() - hostile.arrival
    worker.stop()
    assert not called.is_set() and hostile.results[0] == []
    assert worker.stopped_batches == 1
    print(f"busy {busy:.2f} s on a request of {whole:.0f} s with a 0.5 s timeout")


def test_a_hung_up_request_does_not_stop_a_batch_with_live_requests(translator, monkeypatch):
    worker = DecodingWorker(translator, max_wait_ms=60_000)  # not started: one batch of both
    sources = ids(worker, long_sentences(40, 60))
    gone = worker.submit(sources[:20], DecodeOptions(beam=3), lambda job: None)
    done = threading.Event()
    live = worker.submit(sources[20:], DecodeOptions(beam=3), lambda job: done.set())
    decode_ids = translator.decode_ids

    def cancelling(sources, **settings):  # the first request hangs up while the batch decodes
        worker.cancel(gone)
        return decode_ids(sources, **settings)

    monkeypatch.setattr(translator, "decode_ids", cancelling)
    worker.start().stop(timeout=120)
    assert done.is_set() and worker.batches == 1 and worker.stopped_batches == 0
    assert live.error is None and all(hyps for hyps in live.results) and gone.results[0] == []


def test_requests_past_their_deadline_are_dropped_unseen(translator):
    worker = DecodingWorker(translator, max_wait_ms=60_000)  # not started: both wait
    called = []
    dead = worker.submit(ids(worker, ["a b"]), DecodeOptions(beam=1), called.append, timeout=0.001)
    deadline = time.monotonic() + 5
    while time.monotonic() < dead.deadline:  # bounded: a millisecond
        assert time.monotonic() < deadline
    alive = worker.submit(ids(worker, ["c d"]), DecodeOptions(beam=1), called.append)
    worker.start().stop(timeout=60)
    assert called == [alive] and worker.sentences == 1


def test_an_attention_batch_is_cut_to_the_attention_budget(translator):
    steps = math.ceil(9 * translator.config.decode.max_len_ratio) + 5  # 8 tokens and eos: 9 ids
    worker = DecodingWorker(translator, max_batch=64, max_wait_ms=60_000,
                            max_attention_cells=2 * 9 * steps + 1)  # two sentences' padded cells
    jobs = [worker.submit(ids(worker, ["a b c d e f g h"]), DecodeOptions(beam=1, attention=True),
                          lambda job: None) for _ in range(6)]
    plain = worker.submit(ids(worker, ["a b c d e f g h"] * 6), DecodeOptions(beam=1), lambda job: None)
    worker.start().stop(timeout=60)
    assert worker.batches == 3 + 1 and worker.sentences == 12
    assert all(job.results[0][0].attention is not None for job in jobs) and plain.results[5]


def test_bad_settings_are_refused_and_a_dead_worker_says_so(translator, monkeypatch):
    for wait in (float("inf"), float("nan"), -1, 10**9):
        with pytest.raises(ValueError, match="max_wait_ms"):
            DecodingWorker(translator, max_wait_ms=wait)
    worker = DecodingWorker(translator, max_wait_ms=60_000)
    failed = threading.Event()
    waiting = worker.submit(ids(worker, ["a b"]), DecodeOptions(beam=1), lambda job: failed.set())

    def broken(*args, **kwargs):  # a fault of the worker itself, not of one batch
        raise MemoryError("the worker's own fault")

    monkeypatch.setattr(worker, "_take", broken)
    worker.start()
    assert failed.wait(30) and isinstance(waiting.error, WorkerStopped)
    assert not worker.alive and "the worker's own fault" in str(worker.error)
    with pytest.raises(WorkerStopped, match="the worker's own fault"):
        worker.submit(ids(worker, ["a"]), DecodeOptions(beam=1), lambda job: None)
