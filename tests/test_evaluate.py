"""``seq2seq evaluate`` on several test sets at once: --src/--ref pairs and --test-dir."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from seq2seq import cli

SIGNATURE = re.compile(r"nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:\S+")


def evaluate(capsys, *args) -> tuple[int, list[dict], str]:
    code = cli.main(["evaluate", "--device", "cpu", "--beam", "1", *map(str, args)])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_several_sets_give_one_table_and_a_json_line_each(trained_model_dir, reversal_corpus, translator,
                                                          tmp_path, capsys):
    folder = tmp_path / "sets"
    folder.mkdir()
    for name, source, reference in (("valid", "valid.src", "valid.tgt"),
                                    ("copied", "test.src", "test.src")):  # sources as references: low BLEU
        for suffix, original in ((".src", source), (".ref", reference)):
            lines = (reversal_corpus / original).read_text().splitlines(keepends=True)[:50]
            (folder / f"{name}{suffix}").write_text("".join(lines))
    pair = ["--src", reversal_corpus / "test.src", "--ref", reversal_corpus / "test.tgt"]
    code, results, table = evaluate(capsys, "--model-dir", trained_model_dir, *pair, "--test-dir", folder)
    assert code == 0, table
    assert [r["set"] for r in results] == ["test.src", "copied", "valid"]  # pairs first, then the folder's
    assert results[0]["ref"] == str(reversal_corpus / "test.tgt")
    for result in results:
        expected = translator.evaluate(result["src"], result["ref"], beam=1)
        assert (result["bleu"], result["chrf"]) == (expected["bleu"], expected["chrf"])
        assert SIGNATURE.fullmatch(result["signature"])
        assert result["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
        assert result["sentences"] == (200 if result["set"] == "test.src" else 50)
        assert result["sentences_per_s"] > 0
    assert results[0]["bleu"] >= 90 and results[1]["bleu"] < 50 and results[2]["bleu"] >= 90
    lines = table.splitlines()
    assert lines[0].split() == ["test", "set", "sentences", "BLEU", "chrF", "sent/s"]
    for line, result in zip(lines[1:4], results):
        assert line.split()[:4] == [result["set"], str(result["sentences"]), f"{result['bleu']:.2f}",
                                    f"{result['chrf']:.2f}"]
    assert lines[4] == f"BLEU: {results[0]['signature']}"
    assert lines[5] == f"chrF: {results[0]['chrf_signature']}"


def test_an_ensemble_evaluates_several_sets(trained_model_dir, reversal_corpus, tmp_path, capsys):
    pairs = []
    for split in ("valid", "test"):
        for suffix, original in (("src", "src"), ("ref", "tgt")):
            lines = (reversal_corpus / f"{split}.{original}").read_text().splitlines(keepends=True)[:50]
            (tmp_path / f"{split}.{suffix}").write_text("".join(lines))
            pairs += [f"--{suffix}", tmp_path / f"{split}.{suffix}"]
    _, alone, _ = evaluate(capsys, "--model-dir", trained_model_dir, *pairs)
    code, together, _ = evaluate(capsys, "--ensemble", f"{trained_model_dir},{trained_model_dir}", *pairs)
    assert code == 0
    assert [r["bleu"] for r in together] == [r["bleu"] for r in alone]


@pytest.mark.parametrize(("build", "pattern"), [
    (lambda c, d: ["--src", c / "valid.src", "--src", c / "test.src", "--ref", c / "valid.tgt"],
     r"--src given 2 time\(s\) and --ref 1"),
    (lambda c, d: ["--test-dir", d], r"no NAME\.src files"),
    (lambda c, d: ["--test-dir", d / "missing"], r"missing: not a folder"),
    (lambda c, d: [], r"evaluate needs --src FILE --ref FILE"),
])
def test_bad_test_sets_are_named(trained_model_dir, reversal_corpus, tmp_path, capsys, build, pattern):
    code, results, err = evaluate(capsys, "--model-dir", trained_model_dir, *build(reversal_corpus, tmp_path))
    assert code == 1 and not results
    assert re.search(pattern, err), err


def test_a_source_without_its_reference_is_named_before_any_decoding(trained_model_dir, reversal_corpus,
                                                                     tmp_path, capsys):
    shutil.copy(reversal_corpus / "valid.src", tmp_path / "a.src")
    shutil.copy(reversal_corpus / "valid.tgt", tmp_path / "a.ref")
    shutil.copy(reversal_corpus / "test.src", tmp_path / "b.src")
    code, results, err = evaluate(capsys, "--model-dir", trained_model_dir, "--test-dir", tmp_path)
    assert code == 1 and not results  # a.src was not decoded first
    assert f"{tmp_path / 'b.ref'}: no such file (the reference of {tmp_path / 'b.src'})" in err
