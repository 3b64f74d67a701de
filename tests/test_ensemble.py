"""Ensembles (decoding/ensemble.py): the mean of the members' log-probabilities at each step,
through greedy and beam search, the Translator and the command line."""

from __future__ import annotations

import http.client
import json
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import in_threads, reversal_pairs, run_cli, serving

from seq2seq import cli
from seq2seq.config import ConfigError
from seq2seq.data.tokenizers import BOS_ID, EOS_ID
from seq2seq.decoding.ensemble import Ensemble, EnsembleSession, ensemble_weights
from seq2seq.decoding.translator import Translator

SOURCES = ["a b c d", "h g f e d", "c c a", "b a h g f e d c"]


@pytest.fixture(scope="module")
def other_model_dir(reversal_corpus, tmp_path_factory) -> Path:
    """A second, different model of the same task and tokenizers: smaller, another seed, two
    epochs (so the two disagree on their scores)."""
    model_dir = tmp_path_factory.mktemp("runs") / "other"
    done = run_cli("train", "--config", reversal_corpus / "cfg.yaml", "--data-dir", reversal_corpus,
                   "--model-dir", model_dir, "--set", "model.hidden_size=48", "--set", "train.seed=2",
                   "--set", "train.epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return model_dir


@pytest.fixture(scope="module")
def transformer_model_dir(reversal_corpus, tmp_path_factory) -> Path:
    """A tiny Transformer of the same task and tokenizers: another family in the ensemble."""
    folder = tmp_path_factory.mktemp("runs")
    config = folder / "transformer.yaml"
    config.write_text(
        "data: {train_src: train.src, train_tgt: train.tgt, valid_src: valid.src, valid_tgt: valid.tgt,\n"
        "       tokenizer: word, vocab_size: 100}\n"
        "model: {arch: transformer, d_model: 32, heads: 2, ff_size: 64, encoder_layers: 1,\n"
        "        decoder_layers: 1, dropout: 0.0}\n"
        "train: {batch_tokens: 500, epochs: 2, lr: 0.003, threads: 1, device: cpu, seed: 3}\n")
    done = run_cli("train", "--config", config, "--data-dir", reversal_corpus, "--model-dir", folder / "tf")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "tf"


def teacher_forced_score(translator: Translator, source: str, tokens: list[int]) -> float:
    """The summed log-probability of ``tokens`` then eos after ``source``, by one forward pass
    (the model's own forward, not the decoding session)."""
    src = torch.tensor([translator.encode_source(source)])
    tgt_in = torch.tensor([[BOS_ID, *tokens]])
    with torch.inference_mode():
        scores, _ = translator.model(src, torch.tensor([src.size(1)]), tgt_in)
    log_probs = torch.log_softmax(scores[0].float(), -1)
    return float(log_probs[torch.arange(len(tokens) + 1), torch.tensor([*tokens, EOS_ID])].sum())


def test_weights_are_scaled_and_checked():
    assert ensemble_weights(None, 4) == (0.25,) * 4
    assert ensemble_weights([1, 3], 2) == (0.25, 0.75)
    for bad in ([1.0], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ConfigError, match="ensemble weights"):
            ensemble_weights(bad, 2)


@pytest.mark.parametrize("beam", [1, 3])
def test_an_ensemble_of_one_is_that_model(trained_model_dir, translator, beam):
    ensemble = Translator.load_ensemble([trained_model_dir], device="cpu")
    assert isinstance(ensemble.model, Ensemble)
    n_best = 1 if beam == 1 else 3
    alone = translator.hypotheses(SOURCES, beam=beam, n_best=n_best)
    together = ensemble.hypotheses(SOURCES, beam=beam, n_best=n_best)
    assert [[h.tokens for h in hyps] for hyps in together] == [[h.tokens for h in hyps] for hyps in alone]
    for mine, theirs in zip(together, alone):
        assert [h.score for h in mine] == pytest.approx([h.score for h in theirs], abs=1e-5)


def test_two_copies_give_the_same_outputs(trained_model_dir, translator):
    twice = Translator.load_ensemble([trained_model_dir, trained_model_dir], device="cpu")
    assert twice.translate(SOURCES, beam=3) == translator.translate(SOURCES, beam=3)
    alone, together = translator.hypotheses(SOURCES, beam=1), twice.hypotheses(SOURCES, beam=1)
    assert [h[0].score for h in together] == pytest.approx([h[0].score for h in alone], abs=1e-5)


@pytest.mark.parametrize(("second", "weights"), [("other_model_dir", None), ("other_model_dir", [1.0, 3.0]),
                                                 ("transformer_model_dir", None)])
def test_a_hypothesis_scores_the_weighted_mean_of_its_members(trained_model_dir, translator, second,
                                                              weights, request):
    """With a smaller RNN of another seed, or with a Transformer (members of two families)."""
    second_dir = request.getfixturevalue(second)
    other = Translator.load(second_dir, device="cpu")
    ensemble = Translator.load_ensemble([trained_model_dir, second_dir], weights, device="cpu")
    w = (0.5, 0.5) if weights is None else (0.25, 0.75)
    greedy = ensemble.hypotheses(SOURCES, beam=1)
    ensemble.config.decode.length_penalty = 0.0  # beam scores unnormalised: summed log-probabilities
    beams = ensemble.hypotheses(SOURCES, beam=3, n_best=3)
    checked = 0
    for source, hyps in zip(SOURCES * 2, greedy + beams):
        for h in hyps:
            members = [teacher_forced_score(m, source, h.tokens) for m in (translator, other)]
            assert members[0] != pytest.approx(members[1], abs=1e-3)  # two different models
            assert h.score == pytest.approx(w[0] * members[0] + w[1] * members[1], abs=1e-4)
            checked += 1
    assert checked == len(SOURCES) * 4


def test_attention_is_the_members_mean(trained_model_dir, other_model_dir):
    ensemble = Translator.load_ensemble([trained_model_dir, other_model_dir], device="cpu")
    alignment = ensemble.attention("a b c d e")
    assert alignment.weights.shape == (len(alignment.target_pieces), len(alignment.source_pieces))
    assert alignment.weights.sum(1) == pytest.approx([1.0] * len(alignment.target_pieces), abs=1e-5)


def test_rounded_member_scores_are_refused():
    class Rounding:
        rounds_scores = True

    with pytest.raises(ConfigError, match="--precision fp32"):
        EnsembleSession([Rounding()], [1.0])


def test_a_different_target_tokenizer_is_refused_naming_both_files(trained_model_dir, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(trained_model_dir, changed)
    spec = json.loads((changed / "tokenizer.json").read_text())
    vocab = changed / f"{spec['tgt']}.vocab.json"
    tokens = json.loads(vocab.read_text())
    tokens["tokens"][-2:] = tokens["tokens"][-1:-3:-1]  # two words swap ids
    vocab.write_text(json.dumps(tokens))
    with pytest.raises(ConfigError) as error:
        Translator.load_ensemble([trained_model_dir, changed], device="cpu")
    message = str(error.value)
    assert str(vocab) in message and str(trained_model_dir / vocab.name) in message
    done = run_cli("translate", "--model-dir", trained_model_dir, "--model-dir", changed, input="a b c\n")
    assert done.returncode == 1 and str(vocab) in done.stderr and "tokenizer" in done.stderr


def test_the_command_line_decodes_an_ensemble(trained_model_dir, other_model_dir, tmp_path, capsys):
    ensemble = Translator.load_ensemble([trained_model_dir, other_model_dir], [2, 1], device="cpu")
    expected = "".join(line + "\n" for line in ensemble.translate(SOURCES))
    source = tmp_path / "in.txt"
    source.write_text("".join(s + "\n" for s in SOURCES))
    common = ["--input", str(source), "--device", "cpu", "--ensemble-weights", "2,1"]
    for i, members in enumerate((["--model-dir", str(trained_model_dir), "--model-dir", str(other_model_dir)],
                                 ["--ensemble", f"{trained_model_dir},{other_model_dir}"])):
        output = tmp_path / f"out{i}.txt"
        assert cli.main(["translate", *members, *common, "--output", str(output)]) == 0
        assert output.read_text() == expected
    assert cli.main(["translate", "--ensemble", f"{trained_model_dir},{other_model_dir}", "--input",
                     str(source), "--ensemble-weights", "1"]) == 1
    assert "--ensemble-weights: 1 weight(s) for 2 model(s)" in capsys.readouterr().err
    page = tmp_path / "attention.html"
    assert cli.main(["attention", "--model-dir", str(trained_model_dir), "--model-dir", str(other_model_dir),
                     "--text", "a b c", "--html", str(page)]) == 0
    assert page.is_file() and f"{trained_model_dir.name}+{other_model_dir.name}" in page.read_text()


# -- serving ------------------------------------------------------------------------------------
def test_the_server_batches_ensemble_requests_across_clients(trained_model_dir, other_model_dir):
    """16 clients at once: fewer batches than requests, each result as the ensemble's offline."""
    from fastapi.testclient import TestClient

    from seq2seq.serving.app import create_app
    from seq2seq.serving.settings import ServeConfig

    ensemble = Translator.load_ensemble([trained_model_dir, other_model_dir], device="cpu")
    app = create_app({"ens": lambda: ensemble}, ServeConfig(max_wait_ms=300))
    sources = [s for s, _ in reversal_pairs(16, random.Random(4))]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the ensemble did not load"
            time.sleep(0.05)
        (info,) = client.get("/v1/models").json()["models"]
        assert info["ensemble"] == [str(trained_model_dir), str(other_model_dir)]
        worker = app.state.models.served["ens"].worker
        results: list = [None] * len(sources)
        start = threading.Barrier(len(sources))

        def call(n: int) -> None:
            start.wait()
            results[n] = client.post("/v1/translate", json={"text": sources[n], "beam": 1}).json()

        threads = [threading.Thread(target=call, args=(n,)) for n in range(len(sources))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert worker.batches < len(sources)  # batched across requests
    offline = ensemble.hypotheses(sources, beam=1)
    assert [r["results"][0]["translation"] for r in results] == [ensemble.tgt_tok.decode(h[0].tokens)
                                                                 for h in offline]
    assert [r["results"][0]["score"] for r in results] == pytest.approx([h[0].score for h in offline],
                                                                        rel=1e-5)


def test_a_real_server_serves_an_ensemble(trained_model_dir, other_model_dir):
    ensemble = Translator.load_ensemble([trained_model_dir, other_model_dir], device="cpu")
    sources = [s for s, _ in reversal_pairs(12, random.Random(5))]
    name = f"{trained_model_dir.name}+{other_model_dir.name}"
    with serving("--model-dir", trained_model_dir, "--model-dir", other_model_dir, "--device", "cpu",
                 "--max-wait-ms", "50") as (_, port):
        def call(n: int) -> tuple[int, dict]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request("POST", "/v1/translate", json.dumps({"text": sources[n]}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())

        results = in_threads(call, len(sources))
        assert [status for status, _ in results] == [200] * len(sources)
        assert [body["model"] for _, body in results] == [name] * len(sources)
        assert [body["results"][0]["translation"] for _, body in results] == ensemble.translate(sources)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/health")
        health = json.loads(connection.getresponse().read())
        assert health["workers"][name]["largest_batch"]["requests"] > 1, health
