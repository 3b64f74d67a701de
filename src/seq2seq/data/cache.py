"""Prepared corpora kept across runs: a second training on the same files reuses the arrays.

The cache is the folder ``$SEQ2SEQ_CACHE``, else ``$XDG_CACHE_HOME/seq2seq``, else
``~/.cache/seq2seq``. Its ``prepared/`` folder holds one prepared folder (``data/prepared.py``)
per key, and beside each its lock:
    prepared/KEY/              a prepared corpus, as ``seq2seq prepare --output`` writes one
    prepared/KEY.lock          held while a process builds, reuses or removes KEY; its
                               modification time is the entry's last use
    prepared/.KEY.partial-...  what a killed preparation left (the next one removes it)
KEY is the SHA-256 (first 32 hex digits) of the training files' SHA-256s, the data settings
that shape the arrays (``prepared.settings_of``), the prepared format, and, for a run that
imposes its tokenizers (a resumed or fine-tuning run), those tokenizers' files.

A second process wanting a key that is being built waits for the lock (a blocking ``flock``,
no polling), then finds the entry complete and reuses it. ``binarize`` builds into a
temporary folder and renames it when complete, so a SIGKILL leaves no entry that looks
prepared.

Training prepares in a child process (``prepare_in_child``: ``python -c`` running ``_child``,
JSON over a pipe, no pickle), so the training process's peak memory excludes the
tokenizers' training and the encoding. The child dies with its parent (``PR_SET_PDEATHSIG``);
its log lines reach the parent's log; its errors arrive with their class and message.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from seq2seq.config import Config, ConfigError, DataConfig
from seq2seq.data import prepared as fmt
from seq2seq.data.text import DataError
from seq2seq.files import FileError, FileLock, LockBusy, read_named_file
from seq2seq.model_dir import TOKENIZER_FILE, tokenizer_file_names

PREPARED = "prepared"  # the cache's folder of prepared corpora
KEY_DIGITS = 32
_KEY = re.compile(rf"[0-9a-f]{{{KEY_DIGITS}}}")
_LOCK_SUFFIX = ".lock"
_PARTIAL = re.compile(rf"\.([0-9a-f]{{{KEY_DIGITS}}})\.partial-[A-Za-z0-9_]{{8}}")  # prepare's temporaries
_ENTRY_LOCK = "prepare.lock"  # prepare.LOCK_FILE, binarize's own lock inside the folder (prepare loads more)
# the errors a child's preparation may raise, by module: re-raised in the parent with their class
_ERRORS = {("seq2seq.data.text", "DataError"): DataError, ("seq2seq.config", "ConfigError"): ConfigError,
           ("seq2seq.files", "FileError"): FileError}


def cache_dir() -> Path:
    """The cache folder: ``$SEQ2SEQ_CACHE``, else ``$XDG_CACHE_HOME/seq2seq``, else ``~/.cache/seq2seq``."""
    if os.environ.get("SEQ2SEQ_CACHE"):
        return Path(os.environ["SEQ2SEQ_CACHE"]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().absolute() / "seq2seq"


def prepared_root(root: Path | None = None) -> Path:
    return (root or cache_dir()) / PREPARED


# -- keys ----------------------------------------------------------------------------------------
def cache_key(data: DataConfig, tokenizers: dict[str, str] | None = None,
              sources: dict[str, str] | None = None) -> str:
    """The key of ``data``'s training files and settings (and imposed ``tokenizers``, as
    ``tokenizer_identity`` gives them). Hashes the training files (regular files), unless
    ``sources`` gives their SHA-256s (``source_digests``)."""
    sources = sources or source_digests(data)
    material = {"format": fmt.FORMAT, "settings": fmt.settings_of(data), "sources": sources,
                "tokenizers": tokenizers}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:KEY_DIGITS]


def source_digests(data: DataConfig) -> dict[str, str]:
    """The SHA-256 of each training file, by setting name (``train_src``, ``train_tgt``)."""
    return {name: fmt.file_record(path)["sha256"] for name, path in fmt.source_paths(data).items()}


def tokenizer_identity(folder: Path) -> dict[str, str]:
    """SHA-256 of each tokenizer file of a model (or prepared) folder: ``tokenizer.json`` and
    the files it names. Read as regular files only, never through a link."""
    source = Path(folder) / TOKENIZER_FILE
    try:
        spec = json.loads(read_named_file(folder, TOKENIZER_FILE, source))
        stems = [spec[side] for side in ("src", "tgt")] if isinstance(spec, dict) else []
        names = [TOKENIZER_FILE, *tokenizer_file_names([s for s in stems if isinstance(s, str)])]
        identity = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # NAME.model exists for sentencepiece only
                identity[name] = hashlib.sha256(read_named_file(folder, name, source)).hexdigest()
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{source}: cannot read the tokenizers: {error}") from None
    return identity


def _regular_inputs(data: DataConfig) -> bool:
    """Whether every training file can be hashed before it is read (not a pipe, not stdin)."""
    for path in fmt.source_paths(data).values():
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return False
        except OSError:
            raise DataError(f"{path}: no such file") from None
    return True


# -- the entries and their locks -----------------------------------------------------------------
def _lock_path(root: Path, key: str) -> Path:
    return root / f"{key}{_LOCK_SUFFIX}"


@contextlib.contextmanager
def _entry_lock(root: Path, key: str, log: Callable[[str], None], wait: bool = True) -> Iterator[FileLock]:
    """The lock of entry ``key``; while another process holds it, wait (a shared ``flock`` on
    the same file blocks until the holder lets go) or, with ``wait=False``, ``LockBusy``."""
    path = _lock_path(root, key)
    told = False
    while True:
        try:
            lock = FileLock(path)
            break
        except LockBusy as busy:
            if not wait:
                raise
            if not told:
                log(f"waiting for {busy.holder}, which is preparing {root / key}")
                told = True
            _wait_for_release(path)
        except FileError as error:
            raise DataError(f"the prepared-data cache: {error}") from None
    try:
        os.utime(lock.fd)  # the entry's last use
        yield lock
    finally:
        lock.release()


def _wait_for_release(path: Path) -> None:
    """Block until the holder of ``path``'s exclusive lock lets it go (or dies)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # gone or replaced meanwhile: FileLock says what it is
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _complete(entry: Path) -> dict[str, Any] | None:
    """The manifest of a complete entry (a real folder, not a link); None otherwise."""
    try:
        if not stat.S_ISDIR(os.lstat(entry).st_mode):
            return None
        return fmt.read_manifest(entry)
    except (OSError, DataError):
        return None


def _fits(manifest: dict[str, Any] | None, data: DataConfig, entry: Path,
          tokenizers_from: Path | None) -> bool:
    if manifest is None or fmt.mismatch(manifest, data) or fmt.tokenizer_mismatch(manifest, entry):
        return False
    return tokenizers_from is None or not fmt.tokenizer_mismatch(manifest, tokenizers_from)


def prepare_cached(config: Config, tokenizers_from: Path | None = None, workers: int | None = None,
                   log: Callable[[str], None] = print, root: Path | None = None
                   ) -> tuple[Path, dict[str, Any]]:
    """``config.data``'s training files prepared in the cache, reused when an entry fits; returns
    the entry's folder and manifest. The training files must be regular files.

    Without ``tokenizers_from`` the entry's tokenizers are trained; with it (a resumed or
    fine-tuning run: a model folder) the entry of the plain key is used when its tokenizers are
    that folder's, else the entry keyed by those tokenizers, built with them when missing.
    """
    from seq2seq.data.prepare import binarize  # loads sentencepiece: not for --list and --clean

    root = prepared_root(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot make the prepared-data cache {root}: {error.strerror or error} (set "
                        f"SEQ2SEQ_CACHE to a writable folder, or data.prepared)") from None
    data = config.data
    if not _regular_inputs(data):
        raise DataError(f"{data.train_src}: a training file that is not a regular file (a pipe) cannot be "
                        f"hashed before it is read, so it is not cached: prepare it with --output FOLDER")
    sources = source_digests(data)  # hashed once: the files may be large
    key = cache_key(data, sources=sources)
    if tokenizers_from is not None:
        with _entry_lock(root, key, log):
            if _fits(_complete(root / key), data, root / key, tokenizers_from):
                return root / key, binarize(config, root / key, workers, rebuild=False, log=log)
        key = cache_key(data, tokenizer_identity(tokenizers_from), sources)
    entry = root / key
    with _entry_lock(root, key, log):
        manifest = binarize(config, entry, workers, rebuild=True, tokenizers_from=tokenizers_from, log=log)
    return entry, manifest


def prepare_for_run(config: Config, model_dir: Path, resume: bool, tokenizers_from: Path | None = None,
                    log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The prepared folder of a training run, and its manifest: ``data.prepared`` when set (made
    when missing, refused when it does not fit); a resumed run's own ``MODEL_DIR/prepared`` when
    it has one (runs before the cache); ``MODEL_DIR/prepared`` when a training file is a pipe,
    which cannot be hashed before it is read; else the cache (``prepare_cached``)."""
    from seq2seq.data.prepare import PREPARED_DIR, binarize

    model_dir = Path(model_dir)
    own = model_dir / PREPARED_DIR
    if config.data.prepared:
        directory = Path(config.data.prepared)
        return directory, binarize(config, directory, rebuild=False, tokenizers_from=tokenizers_from, log=log)
    if resume and os.path.lexists(own / fmt.MANIFEST):
        return own, binarize(config, own, rebuild=False, tokenizers_from=tokenizers_from, log=log)
    if not _regular_inputs(config.data):
        return own, binarize(config, own, rebuild=not resume, tokenizers_from=tokenizers_from, log=log)
    return prepare_cached(config, tokenizers_from, log=log)


# -- the preparation in a child process ------------------------------------------------------------
def prepare_in_child(config: Config, model_dir: Path, resume: bool, tokenizers_from: Path | None = None,
                     log: Callable[[str], None] = print, directory: Path | None = None
                     ) -> tuple[Path, dict[str, Any]]:
    """``prepare_for_run`` (or, given ``directory``, ``binarize`` into it with ``rebuild=False``)
    in a child process: its log lines are passed to ``log``, its DataError, ConfigError,
    FileError or OSError raised here as they were raised there. The child dies with this
    process; an interrupt here (Ctrl-C, or any exception) ends it first."""
    import seq2seq

    request = {"config": config.to_dict(), "model_dir": str(model_dir), "resume": resume,
               "tokenizers_from": None if tokenizers_from is None else str(tokenizers_from),
               "directory": None if directory is None else str(directory), "parent": os.getpid()}
    package = str(Path(seq2seq.__file__).resolve().parent.parent)  # the child imports this copy
    read, write = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {package!r}); "
                                   f"from seq2seq.data.cache import _child; _child({write})"],
            stdin=subprocess.PIPE, pass_fds=(write,))
    finally:
        os.close(write)
    result: dict[str, Any] = {}
    try:
        with os.fdopen(read, "rb") as messages:
            assert child.stdin is not None
            child.stdin.write(json.dumps(request).encode())
            child.stdin.close()
            for line in messages:
                message = json.loads(line)
                if "log" in message:
                    log(message["log"])
                else:
                    result = message
        code = child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    if "directory" in result:
        log(f"data prepared in process {child.pid} (its peak memory {result['maxrss_kb'] / 1024:,.0f} MB)")
        return Path(result["directory"]), result["manifest"]
    raise _error(result, child.pid, code)


def _error(result: dict[str, Any], pid: int, code: int) -> BaseException:
    """The child's error, as it was raised there."""
    error = result.get("error")
    if not error:
        how = (f"was killed by {signal.Signals(-code).name} (out of memory?)" if code < 0
               else f"exited with code {code} (its error is printed above)")
        return DataError(f"the data preparation (process {pid}) {how} before it finished; nothing "
                         f"was kept")
    if error["name"] == "KeyboardInterrupt":
        return KeyboardInterrupt()
    if error["name"] == "OSError" or "errno" in error:
        return OSError(error.get("errno"), error["message"], error.get("filename"))
    cls = _ERRORS.get((error["module"], error["name"]))
    if cls is not None:
        return cls(error["message"])
    return RuntimeError(f"the data preparation (process {pid}) failed: {error['name']}: "
                        f"{error['message']} (its traceback is printed above)")


def _child(channel: int) -> None:
    """The child's side of ``prepare_in_child``: a JSON request on stdin, JSON lines on ``channel``."""
    request = json.loads(sys.stdin.read())
    from seq2seq.data.prepare import _die_with_parent, binarize

    _die_with_parent(request["parent"])
    out = os.fdopen(channel, "w", buffering=1, encoding="utf-8")

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")

    tokenizers_from = None if request["tokenizers_from"] is None else Path(request["tokenizers_from"])
    try:
        config = Config.from_dict(request["config"])
        if request["directory"] is not None:
            directory = Path(request["directory"])
            manifest = binarize(config, directory, rebuild=False, tokenizers_from=tokenizers_from,
                                log=lambda m: send({"log": m}))
        else:
            directory, manifest = prepare_for_run(config, Path(request["model_dir"]), request["resume"],
                                                  tokenizers_from, log=lambda m: send({"log": m}))
    except BaseException as error:  # noqa: BLE001 - each goes to the parent, a bug with its traceback
        known = (type(error).__module__, type(error).__name__) in _ERRORS
        if not known and not isinstance(error, (OSError, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()
        described = {"module": type(error).__module__, "name": type(error).__name__, "message": str(error)}
        if isinstance(error, OSError):
            described.update(errno=error.errno, message=error.strerror or str(error), filename=error.filename)
        send({"error": described})
        out.close()
        sys.exit(130 if isinstance(error, KeyboardInterrupt) else 1)
    send({"directory": str(directory), "manifest": manifest, "maxrss_kb": _peak_kb()})
    out.close()


def _peak_kb() -> int:
    """This process's peak resident memory since its exec (``VmHWM``; ``ru_maxrss`` would count the
    parent's memory at the fork)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- seq2seq prepare --list / --clean -------------------------------------------------------------
def entries(root: Path | None = None) -> list[dict[str, Any]]:
    """The cache's entries, most recently used first: key, folder, bytes, last use, and the
    manifest (None for what a killed preparation left, or a link, which is never followed)."""
    root = prepared_root(root)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not _KEY.fullmatch(name):
            continue
        entry = root / name
        info = os.lstat(entry)
        link = stat.S_ISLNK(info.st_mode)
        try:
            used = os.stat(_lock_path(root, name), follow_symlinks=False).st_mtime
        except OSError:
            used = info.st_mtime
        found.append({"key": name, "folder": entry, "link": link, "bytes": 0 if link else _size(entry),
                      "last_used": used, "manifest": None if link else _complete(entry)})
    return sorted(found, key=lambda e: -e["last_used"])


def _size(folder: Path) -> int:
    total = 0
    for top, _, files in os.walk(folder):  # never follows links
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_size
    return total


def describe(entry: dict[str, Any]) -> str:
    """An entry as ``seq2seq prepare --list`` prints it: key, size, pairs and last use; its
    inputs; its settings."""
    used = datetime.datetime.fromtimestamp(entry["last_used"], datetime.timezone.utc)
    head = f"{entry['key']}  {entry['bytes'] / 1e6:,.1f} MB  last used {used:%Y-%m-%d %H:%M} UTC"
    manifest = entry["manifest"]
    if entry["link"]:
        return f"{head}  (a symbolic link, not a prepared folder: left alone)"
    if manifest is None:
        return f"{head}  (no {fmt.MANIFEST}: a preparation that did not finish, or not a prepared folder)"
    inputs = ", ".join(f"{r.get('path')} ({r.get('size'):,} bytes)" for r in manifest["sources"].values())
    settings = " ".join(f"{k}={v}" for k, v in manifest["settings"].items())
    return f"{head}  {manifest['pairs']:,} pairs\n    inputs: {inputs}\n    settings: {settings}"


def clean(keys: list[str] | None = None, log: Callable[[str], None] = print, root: Path | None = None) -> int:
    """Remove the cache's entries (``keys``: those, or unique prefixes of them; None: all), each
    under its lock: an entry in use is skipped, saying by whom. Only real folders holding a
    manifest (or only the lock a killed preparation left) are deleted, with the temporary folders
    of their key; links are never followed. Returns the number removed."""
    found = {e["key"]: e for e in entries(root)}
    root = prepared_root(root)
    chosen = list(found) if keys is None else [_match(key, found) for key in keys]
    removed = 0
    for key in chosen:
        entry = root / key
        try:
            with _entry_lock(root, key, log, wait=False):
                try:
                    if not _removable(entry):
                        log(f"{entry}: not a prepared folder (no {fmt.MANIFEST}, or a link): left alone")
                        continue
                    for name in os.listdir(root):
                        match = _PARTIAL.fullmatch(name)
                        if match and match.group(1) == key:
                            shutil.rmtree(root / name, ignore_errors=True)
                    shutil.rmtree(entry)
                finally:  # held: a waiter finds it gone and locks a new file (FileLock checks)
                    _lock_path(root, key).unlink(missing_ok=True)
        except LockBusy as busy:
            log(f"{entry}: in use by {busy.holder}: skipped")
            continue
        removed += 1
        log(f"removed {entry}")
    return removed


def _match(key: str, found: dict[str, Any]) -> str:
    matches = [k for k in found if k.startswith(key.lower())] if key else []
    if len(matches) != 1:
        why = "no entry" if not matches else f"{len(matches)} entries"
        raise ConfigError(f"--clean {key}: {why} of the cache {cache_dir()} starts with it; see "
                          f"seq2seq prepare --list")
    return matches[0]


def _removable(entry: Path) -> bool:
    """A real folder (not a link) that is a complete prepared corpus, or holds only the lock a
    killed preparation left."""
    try:
        if not stat.S_ISDIR(os.lstat(entry).st_mode):
            return False
        names = set(os.listdir(entry))
    except OSError as error:
        if error.errno == errno.ENOENT:
            return False
        raise
    if names <= {_ENTRY_LOCK}:
        return True
    return stat.S_ISREG(os.lstat(entry / fmt.MANIFEST).st_mode) if fmt.MANIFEST in names else False
