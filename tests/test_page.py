"""The page: the view of one translation, served by ``seq2seq serve`` or written by
``seq2seq attention --html`` with its result inside."""

from __future__ import annotations

import json
import re

import numpy as np

from seq2seq.cli import main
from seq2seq.serving.results import page_html, sentence_result

STATIC = re.compile(r'<script id="static-result" type="application/json">(.*?)</script>', re.S)


def test_attention_html_writes_the_page_with_one_result_inside(tmp_path, trained_model_dir, translator,
                                                               capsys):
    out = tmp_path / "attention.html"
    text = "a b </script> c"  # a word that must not end the page's script
    assert main(["attention", "--model-dir", str(trained_model_dir), "--text", text, "--html", str(out)]) == 0
    assert f"attention page written to {out}" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert page.count("</script>") == page_html().count("</script>")
    assert "http://" not in page and "https://" not in page  # opens offline
    static = json.loads(STATIC.search(page).group(1))
    result = static["result"]
    assert static["source"] == text and static["model"] == trained_model_dir.name
    assert result["translation"] == translator.translate([text], beam=1)[0]
    assert result["source_tokens"] == text.split() + ["</s>"]
    assert len(result["attention"]) == len(result["target_tokens"])
    alignment = translator.attention(text)
    assert result["target_tokens"] == alignment.target_pieces
    assert np.round(alignment.weights.astype(np.float64), 4).tolist() == result["attention"]


def test_attention_needs_an_output(trained_model_dir, capsys):
    assert main(["attention", "--model-dir", str(trained_model_dir), "--text", "a b"]) == 1
    assert "--output FILE.png, --html FILE.html, or both" in capsys.readouterr().err


def test_the_served_page_has_no_result_inside():
    assert json.loads(STATIC.search(page_html()).group(1)) is None


def test_a_result_with_n_best_lists_each_alternative(translator):
    hypotheses = translator.hypotheses(["a b c"], beam=3, n_best=3)[0]
    result = sentence_result(translator, "a b c", hypotheses)
    expected = translator.translate(["a b c"], beam=3, n_best=3)[0]
    assert [h["translation"] for h in result["n_best"]] == expected
    assert result["score"] == result["n_best"][0]["score"] >= result["n_best"][1]["score"]
    assert "attention" not in result and "source_tokens" not in result
