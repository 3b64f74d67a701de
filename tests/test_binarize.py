"""``seq2seq prepare``: encoding a corpus once into memory-mapped arrays (binarize.py, corpus.py)."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_reversal

from seq2seq.cli import main
from seq2seq.config import Config, ModelConfig
from seq2seq.data.batches import collate, encode_corpus, make_batches
from seq2seq.data.prepare import binarize
from seq2seq.data.prepared import MANIFEST, PreparedCorpus, read_manifest
from seq2seq.data.text import DataError, read_parallel
from seq2seq.data.tokenizers import PAD_ID, load_tokenizers
from seq2seq.models.checkpoint import read_checkpoint
from seq2seq.models.rnn.model import Seq2Seq

WORDS = [f"w{i}" for i in range(300)]


def _corpus(folder: Path, n: int, seed: int = 1, empty_every: int = 0) -> tuple[Path, Path]:
    """``n`` pairs of random words (1-30 a side); every ``empty_every``-th target is empty."""
    rng = random.Random(seed)
    src, tgt = [], []
    for i in range(n):
        src.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))))
        empty = empty_every and i % empty_every == 0
        tgt.append("" if empty else " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.src").write_text("".join(s + "\n" for s in src), encoding="utf-8")
    (folder / "train.tgt").write_text("".join(t + "\n" for t in tgt), encoding="utf-8")
    return folder / "train.src", folder / "train.tgt"


def _config(src: Path, tgt: Path | str = "", **data) -> Config:
    settings = {"train_src": str(src), "train_tgt": str(tgt), "tokenizer": "word", "vocab_size": 200,
                "max_len": 25, **data}
    return Config.from_dict({"data": settings})


def _quiet(_message: str) -> None:
    pass


def _arrays(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in
            ("src.ids", "src.lengths", "src.offsets", "tgt.ids", "tgt.lengths", "tgt.offsets")}


def test_prepared_corpus_holds_what_the_in_memory_path_encodes(tmp_path):
    src, tgt = _corpus(tmp_path / "data", 1200, empty_every=97)
    manifest = binarize(_config(src, tgt), tmp_path / "prepared", workers=1, chunk_pairs=250, log=_quiet)
    corpus = PreparedCorpus(tmp_path / "prepared")
    src_tok, tgt_tok = load_tokenizers(tmp_path / "prepared")
    expected = encode_corpus(*read_parallel(src, tgt), src_tok, tgt_tok, max_len=25, log=_quiet)
    assert len(corpus) == len(expected.src) == manifest["pairs"] < 1200
    assert (manifest["skipped_empty"], manifest["skipped_long"]) == (expected.skipped_empty,
                                                                      expected.skipped_long)
    assert manifest["skipped_long"] > 0 and manifest["skipped_empty"] == 13
    assert [corpus.src[i] for i in range(len(corpus))] == expected.src
    assert [corpus.tgt[i] for i in range(len(corpus))] == expected.tgt
    assert corpus.src.lengths.dtype == np.uint8 and corpus.src.dtype == np.uint8  # 204 tokens
    # the same batches, the same tensors, the same loss
    batches = make_batches(corpus.src.lengths, corpus.tgt.lengths, 300, 64, seed=1, epoch=2)
    reference = make_batches([len(s) for s in expected.src], [len(t) for t in expected.tgt], 300, 64,
                             seed=1, epoch=2)
    assert [b.tolist() for b in batches] == [b.tolist() for b in reference]
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(embed_size=8, hidden_size=8, dropout=0.0),
                    src_vocab=len(src_tok), tgt_vocab=len(tgt_tok), pad_id=PAD_ID).eval()
    for indices in batches[:3]:
        mapped, listed = collate(indices, corpus.src, corpus.tgt), collate(indices, expected.src,
                                                                           expected.tgt)
        for name in ("src", "src_lengths", "tgt_in", "tgt_out"):
            assert torch.equal(getattr(mapped, name), getattr(listed, name))
        with torch.no_grad():
            losses = [model(b.src, b.src_lengths, b.tgt_in, tgt_out=b.tgt_out)[0] for b in (mapped, listed)]
        assert float(losses[0]) == float(losses[1]) > 0


def test_two_workers_write_the_same_arrays_as_one(tmp_path):
    src, tgt = _corpus(tmp_path / "data", 3000)
    config = _config(src, tgt, tokenizer="sentencepiece", vocab_size=120, tokenizer_sample=2000)
    one = binarize(config, tmp_path / "one", workers=1, chunk_pairs=400, log=_quiet)
    two = binarize(config, tmp_path / "two", workers=2, chunk_pairs=400, log=_quiet)
    assert _arrays(tmp_path / "one") == _arrays(tmp_path / "two")
    assert one["tokenizer_files"] == two["tokenizer_files"]  # the sample is drawn reproducibly
    assert one["tokenizer_sample_pairs"] == 1000 and one["pairs"] == two["pairs"]  # 2000 sentences


def test_a_prepared_folder_that_fits_is_kept_and_one_that_does_not_is_rebuilt_or_refused(tmp_path):
    src, tgt = _corpus(tmp_path / "data", 300)
    out = tmp_path / "prepared"
    logged: list[str] = []
    first = binarize(_config(src, tgt), out, workers=1, log=logged.append)
    os.utime(src)  # touched, same bytes: the hash says it is the same file
    assert binarize(_config(src, tgt), out, workers=1, log=logged.append) == first
    assert "up to date" in logged[-1]
    with pytest.raises(DataError, match=r"data\.max_len=25, the config has 30.*seq2seq prepare"):
        binarize(_config(src, tgt, max_len=30), out, rebuild=False, log=_quiet)
    with src.open("a", encoding="utf-8") as handle:
        handle.write("w1 w2\n")
    with tgt.open("a", encoding="utf-8") as handle:
        handle.write("w3\n")
    with pytest.raises(DataError, match=r"data\.train_src .*train\.src is not the file it was made from"):
        binarize(_config(src, tgt), out, rebuild=False, log=_quiet)
    assert PreparedCorpus(out).manifest == first  # refused: left as it was
    rebuilt = binarize(_config(src, tgt), out, log=logged.append)
    assert any(m.startswith(f"rebuilding {out}: data.train_src") for m in logged)
    assert rebuilt["lines"] == 301
    # a damaged array, or a folder that is not a prepared corpus, is never used
    (out / "tgt.ids").write_bytes((out / "tgt.ids").read_bytes()[:-1])
    with pytest.raises(DataError, match=r"tgt\.ids: .*damaged"):
        PreparedCorpus(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a prepared corpus"):
        binarize(_config(src, tgt), tmp_path / "other", log=_quiet)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_the_tokenizers_learn_from_a_reproducible_sample(tmp_path):
    src, tgt = _corpus(tmp_path / "data", 2000)
    config = _config(src, tgt, tokenizer_sample=50, vocab_size=1000)
    first = binarize(config, tmp_path / "a", log=_quiet)
    assert first["tokenizer_sample_pairs"] == 50
    assert binarize(config, tmp_path / "b", log=_quiet)["tokenizer_files"] == first["tokenizer_files"]
    src_tok, _ = load_tokenizers(tmp_path / "a")
    assert 4 < len(src_tok) < 300  # not every word was in the sample
    whole = binarize(_config(src, tgt, vocab_size=1000), tmp_path / "c", log=_quiet)
    assert len(load_tokenizers(tmp_path / "c")[0]) == 304 and whole["tokenizer_sample_pairs"] == 2000


@pytest.mark.parametrize("fault, message", [
    ("count", r"parallel files differ in length: .*train\.src has 40 lines, .*train\.tgt has 39"),
    ("utf8", r"train\.tgt:7: invalid UTF-8"),
    ("long", r"train\.src:12: line of 600 characters exceeds the limit of 500"),
    ("gzip", r"train\.tgt\.gz:\d+: corrupt or truncated gzip"),
])
def test_bad_input_names_file_and_line_and_leaves_nothing(tmp_path, fault, message):
    src, tgt = _corpus(tmp_path, 40)
    lines = tgt.read_bytes().splitlines(keepends=True)
    if fault == "count":
        tgt.write_bytes(b"".join(lines[:-1]))
    elif fault == "utf8":
        tgt.write_bytes(b"".join(lines[:6] + [b"M\xe4dchen\n"] + lines[7:]))
    elif fault == "long":
        src_lines = src.read_bytes().splitlines(keepends=True)
        src.write_bytes(b"".join(src_lines[:11] + [b"x" * 600 + b"\n"] + src_lines[12:]))
    else:
        zipped = gzip.compress(b"".join(lines) * 200)
        tgt = tmp_path / "train.tgt.gz"
        tgt.write_bytes(zipped[:len(zipped) // 2])
        src.write_bytes(src.read_bytes() * 200)
    with pytest.raises(DataError, match=message):
        binarize(_config(src, tgt, max_line_chars=500), tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_corpus_that_could_overflow_the_index_is_refused_before_any_work(tmp_path):
    src, tgt = _corpus(tmp_path / "data", 3)
    with pytest.raises(DataError, match=r"3 pairs of up to .* more than the index type"):
        binarize(_config(src, tgt, max_len=2**62), tmp_path / "out", log=_quiet)
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # no tokenizer, no folder


def test_a_tsv_corpus_and_the_command_line(tmp_path, capsys):
    src, tgt = _corpus(tmp_path, 100)
    pairs = zip(src.read_text().splitlines(), tgt.read_text().splitlines())
    (tmp_path / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text("data: {train_src: train.tsv, tokenizer: word, max_len: 40}\n")
    argv = ["prepare", "--config", str(config), "--data-dir", str(tmp_path), "--output",
            str(tmp_path / "prepared"), "--workers", "1"]
    assert main(argv) == 0
    assert "prepared 100 of 100 pairs" in capsys.readouterr().err
    assert main(argv) == 0 and "up to date" in capsys.readouterr().err
    assert main([*argv, "--set", "data.max_len=0"]) == 1
    assert "data.max_len must be > 0" in capsys.readouterr().err
    _, tgt_tok = load_tokenizers(tmp_path / "prepared")
    first = tgt.read_text().splitlines()[0]
    assert PreparedCorpus(tmp_path / "prepared").tgt[0] == tgt_tok.encode(first) != []


# -- faults of the machine: a kill, a full disk -------------------------------------------------
_PREPARE = """
import sys
from seq2seq.data.prepare import binarize
from seq2seq.config import Config
config = Config.from_dict({"data": {"train_src": sys.argv[1], "train_tgt": sys.argv[2],
                                    "tokenizer": "word", "max_len": 40}})
binarize(config, sys.argv[3], workers=1, chunk_pairs=200)
"""


def test_a_killed_preparation_leaves_nothing_that_looks_prepared(tmp_path):
    src, tgt = _corpus(tmp_path / "data", 40_000)
    out = tmp_path / "prepared"
    process = subprocess.Popen([sys.executable, "-c", _PREPARE, str(src), str(tgt), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        # Kill it once its first chunks are on disk, in the middle of the encoding.
        while time.monotonic() < deadline and process.poll() is None:
            partial = [p for p in tmp_path.glob(".prepared.partial-*") if (p / "src.ids").is_file()]
            if partial and (partial[0] / "src.ids").stat().st_size > 20_000:
                break
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read().decode()
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    # the folder holds only its lock (taken before anything is written), the work is beside it
    assert os.listdir(out) == ["prepare.lock"] and len(list(tmp_path.glob(".prepared.partial-*"))) == 1
    with pytest.raises(DataError, match="not a prepared corpus"):
        PreparedCorpus(out)
    # the next preparation removes what the killed one left, and completes
    binarize(_config(src, tgt, max_len=40), out, workers=1, log=_quiet)
    assert read_manifest(out)["pairs"] > 0 and not list(tmp_path.glob(".prepared.partial-*"))


def _spawned_workers(pid: int) -> list[int]:
    """The multiprocessing workers (spawn) among the children of process ``pid``."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    workers = []
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(int(child))
        except OSError:
            continue
    return workers


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers in /proc (Linux)")
def test_a_worker_that_dies_ends_the_preparation_with_an_error_not_a_hang(tmp_path):
    """A real death: an encoding worker killed (SIGKILL, as the OOM killer does) as soon as both
    exist, long before the 200 chunks are encoded; the preparation ends with an error naming
    the cause, and leaves nothing behind. (A worker killed while the pool still starts the other
    can hang Python 3.11's ProcessPoolExecutor in its clean-up; not tested here.)"""
    src, tgt = _corpus(tmp_path / "data", 40_000)
    script = _PREPARE.replace("workers=1", "workers=2")
    out = tmp_path / "prepared"
    process = subprocess.Popen([sys.executable, "-c", script, str(src), str(tgt), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 120
    try:
        while killed is None and process.poll() is None and time.monotonic() < deadline:
            workers = _spawned_workers(process.pid)
            if len(workers) == 2:
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
            time.sleep(0.002)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert killed is not None, "no encoding worker was seen: " + err[-2000:]
    assert process.returncode == 1, err[-2000:]
    assert "DataError: an encoding worker process stopped" in err.strip().splitlines()[-1]
    assert not out.exists() and not list(tmp_path.glob(".prepared*"))


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_failed_write_gives_a_clear_error_and_no_half_made_dataset(tmp_path):
    """A real write failure: the kernel refuses writes past RLIMIT_FSIZE, as a full disk would."""
    src, tgt = _corpus(tmp_path / "data", 20_000)
    out = tmp_path / "prepared"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"data": {"train_src": str(src), "train_tgt": str(tgt),
                                           "tokenizer": "word", "max_len": 40}}))
    result = subprocess.run([sys.executable, "-m", "seq2seq", "prepare", "--config", str(config),
                             "--output", str(out), "--workers", "1"], capture_output=True, text=True,
                            preexec_fn=_limit_file_size, timeout=300)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"seq2seq: error: cannot write the prepared corpus {re.escape(str(out))}: "
                        rf"File too large \(writing [st][rg][ct]\.(ids|offsets|lengths)\); nothing was kept",
                        last), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "data"]


# -- training reads the prepared arrays -----------------------------------------------------------
TRAIN_CONFIG = """\
data: {train_src: train.src, train_tgt: train.tgt, tokenizer: word, vocab_size: 100}
model: {embed_size: 16, hidden_size: 24, attention: bahdanau, dropout: 0.3}
train: {batch_tokens: 100, epochs: 1, max_steps: 4, lr: 0.01, log_every: 2, threads: 1, device: cpu}
"""


def test_training_maps_a_prepared_folder_and_refuses_one_that_does_not_fit(tmp_path, capsys,
                                                                            prepared_data_cache):
    data = write_reversal(tmp_path / "data", {"train": 300}, seed=3)
    (data / "cfg.yaml").write_text(TRAIN_CONFIG, encoding="utf-8")
    common = ["--config", str(data / "cfg.yaml"), "--data-dir", str(data)]
    assert main(["prepare", *common, "--output", str(data / "shared"), "--workers", "1"]) == 0
    assert main(["train", *common, "--model-dir", str(tmp_path / "own")]) == 0  # prepares its own
    assert main(["train", *common, "--model-dir", str(tmp_path / "given"),
                 "--set", "data.prepared=shared"]) == 0
    cached = prepared_data_cache / "prepared"
    [entry] = [p for p in cached.iterdir() if p.is_dir()]  # the own run's, in the cache
    assert (entry / MANIFEST).is_file()
    assert not (tmp_path / "own" / "prepared").exists() and not (tmp_path / "given" / "prepared").exists()
    own, given = (read_checkpoint(tmp_path / d / "last.safetensors")[0] for d in ("own", "given"))
    assert own.keys() == given.keys() and all(torch.equal(own[k], given[k]) for k in own)
    # a run whose prepared data is gone (or that predates it) resumes with its own tokenizers
    shutil.rmtree(entry)
    assert main(["train", "--model-dir", str(tmp_path / "own"), "--resume", "--set",
                 "train.max_steps=6"]) == 0
    [entry] = [p for p in cached.iterdir() if p.is_dir()]
    manifest = read_manifest(entry)
    assert manifest["tokenizer_files"] == read_manifest(data / "shared")["tokenizer_files"]
    capsys.readouterr()
    assert main(["train", *common, "--model-dir", str(tmp_path / "other"), "--set", "data.prepared=shared",
                 "--set", "data.max_len=50"]) == 1
    assert re.search(r"shared does not fit the config: it was made with data\.max_len=100, the config "
                     r"has 50\. Run seq2seq prepare", capsys.readouterr().err)


_ON_TMPFS = """
set -e
mount -t tmpfs -o size=256k tmpfs "$1"
code=0
"$2" -m seq2seq prepare --config "$3" --output "$1/prepared" --workers 1 || code=$?
echo "exit $code"
ls -A "$1"
"""


def test_a_full_disk_gives_a_clear_error_and_no_half_made_dataset(tmp_path):
    """A real full disk: a 256 kB tmpfs, mounted in a private mount namespace, fills up."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs",
                            "-o", "size=64k", "tmpfs", "/mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here (unshare: {probe.stderr.strip()}); the RLIMIT_FSIZE "
                    f"test above fails writes for real without one")
    src, tgt = _corpus(tmp_path / "data", 20_000)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"data": {"train_src": str(src), "train_tgt": str(tgt),
                                           "tokenizer": "word", "max_len": 40}}))
    (tmp_path / "disk").mkdir()
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", _ON_TMPFS,
                             "sh", str(tmp_path / "disk"), sys.executable, str(config)],
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.splitlines() == ["exit 1"], result.stdout + result.stderr  # nothing left
    assert re.search(r"^seq2seq: error: cannot write the prepared corpus .*/disk/prepared: No space "
                     r"left on device \(writing [st][rg][ct]\.(ids|offsets|lengths)\); nothing was "
                     r"kept$", result.stderr, re.MULTILINE), result.stderr


# -- the worker processes die with their parent -------------------------------------------------
def _children_by_parent() -> dict[int, list[int]]:
    """Every process's children, read from /proc (no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # ended meanwhile
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "(comm) state"
            children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    children, found, todo = _children_by_parent(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead and waiting for a parent to reap it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_killing_prepare_with_sigkill_leaves_no_worker_process(tmp_path):
    """A real ``seq2seq prepare`` with two encoding workers, killed with SIGKILL while they work:
    every process it started ends too (none is left blocked on a pipe, as they once were)."""
    rng = random.Random(5)
    lines = ["".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "\n" for _ in range(45_000))
             for _ in range(2)]  # 3 chunks of 20,000 pairs: two workers
    (tmp_path / "train.src").write_text(lines[0], encoding="utf-8")
    (tmp_path / "train.tgt").write_text(lines[1], encoding="utf-8")
    (tmp_path / "cfg.yaml").write_text("data: {train_src: train.src, train_tgt: train.tgt, "
                                       "tokenizer: word, max_len: 40}\n")
    process = subprocess.Popen([sys.executable, "-m", "seq2seq", "prepare", "--config",
                                str(tmp_path / "cfg.yaml"), "--data-dir", str(tmp_path), "--output",
                                str(tmp_path / "prepared"), "--workers", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            started = _descendants(process.pid)
            if sum("spawn_main" in _cmdline(pid) for pid in started) >= 2:
                break
            time.sleep(0.02)
        assert process.poll() is None, f"prepare ended before its workers started: {process.stderr.read()}"
        assert sum("spawn_main" in _cmdline(pid) for pid in started) >= 2, "no worker started in 120 s"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        deadline = time.monotonic() + 20
        while any(map(_alive, started)) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = [f"{pid}: {_cmdline(pid)}" for pid in started if _alive(pid)]
        assert not left, f"processes left behind by the killed prepare: {left}"
    finally:
        process.kill()
        process.wait()
        for pid in started:  # never leave them running, even when the test fails
            if _alive(pid) and "multiprocessing" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)


# -- what a preparation may delete ----------------------------------------------------------------
def test_an_output_name_with_wildcards_deletes_no_sibling(tmp_path):
    """``--output 'a*'`` once globbed ``.a*.*.partial`` and deleted the siblings it matched."""
    src, tgt = _corpus(tmp_path / "data", 200)
    siblings = [tmp_path / ".ab.x.partial", tmp_path / ".a[b].zz.partial",
                tmp_path / ".ab.partial-12345678"]  # the last: the work in progress of output "ab"
    for sibling in siblings:
        sibling.mkdir()
        (sibling / "keep.txt").write_text("mine")
    for name in ("a*", "a[b]"):
        binarize(_config(src, tgt), tmp_path / name, workers=1, log=_quiet)
        binarize(_config(src, tgt, max_len=30), tmp_path / name, workers=1, log=_quiet)  # a rebuild
        assert read_manifest(tmp_path / name)["settings"]["max_len"] == 30
    for sibling in siblings:
        assert (sibling / "keep.txt").read_text() == "mine"


def test_a_rebuild_refuses_a_folder_with_foreign_files_and_changes_nothing(tmp_path):
    src, tgt = _corpus(tmp_path / "data", 200)
    out = tmp_path / "prepared"
    binarize(_config(src, tgt), out, workers=1, log=_quiet)
    (out / "README.md").write_text("my notes")
    before = _arrays(out)
    with pytest.raises(DataError, match=r"must be rebuilt .* holds .*README\.md, which seq2seq prepare did "
                                        r"not write .*nothing was changed"):
        binarize(_config(src, tgt, max_len=30), out, workers=1, log=_quiet)
    assert (out / "README.md").read_text() == "my notes" and _arrays(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folder
    # a folder that fits is used as it is, foreign files and all
    assert binarize(_config(src, tgt), out, workers=1, log=_quiet)["settings"]["max_len"] == 25


def test_an_output_that_is_a_symlink_is_built_and_rebuilt_through_it(tmp_path):
    """The link stays a link; its target folder is built, then rebuilt; nothing partial is left."""
    src, tgt = _corpus(tmp_path / "data", 200)
    (tmp_path / "disk").mkdir()
    link = tmp_path / "prepared"
    link.symlink_to(tmp_path / "disk" / "corpus")  # dangling until the first preparation
    binarize(_config(src, tgt), link, workers=1, log=_quiet)
    assert link.is_symlink() and read_manifest(tmp_path / "disk" / "corpus")["settings"]["max_len"] == 25
    binarize(_config(src, tgt, max_len=30), link, workers=1, log=_quiet)
    assert link.is_symlink() and read_manifest(link)["settings"]["max_len"] == 30
    assert PreparedCorpus(link).manifest["settings"]["max_len"] == 30
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["corpus"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "disk", "prepared"]


def test_a_second_preparation_into_a_locked_folder_is_refused_before_it_deletes_anything(tmp_path):
    from seq2seq.files import FileLock

    src, tgt = _corpus(tmp_path / "data", 200)
    out = tmp_path / "prepared"
    binarize(_config(src, tgt), out, workers=1, log=_quiet)
    before = _arrays(out)
    stale = tmp_path / ".prepared.partial-abcd1234"  # what a killed run would leave: kept while locked
    stale.mkdir()
    with FileLock(out / "prepare.lock"):  # as a preparation running in another process holds it
        with pytest.raises(DataError, match=rf"{out} is in use: pid {os.getpid()} on .* is preparing it"):
            binarize(_config(src, tgt, max_len=30), out, workers=1, log=_quiet)
    assert _arrays(out) == before and stale.is_dir()


def test_a_prepare_lock_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    src, tgt = _corpus(tmp_path / "data", 200)
    out = tmp_path / "prepared"
    binarize(_config(src, tgt), out, workers=1, log=_quiet)
    victim = tmp_path / "someones.txt"
    victim.write_text("precious\n")
    assert not (out / "prepare.lock").exists()  # made in the folder that the new one replaced
    (out / "prepare.lock").symlink_to(victim)
    before = _arrays(out)
    with pytest.raises(DataError, match=r"prepare\.lock: the lock file is a symbolic link.*nothing was "
                                        r"changed"):
        binarize(_config(src, tgt, max_len=30), out, workers=1, log=_quiet)
    assert victim.read_text() == "precious\n" and _arrays(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "prepared", "someones.txt"]
