"""The cache of prepared corpora (data/cache.py): reused across runs, keyed by the files and the
settings, locked, safe against SIGKILL, managed by ``prepare --list/--clean``, and prepared in a
child process. Each test has its own cache (conftest's ``prepared_data_cache``)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_reversal

from seq2seq.cli import main
from seq2seq.config import Config
from seq2seq.data import cache
from seq2seq.data.prepared import MANIFEST, read_manifest
from seq2seq.data.text import DataError
from seq2seq.files import FileLock

TRAIN_CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, tokenizer: word, vocab_size: 100}
model: {embed_size: 16, hidden_size: 24, attention: bahdanau, dropout: 0.0}
train: {batch_tokens: 100, epochs: 1, max_steps: 2, lr: 0.01, log_every: 1, threads: 1, device: cpu}
"""
WORDS = [f"w{i}" for i in range(300)]


def _data(tmp_path: Path, pairs: int = 300) -> tuple[Path, list[str]]:
    data = write_reversal(tmp_path / "data", {"train": pairs}, seed=3)
    (data / "cfg.yaml").write_text(TRAIN_CONFIG, encoding="utf-8")
    return data, ["--config", str(data / "cfg.yaml"), "--data-dir", str(data)]


def _big_corpus(folder: Path, n: int = 25_000) -> Path:
    """``n`` pairs of random words: a preparation of a few seconds, long enough to
    be caught in the middle (two chunks); ``cfg.yaml`` names them."""
    rng = random.Random(5)
    folder.mkdir(parents=True, exist_ok=True)
    for side in ("src", "tgt"):
        (folder / f"train.{side}").write_text(
            "".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "\n" for _ in range(n)),
            encoding="utf-8")
    (folder / "cfg.yaml").write_text(TRAIN_CONFIG.replace("vocab_size: 100", "vocab_size: 400, max_len: 40"),
                                     encoding="utf-8")
    return folder


def _key(data: Path, **settings) -> str:
    config = Config.load(data / "cfg.yaml")
    config.data.train_src, config.data.train_tgt = str(data / "train.src"), str(data / "train.tgt")
    for name, value in settings.items():
        setattr(config.data, name, value)
    return cache.cache_key(config.data)


def _spawn(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seq2seq", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def _read_until(process: subprocess.Popen, pattern: str, seen: list[str]) -> re.Match:
    """Read ``process``'s stderr lines (into ``seen``) until one matches ``pattern``."""
    while line := process.stderr.readline():
        seen.append(line)
        if found := re.search(pattern, line):
            return found
    raise AssertionError(f"{pattern!r} never came: {''.join(seen)[-3000:]}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _children(pid: int) -> list[int]:
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir()
            for p in (task / "children").read_text().split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


# -- where the cache is ------------------------------------------------------------------------------
def test_the_cache_folder_is_seq2seq_cache_else_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQ2SEQ_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SEQ2SEQ_CACHE")
    assert cache.cache_dir() == tmp_path / "xdg" / "seq2seq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "seq2seq"


# -- reuse -----------------------------------------------------------------------------------------
def test_a_second_run_reuses_the_prepared_data_and_other_settings_get_another_entry(
        tmp_path, capsys, prepared_data_cache):
    data, common = _data(tmp_path)
    assert main(["train", *common, "--model-dir", str(tmp_path / "one")]) == 0
    first = capsys.readouterr().err
    entry = prepared_data_cache / "prepared" / _key(data)
    assert "prepared 300 of 300 pairs in" in first and str(entry) in first
    # a second run with a new model folder: no preparation, the same arrays, its tokenizers copied
    assert main(["train", *common, "--model-dir", str(tmp_path / "two")]) == 0
    second = capsys.readouterr().err
    assert f"prepared data in {entry} is up to date (300 pairs)" in second and "prepared 300 of" not in second
    for name in read_manifest(entry)["tokenizer_files"]:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert not (tmp_path / "one" / "prepared").exists() and not (tmp_path / "two" / "prepared").exists()
    # a copy of the files elsewhere has the same key; a setting that shapes the arrays does not
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train.src", "train.tgt", "cfg.yaml"):
        (copy / name).write_bytes((data / name).read_bytes())
    assert _key(copy) == _key(data) != _key(data, max_len=50) != _key(data, tokenizer="char")
    assert main(["train", *common, "--model-dir", str(tmp_path / "three"), "--set", "data.max_len=50"]) == 0
    assert "prepared 300 of 300 pairs" in capsys.readouterr().err
    assert sorted(e["key"] for e in cache.entries()) == sorted([_key(data), _key(data, max_len=50)])


def test_a_resumed_run_finds_its_entry_or_rebuilds_it_with_its_own_tokenizers(tmp_path, capsys,
                                                                               prepared_data_cache):
    data, common = _data(tmp_path)
    model = tmp_path / "run"
    assert main(["train", *common, "--model-dir", str(model)]) == 0
    capsys.readouterr()
    entry = prepared_data_cache / "prepared" / _key(data)
    assert main(["train", "--model-dir", str(model), "--resume", "--set", "train.max_steps=3"]) == 0
    assert f"prepared data in {entry} is up to date" in capsys.readouterr().err
    # the entry removed: the resumed run prepares again, with the run's tokenizers, not new ones
    assert main(["prepare", "--clean"]) == 0 and not entry.exists()
    capsys.readouterr()
    assert main(["train", "--model-dir", str(model), "--resume", "--set", "train.max_steps=4"]) == 0
    err = capsys.readouterr().err
    assert "prepared 300 of 300 pairs" in err and "training word tokenizer" not in err
    [rebuilt] = cache.entries()
    assert cache.tokenizer_identity(rebuilt["folder"]) == cache.tokenizer_identity(model)
    assert not (model / "prepared").exists()


def test_an_old_run_that_prepared_into_its_model_folder_resumes_from_it(tmp_path, capsys):
    data, common = _data(tmp_path)
    model = tmp_path / "old"
    assert main(["train", *common, "--model-dir", str(model), "--set",
                 f"data.prepared={model / 'prepared'}"]) == 0
    (model / "config.yaml").write_text((model / "config.yaml").read_text().replace(
        f"prepared: {model / 'prepared'}", "prepared: ''"))  # as a run before the cache saved it
    capsys.readouterr()
    assert main(["train", "--model-dir", str(model), "--resume", "--set", "train.max_steps=3"]) == 0
    assert f"prepared data in {model / 'prepared'} is up to date" in capsys.readouterr().err
    assert cache.entries() == []


# -- in a child process ----------------------------------------------------------------------------
def test_the_preparation_runs_in_a_child_process_and_its_errors_name_file_and_line(tmp_path, capsys):
    data, common = _data(tmp_path)
    assert main(["train", *common, "--model-dir", str(tmp_path / "one")]) == 0
    err = capsys.readouterr().err
    found = re.search(r"^data prepared in process (\d+) \(its peak memory [\d,]+ MB\)$", err, re.M)
    pid = int(found.group(1))
    assert pid != os.getpid()
    # a DataError raised in the child: its class and message, naming the file and the line
    lines = (data / "train.tgt").read_bytes().splitlines(keepends=True)
    (data / "train.tgt").write_bytes(b"".join(lines[:6] + [b"M\xe4dchen\n"] + lines[7:]))
    config = Config.load(data / "cfg.yaml")
    config.data.train_src, config.data.train_tgt = str(data / "train.src"), str(data / "train.tgt")
    with pytest.raises(DataError, match=r"train\.tgt:7: invalid UTF-8"):
        cache.prepare_in_child(config, tmp_path / "two", resume=False, log=lambda _m: None)
    assert main(["train", *common, "--model-dir", str(tmp_path / "three")]) == 1
    assert re.search(r"^seq2seq: error: .*train\.tgt:7: invalid UTF-8", capsys.readouterr().err, re.M)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_the_training_process_stops_its_preparation_and_a_rerun_prepares(tmp_path, stop):
    """A real ``seq2seq train``, stopped while its child prepares 25,000 pairs: the child ends too
    (Ctrl-C: the parent ends it; SIGTERM, SIGKILL: Linux, by PR_SET_PDEATHSIG), no entry looks
    prepared, and the next run prepares and trains."""
    data = _big_corpus(tmp_path / "data")
    argv = ["train", "--config", data / "cfg.yaml", "--data-dir", data, "--model-dir", tmp_path / "run"]
    process, seen = _spawn(*argv), []
    try:
        _read_until(process, r"^read and checked 25,000 pairs", seen)  # then it encodes for seconds
        [child] = [pid for pid in _children(process.pid) if "_child" in _cmdline(pid)]
        process.send_signal(stop)
        process.wait(60)
        assert _gone_within(child, 20), f"the preparation process {child} outlived its parent"
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == {signal.SIGINT: 130}.get(stop, -stop), "".join(seen)
    assert [e["manifest"] for e in cache.entries()] in ([], [None])  # nothing that looks prepared
    done = subprocess.run([sys.executable, "-m", "seq2seq", *map(str, argv), "--overwrite"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prepared 25,000 of 25,000 pairs" in done.stderr
    assert [e["manifest"]["pairs"] for e in cache.entries()] == [25_000]
    assert not [p for p in (cache.prepared_root()).iterdir() if ".partial-" in p.name]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_a_preparation_process_that_is_killed_ends_the_training_with_an_error_naming_it(tmp_path):
    """The child killed (SIGKILL, as the OOM killer does) while it prepares: ``seq2seq train``
    exits 1 with one line naming the process and the signal, and nothing looks prepared."""
    data = _big_corpus(tmp_path / "data")
    process, seen = _spawn("train", "--config", data / "cfg.yaml", "--data-dir", data, "--model-dir",
                           tmp_path / "run"), []
    try:
        _read_until(process, r"^read and checked 25,000 pairs", seen)
        [child] = [pid for pid in _children(process.pid) if "_child" in _cmdline(pid)]
        os.kill(child, signal.SIGKILL)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 1, err
    assert err.strip().splitlines()[-1] == (f"seq2seq: error: the data preparation (process {child}) was "
                                            f"killed by SIGKILL (out of memory?) before it finished; "
                                            f"nothing was kept")
    assert [e["manifest"] for e in cache.entries()] == [None]


# -- concurrent writers ------------------------------------------------------------------------------
def test_two_processes_preparing_one_key_one_builds_the_other_waits_and_reuses(tmp_path):
    """Two real ``seq2seq prepare`` processes for the same files and settings, started while this
    test holds the entry's lock: both wait for it; then one builds and the other reuses."""
    data = _big_corpus(tmp_path / "data", 5_000)
    root = cache.prepared_root()
    root.mkdir(parents=True)
    key = _key(data)
    argv = ["prepare", "--config", data / "cfg.yaml", "--data-dir", data, "--workers", "1"]
    lock = FileLock(root / f"{key}.lock")
    processes, seen = [], [[], []]
    try:
        processes = [_spawn(*argv), _spawn(*argv)]
        for process, lines in zip(processes, seen):
            _read_until(process, rf"^waiting for pid {os.getpid()} on .*, which is preparing {root / key}$",
                        lines)
        lock.release()
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        lock.release()
        for process in processes:
            process.kill()
            process.communicate()
    logs = ["".join(lines) + err for lines, (_, err) in zip(seen, outputs)]
    assert [p.returncode for p in processes] == [0, 0], logs
    assert [out.strip() for out, _ in outputs] == [str(root / key)] * 2
    assert sorted("prepared 5,000 of 5,000 pairs" in log for log in logs) == [False, True], logs
    assert sum(f"prepared data in {root / key} is up to date" in log for log in logs) == 1
    assert read_manifest(root / key)["pairs"] == 5_000


# -- prepare --list / --clean ----------------------------------------------------------------------
def test_prepare_list_and_clean(tmp_path, capsys):
    data, common = _data(tmp_path)
    assert main(["prepare", *common]) == 0
    assert main(["prepare", *common, "--set", "data.max_len=50"]) == 0
    keys = [_key(data), _key(data, max_len=50)]
    capsys.readouterr()
    assert main(["prepare", "--list"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"prepared: 2 prepared corpora, [\d.]+ MB", listed)
    for key in keys:
        assert re.search(rf"^{key}  [\d.]+ MB  last used \d{{4}}-\d\d-\d\d \d\d:\d\d UTC  300 pairs$",
                         listed, re.M)
    assert f"inputs: {data / 'train.src'} (" in listed and "max_len=50" in listed and "max_len=100" in listed
    # one entry by a prefix of its key; an unknown key is an error naming it
    assert main(["prepare", "--clean", keys[1][:8]]) == 0
    assert [e["key"] for e in cache.entries()] == [keys[0]]
    assert main(["prepare", "--clean", "0123abcd"]) == 1
    assert "--clean 0123abcd: no entry of the cache" in capsys.readouterr().err
    # an entry in use is skipped; a link and a folder without a manifest are left alone
    root = cache.prepared_root()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MANIFEST).write_text("{}")
    (elsewhere / "precious.txt").write_text("mine")
    (root / ("a" * 32)).symlink_to(elsewhere)
    (root / ("b" * 32)).mkdir()
    (root / ("b" * 32) / "notes.txt").write_text("mine")
    (root / keys[0] / "link").symlink_to(elsewhere / "precious.txt")  # removed, never followed
    assert main(["prepare", "--list"]) == 0
    listed = capsys.readouterr().out
    assert f"{'a' * 32}  0.0 MB  last used" in listed and "(a symbolic link, not a prepared folder" in listed
    assert f"{'b' * 32}  0.0 MB  last used" in listed and "(no manifest.json: a preparation" in listed
    with FileLock(root / f"{keys[0]}.lock"):
        assert main(["prepare", "--clean"]) == 0
        assert f"{root / keys[0]}: in use by pid {os.getpid()}" in capsys.readouterr().err
    assert main(["prepare", "--clean"]) == 0
    err = capsys.readouterr().err
    assert f"removed {root / keys[0]}" in err and "removed 1 prepared corpora" in err
    assert sorted(os.listdir(root)) == ["a" * 32, "b" * 32]
    assert (elsewhere / "precious.txt").read_text() == "mine" and (root / ("b" * 32) / "notes.txt").is_file()
    assert main(["prepare", "--list", "--config", str(data / "cfg.yaml")]) == 1  # --list takes no config


_NO_TORCH = """
import sys
from seq2seq import cli
code = cli.main(sys.argv[1:])
print("torch loaded" if "torch" in sys.modules else "no torch", code, file=sys.stderr)
"""


def test_prepare_list_and_clean_load_no_torch(tmp_path):
    data, common = _data(tmp_path)
    assert main(["prepare", *common]) == 0
    for argv in (["--list"], ["--clean"]):
        done = subprocess.run([sys.executable, "-c", _NO_TORCH, "prepare", *argv], capture_output=True,
                              text=True, timeout=60)
        assert done.stderr.strip().splitlines()[-1] == "no torch 0", done.stderr
    assert "removed 1 prepared corpora" in done.stderr and cache.entries() == []


def test_the_cache_names_binarize_lock_file():
    from seq2seq.data.prepare import LOCK_FILE

    assert cache._ENTRY_LOCK == LOCK_FILE
