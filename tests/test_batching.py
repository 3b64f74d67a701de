"""The decoding worker: batches across callers, keeps each result its own, bounds its queue."""

from __future__ import annotations

import random
import threading
import time

import pytest
from conftest import reversal_pairs

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
        assert [h[0].score for h in job.results] == pytest.approx([h.score for h in alone], abs=1e-4)


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
    at once, and two requests answered together are batched together again."""
    worker = DecodingWorker(translator, max_wait_ms=2_000).start()
    submit_and_wait(worker, ["a b c"], DecodeOptions(beam=1))  # before a first batch: max_wait
    start = time.monotonic()
    for sentence in ["d e", "f g h"]:  # one after another, each the only one expected
        submit_and_wait(worker, [sentence], DecodeOptions(beam=1))
    assert time.monotonic() - start < 2 and worker.batches == 3  # neither waited out max_wait
    worker.stop()

    worker = DecodingWorker(translator, max_wait_ms=3_000)  # two requests answered together
    pair = [threading.Event(), threading.Event()]
    for n in range(2):
        worker.submit(ids(worker, ["a b"]), DecodeOptions(beam=1), lambda job, n=n: pair[n].set())
    worker.start()
    assert pair[0].wait(60) and pair[1].wait(60) and worker.batches == 1
    again = [threading.Event(), threading.Event()]
    worker.submit(ids(worker, ["c d"]), DecodeOptions(beam=1), lambda job: again[0].set())
    time.sleep(0.2)  # the first of the two waits for the second
    worker.submit(ids(worker, ["e f"]), DecodeOptions(beam=1), lambda job: again[1].set())
    assert again[0].wait(60) and again[1].wait(60)
    worker.stop()
    assert worker.batches == 2
