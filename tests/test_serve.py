"""``seq2seq serve``: the REST API through FastAPI's test client, then a real server process.

The API tests serve the session's tiny reversal model; the end-to-end tests start
``seq2seq serve`` on 127.0.0.1 and a free port with a model the demo trains in seconds, talk to
it over a socket (bad input, slow and vanishing clients included), measure its memory, and stop
it with SIGTERM.
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
from collections.abc import Callable, Iterator

import pytest
from conftest import free_port, in_threads, reversal_pairs, serving
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
LOCAL = "http://127.0.0.1"  # the test client's Host: a loopback name, as the default allows


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
        client = TestClient(app, base_url=LOCAL, raise_server_exceptions=False).__enter__()
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

    with TestClient(create_app({"rev": slow_loader}), base_url=LOCAL) as client:
        status, code, message = error_of(client.get("/health"))
        assert (status, code) == (503, "loading") and "loading" in message
        assert error_of(client.post("/v1/translate", json={"text": "a b"}))[:2] == (503, "loading")
        loaded.set()
        wait_ready(client)
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["models"] == ["rev"]
        assert health["workers"]["rev"]["alive"] and health["workers"]["rev"]["batches"] == 0


def test_health_is_503_when_a_decoding_worker_died(make_client, monkeypatch):
    client = make_client()
    worker = client.app.state.models.served["rev"].worker

    def broken(*args, **kwargs):  # what --max-wait-ms inf once did: the thread ends on an error
        raise OverflowError("timeout value is too large")

    monkeypatch.setattr(worker, "_take", broken)  # taken after the batch now waiting
    assert client.post("/v1/translate", json={"text": "a b"}).status_code == 200
    worker._thread.join(30)
    status, code, message = error_of(client.get("/health"))
    assert (status, code) == (503, "worker_stopped") and "timeout value is too large" in message
    status, code, _ = error_of(client.post("/v1/translate", json={"text": "a b"}))
    assert (status, code) == (503, "shutting_down")


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


def test_the_openapi_description_is_served_and_no_page_loads_from_a_cdn(make_client):
    client = make_client()
    for page in ("/docs", "/redoc"):  # FastAPI's would load Swagger or ReDoc from a CDN
        assert error_of(client.get(page))[:2] == (404, "not_found")
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
    offline = translator.hypotheses(sources, beam=1)
    assert ([r["translation"] for r in alone] == [r["translation"] for r in together]
            == [translator.tgt_tok.decode(h[0].tokens) for h in offline])
    # scores are served unrounded and agree to float32 rounding (a GEMM's row sums in another
    # order at another batch size): sums of a few float32 log-probabilities, seen 1.1e-6 apart
    # relative (about 10 float32 steps); held to 1e-5
    assert [r["score"] for r in together] == pytest.approx([r["score"] for r in alone], rel=1e-5, abs=0)
    assert [r["score"] for r in alone] == pytest.approx([h[0].score for h in offline], rel=1e-5, abs=0)


def test_opennmt_py_clients_get_their_shape(make_client, translator):
    client = make_client(loaders={"100": lambda: translator})
    response = client.post("/translator/translate",
                           json=[{"src": "a b c", "id": 100}, {"src": "h g", "id": 100}])
    assert response.status_code == 200
    assert response.json() == [[
        {"src": "a b c", "tgt": translator.translate(["a b c"])[0], "n_best": 1, "pred_score": pytest.approx(
            translator.hypotheses(["a b c"])[0][0].score, rel=1e-5, abs=0)},
        {"src": "h g", "tgt": translator.translate(["h g"])[0], "n_best": 1, "pred_score": pytest.approx(
            translator.hypotheses(["h g"])[0][0].score, rel=1e-5, abs=0)}]]
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


@pytest.mark.parametrize("settings, body, names", [
    ({"max_decode_tokens": 200}, {"text": ["a b c d e f g h"] * 4, "beam": 3},
     "text: decoding these 4 sentences may take 228 target tokens (output-length limit x beam 3, summed), "
     "more than the limit of 200 (--max-decode-tokens)"),
    ({"max_attention_cells": 1000}, {"text": ["a b c d e f g h"] * 6, "return_attention": True},
     "return_attention: the attention of these 6 sentences may take 1,026 cells (output-length limit x "
     "source tokens, summed), more than the limit of 1,000 (--max-attention-cells)"),
    ({"max_n_best": 2}, {"text": "a b", "beam": 3, "n_best": 3}, "n_best: 3 is more than the limit of 2 "
     "(--max-n-best)"),
])
def test_a_request_over_a_cost_bound_is_413_naming_the_bound_and_its_flag(make_client, translator,
                                                                          settings, body, names):
    """The bounds are checked before anything is queued; a request just within them is served.
    8 tokens and eos: an output-length limit of ceil(9 x 1.5) + 5 = 19 steps, 171 attention cells."""
    assert translator.config.decode.max_len_ratio == 1.5
    client = make_client(**settings)
    worker = client.app.state.models.served["rev"].worker
    status, code, message = error_of(client.post("/v1/translate", json=body))
    assert (status, code) == (413, "over_limit") and message.startswith(names), message
    assert worker.sentences == 0  # refused before decoding
    within = {**body, "text": body["text"][:3]} if isinstance(body["text"], list) else {**body, "n_best": 2}
    assert client.post("/v1/translate", json=within).status_code == 200


def test_results_are_built_off_the_event_loop(make_client, monkeypatch):
    from seq2seq.serving import app as app_module

    threads = []
    build = app_module.sentence_result

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return build(*args, **kwargs)

    monkeypatch.setattr(app_module, "sentence_result", recording)
    response = make_client().post("/v1/translate", json={"text": ["a b", "c d"], "return_attention": True})
    assert response.status_code == 200 and len(threads) == 2
    assert all(name.startswith("results") for name in threads), threads


SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options")


def assert_security_headers(headers) -> None:
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


def test_every_response_carries_the_security_headers(make_client):
    import base64
    import hashlib
    import re

    client = make_client(api_key=KEY)
    responses = [client.get("/"), client.get("/health"), client.get("/openapi.json"), client.get("/nothing"),
                 client.post("/v1/translate", json={"text": "a"}),  # 401
                 client.post("/v1/translate", json={"text": "a"}, headers={"Host": "evil.example"}),  # 400
                 client.post("/v1/translate", content=b"x" * 2_000_000,
                             headers={**JSON, "Authorization": f"Bearer {KEY}"}),  # 413
                 client.post("/v1/translate", json={"text": "a b"},
                             headers={"Authorization": f"Bearer {KEY}"})]
    assert [r.status_code for r in responses] == [200, 200, 200, 401, 401, 400, 413, 200]
    for response in responses:
        assert_security_headers(response.headers)
    # the page's own inline script and style are allowed by their hashes, nothing else
    page, policy = responses[0].text, responses[0].headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy and "connect-src 'self'" in policy


@pytest.mark.parametrize("bound_to, allowed_hosts, good, bad", [
    ("127.0.0.1", "", ["127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000", "localhost."],
     ["evil.example", "127.0.0.1.evil.example", "localhost:80:80", "[::2]", ""]),
    ("::1", "", ["[::1]", "127.0.0.1"], ["evil.example"]),
    ("0.0.0.0", "", ["evil.example", "10.0.0.1:8000"], []),
    ("0.0.0.0", "api.example,*.example.org", ["api.example:443", "a.b.example.org"],
     ["example.org", "evil.example", "127.0.0.1"]),
])
def test_the_host_header_is_checked(translator, bound_to, allowed_hosts, good, bad):
    """Loopback names by default when bound to loopback (a DNS-rebinding page cannot reach the
    API), any host when bound elsewhere, and the --allowed-hosts list when given."""
    app = create_app({"rev": lambda: translator}, ServeConfig(allowed_hosts=allowed_hosts), host=bound_to)
    with TestClient(app, base_url=LOCAL) as client:
        for host in good:
            assert client.get("/", headers={"Host": host}).status_code == 200, host
        for host in bad:
            status, code, message = error_of(client.get("/health", headers={"Host": host}))
            assert (status, code) == (400, "invalid_host") and "--allowed-hosts" in message, host


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


@pytest.mark.parametrize("settings, message", [
    ({"max_queue": 10}, r"--max-queue \(10\) must be >= --max-sentences \(100\)"),
    ({"timeout": 0}, r"--timeout must be in \(0, 86400\], got 0"),
    ({"timeout": float("nan")}, "--timeout must be a finite number, got nan"),
    ({"max_wait_ms": float("inf")}, "--max-wait-ms must be a finite number, got inf"),
    ({"max_wait_ms": -1.0}, r"--max-wait-ms must be in \[0, 60000\], got -1"),
    ({"drain_timeout": 1e9}, r"--drain-timeout must be in \[2, 3600\]"),
    ({"header_timeout": float("-inf")}, "--header-timeout must be a finite number"),
    ({"max_decode_tokens": 0}, "--max-decode-tokens must be between 1 and 2[*][*]62, got 0"),
    ({"max_attention_cells": 2**70}, "--max-attention-cells must be between 1 and 2[*][*]62"),
    ({"max_beam": True}, "--max-beam must be a whole number"),
    ({"allowed_hosts": "a.example, evil.example/x"}, "--allowed-hosts: 'evil.example/x' is not a host name"),
])
def test_limits_are_checked_when_the_server_is_made(translator, settings, message):
    with pytest.raises(ValueError, match=message):
        create_app({"rev": lambda: translator}, ServeConfig(**settings))


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
        results = in_threads(lambda n: request(port, "POST", "/v1/translate", {
            "text": sources[n], "return_attention": True, "return_tokens": True}), len(sources))
        assert [status for status, _ in results] == [200] * len(sources)
        assert [body["results"][0]["translation"] for _, body in results] == translator.translate(sources)
        status, health = request(port, "GET", "/health")
        largest = health["workers"]["model"]["largest_batch"]
        assert status == 200 and largest["requests"] > 1, health  # a batch of several requests formed
        assert health["workers"]["model"]["batches"] < len(sources)
        status, models = request(port, "GET", "/v1/models")
        assert status == 200 and models["models"][0]["name"] == "model"  # the folder's name


def test_a_real_server_survives_bad_clients(demo_model_dir):
    with serving("--model-dir", demo_model_dir, "--max-sentences", "100") as (process, port):
        # a client that hangs up halfway through its body, and one that hangs up before the answer
        post = b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        raw_exchange(port, post + b"Content-Length: 1000\r\n\r\n{\"text\": [\"ab", close_early=True)
        raw_exchange(port, post + b"Content-Length: 20\r\n\r\n{\"text\": \"abcdefgh\"}", close_early=True)
        # 10,000 sentences; 20 MB announced (refused before a byte of it is read)
        assert request(port, "POST", "/v1/translate", {"text": ["abc"] * 10_000})[0] == 413
        answer = raw_exchange(port, b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
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


def long_text(chars: int, seed: int = 1) -> str:
    """Letters the reversal model reverses: it decodes to its output-length limit."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij") for _ in range(chars))


def until(condition: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``condition`` until true (returns the seconds it took), or fail after ``within`` s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, f"{what}: not within {within} s"
        time.sleep(0.05)
    return time.monotonic() - start


def worker_stats(port: int) -> dict:
    status, health = request(port, "GET", "/health")
    assert status == 200, health
    return health["workers"]["model"]


def headers_of(answer: bytes) -> dict[str, str]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in head)}


def test_a_real_server_cuts_slow_clients_and_stops_timed_out_requests(demo_model_dir):
    """Half-sent headers and bodies are cut within their timeouts (a real socket); a request
    that would decode for minutes gets 504 at its timeout and its batch stops, so the next
    request is answered at once; an unknown Host is refused; every answer, uvicorn's own 400
    too, carries the security headers."""
    with serving("--model-dir", demo_model_dir, "--header-timeout", "1", "--body-timeout", "1",
                 "--timeout", "2", "--max-wait-ms", "0", "--beam", "10",
                 "--max-decode-tokens", "10000000") as (process, port):
        for partial in (b"", b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(partial)
                start = time.monotonic()
                assert sock.recv(1024) == b""  # closed by the server (EOF), not by the 30 s timeout
                assert time.monotonic() - start < 1 + 10
        head = (b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        start = time.monotonic()
        answer = raw_exchange(port, head + b'{"text": "ab')  # and no more: the server closes
        assert answer.startswith(b"HTTP/1.1 408") and b"(--body-timeout)" in answer, answer
        assert time.monotonic() - start < 1 + 10
        assert_security_headers(headers_of(answer))

        # a hostile request: 50 sentences the model decodes to up to 1,506 steps each, at beam 10
        start = time.monotonic()
        hostile = {"text": [long_text(1000, n) for n in range(50)]}
        status, body = request(port, "POST", "/v1/translate", hostile)
        assert (status, body["error"]["code"]) == (504, "timeout")
        assert "(--timeout)" in body["error"]["message"]
        until(lambda: not worker_stats(port)["decoding"], 30, "the batch stopped")  # a step, or the
        busy = time.monotonic() - start  # encoder's pass over the 50,000 characters, at most
        assert worker_stats(port)["stopped_batches"] == 1  # stopped, not finished
        for _ in range(3):  # a loaded machine may take more than --timeout 2 for one sentence
            status, body = request(port, "POST", "/v1/translate", {"text": "abc", "beam": 1})
            if status != 504:
                break
        expected = Translator.load(demo_model_dir, device="cpu").translate(["abc"], beam=1)
        assert status == 200 and [r["translation"] for r in body["results"]] == expected
        print(f"the worker was busy {busy:.1f} s with a hostile request and --timeout 2")

        answer = raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: evil.example\r\n"
                                    b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400") and b"--allowed-hosts" in answer
        assert_security_headers(headers_of(answer))
        answer = raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n")  # answered by uvicorn itself
        assert answer.startswith(b"HTTP/1.1 400")
        assert_security_headers(headers_of(answer))
        assert process.poll() is None


def test_a_real_server_stops_the_batch_of_a_client_that_hung_up(demo_model_dir):
    with serving("--model-dir", demo_model_dir, "--timeout", "600", "--max-wait-ms", "0",
                 "--beam", "10", "--max-decode-tokens", "10000000") as (process, port):
        body = json.dumps({"text": [long_text(1000, n) for n in range(50)]}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            until(lambda: worker_stats(port)["decoding"], 60, "the worker took the request")
        # hung up: the batch stops well before its 600 s timeout, and the worker is free
        took = until(lambda: worker_stats(port)["stopped_batches"] == 1, 60, "the batch stopped")
        status, answer = request(port, "POST", "/v1/translate", {"text": "abc", "beam": 1})
        expected = Translator.load(demo_model_dir, device="cpu").translate(["abc"], beam=1)
        assert status == 200 and [r["translation"] for r in answer["results"]] == expected
        print(f"the batch stopped {took:.1f} s after its client hung up")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_a_real_servers_memory_follows_the_attention_asked_for(demo_model_dir):
    """Attention is kept only for requests that ask for it, and a request's attention is
    bounded before decoding (413 naming --max-attention-cells): the largest one allowed, sent
    three times at once, grows the server by a bounded amount."""
    with serving("--model-dir", demo_model_dir, "--max-attention-cells", "300000",
                 "--timeout", "600") as (process, port):
        def translate(body: dict) -> tuple[int, dict]:
            return request(port, "POST", "/v1/translate", body)

        assert translate({"text": ["abcdef"] * 4, "return_attention": True, "return_tokens": True})[0] == 200
        before = rss_mb(process.pid)
        status, body = translate({"text": long_text(1000), "return_attention": True})
        message = body["error"]["message"]
        assert status == 413 and "1,508,507 cells" in message and "(--max-attention-cells)" in message
        status, body = translate({"text": [long_text(1000)] * 100})  # 100 KB
        assert status == 413 and "(--max-decode-tokens)" in body["error"]["message"]
        # 400 characters: 401 x 607 = 243,407 cells, within 300,000
        largest = {"text": long_text(400), "return_attention": True}
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(translate(largest))) for _ in range(3)]
        for thread in threads:
            thread.start()
        peak = before
        while any(thread.is_alive() for thread in threads):  # bounded: each request's --timeout
            peak = max(peak, rss_mb(process.pid))
            time.sleep(0.05)
        after = rss_mb(process.pid)
        assert [status for status, _ in answers] == [200] * 3
        weights = answers[0][1]["results"][0]["attention"]
        assert len(weights) <= 607 and len(weights[0]) == 401  # rows: output tokens and eos
        print(f"RSS {before:.0f} MB before, peak {peak:.0f} MB, {after:.0f} MB after three requests of "
              f"243,407 attention cells")
        assert peak - before < 200, (before, peak)


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(demo_model_dir):
    with serving("--model-dir", demo_model_dir, "--max-wait-ms", "5000") as (process, port):
        answers: list = []
        in_flight = threading.Thread(target=lambda: answers.append(
            request(port, "POST", "/v1/translate", {"text": ["abc", "hello"]})))
        in_flight.start()
        until(lambda: worker_stats(port)["queued"] == 2, 30, "the request waits for batch-mates (5 s)")
        process.send_signal(signal.SIGTERM)
        in_flight.join(60)
        assert process.wait(60) == 0
        assert answers and answers[0][0] == 200 and len(answers[0][1]["results"]) == 2
        with pytest.raises(OSError):  # no longer listening
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_sigterm_with_a_trickling_client_and_a_long_request_ends_within_the_drain_deadline(demo_model_dir):
    """A client trickling its body and a request that would decode for minutes are answered
    503 at the drain deadline, and the server exits 0 within it, with no traceback."""
    drain = 3
    with serving("--model-dir", demo_model_dir, "--drain-timeout", str(drain), "--body-timeout", "600",
                 "--timeout", "600", "--max-wait-ms", "0", "--beam", "10",
                 "--max-decode-tokens", "10000000") as (process, port):
        answers: list = []
        hostile = {"text": [long_text(1000, n) for n in range(50)]}
        long = threading.Thread(target=lambda: answers.append(
            request(port, "POST", "/v1/translate", hostile)))
        long.start()
        until(lambda: worker_stats(port)["decoding"], 60, "the worker took the long request")
        trickler = socket.create_connection(("127.0.0.1", port), timeout=30)
        trickler.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        stop = threading.Event()

        def trickle() -> None:  # a byte every 0.2 s, never all of it
            while not stop.wait(0.2):
                try:
                    trickler.sendall(b" ")
                except OSError:
                    return

        trickling = threading.Thread(target=trickle)
        trickling.start()
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(drain + 30)
        took = time.monotonic() - start
        stop.set()
        trickling.join(10)
        long.join(30)
        answer = trickler.recv(65536)
        trickler.close()
        stderr = process.stderr.read().decode()
        print(f"SIGTERM to exit: {took:.1f} s with --drain-timeout {drain}")
        assert code == 0 and took < drain + 3, stderr
        assert answer.startswith(b"HTTP/1.1 503") and b"--drain-timeout" in answer, answer
        status, body = answers[0]
        assert (status, body["error"]["code"]) == (503, "shutting_down") and "--drain-timeout" in str(body)
        assert "Traceback" not in stderr and "Cancel" not in stderr, stderr


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
        (("--model-dir", trained_model_dir, "--max-chars", "0"), "--max-chars must be between 1 and 2**62"),
        (("--model-dir", trained_model_dir, "--max-wait-ms", "inf"), "--max-wait-ms must be a finite number"),
        (("--model-dir", trained_model_dir, "--timeout", "nan"), "--timeout must be a finite number"),
        (("--model-dir", trained_model_dir, "--drain-timeout", "6e4"), "--drain-timeout must be in [2"),
        (("--model-dir", trained_model_dir, "--allowed-hosts", "a b"), "--allowed-hosts: 'a b' is not"),
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
