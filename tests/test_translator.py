"""The Python API on the session's tiny reversal model: search invariants, batching, odd input.

Invariants: beam 1 is greedy; n-best lists are sorted; with raw log-probabilities (length
penalty 0) beam search never finds a worse translation than greedy search.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import long_line, reversal_pairs

import seq2seq.translator as translator_module
from seq2seq.data import collate
from seq2seq.search import beam_search, max_output_lengths
from seq2seq.tokenize import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seq2seq.translator import Translator

# In-distribution sentences, then harder ones: unseen lengths, unknown words, repeats.
SENTENCES = [s for s, _ in reversal_pairs(20, random.Random(11))] + [
    "a", "a b c d e f g h a b c d e f", "h " * 15 + "a", "x y z", "a zz b", "c c c c c c c c c",
]


def test_beam_1_is_greedy(translator):
    greedy = translator.hypotheses(SENTENCES, beam=1)  # Translator's greedy_search path
    src_ids = [translator.encode_source(s) for s in SENTENCES]
    batch = collate(range(len(src_ids)), src_ids)
    with torch.inference_mode():
        beams = beam_search(translator.model, batch.src, batch.src_lengths, beam=1, bos=BOS_ID,
                            eos=EOS_ID, max_lengths=max_output_lengths(batch.src_lengths,
                                                                       translator.config.decode.max_len_ratio),
                            alpha=0.0, banned=[PAD_ID, BOS_ID, UNK_ID])
    assert len(greedy) == len(beams) == len(SENTENCES)
    for sentence, (g,), (b,) in zip(SENTENCES, greedy, beams):
        assert g.tokens == b.tokens, sentence
        assert g.score == pytest.approx(b.score, abs=1e-4), sentence


def test_n_best_is_sorted_and_distinct(translator):
    for hyps in translator.hypotheses(SENTENCES, beam=5, n_best=5):
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5


def test_beam_scores_at_least_greedy_without_length_penalty(translator, monkeypatch):
    monkeypatch.setattr(translator.config.decode, "length_penalty", 0.0)
    greedy = translator.hypotheses(SENTENCES, beam=1)
    for beam in (2, 5):
        found = translator.hypotheses(SENTENCES, beam=beam)
        for sentence, (g,), (b,) in zip(SENTENCES, greedy, found):
            assert b.score >= g.score - 1e-4, (sentence, beam, b, g)


def test_load_once_translate_many(trained_model_dir, monkeypatch):
    translator = Translator.load(trained_model_dir, device="cpu")

    def no_reload(*args, **kwargs):
        raise AssertionError("translating must not read the model directory again")

    monkeypatch.setattr(translator_module, "load_model", no_reload)
    monkeypatch.setattr(translator_module, "load_tokenizers", no_reload)
    first = translator.translate(SENTENCES[:5])
    for _ in range(3):
        assert translator.translate(SENTENCES[:5]) == first
    assert translator.translate(["d c b a"], beam=1) == ["a b c d"]
    assert translator.translate([]) == []


def test_input_order_is_kept_when_batched_by_length(translator):
    sentences = list(SENTENCES)
    random.Random(5).shuffle(sentences)
    one_by_one = [translator.translate([s], beam=3)[0] for s in sentences]
    assert translator.translate(sentences, beam=3, batch_size=4) == one_by_one
    assert translator.translate(sentences, beam=1, batch_size=3) == [
        translator.translate([s], beam=1)[0] for s in sentences]


def test_n_best_greater_than_beam_is_an_error(translator):
    with pytest.raises(ValueError, match=r"n_best \(3\) must be <= beam \(2\)"):
        translator.translate(["a b c"], beam=2, n_best=3)
    with pytest.raises(TypeError, match="a list of sentences"):
        translator.translate("a b c")


def test_odd_lines_translate_one_output_each(translator):
    lines = ["", "😀🎉 🚀", "\u200b\ufeff", long_line(5000, words=80), "a b c", "   "]
    for beam in (1, 3):
        out = translator.translate(lines, beam=beam)
        assert len(out) == len(lines) and all(isinstance(o, str) and "\n" not in o for o in out)
        assert out[0] == "" and out[4] == "c b a"
    n_best = translator.translate(lines, beam=2, n_best=2)
    assert [len(hyps) for hyps in n_best] == [2] * len(lines)


def test_a_5000_character_line_of_2500_words_translates(translator):
    """The issue asks that a 5,000-character line translates; this one is 2,500 words long,
    over ``data.max_len`` (100) tokens, which ``encode_source`` currently refuses."""
    line = " ".join(random.Random(3).choice("abcdefgh") for _ in range(2500)) + "a"
    assert len(line) == 5000
    out = translator.translate(["a b", line, ""], beam=3)
    assert len(out) == 3 and out[0] == "b a" and out[2] == "" and "\n" not in out[1]


def test_bf16_decoding_agrees_with_fp32_and_bad_precision_is_refused(trained_model_dir, translator):
    bf16 = Translator.load(trained_model_dir, precision="bf16")
    assert bf16.config.train.precision == "bf16"
    sentences = [s for s, _ in reversal_pairs(30, random.Random(5))]
    for beam in (1, 3):  # rounded scores rank, rescored candidates decide: the same answers
        assert bf16.translate(sentences, beam=beam) == translator.translate(sentences, beam=beam)
    with pytest.raises(ValueError, match="train.precision"):
        Translator.load(trained_model_dir, precision="fp16")
