"""Tokenizers: roundtrips, special ids, save/load, validation, and robustness on any text."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq.config import DataConfig
from seq2seq.data.tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    UNK_ID,
    Tokenizer,
    load_tokenizers,
    train_tokenizers,
)

KINDS = ("sentencepiece", "word", "char")

# A toy English-German corpus in the manner of Multi30k's image captions, made by the test:
# (English, German) words of each slot; names, made of syllables, give the long tail of rare
# words that a real corpus has (thousands of word types, most seen once or twice).
SUBJECTS = [("a", "ein"), ("one", "ein"), ("the", "der")]
ADJECTIVES = [("young", "junger"), ("old", "alter"), ("tall", "großer"), ("happy", "fröhlicher"),
              ("small", "kleiner"), ("brown", "brauner"), ("", "")]
NOUNS = [("man", "Mann"), ("dog", "Hund"), ("boy", "Junge"), ("worker", "Arbeiter"),
         ("musician", "Musiker"), ("cyclist", "Radfahrer")]
VERBS = [("runs", "läuft"), ("sits", "sitzt"), ("waits", "wartet"), ("sings", "singt"),
         ("plays", "spielt"), ("jumps", "springt")]
PLACES = [("in the park", "im Park"), ("on a bench", "auf einer Bank"), ("near the water", "am Wasser"),
          ("in front of a building", "vor einem Gebäude"), ("on the street", "auf der Straße")]
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "bel", "do", "fi", "gor", "he", "jun", "ne", "pra",
             "qui", "vol", "wen", "zu", "xi", "yan"]


def caption_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` (English, German) captions such as "a young man named Kalomi runs in the park ."."""
    rng = random.Random(seed)
    english, german = [], []
    for _ in range(n):
        (s, s_de), (a, a_de), (o, o_de), (v, v_de), (p, p_de) = (
            rng.choice(words) for words in (SUBJECTS, ADJECTIVES, NOUNS, VERBS, PLACES))
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        english.append(" ".join(w for w in (s, a, o, "named", name, v, p, ".") if w))
        german.append(" ".join(w for w in (s_de, a_de, o_de, "namens", name, v_de, p_de, ".") if w))
    return english, german


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    """2,000 training and 300 validation lines of toy English and German captions."""
    train, val = caption_pairs(2000, seed=0), caption_pairs(300, seed=1)
    return {"train.en": train[0], "train.de": train[1], "val.en": val[0], "val.de": val[1]}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, tuple[Path, Tokenizer, Tokenizer]]:
    """One (model_dir, src, tgt) per kind; sentencepiece is joint with a 1,000 vocabulary."""
    out = {}
    for kind in KINDS:
        model_dir = tmp_path_factory.mktemp(kind)
        config = DataConfig(tokenizer=kind, vocab_size=1000, joint_vocab=True)
        src, tgt = train_tokenizers(config, corpus["train.en"], corpus["train.de"], model_dir, log=_quiet)
        out[kind] = (model_dir, src, tgt)
    return out


def _quiet(_: str) -> None:
    pass


def _known(tokenizer: Tokenizer, line: str) -> bool:
    """A normal sentence: single spaces and only characters seen in training."""
    return " ".join(line.split()) == line and UNK_ID not in tokenizer.encode(line)


def test_sentencepiece_roundtrips_normal_sentences(trained, corpus):
    _, src, tgt = trained["sentencepiece"]
    for tokenizer, lines in ((src, corpus["val.en"]), (tgt, corpus["val.de"])):
        normal = [line for line in lines if _known(tokenizer, line)]
        assert len(normal) > 0.9 * len(lines)
        for line in normal:
            assert tokenizer.decode(tokenizer.encode(line)) == line
        # subwords, not characters (about 5 per word)
        assert sum(len(tokenizer.encode(s)) for s in normal) < 3 * sum(len(s.split()) for s in normal)


def test_special_ids_are_reserved_and_distinct(trained):
    assert len({PAD_ID, UNK_ID, BOS_ID, EOS_ID}) == 4
    for kind in KINDS:
        _, src, tgt = trained[kind]
        for tokenizer in (src, tgt):
            assert [tokenizer.id_to_piece(i) for i in range(4)] == list(SPECIALS)
            ids = tokenizer.encode("<pad> <bos> A dog <eos> runs . <unk>")
            assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids), kind
            # specials in the ids are skipped on decode
            plain = tokenizer.decode(tokenizer.encode("A dog"))
            assert tokenizer.decode([BOS_ID, *tokenizer.encode("A dog"), EOS_ID, PAD_ID]) == plain


def test_joint_and_separate_sentencepiece(trained, corpus, tmp_path):
    model_dir, src, tgt = trained["sentencepiece"]
    assert src is tgt
    assert json.loads((model_dir / "tokenizer.json").read_text())["src"] == "joint"
    assert (model_dir / "joint.model").is_file()
    config = DataConfig(tokenizer="sentencepiece", vocab_size=500, joint_vocab=False)
    src, tgt = train_tokenizers(config, corpus["train.en"], corpus["train.de"], tmp_path, log=_quiet)
    assert (tmp_path / "src.model").is_file() and (tmp_path / "tgt.model").is_file()
    assert src.tokens != tgt.tokens
    # each side's model fits its own language better
    german = corpus["val.de"][:100]
    assert sum(map(len, map(tgt.encode, german))) < sum(map(len, map(src.encode, german)))


def test_word_and_char_roundtrip(trained, corpus):
    _, word, _ = trained["word"]
    _, char, _ = trained["char"]
    in_vocabulary = [line for line in corpus["train.en"][:300] if UNK_ID not in word.encode(line)]
    assert len(in_vocabulary) > 50
    for line in in_vocabulary:
        assert word.decode(word.encode(line)) == " ".join(line.split())
    for line in corpus["train.en"][:300]:
        assert char.decode(char.encode(line)) == line
    assert word.pieces("a  dog\tbarks") == ["a", "dog", "barks"]
    assert char.pieces("a b") == ["a", " ", "b"]
    assert word.decode(word.encode("a zyzzyva dog")) == "a \u2047 dog"


def test_word_vocabulary_is_capped_most_frequent_first(trained, corpus):
    _, word, _ = trained["word"]
    counts = Counter(w for line in corpus["train.en"] for w in line.split())
    assert len(counts) > 1000 - len(SPECIALS)  # more word types than the vocabulary holds
    assert len(word) == 1000
    ranked = sorted(counts, key=lambda w: (-counts[w], w))  # ties in alphabetical order
    assert word.tokens[len(SPECIALS):] == ranked[:1000 - len(SPECIALS)]
    assert word.encode(ranked[-1]) == [UNK_ID]  # a word seen least of all is left out
    _, char, _ = trained["char"]
    assert set("".join(corpus["train.en"])) == set(char.tokens[4:])


def test_lowercase(corpus, tmp_path):
    config = DataConfig(tokenizer="word", vocab_size=100, lowercase=True)
    src, _ = train_tokenizers(config, ["The dog", "the cat"], ["Der Hund", "die Katze"], tmp_path,
                              log=_quiet)
    assert src.encode("THE DOG") == src.encode("the dog")
    assert UNK_ID not in src.encode("THE DOG")
    assert load_tokenizers(tmp_path)[0].lowercase


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_gives_identical_encodings(trained, corpus, kind):
    model_dir, src, tgt = trained[kind]
    src2, tgt2 = load_tokenizers(model_dir)
    assert (src2.kind, len(src2), len(tgt2)) == (kind, len(src), len(tgt))
    for line in corpus["val.en"][:50] + ["Ünïcødé ☃ \x00 <unk>"]:
        assert src2.encode(line) == src.encode(line)
        assert src2.pieces(line) == src.pieces(line)
    for line in corpus["val.de"][:50]:
        assert tgt2.encode(line) == tgt.encode(line)
    assert not list(model_dir.glob("*.tmp"))  # no leftovers of the atomic writes


@pytest.mark.parametrize("tamper, field", [
    (lambda spec: spec.update(tokens=["<unk>", "<pad>", "<bos>", "<eos>", "a"]), "tokens"),
    (lambda spec: spec.update(tokens="abc"), "tokens"),
    (lambda spec: spec.update(tokens=[*SPECIALS, "a", "a"]), "tokens"),
    (lambda spec: spec.update(tokens=[*SPECIALS, 5]), "tokens"),
    (lambda spec: spec.update(kind="bpe"), "kind"),
    (lambda spec: spec.update(lowercase="yes"), "lowercase"),
    (lambda spec: spec.pop("tokens"), "tokens"),
])
def test_tampered_vocabulary_is_refused(tmp_path, tamper, field):
    Tokenizer("word", tokens=[*SPECIALS, "a", "b"]).save(tmp_path, "src")
    path = tmp_path / "src.vocab.json"
    spec = json.loads(path.read_text())
    tamper(spec)
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=rf"src\.vocab\.json: field '{field}'"):
        Tokenizer.load(tmp_path, "src")


def test_broken_files_are_refused(trained, tmp_path):
    model_dir, src, _ = trained["sentencepiece"]
    src.save(tmp_path, "joint")
    (tmp_path / "joint.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"joint\.model"):
        Tokenizer.load(tmp_path, "joint")
    (tmp_path / "joint.vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"joint\.vocab\.json: not valid JSON"):
        Tokenizer.load(tmp_path, "joint")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "word", "src": "../x", "tgt": "t"}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: field 'src'"):
        load_tokenizers(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizers(tmp_path / "missing")


def test_training_errors_are_clear(tmp_path, corpus):
    config = DataConfig(tokenizer="sentencepiece", vocab_size=20)
    with pytest.raises(ValueError, match="data.vocab_size=20 is too small"):
        train_tokenizers(config, corpus["train.en"], corpus["train.de"], tmp_path, log=_quiet)
    with pytest.raises(ValueError, match="no non-empty line"):
        train_tokenizers(config, ["", " "], [""], tmp_path, log=_quiet)


def test_tiny_corpus_with_large_vocab_size(tmp_path):
    config = DataConfig(tokenizer="sentencepiece", vocab_size=8000, joint_vocab=False)
    src, tgt = train_tokenizers(config, ["a b c", "a b"], ["x y", "y z"], tmp_path, log=_quiet)
    assert 4 < len(src) < 100
    assert tgt.decode(tgt.encode("x y")) == "x y"


def test_decode_refuses_ids_outside_the_vocabulary(trained):
    for kind in KINDS:
        tokenizer = trained[kind][1]
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tokenizer.decode([len(tokenizer)])


AWKWARD = ["", " ", "\x00", "a\x00b", "\ud800", "x\udfffy\ud83d", "😀" * 3, "\u202e\u200b\t\r\x0b",
           "<pad><eos>", "a" * 100_000, "é" * 50_000 + " " + "b" * 50_000]


@pytest.mark.parametrize("kind", KINDS)
def test_awkward_text_never_crashes(trained, kind):
    for tokenizer in trained[kind][1:]:
        for text in AWKWARD:
            _check_encoding(tokenizer, text)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=())) | st.text())
def test_encode_never_crashes_on_any_text(trained, kind, text):
    _check_encoding(trained[kind][2], text)


def _check_encoding(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids)
    assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids)
    assert len(tokenizer.pieces(text)) == len(ids)
    assert isinstance(tokenizer.decode(ids), str)


def test_sentencepiece_learns_from_tokenizer_sample_sentences(tmp_path, corpus):
    """``data.tokenizer_sample`` reaches sentencepiece (no fixed cap of its own): 200 sentences
    give a smaller vocabulary than all 4,000, and a sample as large as the text gives the same
    tokenizer as a sample far larger."""
    def pieces(sample: int, folder: str) -> list[str]:
        config = DataConfig(tokenizer="sentencepiece", vocab_size=1000, joint_vocab=True,
                            tokenizer_sample=sample)
        src, _ = train_tokenizers(config, corpus["train.en"], corpus["train.de"],
                                  tmp_path / folder, log=_quiet)
        return [src.id_to_piece(i) for i in range(len(src))]

    everything = pieces(4000, "all")
    assert pieces(50_000_000, "huge") == everything
    assert len(pieces(200, "small")) < len(everything)
