"""Public corpora, fetched and checked: ``seq2seq data multi30k --output DIR``.

Multi30k task 1 (Elliott et al., 2016: English image captions with German and French
translations) comes from its public repository, github.com/multi30k/dataset, folder
``data/task1/raw``: ``train``, ``val`` and ``test_2016_flickr``, each ``.en/.de/.fr.gz``.
The configs in ``seq2seq configs`` read these files as they are.

Each file is checked against the SHA-256 kept in the package (``multi30k.sha256``). pooch
does the fetching: it downloads into a temporary file beside the target and moves it in place
only when the checksum matches, skips a file that is already there with the right checksum
(so a second run after an interruption fetches only what is missing) and fetches again one
whose checksum differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"


class DownloadError(Exception):
    """A file could not be fetched or did not match its checksum; the message names it."""


def multi30k_checksums() -> dict[str, str]:
    """File name -> SHA-256 hex digest of the Multi30k task 1 raw files, from the package."""
    lines = Path(__file__).with_name("multi30k.sha256").read_text(encoding="utf-8").splitlines()
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def download_multi30k(output_dir: str | Path, base_url: str = MULTI30K_URL,
                      checksums: dict[str, str] | None = None) -> list[Path]:
    """Fetch the Multi30k task 1 files into ``output_dir``; return their paths.

    ``checksums`` (file name -> SHA-256) defaults to the package's list of the nine files.
    Raises ``DownloadError`` naming the URL or file on a network error, an HTTP error or a
    checksum mismatch; the files already fetched stay, and nothing half-written is left.
    """
    import pooch
    import requests

    checksums = multi30k_checksums() if checksums is None else checksums
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise DownloadError(f"{output}: exists and is not a folder")
    pooch.get_logger().setLevel(logging.WARNING)  # one line per file is printed below instead
    paths = []
    for name, digest in checksums.items():
        url = base_url.rstrip("/") + "/" + name
        target = output / name
        if not target.exists():
            state = "fetched"
        elif target.is_file() and pooch.file_hash(str(target)) == digest:
            print(f"{target}: already there, sha256 ok", flush=True)  # no second hash in retrieve
            paths.append(target)
            continue
        else:
            state = "fetched again (the file there had another checksum)"
        try:
            pooch.retrieve(url, known_hash=f"sha256:{digest}", fname=name, path=output)
        except requests.RequestException as error:
            raise DownloadError(f"{url}: {error}") from None
        except ValueError as error:  # pooch's checksum mismatch; it deleted the download
            raise DownloadError(f"{url}: checksum mismatch, file not kept ({error})") from None
        except OSError as error:
            raise DownloadError(f"{target}: cannot write: {error.strerror or error}") from None
        print(f"{target}: {state}, sha256 ok", flush=True)
        paths.append(target)
    return paths
