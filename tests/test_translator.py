"""The Python API on the session's tiny reversal model: search invariants, batching, odd input.

Invariants: beam 1 is greedy; greedy takes the most likely token at every step; n-best lists
are sorted; a beam wide enough to hold every hypothesis finds exactly what exhaustive search
finds (every output of a two-word vocabulary up to the length limit, scored by teacher forcing).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from conftest import long_line, reversal_pairs

import seq2seq.decoding.translator as translator_module
from seq2seq.config import Config
from seq2seq.data.batches import collate
from seq2seq.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Tokenizer
from seq2seq.decoding.search import beam_search, max_output_lengths
from seq2seq.decoding.translator import Translator
from seq2seq.models.rnn.model import Seq2Seq

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


def forced_log_probs(translator: Translator, source: str, outputs: list[list[int]]) -> torch.Tensor:
    """(len(outputs), longest + 1, vocab) log-probabilities of each step of each output followed by
    eos, from one teacher-forced pass of the model (not the step-by-step decoder search uses)."""
    src = collate([0], [translator.encode_source(source)])
    longest = max(map(len, outputs))
    tgt_in = torch.tensor([[BOS_ID, *out] + [PAD_ID] * (longest - len(out)) for out in outputs])
    with torch.inference_mode():
        scores, _ = translator.model(src.src.expand(len(outputs), -1),
                                     src.src_lengths.expand(len(outputs)), tgt_in)
    return torch.log_softmax(scores.double(), dim=-1)


def exhaustive_search(translator: Translator, source: str, words: list[int]) -> dict[tuple, float]:
    """Every output of ``words`` up to the length limit, with the score beam search gives it:
    the sum of its steps' log-probabilities (eos is certain at the limit, where nothing else
    may come) divided by GNMT's length penalty ((5 + steps) / 6) ** alpha, eos counted."""
    decode = translator.config.decode
    steps = math.ceil(len(translator.encode_source(source)) * decode.max_len_ratio) + 5
    outputs = [list(out) for n in range(steps) for out in itertools.product(words, repeat=n)]
    log_probs = forced_log_probs(translator, source, outputs)
    found = {}
    for i, out in enumerate(outputs):
        total = sum(float(log_probs[i, t, token]) for t, token in enumerate(out))
        if len(out) + 1 < steps:
            total += float(log_probs[i, len(out), EOS_ID])
        found[tuple(out)] = total / ((5 + len(out) + 1) / 6) ** decode.length_penalty
    return found


@pytest.fixture(scope="module", params=[("gru", True), ("lstm", False)], ids=["gru", "lstm-no-feeding"])
def two_word_translator(request) -> Translator:
    """An untrained model over the words "a" and "b", its output layer scaled up so that its
    distributions are far from uniform and scores far from ties."""
    cell, input_feeding = request.param
    config = Config()
    config.override([f"model.cell={cell}", f"model.input_feeding={input_feeding}", "model.embed_size=8",
                     "model.hidden_size=16", "model.attention=bahdanau", "model.dropout=0"])
    tokenizer = Tokenizer("word", tokens=[*SPECIALS, "a", "b"])
    torch.manual_seed(7)
    model = Seq2Seq(config.model, src_vocab=len(tokenizer), tgt_vocab=len(tokenizer), pad_id=PAD_ID)
    with torch.no_grad():
        model.generator.weight.mul_(6.0)
    return Translator(model, tokenizer, tokenizer, config, torch.device("cpu"))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("source", ["a b", "b b a b"])
def test_a_beam_that_holds_every_hypothesis_equals_exhaustive_search(two_word_translator, monkeypatch,
                                                                     alpha, source):
    translator = two_word_translator
    monkeypatch.setattr(translator.config.decode, "length_penalty", alpha)
    # 0.1 * (source tokens + eos) rounds up to 1: outputs of up to 5 words, then eos (depth 5).
    monkeypatch.setattr(translator.config.decode, "max_len_ratio", 0.1)
    words = [translator.tgt_tok.tokens.index(w) for w in ("a", "b")]
    exhaustive = exhaustive_search(translator, source, words)
    assert len(exhaustive) == 63 and max(map(len, exhaustive)) == 5
    ranked = sorted(exhaustive, key=exhaustive.get, reverse=True)
    assert exhaustive[ranked[0]] - exhaustive[ranked[1]] > 1e-3, "a near tie: choose another seed"

    # 2 words of 3 finite ways (eos too) on at most 16 beams: 48 candidates a step fit in 64
    (found,) = translator.hypotheses([source], beam=64, n_best=63)
    assert {tuple(h.tokens) for h in found} == set(exhaustive)
    for h in found:
        assert h.score == pytest.approx(exhaustive[tuple(h.tokens)], abs=1e-4), h.tokens
    assert found[0].tokens == list(ranked[0])
    assert translator.translate([source], beam=64) == [translator.tgt_tok.decode(ranked[0])]


def test_greedy_takes_the_most_likely_token_at_every_step(translator):
    for sentence, (hyp,) in zip(SENTENCES, translator.hypotheses(SENTENCES, beam=1)):
        if not hyp.tokens and not translator.src_tok.encode(sentence):
            continue  # nothing to translate: not decoded
        log_probs = forced_log_probs(translator, sentence, [hyp.tokens])[0]
        log_probs[:, [PAD_ID, BOS_ID, UNK_ID]] = float("-inf")  # banned, as in decoding
        chosen = [*hyp.tokens, EOS_ID]
        limit = math.ceil(len(translator.encode_source(sentence))
                          * translator.config.decode.max_len_ratio) + 5
        for t, token in enumerate(chosen):
            if t + 1 < limit:  # at the limit only eos may come
                assert int(log_probs[t].argmax()) == token, (sentence, t)
        assert hyp.score == pytest.approx(sum(float(log_probs[t, tok]) for t, tok in enumerate(chosen)
                                              if t + 1 < limit), abs=1e-3)


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
    with pytest.raises(ValueError, match=r"n_best \(3\) must be <= decode\.beam \(2\)"):
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
    assert bf16.config.decode.precision == "bf16" and translator.config.decode.precision == "fp32"
    sentences = [s for s, _ in reversal_pairs(30, random.Random(5))]
    for beam in (1, 3):  # rounded scores rank, rescored candidates decide: the same answers
        assert bf16.translate(sentences, beam=beam) == translator.translate(sentences, beam=beam)
    with pytest.raises(ValueError, match="decode.precision"):
        Translator.load(trained_model_dir, precision="fp16")


def test_hypothesis_chunks_read_lazily_and_keep_the_order(translator, monkeypatch):
    sentences = SENTENCES * 3
    pulled = []

    def source():
        for sentence in sentences:
            pulled.append(sentence)
            yield sentence

    chunks = translator.hypothesis_chunks(source(), beam=2, chunk_lines=7)
    first = next(chunks)
    assert len(first) == 7 and len(pulled) == 7  # nothing read beyond the chunk
    rest = list(chunks)
    assert [len(c) for c in rest] == [7] * (len(sentences) // 7 - 1) + [len(sentences) % 7]
    whole = translator.hypotheses(sentences, beam=2)
    assert [[h.tokens for h in hyps] for c in [first, *rest] for hyps in c] == \
        [[h.tokens for h in hyps] for hyps in whole]
    monkeypatch.setattr(translator.config.decode, "max_input_len", 5)
    with pytest.raises(ValueError, match=r"^input:10: 7 tokens, more than decode.max_input_len=5"):
        list(translator.hypothesis_chunks(["a"] * 9 + ["a b c d e f g"], chunk_lines=4))


def test_load_draws_nothing_from_the_random_stream(trained_model_dir):
    torch.manual_seed(3)
    before = torch.get_rng_state()
    Translator.load(trained_model_dir, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)
