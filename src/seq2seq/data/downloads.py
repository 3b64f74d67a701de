"""Public corpora, fetched and checked: ``seq2seq data multi30k --output DIR``.

Multi30k task 1 (Elliott et al., 2016: English image captions with German and French
translations) comes from its public repository, github.com/multi30k/dataset, folder
``data/task1/raw``: ``train``, ``val`` and ``test_2016_flickr``, each ``.en/.de/.fr.gz``.
The configs in ``seq2seq configs`` read these files as they are.

Each file is checked against the SHA-256 kept in the package (``multi30k.sha256``). A file
already there with the right checksum is kept (so a second run after an interruption fetches
only what is missing, and a local copy can be put in the folder by hand); one whose checksum
differs is fetched again. requests streams each file into a temporary file beside the target
(``.NAME.*.download``), hashed as it arrives, which is renamed into place only when complete
and matching. The whole command has a deadline (``DEADLINE_S``; a watchdog shuts the
connection down when it passes) and each file a size cap (``MAX_FILE_BYTES``), so a server
that trickles, stalls or sends without end cannot hold the command or fill the disk. A
failed or interrupted (Ctrl-C) download removes its temporary file; one killed outright
(SIGKILL, or SIGTERM, which Python does not catch by default) leaves it, and the next run
into the folder removes it first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
DEADLINE_S = 600.0  # the whole download; Multi30k is about 2 MB
MAX_FILE_BYTES = 16 << 20  # per file; Multi30k's largest is about 0.6 MB
CONNECT_TIMEOUT_S = 30.0
PARTIAL = ".download"  # suffix of the temporary files: ``.NAME.XXXXXXXX.download``
_CHUNK = 1 << 16


class DownloadError(Exception):
    """A file could not be fetched or did not match its checksum; the message names it."""


def multi30k_checksums() -> dict[str, str]:
    """File name -> SHA-256 hex digest of the Multi30k task 1 raw files, from the package."""
    lines = Path(__file__).with_name("multi30k.sha256").read_text(encoding="utf-8").splitlines()
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def download_multi30k(output_dir: str | Path, base_url: str = MULTI30K_URL,
                      checksums: dict[str, str] | None = None, *, deadline_s: float = DEADLINE_S,
                      max_file_bytes: int = MAX_FILE_BYTES) -> list[Path]:
    """Fetch the Multi30k task 1 files into ``output_dir``; return their paths.

    ``checksums`` (file name -> SHA-256) defaults to the package's list of the nine files.
    Raises ``DownloadError`` naming the URL or file on an unsupported URL, a network error, an
    HTTP error, a file over ``max_file_bytes``, the whole download taking over ``deadline_s``
    seconds, or a checksum mismatch; the files already fetched stay, and no temporary file is
    left.
    """
    import pooch

    checksums = multi30k_checksums() if checksums is None else checksums
    scheme = urllib.parse.urlsplit(base_url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"{base_url}: unsupported URL scheme {scheme or 'none'!r}: the base URL must "
                            f"start with http:// or https:// (to use local copies, put them in the "
                            f"output folder: files there with the right checksum are kept)")
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise DownloadError(f"{output}: exists and is not a folder")
    deadline = time.monotonic() + deadline_s
    try:
        output.mkdir(parents=True, exist_ok=True)
        _remove_stale_downloads(output, checksums)
    except OSError as error:
        raise DownloadError(f"{output}: cannot write: {error.strerror or error}") from None
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    paths = []
    for name, digest in checksums.items():
        url = base_url.rstrip("/") + "/" + name
        target = output / name
        if not target.exists():
            state = "fetched"
        elif target.is_file() and pooch.file_hash(str(target)) == digest:
            print(f"{target}: already there, sha256 ok", flush=True)
            paths.append(target)
            continue
        else:
            state = "fetched again (the file there had another checksum)"
        _fetch(url, target, digest, deadline, deadline_s, max_file_bytes)
        print(f"{target}: {state}, sha256 ok", flush=True)
        paths.append(target)
    return paths


def _remove_stale_downloads(output: Path, checksums: dict[str, str]) -> None:
    """Remove the temporary files that a killed download into ``output`` left (names compared
    as strings, never used as patterns)."""
    prefixes = tuple(f".{name}." for name in checksums)
    for entry in os.scandir(output):
        if entry.name.endswith(PARTIAL) and entry.name.startswith(prefixes) and entry.is_file(
                follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _fetch(url: str, target: Path, digest: str, deadline: float, deadline_s: float,
           max_file_bytes: int) -> None:
    """Stream ``url`` into a temporary file beside ``target``, renamed to it when complete and
    matching ``digest``; the temporary file is removed on any error or interruption."""
    import requests
    import urllib3

    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL, dir=target.parent)
    received = 0
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the corpus from other users
        sha256 = hashlib.sha256()
        with os.fdopen(fd, "wb") as handle, _get(url, deadline) as response:
            if response.status_code != 200:
                raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason or ''}".rstrip())
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_file_bytes:
                raise DownloadError(f"{url}: {int(declared)} bytes (Content-Length), more than the "
                                    f"{max_file_bytes} a file of this corpus may have; not fetched")
            with _watchdog(response.raw, deadline) as late:
                while chunk := response.raw.read1(_CHUNK):  # what has arrived, up to _CHUNK
                    received += len(chunk)
                    if received > max_file_bytes:
                        raise DownloadError(f"{url}: more than the {max_file_bytes} bytes a file of "
                                            f"this corpus may have; stopped, nothing kept")
                    sha256.update(chunk)
                    handle.write(chunk)
                    if time.monotonic() > deadline:
                        late.set()
                        break
            if late.is_set():
                raise _late(url, deadline_s, received)
            handle.flush()
            os.fsync(handle.fileno())
        if sha256.hexdigest() != digest:
            raise DownloadError(f"{url}: checksum mismatch, file not kept (sha256 {sha256.hexdigest()}, "
                                f"expected {digest}; {received} bytes)")
        os.replace(temporary, target)
    except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):
        raise _late(url, deadline_s, received) from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        if time.monotonic() >= deadline:  # the watchdog cut the connection: a short read
            raise _late(url, deadline_s, received) from None
        raise DownloadError(f"{url}: {_gist(error)}") from None
    except OSError as error:  # the socket's errors come as urllib3's; this one is the disk's
        raise DownloadError(f"{target}: cannot write: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


@contextlib.contextmanager
def _get(url: str, deadline: float) -> Any:
    import requests

    remaining = max(deadline - time.monotonic(), 0.001)
    response = requests.get(url, stream=True, timeout=(min(CONNECT_TIMEOUT_S, remaining), remaining),
                            headers={"Accept-Encoding": "identity"})  # bytes as stored: the checksum's
    try:
        yield response
    finally:
        response.close()


@contextlib.contextmanager
def _watchdog(raw: Any, deadline: float) -> Iterator[threading.Event]:
    """Shut the response's connection down at ``deadline``, so that a read blocked on a server
    that stopped sending returns then (requests' read timeout counts from each read's start, so a
    server that sends a byte now and then never meets it). Yields an event set when it fired."""
    fired = threading.Event()
    try:  # a second socket object on a copy of the descriptor: shutdown() acts on the connection
        sock = socket.socket(fileno=os.dup(raw.fileno()))
    except (OSError, ValueError, AttributeError):  # no socket to watch (not expected)
        yield fired
        return

    def cut() -> None:
        fired.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), cut)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
        timer.join()
        sock.close()


def _late(url: str, deadline_s: float, received: int) -> DownloadError:
    return DownloadError(f"{url}: not finished within the download's deadline of {deadline_s:g} s "
                         f"({received} bytes of this file received); nothing half-written is kept, "
                         f"and a new run fetches only the missing files")


def _gist(error: BaseException) -> str:
    text = str(error)
    return text if len(text) <= 300 else text[:297] + "..."


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
