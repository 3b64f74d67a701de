"""``seq2seq serve``: the REST API through FastAPI's test client, then a real server process.

The API tests serve the session's tiny reversal model; the end-to-end tests start
``seq2seq serve`` on 127.0.0.1 and a free port with a model the demo trains in seconds, talk to
it over a socket (bad input included), and stop it with SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import free_port, reversal_pairs, serving
from fastapi.testclient import TestClient

from seq2seq.cli import main
from seq2seq.config import Config
from seq2seq.data.tasks import make_task
from seq2seq.data.tokenizers import PAD_ID
from seq2seq.decoding.translator import Translator
from seq2seq.models.rnn.model import Seq2Seq
from seq2seq.serving.app import create_app
from seq2seq.serving.settings import ServeConfig

KEY = "s3cret-key"


def wait_ready(client: TestClient) -> None:
    for _ in range(600):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the models did not load")


@pytest.fixture
def make_client(translator) -> Iterator:
    """make_client(**ServeConfig fields, api_key=None) -> a ready TestClient serving 'rev'."""
    clients = []

    def make(api_key: str | None = None, loaders: dict | None = None, **settings) -> TestClient:
        app = create_app(loaders or {"rev": lambda: translator}, ServeConfig(**settings), api_key=api_key)
        client = TestClient(app, raise_server_exceptions=False).__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def error_of(response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert "Traceback" not in response.text
    return response.status_code, body["error"]["code"], body["error"]["message"]


# -- the API ----------------------------------------------------------------------------------
def test_health_is_503_until_the_models_are_loaded(translator):
    loaded = threading.Event()

    def slow_loader():
        loaded.wait(60)
        return translator

    with TestClient(create_app({"rev": slow_loader})) as client:
        status, code, message = error_of(client.get("/health"))
        assert (status, code) == (503, "loading") and "loading" in message
        assert error_of(client.post("/v1/translate", json={"text": "a b"}))[:2] == (503, "loading")
        loaded.set()
        wait_ready(client)
        assert client.get("/health").json() == {"status": "ok", "models": ["rev"]}


def test_models_lists_languages_architecture_and_defaults(make_client, translator):
    body = make_client(max_chars=50).get("/v1/models").json()
    (model,) = body["models"]
    assert model["name"] == "rev" and model["cell"] == "gru" and model["attention"] == "bahdanau"
    assert model["source_language"] == "src" and model["target_language"] == "tgt"
    assert model["parameters"] == translator.model.num_parameters()
    assert model["decode"]["beam"] == 3 and model["decode"]["precision"] == "fp32"
    assert body["limits"]["max_chars"] == 50


def test_translate_returns_results_in_order_as_the_translator_does(make_client, translator):
    sources = [s for s, _ in reversal_pairs(6, random.Random(1))] + [""]
    response = make_client().post("/v1/translate", json={"text": sources, "return_tokens": True,
                                                          "return_attention": True, "n_best": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "rev" and body["seconds"] > 0
    expected = translator.translate(sources, n_best=2)
    results = body["results"]
    assert [[h["translation"] for h in r["n_best"]] for r in results] == expected
    assert [r["translation"] for r in results] == [e[0] for e in expected]
    for source, result in zip(sources, results):
        assert result["source_tokens"] == source.split() + ["</s>"]
        assert result["target_tokens"] == result["translation"].split() + ["</s>"]
        weights = result["attention"]  # one row per target token, one column per source token
        assert len(weights) == len(result["target_tokens"])
        assert all(len(row) == len(result["source_tokens"]) for row in weights)
        assert all(sum(row) == pytest.approx(1, abs=1e-3) for row in weights)
        assert result["score"] == result["n_best"][0]["score"] <= 0


def test_a_string_is_one_sentence_a_line_and_options_default_to_the_model(make_client, translator):
    client = make_client()
    response = client.post("/v1/translate", json={"text": "a b c\r\nd e\u2028f g\n"})
    results = response.json()["results"]
    assert [r["translation"] for r in results] == translator.translate(["a b c", "d e\u2028f g"])
    assert set(results[0]) == {"translation", "score"}  # no tokens, attention or n-best unasked
    empty = client.post("/v1/translate", json={"text": ""}).json()["results"]
    assert [r["translation"] for r in empty] == [""]


def test_models_are_chosen_by_name_and_attention_needs_a_model_with_it(make_client, translator):
    config = Config.from_dict(translator.config.to_dict())
    config.model.attention = None
    model = Seq2Seq(config.model, src_vocab=len(translator.src_tok), tgt_vocab=len(translator.tgt_tok),
                    pad_id=PAD_ID)  # untrained: what it says does not matter here
    plain = Translator(model, translator.src_tok, translator.tgt_tok, config)
    client = make_client(loaders={"rev": lambda: translator, "plain": lambda: plain})
    assert [m["attention"] for m in client.get("/v1/models").json()["models"]] == ["bahdanau", None]
    default = client.post("/v1/translate", json={"text": "a b", "return_attention": True})
    assert default.json()["model"] == "rev"  # the first is the default
    response = client.post("/v1/translate", json={"model": "plain", "text": "a b", "return_attention": True})
    status, code, message = error_of(response)
    assert (status, code) == (400, "invalid_request") and "model 'plain' has no attention" in message
    answer = client.post("/v1/translate", json={"model": "plain", "text": "a b", "return_tokens": True})
    assert answer.status_code == 200 and answer.json()["model"] == "plain"


def test_the_openapi_documentation_is_served(make_client):
    client = make_client()
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/v1/models", "/v1/translate", "/translator/translate"} <= set(paths)


def test_a_sentence_does_not_depend_on_its_batch_mates(make_client, translator):
    """Served alone, among 16 concurrent requests (one batch), and through Translator.translate."""
    client = make_client(max_wait_ms=300)
    sources = [s for s, _ in reversal_pairs(16, random.Random(2))]
    alone = [client.post("/v1/translate", json={"text": [s], "beam": 1}).json()["results"][0]
             for s in sources]
    worker = client.app.state.models.served["rev"].worker
    batches_before = worker.batches
    together: list[dict | None] = [None] * len(sources)
    start = threading.Barrier(len(sources))

    def call(n: int) -> None:
        start.wait()
        together[n] = client.post("/v1/translate", json={"text": sources[n], "beam": 1}).json()["results"][0]

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(sources))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert worker.batches - batches_before < len(sources)  # batched across requests
    offline = translator.translate(sources, beam=1)
    assert [r["translation"] for r in alone] == [r["translation"] for r in together] == offline
    # scores agree to float32 rounding: a GEMM's row sums in another order at another batch size
    assert [r["score"] for r in together] == pytest.approx([r["score"] for r in alone], abs=1e-3)


def test_opennmt_py_clients_get_their_shape(make_client, translator):
    client = make_client(loaders={"100": lambda: translator})
    response = client.post("/translator/translate",
                           json=[{"src": "a b c", "id": 100}, {"src": "h g", "id": 100}])
    assert response.status_code == 200
    assert response.json() == [[
        {"src": "a b c", "tgt": translator.translate(["a b c"])[0], "n_best": 1, "pred_score": pytest.approx(
            translator.hypotheses(["a b c"])[0][0].score, abs=1e-3)},
        {"src": "h g", "tgt": translator.translate(["h g"])[0], "n_best": 1, "pred_score": pytest.approx(
            translator.hypotheses(["h g"])[0][0].score, abs=1e-3)}]]
    unknown = client.post("/translator/translate", json=[{"src": "a", "id": 7}])
    assert error_of(unknown)[:2] == (404, "unknown_model")
    assert error_of(client.post("/translator/translate", json=[]))[0] == 400


def test_the_page_is_served_self_contained(make_client):
    response = make_client().get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'id="heatmap"' in page and "v1/translate" in page
    assert "http://" not in page and "https://" not in page  # no CDN, fonts or scripts from elsewhere


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("body, status, code, names", [
    (b'{"text": ', 400, "invalid_request", "malformed JSON"),
    (b'{"text": 5}', 400, "invalid_request", "text: Input should be a valid string or a valid list"),
    (b'{"text": ["a", 5]}', 400, "invalid_request", "text[1]"),
    (b'{"text": "a", "beam": "3"}', 400, "invalid_request", "beam"),
    (b'{"text": "a", "nbest": 2}', 400, "invalid_request", "nbest: Extra inputs"),
    (b'{"text": []}', 400, "invalid_request", "text: an empty list"),
    (b'[1, 2]', 400, "invalid_request", "body"),
    (b'{"text": ["a", "b\\u0000c"]}', 400, "invalid_text", "text[1]: contains a NUL character"),
    (b'{"text": "a b\\ud800"}', 400, "invalid_text", "text line 1: a lone surrogate"),
    (b'{"text": ["\\udc80"]}', 400, "invalid_text", "text[0]: a lone surrogate"),
    (b'{"text": "a", "beam": 0}', 400, "invalid_request", "beam: must be >= 1"),
    (b'{"text": "a", "beam": 2, "n_best": 3}', 400, "invalid_request",
     "n_best: must be between 1 and beam (2)"),
    (b'{"text": "a", "model": "other"}', 404, "unknown_model", "model: no model named 'other'; served: rev"),
    (b'{"text": "a", "beam": 11}', 413, "over_limit", "beam: 11 is more than the limit of 10 (--max-beam)"),
    (json.dumps({"text": ["a"] * 10_000}).encode(), 413, "over_limit",
     "text: 10000 sentences, more than the limit of 100 per request (--max-sentences)"),
    (json.dumps({"text": ["a b"] * 50 + ["a " * 600]}).encode(), 413, "over_limit",
     "text[50]: 1200 characters, more than the limit of 1000 (--max-chars)"),
])
def test_bad_requests_get_a_json_error_naming_the_field_or_limit(make_client, body, status, code, names):
    client = make_client()
    got_status, got_code, message = error_of(client.post("/v1/translate", content=body, headers=JSON))
    assert (got_status, got_code) == (status, code) and names in message, message
    assert client.post("/v1/translate", json={"text": "a b"}).status_code == 200  # still answers


def test_body_size_and_type_are_checked_before_the_body_is_read(make_client):
    client = make_client(max_body_bytes=1000)
    big = b'{"text": "' + b"a " * 10_000_000 + b'"}'  # 20 MB
    assert error_of(client.post("/v1/translate", content=big, headers=JSON))[:2] == (413, "over_limit")

    def chunks():  # no Content-Length: counted while it arrives
        yield b'{"text": "'
        for _ in range(2000):
            yield b"a " * 5000
        yield b'"}'

    status, code, message = error_of(client.post("/v1/translate", content=chunks(), headers=JSON))
    assert (status, code) == (413, "over_limit") and "--max-body-bytes" in message
    for headers, shown in (({"content-type": "text/plain"}, "text/plain"), ({}, "missing"),
                           ({"content-type": "application/x-www-form-urlencoded"}, "x-www-form")):
        response = client.post("/v1/translate", content=b'{"text": "a"}', headers=headers)
        status, code, message = error_of(response)
        assert (status, code) == (400, "invalid_content_type") and shown in message
    assert client.post("/v1/translate", json={"text": "a b"}).status_code == 200


def test_unknown_paths_and_methods_get_json_errors(make_client):
    client = make_client()
    assert error_of(client.get("/v2/nothing"))[:2] == (404, "not_found")
    assert error_of(client.get("/v1/translate"))[:2] == (405, "method_not_allowed")


def test_api_key_is_required_except_for_health_and_the_page(make_client):
    client = make_client(api_key=KEY)
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/translate"),
                             ("POST", "/translator/translate")):
            response = client.request(method, path, json={"text": "a"}, headers=headers)
            assert error_of(response)[:2] == (401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
    ok = client.post("/v1/translate", json={"text": "a b"}, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_a_full_queue_is_503_at_once(make_client):
    client = make_client(max_queue=2, max_sentences=2, max_wait_ms=1500)
    worker = client.app.state.models.served["rev"].worker
    first: list = []
    waiting = threading.Thread(
        target=lambda: first.append(client.post("/v1/translate", json={"text": ["a b", "c d"]})))
    waiting.start()
    for _ in range(200):  # until its two sentences wait in the queue (for 1.5 s)
        if worker.queued == 2:
            break
        time.sleep(0.01)
    response = client.post("/v1/translate", json={"text": "e f"})
    status, code, message = error_of(response)
    assert (status, code) == (503, "queue_full") and "--max-queue" in message
    assert response.headers["retry-after"] == "1"
    waiting.join(30)
    assert first[0].status_code == 200  # the queued request is unharmed


def test_a_request_that_waits_too_long_is_504_and_leaves_the_queue(make_client):
    client = make_client(timeout=0.3, max_wait_ms=3000)
    status, code, message = error_of(client.post("/v1/translate", json={"text": "a b"}))
    assert (status, code) == (504, "timeout") and "0.3 s (--timeout)" in message
    assert client.app.state.models.served["rev"].worker.queued == 0


def test_a_decoding_fault_is_a_500_without_internals(make_client, trained_model_dir):
    broken = Translator.load(trained_model_dir, device="cpu")

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access at /secret/path.py:12")

    broken.decode_ids = fail
    response = make_client(loaders={"rev": lambda: broken}).post("/v1/translate", json={"text": "a b"})
    status, code, message = error_of(response)
    assert (status, code) == (500, "internal") and "secret" not in response.text


def test_limits_are_checked_when_the_server_is_made(translator):
    with pytest.raises(ValueError, match=r"--max-queue \(10\) must be >= --max-sentences \(100\)"):
        create_app({"rev": lambda: translator}, ServeConfig(max_queue=10))
    with pytest.raises(ValueError, match="--timeout must be > 0"):
        create_app({"rev": lambda: translator}, ServeConfig(timeout=0))


# -- a real server ----------------------------------------------------------------------------
def request(port: int, method: str, path: str, body: object = None, headers: dict | None = None,
            raw: bytes | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data,
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def raw_exchange(port: int, data: bytes, close_early: bool = False) -> bytes:
    """Send raw bytes; read the answer to the end (or hang up at once if ``close_early``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if close_early:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_real_server_batches_concurrent_requests_like_translate(demo_model_dir):
    translator = Translator.load(demo_model_dir, device="cpu")
    sources = [s for s, _ in make_task("reversal", n_train=0, n_test=24, seed=9).test]
    with serving("--model-dir", demo_model_dir, "--max-wait-ms", "50") as (process, port):
        results: list = [None] * len(sources)

        def call(n: int) -> None:
            results[n] = request(port, "POST", "/v1/translate", {"text": sources[n], "return_attention": True,
                                                                 "return_tokens": True})

        threads = [threading.Thread(target=call, args=(n,)) for n in range(len(sources))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [status for status, _ in results] == [200] * len(sources)
        assert [body["results"][0]["translation"] for _, body in results] == translator.translate(sources)
        status, models = request(port, "GET", "/v1/models")
        assert status == 200 and models["models"][0]["name"] == "model"  # the folder's name


def test_a_real_server_survives_bad_clients(demo_model_dir):
    with serving("--model-dir", demo_model_dir, "--max-sentences", "100") as (process, port):
        # a client that hangs up halfway through its body, and one that hangs up before the answer
        raw_exchange(port, b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"text\": [\"ab", close_early=True)
        raw_exchange(port, b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 20\r\n\r\n{\"text\": \"abcdefgh\"}", close_early=True)
        # 10,000 sentences; 20 MB announced (refused before a byte of it is read)
        assert request(port, "POST", "/v1/translate", {"text": ["abc"] * 10_000})[0] == 413
        answer = raw_exchange(port, b"POST /v1/translate HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413") and b'"over_limit"' in answer
        # NUL and lone surrogates as JSON escapes, and raw bytes that are not UTF-8
        for raw in (b'{"text": "ab\\u0000c"}', b'{"text": "ab\\ud800"}', b'{"text": "ab\xff"}'):
            status, body = request(port, "POST", "/v1/translate", raw=raw)
            assert status == 400 and body["error"]["code"] in ("invalid_text", "invalid_request"), body
        assert request(port, "POST", "/v1/translate", raw=b"text=abc",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 400
        status, body = request(port, "POST", "/v1/translate", {"text": "abc"})
        assert status == 200 and body["results"][0]["translation"] == Translator.load(
            demo_model_dir, device="cpu").translate(["abc"])[0]
        assert process.poll() is None


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(demo_model_dir):
    with serving("--model-dir", demo_model_dir, "--max-wait-ms", "1500") as (process, port):
        answers: list = []
        in_flight = threading.Thread(target=lambda: answers.append(
            request(port, "POST", "/v1/translate", {"text": ["abc", "hello"]})))
        in_flight.start()
        time.sleep(0.5)  # the request now waits 1.5 s for batch-mates
        process.send_signal(signal.SIGTERM)
        in_flight.join(60)
        assert process.wait(60) == 0
        assert answers and answers[0][0] == 200 and len(answers[0][1]["results"]) == 2
        with pytest.raises(OSError):  # no longer listening
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_serve_api_key_over_the_wire(demo_model_dir):
    with serving("--model-dir", demo_model_dir, "--api-key-env", "TEST_SEQ2SEQ_KEY",
                 env={"TEST_SEQ2SEQ_KEY": KEY}) as (process, port):
        assert request(port, "POST", "/v1/translate", {"text": "abc"})[0] == 401
        assert request(port, "POST", "/v1/translate", {"text": "abc"},
                       headers={"Authorization": f"Bearer {KEY}"})[0] == 200


def test_serve_refuses_bad_settings_in_one_line(tmp_path, trained_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("UNSET_SEQ2SEQ_KEY", raising=False)
    cases = [
        (("--model-dir", tmp_path), "is not a model directory"),
        (("--model", "nonsense"), "--model 'nonsense': expected NAME=DIR"),
        (("--model-dir", trained_model_dir, "--max-chars", "0"), "--max-chars must be >= 1"),
        (("--model-dir", trained_model_dir, "--api-key-env", "UNSET_SEQ2SEQ_KEY"), "unset or empty"),
        ((), "serve needs --model-dir DIR or --model NAME=DIR"),
    ]
    for args, message in cases:
        assert main(["serve", "--port", "1", *map(str, args)]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_serve_without_the_extra_says_what_to_install(trained_model_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: importing it fails
    assert main(["serve", "--model-dir", str(trained_model_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'seq2seq-rnn[serve]'" in err


def test_a_model_that_fails_to_load_stops_the_server(tmp_path, trained_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in trained_model_dir.iterdir():
        if file.is_file():
            data = file.read_bytes()
            (broken / file.name).write_bytes(data[:100] if file.suffix == ".safetensors" else data)
    done = subprocess.run([sys.executable, "-m", "seq2seq", "serve", "--model-dir", broken, "--port",
                           str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "seq2seq: error:" in done.stderr and "safetensors" in done.stderr
