"""Bad input data: a result, or an error that names the file and line; never a hang or a traceback.

Property-based (hypothesis) over the readers, the tokenizers, ``Translator.translate`` and the
``seq2seq translate`` command: random Unicode, control characters, NUL bytes, CRLF, BOMs,
invalid UTF-8, empty files, 100,000-character lines, mismatched pairs and truncated gzip.
Valid input and broken input come from separate generators: valid input must be read, with
exactly its content; broken input must be refused, naming the file and the broken line.
"""

from __future__ import annotations

import gzip
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from seq2seq import cli
from seq2seq.config import DataConfig
from seq2seq.data.text import GZIP_MAGIC, UTF8_BOM, DataError, read_lines, read_parallel
from seq2seq.data.tokenizers import SPECIALS, train_tokenizers
from seq2seq.decoding.translator import Translator

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=20)

# Text with everything a broken corpus holds: any code point (surrogates too), and a good
# share of line breaks, CR, NUL, BOM, tabs and other controls.
NASTY = st.sampled_from(["\n", "\r\n", "\r", "\x00", "\ufeff", "\t", "\x0b", "\x1b", "\u2028", " "])
TEXT = st.lists(st.one_of(st.text(max_size=8), NASTY), max_size=30).map("".join)
ANY_CHARS = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)  # surrogates too
LINE = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=40)
VALID_TEXT = st.one_of(TEXT, st.text(st.characters(codec="utf-8"), max_size=60))  # no lone surrogates
# Byte sequences that are never UTF-8, whatever character follows them: a stray continuation
# byte, bytes never used, a lead byte without its continuation, an encoded surrogate, an
# overlong encoding.
BAD_UTF8 = st.sampled_from([b"\x80", b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98",
                            b"\xed\xa0\x80", b"\xc0\xaf"])


@st.composite
def lines_with_one_broken(draw, line=LINE):
    """(lines as bytes, number of the broken line from 1): valid lines, one with a byte sequence
    that is never UTF-8 put in at a character boundary."""
    lines = draw(st.lists(line, min_size=1, max_size=8))
    broken = draw(st.integers(0, len(lines) - 1))
    at = draw(st.integers(0, len(lines[broken])))
    encoded = [utf8(text) for text in lines]
    encoded[broken] = utf8(lines[broken][:at]) + draw(BAD_UTF8) + utf8(lines[broken][at:])
    return encoded, broken + 1


def utf8(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


def expected_lines(data: bytes) -> list[str]:
    """What read_lines promises for ``data``: split at \\n, one \\r and the first BOM dropped."""
    data = data.removeprefix(UTF8_BOM)
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    return [piece.removesuffix(b"\r").decode("utf-8") for piece in pieces]


def first_bad_line(data: bytes) -> int:
    for number, piece in enumerate(data.removeprefix(UTF8_BOM).split(b"\n"), start=1):
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            return number
    raise AssertionError("no invalid line")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# -- readers ---------------------------------------------------------------------------------
@FAST
@given(text=VALID_TEXT, name=st.sampled_from(["f.txt", "f.gz"]))
@example(text="", name="f.txt")
@example(text="\ufeff", name="f.txt")
@example(text="\ufeffa\r\nb\x00c\r\n\r\n", name="f.gz")
@example(text="a\rb\r\r\n\u2028c", name="f.txt")
def test_read_lines_reads_valid_text_exactly(tmp_path, text, name):
    path = write(tmp_path / name, utf8(text))
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    assert read_lines(path) == [line.removesuffix("\r") for line in lines]


@FAST
@given(broken=lines_with_one_broken(), name=st.sampled_from(["f.txt", "f.gz"]),
       ending=st.sampled_from([b"\n", b"\r\n"]))
def test_read_lines_refuses_invalid_utf8_naming_file_and_line(tmp_path, broken, name, ending):
    lines, number = broken
    path = write(tmp_path / name, b"".join(line + ending for line in lines))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{number}: invalid UTF-8"):
        read_lines(path)


@FAST
@given(data=st.binary(max_size=200), name=st.sampled_from(["f.txt", "f.gz"]))
@example(data=GZIP_MAGIC, name="f.txt")
def test_read_lines_on_random_bytes_matches_what_python_decodes(tmp_path, data, name):
    """Random bytes are mostly broken, sometimes valid: Python's own decoder says which."""
    path = write(tmp_path / name, data)
    if name == "f.txt" and data.startswith(GZIP_MAGIC):  # never UTF-8: 0x8b cannot start a char
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: corrupt or truncated gzip"):
            read_lines(path)
        return
    try:
        expected = expected_lines(data)
    except UnicodeDecodeError:
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{first_bad_line(data)}: "
                                            "invalid UTF-8"):
            read_lines(path)
    else:
        assert read_lines(path) == expected


@FAST
@given(lines=st.lists(LINE, max_size=12), limit=st.integers(1, 30), crlf=st.booleans(),
       bom=st.booleans(), last_newline=st.booleans())
def test_lines_over_max_line_chars_are_refused_with_file_and_line(tmp_path, lines, limit, crlf, bom,
                                                                  last_newline):
    path = tmp_path / "f.txt"
    ending = "\r\n" if crlf else "\n"
    text = ending.join(lines) + (ending if lines and (last_newline or lines[-1] == "") else "")
    path.write_bytes(utf8(("\ufeff" if bom else "") + text))
    too_long = [n for n, line in enumerate(lines, start=1) if len(line) > limit]
    if not too_long:
        assert read_lines(path, max_line_chars=limit) == lines
        return
    n = too_long[0]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{n}: line of {len(lines[n - 1])} "
                                        rf"characters exceeds the limit of {limit} "
                                        r"\(data.max_line_chars\)"):
        read_lines(path, max_line_chars=limit)


@pytest.mark.parametrize("name", ["long.txt", "long.gz"])
@pytest.mark.parametrize("char", ["a", "€", "\U0001f600"])  # 1, 3 and 4 bytes in UTF-8
def test_100000_character_lines_are_read_and_one_more_is_refused(tmp_path, name, char):
    line = char * 100_000
    ok = write(tmp_path / name, utf8(f"short\n{line}\r\nend"))
    assert read_lines(ok) == ["short", line, "end"]
    bad = write(tmp_path / ("over" + name), utf8(f"short\n{line}{char}\nend\n"))
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:2: line of 100001 characters "
                                        r"exceeds the limit of 100000 \(data.max_line_chars\)"):
        read_lines(bad)


@FAST
@given(text=VALID_TEXT, cut=st.floats(0, 1, exclude_min=True, exclude_max=True))
def test_truncated_gzip_names_the_file(tmp_path, text, cut):
    whole = gzip.compress(utf8(text))
    path = tmp_path / "cut.gz"
    path.write_bytes(whole[:max(1, int(len(whole) * cut))])  # at least one byte gone, one left
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:\d+: corrupt or truncated gzip file"):
        read_lines(path)
    path.write_bytes(b"")
    assert read_lines(path) == []  # an empty .gz file is an empty text


def test_gzip_magic_with_garbage_names_the_file(tmp_path):
    path = write(tmp_path / "fake.txt", b"\x1f\x8b this is not gzip\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: corrupt or truncated gzip"):
        read_lines(path)


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'nope.txt'))}: no such file"):
        read_lines(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: cannot read"):
        read_lines(tmp_path)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(utf8("".join(line + "\n" for line in lines)))
    return path


@FAST
@given(pairs=st.lists(st.tuples(LINE, LINE), max_size=6))
def test_read_parallel_reads_files_of_the_same_length(tmp_path, pairs):
    src, tgt = [s for s, _ in pairs], [t for _, t in pairs]
    a, b = write_lines(tmp_path / "a.src", src), write_lines(tmp_path / "b.tgt", tgt)
    assert read_parallel(a, b) == (src, tgt)


@FAST
@given(src=st.lists(LINE, max_size=6), extra=st.lists(LINE, min_size=1, max_size=3),
       longer=st.sampled_from(["src", "tgt"]))
def test_read_parallel_names_both_files_when_their_lengths_differ(tmp_path, src, extra, longer):
    tgt = list(reversed(src)) + extra
    if longer == "src":
        src, tgt = tgt, src
    a, b = write_lines(tmp_path / "a.src", src), write_lines(tmp_path / "b.tgt", tgt)
    with pytest.raises(DataError, match=rf"{re.escape(str(a))} has {len(src)} lines, "
                                        rf"{re.escape(str(b))} has {len(tgt)}"):
        read_parallel(a, b)


NO_TAB = st.text(st.characters(codec="utf-8", exclude_characters="\n\r\t"), max_size=10)


@FAST
@given(pairs=st.lists(st.tuples(NO_TAB, NO_TAB), max_size=6))
def test_tsv_pairs_are_read(tmp_path, pairs):
    path = write_lines(tmp_path / "pairs.tsv", [f"{s}\t{t}" for s, t in pairs])
    assert read_parallel(path, None) == ([s for s, _ in pairs], [t for _, t in pairs])


@FAST
@given(pairs=st.lists(st.tuples(NO_TAB, NO_TAB), max_size=6), bad=st.data(),
       fields=st.lists(NO_TAB, max_size=4).filter(lambda f: len(f) != 2))
def test_a_tsv_line_without_one_tab_is_refused_naming_file_and_line(tmp_path, pairs, bad, fields):
    lines = [f"{s}\t{t}" for s, t in pairs]
    number = bad.draw(st.integers(1, len(lines) + 1))
    lines.insert(number - 1, "\t".join(fields))  # no tab, or two or more
    path = write_lines(tmp_path / "pairs.tsv", lines)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{number}: expected source<TAB>target"):
        read_parallel(path, None)


def test_empty_files_read_as_no_lines(tmp_path):
    for name in ("empty.txt", "empty.gz"):
        assert read_lines(write(tmp_path / name, b"")) == []
    assert read_parallel(tmp_path / "empty.txt", tmp_path / "empty.gz") == ([], [])


# -- tokenizers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A trained tokenizer of each kind, on text that has control characters, NUL and emoji."""
    text = ["a b c\x00d", "über straße \x1b[31m", "😀 x\ty", "the cat sat", "\ufeffbom line"] * 20
    made = {}
    for kind in ("word", "char", "sentencepiece"):
        directory = tmp_path_factory.mktemp(kind)
        config = DataConfig(tokenizer=kind, vocab_size=40, joint_vocab=True)
        made[kind] = train_tokenizers(config, text, text, directory, log=lambda _: None)[0]
    return made


@FAST
@given(text=st.one_of(TEXT, ANY_CHARS), kind=st.sampled_from(["word", "char", "sentencepiece"]))
@example(text="\ud800 lone surrogate \udfff", kind="sentencepiece")
@example(text="<pad> <eos> <unk>", kind="word")
def test_tokenizers_take_any_text(tokenizers, text, kind):
    tokenizer = tokenizers[kind]
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids)
    if kind == "word":
        assert len(ids) == len(text.split())
        assert not set(ids) & {0, 2, 3}, "a literal special token in the text is just unknown"
    decoded = tokenizer.decode(ids)
    assert isinstance(decoded, str)
    decoded.encode("utf-8")  # no lone surrogate comes back out
    assert len(tokenizer.pieces(text)) == len(ids) or kind == "sentencepiece"


@FAST
@given(ids=st.lists(st.integers(-5, 80), max_size=20), kind=st.sampled_from(["word", "char",
                                                                            "sentencepiece"]))
def test_decode_takes_vocabulary_ids_and_names_the_others(tokenizers, ids, kind):
    tokenizer = tokenizers[kind]
    outside = [i for i in ids if not 0 <= i < len(tokenizer)]
    if outside:
        with pytest.raises(ValueError, match=rf"token id {outside[0]} is outside the vocabulary"):
            tokenizer.decode(ids)
    else:
        assert isinstance(tokenizer.decode(ids), str)
    assert tokenizer.tokens[:4] == list(SPECIALS)


# -- translate -------------------------------------------------------------------------------
@SLOW
@given(sentences=st.lists(st.one_of(TEXT, ANY_CHARS), max_size=6), beam=st.sampled_from([1, 3]))
@example(sentences=["", " ", "\x00", "\ufeff", "a b c d e f g h"], beam=3)
def test_translate_takes_any_text(translator, sentences, beam):
    """Any text of up to 60 characters (far below decode.max_input_len tokens) is translated:
    one line out per sentence, the same as when translated alone. Longer ones: the tests of
    max_input_len below."""
    out = translator.translate(sentences, beam=beam)
    assert len(out) == len(sentences) and all(isinstance(t, str) and "\n" not in t for t in out)
    assert out == [translator.translate([s], beam=beam)[0] for s in sentences]
    blank = [o for s, o in zip(sentences, out) if not translator.src_tok.encode(s)]
    assert blank == [""] * len(blank)  # no tokens: nothing to translate


@pytest.fixture
def long_line_translator(trained_model_dir):
    return Translator.load(trained_model_dir, device="cpu")


@pytest.mark.parametrize("long_pairs", ["skip", "truncate"])
def test_a_100000_character_line_is_refused_or_truncated_as_the_config_says(long_line_translator,
                                                                            long_pairs):
    translator = long_line_translator
    translator.config.data.long_pairs = long_pairs
    limit = translator.config.decode.max_input_len = 300  # the default, 5,000, is slow to test
    line = " ".join("abcdefgh"[i % 8] for i in range(50_000))  # 99,999 characters, 50,000 words
    if long_pairs == "skip":
        with pytest.raises(ValueError, match=rf"^input:2: 50000 tokens, more than "
                                             rf"decode.max_input_len={limit}; raise it, or set "
                                             r"data.long_pairs to 'truncate'"):
            translator.translate(["a b", line])
    else:
        short, cut = translator.translate(["a b", line], beam=1)
        assert short == "b a" and 0 < len(cut.split()) <= 1.5 * limit + 10


def run_translate(model_dir: Path, path: Path, capsys) -> tuple[int, str, str]:
    """``seq2seq translate --input PATH`` in this process: (exit code, stderr, output)."""
    capsys.readouterr()
    out = path.with_suffix(".out")
    out.unlink(missing_ok=True)
    code = cli.main(["translate", "--model-dir", str(model_dir), "--input", str(path),
                     "--output", str(out), "--device", "cpu", "--beam", "1"])
    return code, capsys.readouterr().err, out.read_text("utf-8") if out.exists() else ""


@SLOW
@given(text=VALID_TEXT, name=st.sampled_from(["in.txt", "in.gz"]))
@example(text="", name="in.txt")
@example(text="\ufeffa b\r\nc\x00d\n\nh g\r", name="in.gz")
def test_translate_command_translates_every_line_of_a_valid_file(trained_model_dir, translator,
                                                                 tmp_path, capsys, text, name):
    path = write(tmp_path / name, utf8(text))
    code, err, out = run_translate(trained_model_dir, path, capsys)
    assert code == 0, err
    lines = expected_lines(utf8(text))
    assert out == "".join(t + "\n" for t in translator.translate(lines, beam=1))


@SLOW
@given(broken=lines_with_one_broken(), name=st.sampled_from(["in.txt", "in.gz"]))
@example(broken=([b"a b", b"c\x00d", b"\xff"], 3), name="in.txt")
def test_translate_command_refuses_a_file_with_invalid_utf8_naming_the_line(
        trained_model_dir, tmp_path, capsys, broken, name):
    lines, number = broken
    path = write(tmp_path / name, b"".join(line + b"\n" for line in lines))
    code, err, out = run_translate(trained_model_dir, path, capsys)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.startswith(f"seq2seq: error: {path}:{number}: invalid UTF-8"), err


def test_translate_command_refuses_a_line_over_max_line_chars(trained_model_dir, tmp_path, capsys):
    path = tmp_path / "in.txt"
    path.write_text("a b\n" + "a" * 100_001 + "\n")
    code, err, out = run_translate(trained_model_dir, path, capsys)
    assert code == 1 and out == ""
    assert f"seq2seq: error: {path}:2: line of 100001 characters exceeds the limit of 100000" in err


def test_translate_command_refuses_a_line_over_max_input_len_tokens(trained_model_dir, tmp_path,
                                                                   capsys):
    path = tmp_path / "in.txt"
    path.write_text("a b\n" * 3 + "a " * 6000 + "\n")
    code, err, out = run_translate(trained_model_dir, path, capsys)
    assert code == 1 and out == ""
    assert f"seq2seq: error: {path}:4: 6000 tokens, more than decode.max_input_len=5000" in err


@pytest.mark.parametrize("data, message", [
    (b"a b\n\xff\xfe\n", "<stdin>:2: invalid UTF-8"),
    (b"a b\n" + b"c" * 100_001 + b"\n", "<stdin>:2: line of 100001 characters exceeds"),
    (b"a b\n" + "€".encode() * 100_001, "<stdin>:2: line of 100001 characters exceeds"),
    (b"a b\n" + b"c" * 1_000_000, "<stdin>:2: line of 1000000 characters exceeds the limit of 100000"),
    (b"a b\n" + b"c" * 10_000_000, "<stdin>:2: line of more than 66"),  # counted up to 16x the bound
    (gzip.compress(b"a b\n\xff\n"), "<stdin>:2: invalid UTF-8"),  # gunzipped as a file is
    (b"\x1f\x8b\x08\x00garbage", "<stdin>:1: corrupt or truncated gzip file"),
], ids=["invalid-utf8", "long-ascii", "long-multibyte", "huge", "endless", "gzip-invalid-utf8", "bad-gzip"])
def test_translate_command_on_bad_stdin(trained_model_dir, monkeypatch, capsys, data, message):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    capsys.readouterr()
    assert cli.main(["translate", "--model-dir", str(trained_model_dir), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"seq2seq: error: {message}") and "Traceback" not in err


def test_gzip_on_stdin_reads_as_the_same_file_given_by_name(trained_model_dir, tmp_path):
    """``gzip -c f | seq2seq translate`` (a real pipe) gives what ``--input f.gz``, ``--input
    /dev/stdin`` and the plain text on stdin give; before, stdin refused it as invalid UTF-8."""
    from conftest import run_cli

    text = "".join(f"{' '.join('abcdef'[(i + j) % 6] for j in range(1 + i % 5))}\n" for i in range(40))
    (tmp_path / "in.txt").write_text(text)
    (tmp_path / "in.txt.gz").write_bytes(gzip.compress(text.encode()))
    common = ("translate", "--model-dir", trained_model_dir, "--device", "cpu", "--beam", "1")
    plain = run_cli(*common, input=text.encode())
    assert plain.returncode == 0 and len(plain.stdout.splitlines()) == 40, plain.stderr
    command = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "seq2seq", *common))
    piped = subprocess.run(f"gzip -c {shlex.quote(str(tmp_path / 'in.txt'))} | {command}", shell=True,
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout == plain.stdout, piped.stderr
    for flags in (["--input", tmp_path / "in.txt.gz"], ["--input", "/dev/stdin"]):
        done = run_cli(*common, *flags, input=gzip.compress(text.encode()))
        assert done.returncode == 0 and done.stdout == plain.stdout, done.stderr


def test_translate_command_in_a_child_process_reads_bom_crlf_nul(trained_model_dir):
    """The real command: stdin with a BOM, CRLF and NUL gives one line out per line in."""
    from conftest import run_cli

    done = run_cli("translate", "--model-dir", trained_model_dir, "--device", "cpu", "--beam", "1",
                   input=UTF8_BOM + b"a b c\r\nd\x00e f\r\n\r\n" + b"\xff\n")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("seq2seq: error: <stdin>:4: invalid UTF-8")
    done = run_cli("translate", "--model-dir", trained_model_dir, "--device", "cpu", "--beam", "1",
                   input=UTF8_BOM + b"a b c\r\nd\x00e f\r\n\r\n")
    assert done.returncode == 0, done.stderr
    # "d\x00e" is one unknown word to the word tokenizer: the line translates as it does in-process
    second = Translator.load(trained_model_dir, device="cpu").translate(["d\x00e f"], beam=1)[0]
    assert done.stdout.split("\n") == ["c b a", second, "", ""]


# -- training data ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("5E+2", 500.0), ("-.5e1", -5.0)])
def test_numbers_that_yaml_reads_as_strings_are_accepted(text, value):
    """YAML 1.1 (yaml.safe_load) reads 1e-4 as a string; a float setting takes it as a number."""
    from seq2seq.config import Config, ConfigError

    config = Config.from_dict(yaml_load(f"decode: {{length_penalty: {text}}}"))
    assert config.decode.length_penalty == value
    assert Config().override([f"decode.length_penalty={text}"]).decode.length_penalty == value
    with pytest.raises(ConfigError, match="train.batch_tokens: expected int, got 1.5"):
        Config().override(["train.batch_tokens=1.5e0"])
    with pytest.raises(ConfigError, match="train.min_lr: expected float, got '1e-4x'"):
        Config().override(["train.min_lr=1e-4x"])


def yaml_load(text: str):
    import yaml

    return yaml.safe_load(text)



def _train(corpus: Path, model_dir: Path, capsys, *settings: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["train", "--config", str(corpus / "cfg.yaml"), "--data-dir", str(corpus),
                     "--model-dir", str(model_dir), "--set", "train.max_steps=2",
                     "--set", "train.threads=1", *[f"--set={s}" for s in settings]])
    return code, capsys.readouterr().err


@pytest.fixture
def small_corpus(reversal_corpus, tmp_path) -> Path:
    """200 pairs of the reversal task, 3 of them 150 words long; validation on 20 pairs."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for side in ("src", "tgt"):
        lines = (reversal_corpus / f"train.{side}").read_text().splitlines()[:197]
        lines += [" ".join(["a", "b", "c"] * 50)] * 3
        (corpus / f"train.{side}").write_text("\n".join(lines) + "\n")
        valid = (reversal_corpus / f"valid.{side}").read_text().splitlines()[:20]
        (corpus / f"valid.{side}").write_text("\n".join(valid) + "\n")
    (corpus / "cfg.yaml").write_text((reversal_corpus / "cfg.yaml").read_text())
    return corpus


@pytest.mark.parametrize("long_pairs, kept, counts", [
    ("skip", 197, "skipped 0 with an empty side, 3 longer than 100 tokens; truncated 0"),
    ("truncate", 200, "skipped 0 with an empty side, 0 longer than 100 tokens; truncated 3"),
], ids=["skip", "truncate"])
def test_long_training_pairs_are_skipped_or_truncated_and_counted(small_corpus, tmp_path, capsys,
                                                                  long_pairs, kept, counts):
    code, err = _train(small_corpus, tmp_path / "model", capsys, f"data.long_pairs={long_pairs}")
    assert code == 0, err
    assert re.search(rf"^\w+ {kept} of 200 pairs\b[^\n]*: {re.escape(counts)}", err, re.MULTILINE), err


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "train.tgt").write_text("a\nb\n"), "parallel files differ in length: {c}/train.src "
                                                        "has 200 lines, {c}/train.tgt has 2"),
    (lambda c: (c / "train.src").write_bytes(b""), "parallel files differ in length"),
    (lambda c: [(c / f"train.{s}").write_bytes(b"") for s in ("src", "tgt")],
     "{c}/train.src: the training data is empty"),
    (lambda c: [(c / f"train.{s}").write_bytes(b" \n\t\n") for s in ("src", "tgt")],
     "{c}/train.src: no usable training pairs"),
    (lambda c: (c / "train.src").write_bytes(b"a\n" * 5 + b"\xc3\x28\n" + b"a\n" * 194),
     "{c}/train.src:6: invalid UTF-8"),
    (lambda c: (c / "valid.tgt").write_bytes(gzip.compress(b"a\n" * 20)[:12]),
     "{c}/valid.tgt:1: corrupt or truncated gzip file"),
    (lambda c: (c / "train.src").unlink(), "{c}/train.src: no such file"),
], ids=["mismatched", "empty source", "both empty", "only whitespace", "invalid utf-8",
        "truncated gzip", "missing"])
def test_broken_training_data_is_an_error_naming_the_file(small_corpus, tmp_path, capsys, damage,
                                                          message):
    damage(small_corpus)
    code, err = _train(small_corpus, tmp_path / "model", capsys)
    assert code == 1 and "Traceback" not in err
    assert f"seq2seq: error: {message.format(c=small_corpus)}" in err


@pytest.mark.parametrize("limit", [400, None], ids=["lowered", "the default"])
def test_a_training_line_over_max_line_chars_names_file_and_line(small_corpus, tmp_path, capsys, limit):
    """Over a lowered limit, and over the default that users get (100,000 characters)."""
    path = small_corpus / "train.tgt"
    lines = path.read_text().splitlines()
    length = 500 if limit else 100_002
    lines[41] = "b " * (length // 2)
    path.write_text("\n".join(lines) + "\n")
    settings = [f"data.max_line_chars={limit}"] if limit else []
    code, err = _train(small_corpus, tmp_path / "model", capsys, *settings)
    assert code == 1 and "Traceback" not in err
    assert (f"seq2seq: error: {path}:42: line of {length} characters exceeds the limit of "
            f"{limit or 100000}") in err


# -- the NumPy API: EncoderDecoderRNN ------------------------------------------------------------
@pytest.fixture(scope="module")
def rnn():
    """Input size 2, output 3 classes, Bahdanau attention; trained one epoch (target length 3)."""
    import numpy as np

    from seq2seq.vectors.model import EncoderDecoderRNN

    model = EncoderDecoderRNN(2, 8, 3, loss="cross_entropy", attention="bahdanau", seed=0,
                              device="cpu")
    rng = np.random.default_rng(0)
    model.train(rng.random((6, 4, 2)), rng.integers(0, 3, (6, 3)), epochs=1, learning_rate=0.01,
                verbose=False)
    return model


def _numpy_cases():
    import numpy as np

    nan, inf = np.full((5, 4, 2), np.nan), np.full((5, 4, 2), np.inf)
    return {
        "4-d not columns": (np.zeros((5, 4, 2, 2)), r"shape \(5, 4, 2, 2\): expected \(n, T, 2\) or "
                                                    r"\(n, T, 2, 1\)"),
        "wrong features": (np.zeros((5, 4, 3)), "3 features per step .* input_size is 2"),
        "1-d": (np.zeros(5), r"shape \(5,\): expected \(n, T, 2\)"),
        "scalar": (3.0, r"shape \(\): expected \(n, T, 2\)"),
        "nan": (nan, r"NaN or infinite values: (X\[0, 0, 0\] is nan; )?expected finite numbers"),
        "inf": (inf, r"NaN or infinite values: (X\[0, 0, 0\] is inf; )?expected finite numbers"),
        "no sequences": (np.zeros((0, 4, 2)), "empty .*expected at least one sequence"),
        "no steps": (np.zeros((5, 0, 2)), "empty .*expected at least one sequence"),
        "empty list": ([], "expected"),
        "strings": (np.array([[["a", "b"]]]), "must contain numbers, got dtype <U1"),
        "complex": (np.zeros((5, 4, 2), complex), "must contain numbers, got dtype complex128"),
        "None": (None, "must contain numbers"),
        "ragged, wrong features": ([np.zeros((3, 2)), np.zeros((5, 3))],
                                   r"X\[1\] has 3 features per step"),
        "ragged, an empty one": ([np.zeros((3, 2)), np.zeros((0, 2))],
                                 r"X\[1\] is empty: expected a sequence of at least one step"),
        "ragged, nan": ([np.zeros((3, 2)), np.full((2, 2), np.nan)], r"X\[1\] contains NaN"),
        "ragged, strings": ([["a", "b"], ["c"]], r"X\[0\] must contain numbers"),
        "ragged steps": ([[[0, 0], [1]]], r"X\[0\] has steps of different sizes: expected 2 features"),
    }


NUMPY_CASES = list(_numpy_cases())


@pytest.mark.parametrize("case", NUMPY_CASES)
def test_train_and_predict_batch_refuse_bad_inputs_saying_what_was_expected(rnn, case):
    import numpy as np

    X, message = _numpy_cases()[case]
    with pytest.raises(ValueError, match=message):
        rnn.predict_batch(X)
    with pytest.raises(ValueError, match=message):
        rnn.train(X, np.zeros((5, 3), dtype=int), epochs=1, learning_rate=0.01, verbose=False)


def test_ragged_lists_are_accepted_and_padding_changes_nothing(rnn):
    import numpy as np

    a, b = np.random.default_rng(1).random((3, 2)), np.random.default_rng(2).random((5, 2))
    together = rnn.predict_batch([a, b])
    assert together.shape == (2, 3, 3)
    np.testing.assert_allclose(together[0], rnn.predict_batch([a])[0], atol=1e-6)
    np.testing.assert_allclose(together[0], np.hstack(rnn.predict(a)).T, atol=1e-6)


@pytest.mark.parametrize("Y, message", [
    ("count", "X has 5 sequences but Y has 3: expected one target sequence per input sequence"),
    ("class 7", r"class ids from 7 to 7: expected 0 to 2 \(output_size 3\)"),
    ("class -1", "class ids from -1 to -1: expected 0 to 2"),
    ("not probabilities", "cross-entropy targets must be probability vectors"),
    ("nan", "Y contains NaN or infinite values"),
    ("ragged", "Y's sequences have different lengths: expected every target sequence to have the same"),
    ("float classes", r"Y has shape \(5, 3\): expected \(n, T_out, 3\)"),
    ("strings", "Y must contain numbers"),
    ("no steps", r"Y is empty \(shape \(5, 0\)\)"),
    ("4 values", r"Y has 4 values per step .* output_size is 3"),
])
def test_train_refuses_bad_targets(rnn, Y, message):
    import numpy as np

    targets = {"count": np.zeros((3, 3), int), "class 7": np.full((5, 3), 7),
               "class -1": np.full((5, 3), -1), "not probabilities": np.ones((5, 3, 3)),
               "nan": np.full((5, 3, 3), np.nan), "ragged": [[0, 1], [0], [1], [2], [0]],
               "float classes": np.zeros((5, 3)), "strings": np.array([["a"] * 3] * 5),
               "no steps": np.zeros((5, 0), int), "4 values": np.zeros((5, 3, 4))}[Y]
    with pytest.raises(ValueError, match=message):
        rnn.train(np.zeros((5, 4, 2)), targets, epochs=1, learning_rate=0.01, verbose=False)


@pytest.mark.parametrize("settings, message", [
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"epochs": 1.5}, "epochs must be a positive integer"),
    ({"learning_rate": 0}, "learning_rate must be a positive number"),
    ({"learning_rate": float("nan")}, "learning_rate must be a positive number"),
    ({"learning_rate": "0.1"}, "learning_rate must be a positive number"),
    ({"decay_rate": -1}, "decay_rate must be a number >= 0"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"optimizer": "adamw"}, "unknown optimizer 'adamw': expected 'adam' or 'sgd'"),
    ({"periodic_callback": 3}, "periodic_callback must be callable"),
])
def test_train_refuses_bad_settings(rnn, settings, message):
    import numpy as np

    args = {"epochs": 1, "learning_rate": 0.01, "verbose": False, **settings}
    with pytest.raises(ValueError, match=message):
        rnn.train(np.zeros((5, 4, 2)), np.zeros((5, 3), int), **args)


@pytest.mark.parametrize("x, message", [
    ("batch", r"shape \(5, 4, 2\): expected one sequence \(T, 2\) .*use predict_batch for many"),
    ("wrong features", "3 features per step"),
    ("nan", "x contains NaN or infinite values"),
    ("empty", "x is empty: expected a sequence of at least one step"),
    ("string", "x must contain numbers"),
    ("ragged", "x has steps of different sizes: expected 2 features each"),
])
def test_predict_refuses_bad_inputs(rnn, x, message):
    import numpy as np

    value = {"batch": np.zeros((5, 4, 2)), "wrong features": np.zeros((4, 3)),
             "nan": np.full((4, 2), np.nan), "empty": np.zeros((0, 2)), "string": "ab",
             "ragged": [[0, 0], [0]]}[x]
    with pytest.raises(ValueError, match=message):
        rnn.predict(value)


@pytest.mark.parametrize("length", [0, -1, 1.5, "3", True])
def test_predict_refuses_a_bad_length(rnn, length):
    import numpy as np

    with pytest.raises(ValueError, match=f"length must be a positive integer, got {length!r}"):
        rnn.predict(np.zeros((4, 2)), length=length)


@pytest.mark.parametrize("pred, true, message", [
    ("(5,3,3)", "(2,3,3)", r"Y_pred has shape \(5, 3, 3\) but Y_true has \(2, 3, 3\)"),
    ("nan", "(5,3)", "Y_pred contains NaN or infinite values"),
    ("(5,3,4)", "(5,3)", r"Y_pred has shape \(5, 3, 4\): expected steps of 3 values"),
    ("(5,3,3)", "classes 5", "Y_true has class ids from 5 to 5: expected 0 to 2"),
    ("(5,3,3)", "strings", "Y_true must contain numbers"),
    ("ragged", "(2,)", "Y_pred has sequences or steps of different sizes"),
    ("empty", "empty", r"Y_pred is empty \(shape \(0, 3\)\): expected at least one step of 3"),
])
def test_loss_function_refuses_bad_inputs(rnn, pred, true, message):
    import numpy as np

    arrays = {"(5,3,3)": np.full((5, 3, 3), 1 / 3), "(2,3,3)": np.full((2, 3, 3), 1 / 3),
              "nan": np.full((5, 3, 3), np.nan), "(5,3)": np.zeros((5, 3), int),
              "(5,3,4)": np.full((5, 3, 4), 0.25), "classes 5": np.full((5, 3), 5),
              "strings": np.array([["a"] * 3] * 5), "ragged": [[1, 0, 0], [0, 1]],
              "(2,)": np.zeros(2, int), "empty": np.zeros((0, 3))}
    with pytest.raises(ValueError, match=message):
        rnn.loss_function(arrays[pred], arrays[true])


@pytest.mark.parametrize("settings, message", [
    ({"input_size": 0}, "input_size must be a positive integer, got 0"),
    ({"input_size": 2.0}, "input_size must be a positive integer, got 2.0"),
    ({"hidden_size": "8"}, "hidden_size must be a positive integer, got '8'"),
    ({"output_size": True}, "output_size must be a positive integer, got True"),
    ({"loss": "MSE"}, "unknown loss 'MSE': expected 'mse' or 'cross_entropy'"),
    ({"cell": "LSTM"}, "unknown cell 'LSTM': expected one of 'rnn', 'gru', 'lstm'"),
    ({"attention": "foo"}, "unknown attention 'foo': expected one of None, 'bahdanau'"),
    ({"attention": 1}, "attention must be None or a name"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ({"dropout": float("nan")}, r"dropout must be a number in \[0, 1\)"),
    ({"seed": -1}, "seed must be None or a non-negative integer"),
    ({"num_layers": 0}, "num_layers must be a positive integer"),
    ({"bidirectional": "no"}, "bidirectional must be True or False, got 'no'"),
    ({"apply_softmax": "yes"}, "apply_softmax must be True or False, got 'yes'"),
    ({"device": "tpu"}, "unknown device 'tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_constructor_refuses_bad_settings(settings, message):
    from seq2seq.vectors.model import EncoderDecoderRNN

    args = {"input_size": 2, "hidden_size": 8, "output_size": 3, **settings}
    with pytest.raises(ValueError, match=message):
        EncoderDecoderRNN(args.pop("input_size"), args.pop("hidden_size"), args.pop("output_size"),
                          **args)


def test_save_into_a_file_and_load_from_nowhere_are_clear_errors(rnn, tmp_path):
    from seq2seq.vectors.model import EncoderDecoderRNN

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'file'))} is a file: save\(\) "
                                         "writes a directory"):
        rnn.save(tmp_path / "file")
    with pytest.raises(ValueError, match="settings.json not found: expected a directory written by save"):
        EncoderDecoderRNN.load(tmp_path / "nowhere")
