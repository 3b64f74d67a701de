"""Metrics: sacreBLEU's BLEU and chrF on detokenized text, with reproducible signatures."""

from __future__ import annotations

import re

import pytest

from seq2seq.decoding.scores import score_translations

REFERENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]
BLEU_SIGNATURE = re.compile(r"nrefs:1\|case:(mixed|lc)\|eff:no\|tok:13a\|smooth:exp\|version:\d+\.\d+\.\d+")
CHRF_SIGNATURE = re.compile(r"nrefs:1\|case:mixed\|eff:yes\|nc:6\|nw:0\|space:no\|version:\d+\.\d+\.\d+")


def test_identical_text_scores_100():
    scores = score_translations(REFERENCES, REFERENCES)
    assert scores["bleu"] == 100.0 and scores["chrf"] == 100.0


def test_wrong_text_scores_low_and_partial_text_in_between():
    assert score_translations(["x y z"] * 3, REFERENCES)["bleu"] == 0.0
    partial = score_translations(["Ein Mann fährt Auto.", *REFERENCES[1:]], REFERENCES)
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100


def test_signatures_have_sacrebleu_format():
    scores = score_translations(REFERENCES, REFERENCES)
    assert BLEU_SIGNATURE.fullmatch(scores["signature"]) and "case:mixed" in scores["signature"]
    assert CHRF_SIGNATURE.fullmatch(scores["chrf_signature"]), scores["chrf_signature"]


def test_lowercase_bleu_ignores_case_and_says_so():
    upper = [r.upper() for r in REFERENCES]
    assert score_translations(upper, REFERENCES)["bleu"] < 10
    scores = score_translations(upper, REFERENCES, lowercase=True)
    assert scores["bleu"] == 100.0
    assert BLEU_SIGNATURE.fullmatch(scores["signature"]) and "case:lc" in scores["signature"]


def test_text_is_tokenized_by_sacrebleu_not_by_us():
    """Detokenized output is expected: '13a' splits the punctuation itself."""
    spaced = ["Ein Mann fährt Fahrrad .", "Zwei Hunde spielen im Schnee .", "Eine Frau liest ein Buch ."]
    assert score_translations(spaced, REFERENCES)["bleu"] == 100.0


def test_different_counts_are_an_error():
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        score_translations(REFERENCES[:2], REFERENCES)
