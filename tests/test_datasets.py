"""``seq2seq data multi30k``: fetched from a local HTTP server on 127.0.0.1, never the internet.

The server serves small files from a temporary folder and counts the requests it answers, so
the tests see which files were fetched and which were skipped.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from seq2seq import cli
from seq2seq.data.downloads import MAX_FILE_BYTES, DownloadError, download_multi30k, multi30k_checksums

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder, list of requested paths) of a server on a free local port."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []
    handler = functools.partial(type("Handler", (_CountingHandler,), {"requests": requests}),
                                directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/raw/", served, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _serve(served: Path, files: dict[str, bytes]) -> dict[str, str]:
    (served / "raw").mkdir(exist_ok=True)
    for name, content in files.items():
        (served / "raw" / name).write_bytes(content)
    return {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}


FILES = {"train.en.gz": b"a man rides a bike\n" * 50, "train.de.gz": b"ein Mann faehrt Rad\n" * 50}


def test_fetches_checks_and_then_skips_files_already_there(server, tmp_path, capsys):
    base_url, served, requests = server
    checksums = _serve(served, FILES)
    out = tmp_path / "out"
    paths = download_multi30k(out, base_url=base_url, checksums=checksums)
    assert paths == [out / "train.en.gz", out / "train.de.gz"]
    assert {p.name: p.read_bytes() for p in paths} == FILES
    assert sorted(requests) == ["/raw/train.de.gz", "/raw/train.en.gz"]
    assert "fetched, sha256 ok" in capsys.readouterr().out

    # a second run (say after an interruption) fetches nothing that is already right
    (out / "train.de.gz").unlink()
    requests.clear()
    download_multi30k(out, base_url=base_url, checksums=checksums)
    assert requests == ["/raw/train.de.gz"]
    printed = capsys.readouterr().out
    assert f"{out / 'train.en.gz'}: already there" in printed
    assert f"{out / 'train.de.gz'}: fetched" in printed


def test_a_checksum_mismatch_keeps_nothing_and_names_the_url(server, tmp_path):
    base_url, served, _ = server
    checksums = _serve(served, FILES)
    (served / "raw" / "train.de.gz").write_bytes(b"tampered\n")
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=rf"{re.escape(base_url)}train\.de\.gz: checksum mismatch"):
        download_multi30k(out, base_url=base_url, checksums=checksums)
    # the good file before it stays; the bad one and any partial download are gone
    assert sorted(p.name for p in out.iterdir()) == ["train.en.gz"]


def test_a_wrong_file_already_there_is_fetched_again(server, tmp_path, capsys):
    base_url, served, _ = server
    checksums = _serve(served, FILES)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.en.gz").write_bytes(b"truncated")
    download_multi30k(out, base_url=base_url, checksums=checksums)
    assert (out / "train.en.gz").read_bytes() == FILES["train.en.gz"]
    assert "fetched again" in capsys.readouterr().out


def test_a_missing_file_on_the_server_names_the_url(server, tmp_path):
    base_url, served, _ = server
    _serve(served, {})
    with pytest.raises(DownloadError, match=rf"{re.escape(base_url)}val\.en\.gz: .*404"):
        download_multi30k(tmp_path / "out", base_url=base_url, checksums={"val.en.gz": "0" * 64})


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DownloadError, match="exists and is not a folder"):
        download_multi30k(tmp_path / "file", checksums={"val.en.gz": "0" * 64})


def test_the_command_reports_a_mismatch_in_one_line(server, tmp_path, capsys):
    # the packaged checksums are those of the real corpus: these small files cannot match them
    base_url, served, _ = server
    _serve(served, {name: b"not the corpus\n" for name in multi30k_checksums()})
    code = cli.main(["data", "multi30k", "--output", str(tmp_path / "out"), "--base-url", base_url])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("seq2seq: error: ") and "checksum mismatch" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_package_lists_the_nine_multi30k_files():
    checksums = multi30k_checksums()
    assert sorted(checksums) == sorted(f"{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr")
                                       for lang in ("en", "de", "fr"))
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in checksums.values())


@pytest.mark.skipif(not SHARED.is_dir(), reason="the real Multi30k corpus is not at ../shared/data/multi30k")
def test_the_packaged_checksums_match_the_real_corpus():
    for name, digest in multi30k_checksums().items():
        assert hashlib.sha256((SHARED / name).read_bytes()).hexdigest() == digest, name


# -- hostile servers: trickling, endless, silent ------------------------------------------------
class _HostileHandler(http.server.BaseHTTPRequestHandler):
    """``/trickle/NAME`` sends a byte every 20 ms, ``/endless/NAME`` 64 KiB blocks without end,
    ``/silent/NAME`` headers and then nothing, ``/good/NAME`` the file of ``FILES``,
    ``/slow/NAME`` the same in ten pieces over 0.6 s, ``/stall/NAME`` trickles for 0.8 s and then
    sends nothing. Every
    response ends when the fixture sets ``stop`` (bounded in time), or when the client goes."""

    stop: threading.Event

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        mode, _, name = self.path.strip("/").partition("/")
        if mode in ("good", "slow"):
            body = FILES[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            pieces = 10 if mode == "slow" else 1  # slow: the file in 0.6 s
            for i in range(pieces):
                self.wfile.write(body[i * len(body) // pieces:(i + 1) * len(body) // pieces])
                self.wfile.flush()
                if mode == "slow":
                    self.stop.wait(0.06)
            return
        self.send_response(200)
        if mode in ("trickle", "stall"):
            self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.flush()
        began = time.monotonic()
        try:
            while not self.stop.is_set():
                if mode == "trickle" or (mode == "stall" and time.monotonic() - began < 0.8):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    self.stop.wait(0.02)
                elif mode == "endless":
                    self.wfile.write(b"\0" * 65536)
                else:
                    self.stop.wait(0.05)
        except OSError:  # the client hung up
            pass

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def hostile():
    """The base URL of a server on a free local port that serves ``_HostileHandler``'s modes."""
    stop = threading.Event()
    handler = type("Handler", (_HostileHandler,), {"stop": stop})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


CHECKSUMS = {name: hashlib.sha256(body).hexdigest() for name, body in FILES.items()}


@pytest.mark.parametrize("mode", ["trickle", "silent", "stall"])
def test_a_trickling_or_silent_server_meets_the_total_deadline_and_leaves_no_temporary_file(
        hostile, tmp_path, mode):
    """``stall``: a read that starts 0.8 s in waits only for what is left of the deadline (0.7 s),
    not for a timeout set when the request began."""
    out = tmp_path / "out"
    began = time.monotonic()
    with pytest.raises(DownloadError, match=rf"{mode}/train\.en\.gz: not finished within the download's "
                                            rf"deadline of 1\.5 s \(\d+ bytes of this file received\)"):
        download_multi30k(out, base_url=hostile + mode, checksums=CHECKSUMS, deadline_s=1.5)
    elapsed = time.monotonic() - began
    assert 1.5 <= elapsed < 2.1, elapsed
    assert list(out.iterdir()) == []


def test_the_deadline_covers_the_whole_download_not_each_file(hostile, tmp_path):
    """Two files of 0.6 s each, 1 s for all: the first is kept, the second is late."""
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"slow/train\.de\.gz: not finished within .* deadline of 1 s"):
        download_multi30k(out, base_url=hostile + "slow", checksums=CHECKSUMS, deadline_s=1.0)
    assert [p.name for p in out.iterdir()] == ["train.en.gz"]
    assert (out / "train.en.gz").read_bytes() == FILES["train.en.gz"]
    download_multi30k(out, base_url=hostile + "slow", checksums=CHECKSUMS, deadline_s=1.0)  # the rest


def test_an_endless_body_stops_at_the_default_size_cap_and_keeps_nothing(hostile, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=rf"endless/train\.en\.gz: more than the {MAX_FILE_BYTES} bytes"):
        download_multi30k(out, base_url=hostile + "endless", checksums=CHECKSUMS)
    assert list(out.iterdir()) == []


def test_a_declared_size_over_the_cap_is_refused_before_reading(hostile, tmp_path):
    with pytest.raises(DownloadError, match=r"1000000 bytes \(Content-Length\), more than the 999999"):
        download_multi30k(tmp_path / "out", base_url=hostile + "trickle", checksums=CHECKSUMS,
                          max_file_bytes=999_999)
    assert list((tmp_path / "out").iterdir()) == []


def _download_in_child(out: Path, base_url: str) -> subprocess.Popen:
    code = ("import sys; from seq2seq.data.downloads import download_multi30k; "
            f"download_multi30k(sys.argv[1], base_url=sys.argv[2], checksums={CHECKSUMS!r}, deadline_s=60)")
    return subprocess.Popen([sys.executable, "-c", code, str(out), base_url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_partial(out: Path, child: subprocess.Popen) -> list[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and child.poll() is None:
        partial = [p for p in _leftovers(out) if p.endswith(".download")]
        if partial:
            return partial
        time.sleep(0.02)
    raise AssertionError(f"no partial download appeared (exit code {child.poll()})")


def test_ctrl_c_removes_the_temporary_file_and_sigkill_leaves_one_that_the_next_run_removes(
        hostile, tmp_path):
    out = tmp_path / "out"
    child = _download_in_child(out, hostile + "trickle")
    _wait_for_partial(out, child)
    child.send_signal(signal.SIGINT)
    assert child.wait(30) != 0 and b"KeyboardInterrupt" in child.stderr.read()
    assert list(out.iterdir()) == []

    child = _download_in_child(out, hostile + "trickle")
    partial = _wait_for_partial(out, child)
    child.kill()  # SIGKILL: no code runs, the temporary file stays ...
    child.wait(30)
    assert _leftovers(out) == partial and partial[0].startswith(".train.en.gz.")
    (out / ".notes").write_text("a file of the user's")
    paths = download_multi30k(out, base_url=hostile + "good", checksums=CHECKSUMS)
    assert {p.name: p.read_bytes() for p in paths} == FILES
    assert _leftovers(out) == [".notes"]  # ... until the next run, which removes only its own


@pytest.mark.parametrize("url, scheme", [("file:///tmp/mirror/", "file"), ("ftp://127.0.0.1/x/", "ftp"),
                                         ("127.0.0.1:8000/raw/", "none")])
def test_a_url_that_is_not_http_is_refused_saying_so_not_as_a_checksum_mismatch(tmp_path, capsys, url,
                                                                               scheme):
    code = cli.main(["data", "multi30k", "--output", str(tmp_path / "out"), "--base-url", url])
    err = capsys.readouterr().err
    assert code == 1 and "mismatch" not in err and "Traceback" not in err
    assert f"unsupported URL scheme {scheme!r}" in err and "http:// or https://" in err
    assert not (tmp_path / "out").exists()


def test_a_server_that_is_not_there_is_named(tmp_path):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"127\.0\.0\.1:{port}/raw/train\.en\.gz: .*refused"):
        download_multi30k(tmp_path / "out", base_url=f"http://127.0.0.1:{port}/raw/", checksums=CHECKSUMS)
    assert _leftovers(tmp_path / "out") == []
