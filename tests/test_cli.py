"""The ``seq2seq`` command end to end, and the clear errors it gives for bad inputs.

The end-to-end tests run the command in a subprocess on the session's tiny reversal model
(trained by ``seq2seq train`` in conftest). The bad-input tests call ``cli.main`` in-process
(the same function ``python -m seq2seq`` exits with), except one that checks the real exit
status of a subprocess.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading

import pytest
from conftest import long_line, run_cli

from seq2seq import cli
from seq2seq.config import packaged_configs
from seq2seq.models.checkpoint import CheckpointError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIGNATURE = re.compile(r"nrefs:1\|case:(mixed|lc)\|eff:no\|tok:13a\|smooth:exp\|version:\d+\.\d+\.\d+")
SENTENCES = ["a b c", "h g f e d", "c c a b h h g", "d e"]
ODD_LINES = ["", "😀🎉 🚀 a b", long_line(5000), "   ", "a b c"]  # empty, emoji, 5,000 characters


# -- end to end ---------------------------------------------------------------------------------
def test_evaluate_reaches_bleu_90(trained_model_dir, reversal_corpus):
    done = run_cli("evaluate", "--model-dir", trained_model_dir, "--src", reversal_corpus / "test.src",
                   "--ref", reversal_corpus / "test.tgt")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"bleu", "chrf", "signature", "sentences_per_s"} <= set(result)
    assert result["bleu"] >= 90, result
    assert result["chrf"] >= 90, result
    assert SIGNATURE.fullmatch(result["signature"]) and "case:mixed" in result["signature"]
    assert result["sentences"] == 200 and result["sentences_per_s"] > 0


def test_evaluate_lowercase_changes_the_signature(trained_model_dir, reversal_corpus, capsys):
    code = cli.main(["evaluate", "--model-dir", str(trained_model_dir), "--beam", "1", "--lowercase",
                     "--src", str(reversal_corpus / "valid.src"),
                     "--ref", str(reversal_corpus / "valid.tgt")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert "case:lc" in result["signature"] and result["beam"] == 1 and result["bleu"] >= 90


def test_translate_stdin_to_stdout(trained_model_dir, translator):
    done = run_cli("translate", "--model-dir", trained_model_dir,
                   input="".join(s + "\n" for s in SENTENCES))
    assert done.returncode == 0, done.stderr
    out = done.stdout.split("\n")
    assert out[-1] == "" and out[:-1] == translator.translate(SENTENCES)
    reversed_ok = sum(o == " ".join(reversed(s.split())) for o, s in zip(out, SENTENCES))
    assert reversed_ok >= 3, out  # the model learned the task


def test_translate_input_output_files_with_odd_lines(trained_model_dir, tmp_path):
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("".join(line + "\n" for line in ODD_LINES), encoding="utf-8")
    done = run_cli("translate", "--model-dir", trained_model_dir, "--input", source, "--output", target)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    text = target.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == len(ODD_LINES)
    lines = text.split("\n")[:-1]
    assert lines[0] == "" and lines[-1] == "c b a"
    assert not list(tmp_path.glob(".*.tmp"))


def test_translate_n_best(trained_model_dir, translator):
    done = run_cli("translate", "--model-dir", trained_model_dir, "--n-best", "3", "--beam", "3",
                   input="".join(s + "\n" for s in SENTENCES))
    assert done.returncode == 0, done.stderr
    rows = done.stdout.rstrip("\n").split("\n")
    assert len(rows) == len(SENTENCES)
    for row, best in zip(rows, translator.translate(SENTENCES, beam=3)):
        fields = row.split("\t")
        assert len(fields) == 6  # translation, score, three times
        texts, scores = fields[0::2], [float(s) for s in fields[1::2]]
        assert texts[0] == best
        assert scores == sorted(scores, reverse=True)
        assert len(set(texts)) == 3


def test_attention_writes_png(trained_model_dir, tmp_path):
    png = tmp_path / "x.png"
    done = run_cli("attention", "--model-dir", trained_model_dir, "--text", "a b c d e", "--output", png)
    assert done.returncode == 0, done.stderr
    assert str(png) in done.stdout
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


# -- bad inputs: a clear message and a non-zero exit --------------------------------------------
def train_args(corpus, model_dir, *extra):
    return ["train", "--config", str(corpus / "cfg.yaml"), "--data-dir", str(corpus),
            "--model-dir", str(model_dir), *extra]


def fails(capsys, argv: list[str], *patterns: str) -> str:
    """Run ``cli.main(argv)``: it must return 1 and print each pattern (a regex) on stderr."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("seq2seq: error: ") and "Traceback" not in err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in {err!r}"
    return err


@pytest.fixture()
def bad_corpus(reversal_corpus, tmp_path):
    """A copy of the corpus' valid split as training data, and the config, to spoil."""
    for name in ("valid.src", "valid.tgt", "cfg.yaml"):
        (tmp_path / name).write_bytes((reversal_corpus / name).read_bytes())
    config = (tmp_path / "cfg.yaml").read_text().replace("train.src", "valid.src")
    (tmp_path / "cfg.yaml").write_text(config.replace("train.tgt", "valid.tgt"))
    return tmp_path


def test_missing_file_exits_nonzero_in_a_subprocess(bad_corpus, tmp_path):
    (bad_corpus / "valid.tgt").unlink()
    done = run_cli(*train_args(bad_corpus, tmp_path / "m"))
    assert done.returncode == 1
    assert re.search(r"seq2seq: error: \S*valid\.tgt: no such file", done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_different_line_counts_name_both_files(bad_corpus, tmp_path, capsys):
    with open(bad_corpus / "valid.tgt", "a", encoding="utf-8") as handle:
        handle.write("a b c\n")
    fails(capsys, train_args(bad_corpus, tmp_path / "m"),
          r"valid\.src has 200 lines", r"valid\.tgt has 201")


def test_invalid_utf8_names_file_and_line(bad_corpus, tmp_path, capsys):
    lines = (bad_corpus / "valid.src").read_bytes().split(b"\n")
    lines[41] = b"a b \xff\xfe c"
    (bad_corpus / "valid.src").write_bytes(b"\n".join(lines))
    fails(capsys, train_args(bad_corpus, tmp_path / "m"), r"valid\.src:42: invalid UTF-8")


def test_bad_config_key_is_named(bad_corpus, tmp_path, capsys):
    config = bad_corpus / "cfg.yaml"
    config.write_text(config.read_text().replace("hidden_size", "hiden_size"))
    fails(capsys, train_args(bad_corpus, tmp_path / "m"), r"unknown setting 'model\.hiden_size'")
    assert not (tmp_path / "m").exists()  # nothing is created before the config is valid


@pytest.mark.parametrize("assignment, pattern", [
    ("train.lr", r"--set 'train\.lr': expected section\.key=value"),
    ("lr=0.1", r"'lr' must look like section\.key"),
    ("train.lrr=0.1", r"unknown setting 'train\.lrr'"),
    ("train.lr=fast", r"train\.lr: expected float, got 'fast'"),
    ("decode.n_best=9", r"decode\.n_best \(9\) must be <= decode\.beam \(3\)"),
])
def test_bad_set_is_explained(bad_corpus, tmp_path, capsys, assignment, pattern):
    fails(capsys, train_args(bad_corpus, tmp_path / "m", "--set", assignment), pattern)


def test_not_a_model_dir(tmp_path, capsys):
    fails(capsys, ["translate", "--model-dir", tmp_path], r"not a model directory \(no config\.yaml\)")
    fails(capsys, ["evaluate", "--model-dir", tmp_path / "missing", "--src", "x", "--ref", "y"],
          "not a model directory")
    fails(capsys, ["train", "--model-dir", tmp_path, "--resume"], r"--resume: \S+ is not a model directory")


def test_translate_bad_input_files(trained_model_dir, tmp_path, capsys):
    model = ["--model-dir", trained_model_dir]
    fails(capsys, ["translate", *model, "--input", tmp_path / "nope.txt"], r"nope\.txt: no such file")
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"a b c\nd \xc3\x28 e\n")
    fails(capsys, ["translate", *model, "--input", broken], r"broken\.txt:2: invalid UTF-8")
    good = tmp_path / "good.txt"
    good.write_text("a b c\n", encoding="utf-8")
    fails(capsys, ["translate", *model, "--input", good, "--n-best", "4", "--beam", "3"],
          r"--n-best 4: decode\.n_best \(4\) must be <= decode\.beam \(3\)")


def test_translate_invalid_utf8_on_stdin(trained_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a b\n\xff c\n")))
    fails(capsys, ["translate", "--model-dir", trained_model_dir], "<stdin>:2: invalid UTF-8")


def test_evaluate_different_line_counts_name_both_files(trained_model_dir, reversal_corpus,
                                                        tmp_path, capsys):
    refs = tmp_path / "refs.txt"
    refs.write_text("a b c\n", encoding="utf-8")
    fails(capsys, ["evaluate", "--model-dir", trained_model_dir, "--src", reversal_corpus / "valid.src",
                   "--ref", refs], r"valid\.src has 200 lines", r"refs\.txt has 1")


def test_version_is_the_installed_distributions_version():
    """`--version` prints what pip installed (the distribution's metadata), not merely the
    string it reads: a stale install, or a version bumped in one place only, fails here."""
    from importlib.metadata import version

    import seq2seq

    printed = subprocess.run([sys.executable, "-m", "seq2seq", "--version"], capture_output=True,
                             text=True, timeout=60, check=True).stdout.strip()
    assert printed == f"seq2seq {version('seq2seq-rnn')}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", seq2seq.__version__)


# -- a fast command line, and errors that keep the traceback of a bug ---------------------------
_NO_TORCH = """
import sys
from seq2seq import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as done:  # --help
    code = done.code
print("torch loaded" if "torch" in sys.modules else "no torch", code, file=sys.stderr)
"""


@pytest.mark.parametrize("argv, printed", [
    (["--help"], "usage: seq2seq"), (["translate", "--help"], "--model-dir"),
    (["configs"], "multi30k_en_de "), (["configs", "multi30k_en_de"], "model:"),
])
def test_help_and_configs_load_no_torch(argv, printed):
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.stderr.strip().splitlines()[-1] == "no torch 0", done.stderr
    assert printed in done.stdout  # it did its work: the help, the list, a config
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, "configs", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert done.stderr.splitlines() == ["seq2seq: error: no packaged config 'nope'; the configs are: "
                                        + ", ".join(packaged_configs()), "no torch 1"]


def test_an_error_of_the_project_is_one_line_and_debug_shows_its_traceback(tmp_path, capsys):
    argv = ["translate", "--model-dir", str(tmp_path)]
    fails(capsys, argv, "not a model directory")
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(CheckpointError, match="not a model directory"):
            cli.main(debug)


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def buggy(args):
        raise ValueError("a bug, not a bad input")

    monkeypatch.setitem(cli.COMMANDS, "configs", buggy)
    with pytest.raises(ValueError, match="a bug, not a bad input"):
        cli.main(["configs"])
    assert "seq2seq: error" not in capsys.readouterr().err
    done = subprocess.run([sys.executable, "-c", "import sys; from seq2seq import cli; "
                           "cli.COMMANDS['configs'] = lambda a: [][1]; sys.exit(cli.main(['configs']))"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr and "IndexError" in done.stderr


# -- translate streams --------------------------------------------------------------------------
def test_translate_streams_an_endless_pipe(trained_model_dir):
    """``yes "a b c" | seq2seq translate``, through real pipes: translations come out, in
    chunks, while the input is still being written (it never ends)."""
    from seq2seq.decoding.translator import CHUNK_LINES

    yes = subprocess.Popen(["yes", "a b c"], stdout=subprocess.PIPE)
    translate = subprocess.Popen(
        [sys.executable, "-m", "seq2seq", "translate", "--model-dir", str(trained_model_dir),
         "--device", "cpu", "--beam", "1"], stdin=yes.stdout, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)
    yes.stdout.close()  # translate holds the only reading end
    watchdog = threading.Timer(240, translate.kill)  # a translate that waits for the end hangs here
    watchdog.start()
    try:
        lines = [translate.stdout.readline() for _ in range(3 * CHUNK_LINES)]
        assert lines == [b"c b a\n"] * len(lines)
        assert yes.poll() is None and translate.poll() is None  # the input goes on
    finally:
        watchdog.cancel()
        translate.kill()
        yes.kill()
        translate.wait(timeout=60)
        yes.wait(timeout=60)


def test_translate_output_file_appears_whole_or_not_at_all(trained_model_dir, tmp_path, capsys):
    """A bad line after the first chunks: the output file keeps its old content, and no
    temporary file is left, though several chunks were translated before it."""
    from seq2seq.decoding.translator import CHUNK_LINES

    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    bad_line = 2 * CHUNK_LINES + 5
    source.write_bytes(b"a b c\n" * (bad_line - 1) + b"a \xff b\n" + b"d e\n" * 10)
    target.write_text("old\n")
    fails(capsys, ["translate", "--model-dir", trained_model_dir, "--beam", "1", "--input", source,
                   "--output", target], rf"in\.txt:{bad_line}: invalid UTF-8")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]
    source.write_bytes(b"a b c\n" * (bad_line - 1) + b"d e\n")
    assert cli.main(["translate", "--model-dir", str(trained_model_dir), "--beam", "1",
                     "--input", str(source), "--output", str(target)]) == 0
    assert target.read_text() == "c b a\n" * (bad_line - 1) + "e d\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]
