"""``seq2seq data multi30k``: fetched from a local HTTP server on 127.0.0.1, never the internet.

The server serves small files from a temporary folder and counts the requests it answers, so
the tests see which files were fetched and which were skipped.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import threading
from pathlib import Path

import pytest

from seq2seq import cli
from seq2seq.data.downloads import DownloadError, download_multi30k, multi30k_checksums

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
