"""Load on ``seq2seq serve``: concurrent one-sentence clients over loopback, greedy decoding.

    python benchmarks/serve_load.py --model-dir runs/multi30k_en_de

It starts ``seq2seq serve`` on 127.0.0.1 with the Multi30k model and sends test_2016_flickr
sentences, one a request, from 1, 8 and 32 concurrent clients (each with its own keep-alive
connection). Without that model (or the corpus) it trains the dates demo for a few seconds and
sends its test sentences instead: the figures then say that the server works, not how fast.

For each number of clients it prints sentences/s, p50/p95/p99 latency and errors, and the ratio
of the served sentences/s to ``Translator.translate`` of the same sentences in one batched call
in this process (the offline bound). Two baselines: serving one sentence at a time (a server
started with ``--batch-size 1``, as OpenNMT-py's server decodes behind a lock) under 32 clients,
and translating the sentences one by one offline. A soak run of ``--soak`` requests from 32
clients samples the server's resident memory (RSS) over time.

Loops are bounded in count (``--requests`` per run) and time (``--seconds`` per run).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import DATA_DIR, ROOT, record

CLIENTS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``seq2seq serve`` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, model_dir: Path, *flags: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "seq2seq", "serve", "--model-dir", str(model_dir),
             "--port", str(self.port), "--beam", "1", "--log-level", "warning", "--max-queue", "100000",
             *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"seq2seq serve exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("seq2seq serve did not become ready within 180 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def load(port: int, sentences: list[str], clients: int, requests: int, seconds: float,
         on_progress=None) -> dict:
    """``clients`` threads, each sending one sentence a request on its own connection, until
    ``requests`` are done or ``seconds`` have passed."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    taken = [0]
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                n = taken[0]
                if n >= requests:
                    return
                taken[0] += 1
            body = json.dumps({"text": [sentences[n % len(sentences)]]})
            start = time.perf_counter()
            try:
                connection.request("POST", "/v1/translate", body=body,
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1
                done = len(latencies) + errors[0]
            if on_progress is not None:
                on_progress(done)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies.sort()

    def percentile(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else 0

    return {"clients": clients, "sentences_per_s": len(latencies) / wall, "requests": len(latencies),
            "errors": errors[0], "p50_ms": percentile(50), "p95_ms": percentile(95), "p99_ms": percentile(99)}


def small_model(seconds: float) -> tuple[Path, list[str], str]:
    """The fallback: the dates demo trained for ``seconds`` in a temporary folder (in its own
    process, which sets its own torch threads)."""
    from seq2seq.tasks import make_task

    out = Path(tempfile.mkdtemp(prefix="serve_load_")) / "demo"
    subprocess.run([sys.executable, "-m", "seq2seq", "demo", "--task", "dates", "--max-seconds",
                    str(seconds), "--output-dir", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sentences = [src for src, _ in make_task("dates", n_train=0, n_test=1000, seed=5).test]
    return out / "model", sentences, f"the dates demo trained {seconds:g} s (no Multi30k model)"


def offline(model_dir: Path, sentences: list[str], single: int, threads: int) -> tuple[float, float]:
    """Sentences/s of ``Translator.translate`` with ``threads`` torch threads, as the server
    has: all in one batched call, and one at a time (on the first ``single`` sentences)."""
    import torch

    from seq2seq.translator import Translator

    torch.set_num_threads(threads)
    translator = Translator.load(model_dir)
    translator.translate(sentences[:50], beam=1)  # warm-up
    start = time.perf_counter()
    translator.translate(sentences, beam=1)
    batched = len(sentences) / (time.perf_counter() - start)
    start = time.perf_counter()
    for sentence in sentences[:single]:
        translator.translate([sentence], beam=1)
    one_by_one = single / (time.perf_counter() - start)
    return batched, one_by_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "runs/multi30k_en_de")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run at most")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per run at most")
    parser.add_argument("--soak", type=int, default=20_000, help="requests of the memory run (0: none)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--train-seconds", type=float, default=20, help="the fallback model's training")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the server and of the offline translation (default: cores)")
    args = parser.parse_args()

    if (args.model_dir / "config.yaml").is_file():
        from seq2seq.config import Config
        from seq2seq.data import read_lines

        model_dir = args.model_dir
        src_lang = Config.load(model_dir / "config.yaml").data.src_lang
        sentences = read_lines(DATA_DIR / f"test_2016_flickr.{src_lang}.gz")
        what = f"{model_dir} on test_2016_flickr.{src_lang}"
    else:
        model_dir, sentences, what = small_model(args.train_seconds)
    print(f"model: {what}; {len(sentences)} sentences", flush=True)

    batched, one_by_one = offline(model_dir, sentences, min(300, len(sentences)), args.threads)
    print(f"offline: {batched:.0f} sentences/s in one batched call, {one_by_one:.0f} one at a time",
          flush=True)
    rows = [("model", what), ("torch threads (server and offline)", str(args.threads)),
            ("offline batched translate: sentences/s", f"{batched:.0f}"),
            ("offline one sentence a call: sentences/s", f"{one_by_one:.0f}")]

    server = Server(model_dir, "--threads", str(args.threads), "--max-wait-ms", str(args.max_wait_ms))
    try:
        load(server.port, sentences, 8, 200, args.seconds)  # warm-up
        runs = {}
        for clients in CLIENTS:
            runs[clients] = result = load(server.port, sentences, clients, args.requests, args.seconds)
            print(json.dumps(result), flush=True)
            rows.append((f"{clients} client(s): sentences/s", f"{result['sentences_per_s']:.0f} "
                         f"({result['sentences_per_s'] / batched:.0%} of offline batched)"))
            rows.append((f"{clients} client(s): latency p50 / p95 / p99",
                         f"{result['p50_ms']:.1f} / {result['p95_ms']:.1f} / {result['p99_ms']:.1f} ms"))
            rows.append((f"{clients} client(s): errors", f"{result['errors']} of "
                         f"{result['requests'] + result['errors']}"))
        rows.append(("8 clients' p99 against 2 x 1 client's p50 (p99) + the batching wait",
                     f"{runs[8]['p99_ms']:.1f} ms against {2 * runs[1]['p50_ms'] + args.max_wait_ms:.1f} "
                     f"({2 * runs[1]['p99_ms'] + args.max_wait_ms:.1f}) ms"))
        if args.soak:
            samples: list[tuple[int, float]] = []
            marks = sorted({1000, args.soak // 4, args.soak // 2, 3 * args.soak // 4, args.soak})

            def progress(done: int) -> None:
                if marks and done >= marks[0]:
                    samples.append((marks.pop(0), rss_mib(server.process.pid)))

            soak = load(server.port, sentences, 32, args.soak, 10 * args.seconds, on_progress=progress)
            rss = ", ".join(f"{n:,}: {mib:.0f} MiB" for n, mib in samples)
            print(f"soak: {json.dumps(soak)}; RSS after {rss}", flush=True)
            rows.append(("server RSS after N requests (32 clients)", rss))
            after_1000 = [mib for n, mib in samples if n == 1000]
            if after_1000 and samples[-1][0] > 1000:
                rows.append((f"RSS growth from 1,000 requests to {samples[-1][0]:,}",
                             f"{samples[-1][1] / after_1000[0] - 1:+.1%} ({soak['errors']} errors)"))
    finally:
        server.stop()

    baseline = Server(model_dir, "--threads", str(args.threads), "--batch-size", "1", "--max-wait-ms", "0")
    try:
        one = load(baseline.port, sentences, 32, min(args.requests, 1000), args.seconds)
    finally:
        baseline.stop()
    print(f"one sentence at a time (--batch-size 1), 32 clients: {json.dumps(one)}", flush=True)
    gain = runs[32]["sentences_per_s"] / max(one["sentences_per_s"], 1e-9)
    rows.append(("baseline: served one sentence at a time, 32 clients: sentences/s",
                 f"{one['sentences_per_s']:.0f} ({one['sentences_per_s'] / batched:.0%} of offline batched; "
                 f"batching across requests gives {gain:.1f}x)"))
    record("Serving under load: seq2seq serve, greedy, one-sentence requests", rows)


if __name__ == "__main__":
    main()
