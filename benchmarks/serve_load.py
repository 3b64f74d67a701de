"""Load on ``seq2seq serve``: concurrent one-sentence clients over loopback, greedy decoding.

    python benchmarks/serve_load.py --model-dir runs/multi30k_en_de

It starts ``seq2seq serve`` on 127.0.0.1 with the Multi30k model and sends test_2016_flickr
sentences, one a request, from 1, 8 and 32 concurrent clients, each with its own keep-alive
connection. By default all clients run in one asyncio thread, which leaves more of the
machine's cores to the server than a thread per client (``--client threads``) would. Without
that model (or the corpus) it trains the dates demo for a few seconds and sends its test
sentences instead: the figures then say that the server works, not how fast.

For each number of clients it prints sentences/s, p50/p95/p99 latency and errors, and the ratio
of the served sentences/s to ``Translator.translate`` of the same sentences in one batched call
in this process (the offline bound). It also times ``translate`` in calls of 32 sentences in
the test set's order, which is what 32 one-sentence clients let the server batch. Two
baselines: serving one sentence at a time (a server started with ``--batch-size 1``, as
OpenNMT-py's server decodes behind a lock) under 32 clients, and translating the sentences one
by one offline. A soak run of ``--soak`` requests from 32 clients samples the server's resident
memory (RSS) over time.

Loops are bounded in count (``--requests`` per run) and time (``--seconds`` per run).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import DATA_DIR, ROOT, print_header, record

CLIENTS = (1, 8, 32)
CLIENT_KINDS = {
    "asyncio": "HTTP/1.1 over loopback, one keep-alive connection a client, all clients in one "
               "asyncio thread of the benchmark process (uvloop where installed)",
    "threads": "http.client over loopback, one keep-alive connection and one thread a client"}


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


REQUEST = ("POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           "Content-Length: {}\r\n\r\n")


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> int:
    """One POST /v1/translate on a keep-alive HTTP/1.1 connection: the response's status, once
    its whole body (``Content-Length`` bytes) has been read."""
    writer.write(REQUEST.format(len(body)).encode() + body)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = None
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length is None:
        raise ValueError(f"a response without Content-Length: {head[0]}")
    await reader.readexactly(length)
    return int(head[0].split(" ", 2)[1])


def load(port: int, sentences: list[str], clients: int, requests: int, seconds: float,
         on_progress: Callable[[int], None] | None = None, client: str = "asyncio") -> dict:
    """``clients`` concurrent clients, each sending one sentence a request on its own keep-alive
    connection and the next when the answer is in, until ``requests`` are done or ``seconds``
    have passed. ``client``: 'asyncio' (HTTP/1.1 over asyncio streams, all clients in one
    thread: the cheapest on the server's cores) or 'threads' (``http.client``, a thread each)."""
    bodies = [json.dumps({"text": [sentence]}).encode() for sentence in sentences]
    run = _load_asyncio if client == "asyncio" else _load_threads
    start = time.perf_counter()
    latencies, errors = run(port, bodies, clients, requests, time.monotonic() + seconds,
                            on_progress or (lambda done: None))
    wall = time.perf_counter() - start
    latencies.sort()

    def percentile(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else 0

    return {"clients": clients, "sentences_per_s": len(latencies) / wall, "requests": len(latencies),
            "errors": errors, "p50_ms": percentile(50), "p95_ms": percentile(95), "p99_ms": percentile(99)}


def _load_asyncio(port: int, bodies: list[bytes], clients: int, requests: int, deadline: float,
                  on_progress: Callable[[int], None]) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    taken = 0

    async def client() -> None:
        nonlocal errors, taken
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline and taken < requests:
                body = bodies[taken % len(bodies)]
                taken += 1
                start = time.perf_counter()
                try:
                    ok = await exchange(reader, writer, body) == 200
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    ok = False
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
                on_progress(len(latencies) + errors)
        finally:
            writer.close()

    async def main() -> None:
        await asyncio.gather(*(client() for _ in range(clients)))

    try:
        import uvloop  # the serve extra's; the plain loop otherwise
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return latencies, errors


def _load_threads(port: int, bodies: list[bytes], clients: int, requests: int, deadline: float,
                  on_progress: Callable[[int], None]) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    taken = [0]

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < deadline:
            with lock:
                n = taken[0]
                if n >= requests:
                    return
                taken[0] += 1
            start = time.perf_counter()
            try:
                connection.request("POST", "/v1/translate", body=bodies[n % len(bodies)],
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
            on_progress(done)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0]


def small_model(seconds: float) -> tuple[Path, list[str], str]:
    """The fallback: the dates demo trained for ``seconds`` in a temporary folder (in its own
    process, which sets its own torch threads)."""
    from seq2seq.data.tasks import make_task

    out = Path(tempfile.mkdtemp(prefix="serve_load_")) / "demo"
    subprocess.run([sys.executable, "-m", "seq2seq", "demo", "--task", "dates", "--max-seconds",
                    str(seconds), "--output-dir", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sentences = [src for src, _ in make_task("dates", n_train=0, n_test=1000, seed=5).test]
    return out / "model", sentences, f"the dates demo trained {seconds:g} s (no Multi30k model)"


def offline(model_dir: Path, sentences: list[str], single: int, threads: int,
            clients: int) -> dict[str, float]:
    """Sentences/s of ``Translator.translate`` with ``threads`` torch threads, as the server
    has: all in one batched call (the bound the served figures are compared with); in calls of
    ``clients`` sentences in the test set's order (the batches that many one-sentence clients
    give the server), and in batches of that size sorted by length (one call); and one at a
    time (on the first ``single`` sentences)."""
    import torch

    from seq2seq.decoding.translator import Translator

    torch.set_num_threads(threads)
    translator = Translator.load(model_dir)
    translator.translate(sentences[:50], beam=1)  # warm-up

    def rate(work: Callable[[], object], count: int) -> float:
        start = time.perf_counter()
        work()
        return count / (time.perf_counter() - start)

    chunks = [sentences[i:i + clients] for i in range(0, len(sentences), clients)]
    return {"batched": rate(lambda: translator.translate(sentences, beam=1), len(sentences)),
            "in_order": rate(lambda: [translator.translate(chunk, beam=1) for chunk in chunks],
                             len(sentences)),
            "sorted": rate(lambda: translator.translate(sentences, beam=1, batch_size=clients),
                           len(sentences)),
            "one_by_one": rate(lambda: [translator.translate([s], beam=1) for s in sentences[:single]],
                               single)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "runs/multi30k_en_de")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run at most")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per run at most")
    parser.add_argument("--soak", type=int, default=20_000, help="requests of the memory run (0: none)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--train-seconds", type=float, default=20, help="the fallback model's training")
    parser.add_argument("--client", choices=sorted(CLIENT_KINDS), default="asyncio",
                        help="how the clients run (see load)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the server and of the offline translation (default: cores)")
    args = parser.parse_args()
    print_header()

    if (args.model_dir / "config.yaml").is_file():
        from seq2seq.config import Config
        from seq2seq.data.text import read_lines

        model_dir = args.model_dir
        src_lang = Config.load(model_dir / "config.yaml").data.src_lang
        sentences = read_lines(DATA_DIR / f"test_2016_flickr.{src_lang}.gz")
        what = f"{model_dir} on test_2016_flickr.{src_lang}"
    else:
        model_dir, sentences, what = small_model(args.train_seconds)
    print(f"model: {what}; {len(sentences)} sentences", flush=True)

    many = max(CLIENTS)
    bound = offline(model_dir, sentences, min(300, len(sentences)), args.threads, many)
    batched = bound["batched"]
    print(f"offline sentences/s: {json.dumps(bound)}", flush=True)
    rows = [("model", what), ("torch threads (server and offline)", str(args.threads)),
            ("clients", CLIENT_KINDS[args.client]),
            ("offline batched translate: sentences/s", f"{batched:.0f}"),
            (f"offline, calls of {many} sentences in the test set's order (the batches {many} "
             f"one-sentence clients give the server): sentences/s",
             f"{bound['in_order']:.0f} ({bound['in_order'] / batched:.0%} of one batched call)"),
            (f"offline, batches of {many} sorted by length (one call): sentences/s",
             f"{bound['sorted']:.0f} ({bound['sorted'] / batched:.0%} of one batched call)"),
            ("offline one sentence a call: sentences/s", f"{bound['one_by_one']:.0f}")]

    server = Server(model_dir, "--threads", str(args.threads), "--max-wait-ms", str(args.max_wait_ms))
    try:
        load(server.port, sentences, 8, 200, args.seconds, client=args.client)  # warm-up
        runs = {}
        for clients in CLIENTS:
            runs[clients] = result = load(server.port, sentences, clients, args.requests, args.seconds,
                                          client=args.client)
            print(json.dumps(result), flush=True)
            served = result["sentences_per_s"]
            against = (f"; {served / bound['in_order']:.0%} of offline calls of {many} in order"
                       if clients == many else "")
            rows.append((f"{clients} client(s): sentences/s",
                         f"{served:.0f} ({served / batched:.0%} of offline batched{against})"))
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

            soak = load(server.port, sentences, 32, args.soak, 10 * args.seconds, on_progress=progress,
                        client=args.client)
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
        one = load(baseline.port, sentences, 32, min(args.requests, 1000), args.seconds, client=args.client)
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
