"""Hostile and careless inputs: output targets, pipes, bad numbers, and inputs that once hung.

Every fault here is the real thing: FIFOs made with ``os.mkfifo`` and fed or drained by a
second process, symlinks, hard links, a character device made with ``os.mknod`` in a temporary
folder (the machine's own ``/dev`` is never written to), ``/dev/zero`` and an endless ``yes``
as inputs. The command runs in-process through ``cli.main`` (the function ``python -m
seq2seq`` exits with) on the session's tiny reversal model, except where the process itself
matters (a closed stdout, ``/dev/stdin``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LETTERS, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

from seq2seq import cli
from seq2seq.config import Config, ConfigError
from seq2seq.data.text import DataError, read_lines, read_parallel
from seq2seq.data.tokenizers import load_tokenizers
from seq2seq.decoding.translator import Translator
from seq2seq.files import atomic_write_bytes
from seq2seq.models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from seq2seq.vectors.model import EncoderDecoderRNN

SENTENCES = ["a b c", "h g f e d", "c c a b h h g", "d e"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- helpers ------------------------------------------------------------------------------------
@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError (instead of hanging the suite) if the block blocks or loops."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def process(*shell: str | Path) -> Iterator[subprocess.Popen]:
    """A second process, ``sh -c SCRIPT ARGS...``; killed on the way out if still running."""
    child = subprocess.Popen(["sh", "-c", *map(str, shell)], stderr=subprocess.DEVNULL)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)


def main(capsys, *argv: str | Path) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def translate_to(capsys, model_dir: Path, source: Path, output: Path, *extra: str) -> tuple[int, str]:
    code, _, err = main(capsys, "translate", "--model-dir", model_dir, "--device", "cpu",
                        "--beam", "1", "--input", source, "--output", output, *extra)
    return code, err


def refused(capsys, argv: list[str | Path], *patterns: str) -> str:
    """The command exits 1 with a one-line ``seq2seq: error:`` matching each pattern."""
    code, _, err = main(capsys, *argv)
    assert code == 1, err
    assert err.startswith("seq2seq: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in {err!r}"
    return err


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def expected(translator) -> str:
    """What ``translate --beam 1`` writes for SENTENCES."""
    return "".join(t + "\n" for t in translator.translate(SENTENCES, beam=1))


@pytest.fixture
def model_copy(trained_model_dir, tmp_path) -> Path:
    """A copy of the trained model's folder, to spoil."""
    return Path(shutil.copytree(trained_model_dir, tmp_path / "model"))


def letter_lines(n: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 8))) for _ in range(n)]


# -- output targets -----------------------------------------------------------------------------
def test_output_through_a_symlink_writes_its_target_and_keeps_the_link(
        trained_model_dir, source, expected, tmp_path, capsys):
    target, link = tmp_path / "real.txt", tmp_path / "link.txt"
    target.write_text("old\n")
    link.symlink_to(target)
    assert translate_to(capsys, trained_model_dir, source, link) == (0, "")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == expected


@pytest.mark.parametrize("links", [1, 2])
def test_output_keeps_the_mode_and_the_hard_links_of_a_file(trained_model_dir, source, expected,
                                                            tmp_path, capsys, links):
    out = tmp_path / "out.txt"
    out.write_text("old content, longer than the translations will be " * 20)
    out.chmod(0o600)
    inode = out.stat().st_ino
    if links == 2:
        os.link(out, tmp_path / "other-name.txt")
    assert translate_to(capsys, trained_model_dir, source, out) == (0, "")
    assert out.read_text() == expected
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    if links == 2:  # written in place: both names see the new text, nothing is cut
        assert out.stat().st_ino == inode and out.stat().st_nlink == 2
        assert (tmp_path / "other-name.txt").read_text() == expected
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_read_only_output_is_refused_even_for_root(trained_model_dir, source, tmp_path, capsys):
    out = tmp_path / "keep.txt"
    out.write_text("keep me\n")
    out.chmod(0o444)  # root may write it anyway: the refusal reads the mode bits
    code, err = translate_to(capsys, trained_model_dir, source, out)
    assert code == 1 and "read-only file, not replaced" in err and f"({out})" in err, err
    assert out.read_text() == "keep me\n" and stat.S_IMODE(out.stat().st_mode) == 0o444
    assert not list(tmp_path.glob(".*.tmp"))
    # refused before any work: the input is not even opened
    code, err = translate_to(capsys, trained_model_dir, tmp_path / "missing.txt", out)
    assert code == 1 and "read-only file, not replaced" in err and "missing.txt" not in err, err


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_output_errors_name_the_target_not_a_temporary_file(trained_model_dir, source, tmp_path,
                                                            capsys, where):
    (tmp_path / "a-file").write_text("x\n")
    out = tmp_path / "a-file" / "out.txt" if where == "under a file" else tmp_path
    code, err = translate_to(capsys, trained_model_dir, source, out)
    assert code == 1 and err.startswith("seq2seq: error: ") and f"({out})" in err, err
    assert ".tmp" not in err
    assert (tmp_path / "a-file").read_text() == "x\n"


def test_output_into_a_fifo_is_written_not_replaced(trained_model_dir, source, expected, tmp_path,
                                                    capsys):
    fifo, got = tmp_path / "pipe", tmp_path / "got.txt"
    os.mkfifo(fifo)
    with process('cat "$0" > "$1"', fifo, got) as reader, within(120):
        assert translate_to(capsys, trained_model_dir, source, fifo) == (0, "")
        assert reader.wait(timeout=60) == 0
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got.read_text() == expected


def _null_device(path: Path) -> Path:
    """A character device like /dev/null (1, 3), made in a temporary folder."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD (root); CI runs as root")
    return path


def test_output_into_a_character_device_is_written_not_replaced(trained_model_dir, source, tmp_path,
                                                                capsys):
    device = _null_device(tmp_path / "null")
    assert translate_to(capsys, trained_model_dir, source, device) == (0, "")
    code, out, err = main(capsys, "attention", "--model-dir", trained_model_dir, "--device", "cpu",
                          "--text", "a b c", "--output", device)
    assert code == 0, err
    atomic_write_bytes(device, b"straight in\n")
    info = os.lstat(device)
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "null"]  # no temporary file left


def test_a_checkpoint_with_a_hard_link_is_replaced_so_a_snapshot_keeps_its_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    path, snapshot = tmp_path / "last.safetensors", tmp_path / "snapshot.safetensors"
    save_checkpoint(path, model, {"step": 1})
    os.link(path, snapshot)  # what `cp -al run snapshot` makes
    before = snapshot.read_bytes()
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(path, model, {"step": 2})
    assert snapshot.read_bytes() == before and path.read_bytes() != before
    assert read_checkpoint(path)[1]["step"] == 2 and read_checkpoint(snapshot)[1]["step"] == 1


def test_attention_output_follows_a_symlink_and_keeps_the_mode(trained_model_dir, tmp_path, capsys):
    target, link = tmp_path / "picture.png", tmp_path / "link.png"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link.symlink_to(target)
    code, out, err = main(capsys, "attention", "--model-dir", trained_model_dir, "--device", "cpu",
                          "--text", "a b c", "--output", link)
    assert code == 0, err
    assert link.is_symlink() and target.read_bytes().startswith(PNG_MAGIC)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    target.chmod(0o444)
    refused(capsys, ["attention", "--model-dir", trained_model_dir, "--device", "cpu", "--text",
                     "a b c", "--output", link], "read-only file", re.escape(f"({link})"))


# -- pipes ----------------------------------------------------------------------------------------
def test_translate_reads_every_line_of_a_fifo(trained_model_dir, translator, tmp_path, capsys):
    lines = letter_lines(1000)
    text_file, fifo, out = tmp_path / "text.txt", tmp_path / "pipe", tmp_path / "out.txt"
    text_file.write_text("".join(line + "\n" for line in lines))
    os.mkfifo(fifo)
    with process('cat "$0" > "$1"', text_file, fifo) as writer, within(120):
        assert translate_to(capsys, trained_model_dir, fifo, out) == (0, "")
        assert writer.wait(timeout=60) == 0
    got = out.read_text().split("\n")
    assert len(got) == 1001 and got[-1] == ""
    assert got[:-1] == translator.translate(lines, beam=1)


@pytest.mark.parametrize("zipped", [False, True])
def test_read_lines_and_read_parallel_take_fifos_plain_or_gzip(tmp_path, zipped):
    import gzip

    src, tgt = letter_lines(1500, seed=1), letter_lines(1500, seed=2)
    fifos = []
    for name, lines in (("src", src), ("tgt", tgt)):
        data = "".join(line + "\n" for line in lines).encode()
        (tmp_path / f"{name}.data").write_bytes(gzip.compress(data) if zipped else data)
        os.mkfifo(tmp_path / name)
        fifos.append(tmp_path / name)
    feed = 'cat "$0.data" > "$0"'
    with process(feed, fifos[0]), process(feed, fifos[1]), within(60):
        assert read_parallel(fifos[0], fifos[1]) == (src, tgt)
    with process(feed, fifos[0]), within(60):
        assert read_lines(fifos[0]) == src


def test_training_reads_every_pair_from_fifos(reversal_corpus, tmp_path, capsys):
    """Preparation reads the training files twice (a sample for the tokenizers, then every
    pair): FIFOs, one of them gzip'ed, written once by second processes, are copied once into
    the preparation's temporary folder, and every pair is prepared, as from the regular files."""
    import gzip

    for name in ("valid.src", "valid.tgt", "cfg.yaml"):
        shutil.copy(reversal_corpus / name, tmp_path / name)
    lines = (reversal_corpus / "train.src").read_text(encoding="utf-8").count("\n")
    (tmp_path / "train.tgt.data").write_bytes(gzip.compress((reversal_corpus / "train.tgt").read_bytes()))
    src, tgt, model_dir = tmp_path / "train.src", tmp_path / "train.tgt", tmp_path / "m"
    os.mkfifo(src)
    os.mkfifo(tgt)
    with (process('cat "$0" > "$1"', reversal_corpus / "train.src", src),
          process('cat "$0.data" > "$0"', tgt), within(240)):
        code, _, err = main(capsys, "train", "--config", tmp_path / "cfg.yaml", "--data-dir", tmp_path,
                            "--model-dir", model_dir, "--set", "train.max_steps=2")
    assert code == 0, err
    assert f"prepared {lines:,} of {lines:,} pairs" in err and "2 steps done" in err
    manifest = json.loads((model_dir / "prepared" / "manifest.json").read_text())
    assert manifest["lines"] == manifest["pairs"] == lines
    assert [manifest["sources"][s]["path"] for s in ("train_src", "train_tgt")] == [str(src), str(tgt)]
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("spool"))
    # the same arrays as preparing the regular files
    from seq2seq.data.prepare import binarize
    from seq2seq.data.prepared import PreparedCorpus

    config = Config.load(tmp_path / "cfg.yaml")
    config.data.train_src = str(reversal_corpus / "train.src")
    config.data.train_tgt = str(reversal_corpus / "train.tgt")
    binarize(config, tmp_path / "regular", workers=1, log=lambda _message: None)
    piped, regular = PreparedCorpus(model_dir / "prepared"), PreparedCorpus(tmp_path / "regular")
    for side in ("src", "tgt"):
        assert [getattr(piped, side)[i] for i in range(lines)] == [getattr(regular, side)[i]
                                                                   for i in range(lines)]


def test_translate_input_dev_stdin_reads_everything(trained_model_dir, translator):
    lines = letter_lines(1000, seed=5)
    done = run_cli("translate", "--model-dir", trained_model_dir, "--device", "cpu", "--beam", "1",
                   "--input", "/dev/stdin", input="".join(line + "\n" for line in lines),
                   timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == translator.translate(lines, beam=1)


def test_closed_stdout_is_a_clear_error(trained_model_dir):
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" -m seq2seq translate --model-dir "$1" --device cpu >&-',
         sys.executable, str(trained_model_dir)],
        input=b"a b c\n", capture_output=True, timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert err.startswith("seq2seq: error: standard output is closed: give --output FILE")


def test_a_reader_that_goes_away_is_not_a_traceback(trained_model_dir):
    lines = "".join(line + "\n" for line in letter_lines(50, seed=6)).encode()
    child = subprocess.Popen([sys.executable, "-m", "seq2seq", "translate", "--model-dir",
                              str(trained_model_dir), "--device", "cpu", "--beam", "1"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdin.write(lines)
    child.stdin.close()
    child.stdout.close()  # `| head -0`: nobody reads the translations
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 1 and "Traceback" not in err, err


# -- numbers and names: one-line errors that name the flag or setting ----------------------------
@pytest.mark.parametrize("flags, pattern", [
    (["--batch-size", "-1"], r"--batch-size -1: decode\.batch_size must be > 0, got -1"),
    (["--beam", "0"], r"--beam 0: decode\.beam must be > 0, got 0"),
    (["--beam", "-3"], r"--beam -3: decode\.beam must be > 0, got -3"),
    (["--n-best", "0"], r"--n-best 0: decode\.n_best must be > 0, got 0"),
    (["--beam", "100000"], r"--beam 100000: decode\.beam must be <= 1000"),
    (["--device", "gpu"], r"--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "foo"], r"--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "mps"], r"--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    (["--device", "meta"], r"--device must be auto, cpu, cuda or cuda:N, got 'meta'"),
])
def test_bad_translate_flags_name_the_flag(trained_model_dir, source, capsys, flags, pattern):
    refused(capsys, ["translate", "--model-dir", trained_model_dir, "--input", source, *flags],
            pattern)


def test_bad_evaluate_flags_and_empty_files_are_named(trained_model_dir, reversal_corpus, tmp_path,
                                                      capsys):
    model = ["evaluate", "--model-dir", trained_model_dir, "--device", "cpu"]
    valid = ["--src", reversal_corpus / "valid.src", "--ref", reversal_corpus / "valid.tgt"]
    refused(capsys, [*model, *valid, "--batch-size", "-1"], r"--batch-size -1: decode\.batch_size")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(capsys, [*model, "--src", empty, "--ref", empty], rf"{re.escape(str(empty))}: no lines")
    refused(capsys, [*model, "--src", reversal_corpus / "valid.src", "--ref", empty],
            rf"{re.escape(str(empty))}: no lines to evaluate")


@pytest.mark.parametrize("extra, pattern", [
    (["--max-minutes", "-1"], r"--max-minutes -1\.0: train\.max_minutes must be >= 0"),
    (["--max-minutes", "nan"], r"--max-minutes nan: train\.max_minutes must be a finite number"),
    (["--max-minutes", "inf"], r"--max-minutes inf: train\.max_minutes must be a finite number"),
    (["--set", "train.clip_grad=-1"], r"train\.clip_grad must be >= 0, got -1\.0"),
    (["--set", "train.device=gpu"], r"train\.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--set", "train.device=meta"], r"train\.device must be auto, cpu, cuda or cuda:N"),
    (["--set", "train.threads=-1"], r"train\.threads must be >= 0, got -1"),
    (["--set", f"data.max_line_chars={2**61}"], r"data\.max_line_chars must be <= 100000000"),
    (["--set", "decode.max_len_ratio=.nan"], r"decode\.max_len_ratio must be a finite number"),
    (["--set", "train.lr=1e999"], r"train\.lr must be a finite number, got inf"),
    (["--set", "train.seed=-1"], r"train\.seed must be >= 0"),
    (["--set", f"train.epochs={10**30}"], r"train\.epochs must be at most 2\*\*62"),
    (["--set", "model.encoder_layers=10000"], r"model\.encoder_layers must be <= 64, got 10000"),
])
def test_bad_training_settings_are_refused_before_anything_runs(reversal_corpus, tmp_path, capsys,
                                                                extra, pattern):
    model_dir = tmp_path / "m"
    refused(capsys, ["train", "--config", reversal_corpus / "cfg.yaml", "--data-dir",
                     reversal_corpus, "--model-dir", model_dir, *extra], pattern)
    assert not model_dir.exists()


@pytest.mark.parametrize("value", [".inf", ".nan", "1e30", "-1", "0"])
def test_max_len_ratio_in_a_config_file_is_checked(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"decode: {{max_len_ratio: {value}}}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: decode\.max_len_ratio must"):
        Config.load(path)


def test_one_check_for_yaml_set_flags_and_the_api(translator, tmp_path, capsys, trained_model_dir,
                                                   source):
    path = tmp_path / "c.yaml"
    path.write_text("decode: {beam: 0}\n")
    message = "decode.beam must be > 0, got 0"
    for attempt in (lambda: Config.load(path), lambda: Config().override(["decode.beam=0"]),
                    lambda: translator.translate(["a b"], beam=0)):
        with pytest.raises(ConfigError, match=re.escape(message)):
            attempt()
    refused(capsys, ["translate", "--model-dir", trained_model_dir, "--input", source, "--beam", "0"],
            re.escape(message))


def test_translator_takes_any_iterable_of_strings_and_names_bad_items(translator):
    want = translator.translate(SENTENCES, beam=1)
    assert translator.translate((s for s in SENTENCES), beam=1) == want
    assert translator.translate(iter(SENTENCES), beam=2) == translator.translate(SENTENCES, beam=2)
    assert translator.translate(map(str.strip, SENTENCES), beam=1) == want
    assert translator.translate(iter([]), beam=1) == []
    for bad, kind in ((None, "NoneType"), (b"a b", "bytes"), (3, "int")):
        with pytest.raises(TypeError, match=rf"^input:2: expected a string, got {kind}$"):
            translator.translate(["a b", bad])
    with pytest.raises(TypeError, match="not one string"):
        translator.translate(b"a b c")
    for kwargs, pattern in (({"beam": -1}, r"decode\.beam must be > 0, got -1"),
                            ({"n_best": -1}, r"decode\.n_best must be > 0, got -1"),
                            ({"n_best": 0}, r"decode\.n_best must be > 0, got 0"),
                            ({"batch_size": 0}, r"decode\.batch_size must be > 0, got 0"),
                            ({"beam": 2, "n_best": 3}, r"decode\.n_best \(3\) must be <= "),
                            ({"beam": "wide"}, r"beam: expected int, got 'wide'")):
        with pytest.raises(ConfigError, match=pattern):
            translator.translate(SENTENCES, **kwargs)


def test_nan_weights_are_refused_naming_the_weight_and_never_crash_beam_search(model_copy):
    path = model_copy / "best.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    name = next(k for k in tensors if k.startswith("model.decoder"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"best\.safetensors: weight '{name[6:]}' holds NaN"):
        Translator.load(model_copy, device="cpu")
    translator = Translator.load(model_copy, checkpoint="last", device="cpu")
    with torch.no_grad():  # NaN that arrives some other way: each search names the line
        for parameter in translator.model.parameters():
            parameter.fill_(float("nan"))
    for beam in (1, 3):
        with pytest.raises(ValueError, match=r"^input:[12]: the model's scores are not finite"):
            translator.translate(["a b c", "d"], beam=beam)


# -- hangs and unbounded memory -----------------------------------------------------------------
def test_dev_zero_as_input_or_reference_is_refused(trained_model_dir, reversal_corpus, tmp_path,
                                                   capsys):
    with within(60):
        refused(capsys, ["translate", "--model-dir", trained_model_dir, "--device", "cpu",
                         "--input", "/dev/zero", "--output", tmp_path / "out.txt"],
                r"/dev/zero:1: line of more than \d+ characters exceeds the limit of 100000")
        refused(capsys, ["evaluate", "--model-dir", trained_model_dir, "--device", "cpu",
                         "--src", reversal_corpus / "valid.src", "--ref", "/dev/zero"],
                r"/dev/zero:1: line of more than \d+ characters")
    assert not (tmp_path / "out.txt").exists()


def test_an_endless_pipe_is_bounded_by_max_lines(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with process('yes "a b" > "$0"', fifo), within(60):
        with pytest.raises(DataError, match=rf"^{re.escape(str(fifo))}: more than 5000 lines "
                                            r"\(data\.max_lines\)$"):
            read_lines(fifo, max_lines=5000)
    assert Config().override(["data.max_lines=5000"]).data.max_lines == 5000


def _replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:  # sparse: 65 MB that take no disk
        with path.open("wb") as handle:
            handle.truncate(65 << 20)


# Weights have no size limit of their own: their shapes are checked against the settings first.
@pytest.mark.parametrize("name, kind", [
    *((name, kind) for name in ("config.yaml", "tokenizer.json", "src.vocab.json")
      for kind in ("symlink to /dev/zero", "fifo", "65 MB")),
    ("best.safetensors", "symlink to /dev/zero"), ("best.safetensors", "fifo"),
])
def test_model_files_are_read_only_from_regular_files_of_bounded_size(model_copy, name, kind):
    """A file named by another (``src.vocab.json``, by ``tokenizer.json``) is never read through a
    link, and its error says which file named it; the others follow links to regular files."""
    _replace(model_copy / name, kind)
    named = name == "src.vocab.json"
    what = {"symlink to /dev/zero": "a character device", "fifo": "a FIFO"}.get(kind)
    where = rf"{re.escape(name)} \(named by .*tokenizer\.json\)" if named else re.escape(name)
    pattern = (f"{where}: a symbolic link" if named and kind.startswith("symlink") else
               rf"{where}: not a regular file \({what}\)" if what else
               rf"{where}: \d+ bytes, more than the \d+ that a file of this kind may have")
    with within(60), pytest.raises(ValueError, match=pattern):
        Translator.load(model_copy, device="cpu")


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo"])
def test_rnn_load_reads_only_regular_files(tmp_path, kind):
    folder = tmp_path / "rnn"
    EncoderDecoderRNN(2, 4, 2, seed=0).save(folder)
    _replace(folder / "settings.json", kind)
    with within(60), pytest.raises(ValueError, match=r"settings\.json"):
        EncoderDecoderRNN.load(folder, device="cpu")


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "deep"])
def test_a_prepared_folders_manifest_is_read_only_from_a_regular_file(tmp_path, kind):
    from seq2seq.data.prepared import MANIFEST, read_manifest

    path = tmp_path / MANIFEST
    path.write_text("{}")
    if kind == "deep":
        path.write_text(DEEP)
    else:
        _replace(path, kind)
    with within(60), pytest.raises(DataError, match=rf"{re.escape(str(path))}: not a valid manifest"):
        read_manifest(tmp_path)


def alias_bomb(levels: int = 9) -> str:
    """One YAML value that expands to 9**9 (387 million) strings, in about 300 bytes."""
    anchors = ["&a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh"[:levels - 1], "bcdefghi"):
        anchors.append(f"&{name} [{', '.join(['*' + previous] * 9)}]")
    return "[" + ", ".join(anchors) + "]"


def test_a_yaml_alias_bomb_gives_a_short_error(model_copy, tmp_path, capsys):
    config = yaml.safe_load((model_copy / "config.yaml").read_text())
    text = yaml.safe_dump(config).replace("cell: gru", f"cell: {alias_bomb()}")
    assert len(alias_bomb()) < 400 and "cell: [&a" in text
    (model_copy / "config.yaml").write_text(text)
    with within(60), pytest.raises(ConfigError, match=r"config\.yaml: model\.cell: expected str") as error:
        Translator.load(model_copy, device="cpu")
    assert len(str(error.value)) < 400
    err = refused(capsys, ["translate", "--model-dir", model_copy, "--device", "cpu"], "model.cell")
    assert len(err) < 400


def test_huge_layer_counts_are_refused_before_building(model_copy, tmp_path):
    config = yaml.safe_load((model_copy / "config.yaml").read_text())
    config["model"]["encoder_layers"] = 10000
    (model_copy / "config.yaml").write_text(yaml.safe_dump(config))
    with within(60), pytest.raises(ConfigError, match=r"model\.encoder_layers must be <= 64"):
        Translator.load(model_copy, device="cpu")
    folder = tmp_path / "rnn"
    EncoderDecoderRNN(2, 4, 2, seed=0).save(folder)
    settings = json.loads((folder / "settings.json").read_text())
    (folder / "settings.json").write_text(json.dumps({**settings, "num_layers": 20000}))
    with within(60), pytest.raises(ValueError, match=r"num_layers must be at most 64, got 20000"):
        EncoderDecoderRNN.load(folder, device="cpu")


DEEP = "[" * 10_000 + "]" * 10_000


def test_deep_nesting_is_a_clear_error_everywhere(model_copy, tmp_path):
    config_text = (model_copy / "config.yaml").read_text()
    (model_copy / "config.yaml").write_text(config_text.replace("cell: gru", f"cell: {DEEP}"))
    with pytest.raises(ConfigError, match=r"config\.yaml: not valid YAML: nested too deeply"):
        Translator.load(model_copy, device="cpu")
    (model_copy / "config.yaml").write_text(config_text)
    with pytest.raises(ConfigError, match=r"model\.cell must be one of"):
        Config().override([f"model.cell={DEEP}"])  # not YAML: read as the string it is
    for name in ("tokenizer.json", "src.vocab.json"):
        original = (model_copy / name).read_text()
        (model_copy / name).write_text(DEEP)
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: not valid JSON: nested too deeply"):
            load_tokenizers(model_copy)
        (model_copy / name).write_text(original)
    path = model_copy / "best.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(path), metadata={**metadata, "meta": DEEP})
    with pytest.raises(CheckpointError, match=r"best\.safetensors: metadata is nested too deeply"):
        read_checkpoint(path)
    folder = tmp_path / "rnn"
    EncoderDecoderRNN(2, 4, 2, seed=0).save(folder)
    (folder / "settings.json").write_text(DEEP)
    with pytest.raises(ValueError, match=r"settings\.json: not valid JSON: nested too deeply"):
        EncoderDecoderRNN.load(folder, device="cpu")
