"""Files written atomically and read within bounds; no torch here, so every layer may use it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class FileError(ValueError):
    """A file that is not what it must be (not a regular file, too large); the message names it."""


# -- writing files -------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes, delay_s: float = 0.0, *,
                       cut_hard_links: bool = False) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never partial, whatever is there now.

    - Nothing there, or a regular file: the bytes go to a temporary file in the same folder,
      are flushed and fsync'ed, then renamed over ``path``. An existing file keeps its mode
      (and, for root, its owner); a new one gets ``0666`` less the umask.
    - A symlink: its target is written as above; the link stays a link.
    - A character device or a FIFO (``/dev/null``, ``<(...)``, a named pipe): written straight
      into, not replaced. A FIFO blocks until it has a reader, as the shell's ``>`` does.
    - A read-only file (no write bit, even for root) is refused: ``PermissionError``.
    - A file with other hard links is rewritten in place, so every name sees the new bytes,
      as ``>`` and ``rsync --inplace`` do (not atomic: a crash can leave it partial). Files a
      run owns (checkpoints) pass ``cut_hard_links`` and are replaced as usual: a snapshot
      made with ``cp -al`` keeps the old version.
    - A folder, socket or block device is refused.

    Errors are ``OSError``s whose filename is ``path``, never the temporary file. ``delay_s``
    sleeps half-way through the write: a test hook that makes the write window reachable for
    a kill.
    """
    with atomic_writer(path, cut_hard_links=cut_hard_links) as write:
        half = len(data) // 2
        write(data[:half])
        if delay_s > 0:
            time.sleep(delay_s)
        write(data[half:])


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, cut_hard_links: bool = False) -> Iterator[Callable[[bytes], None]]:
    """``write(piece)``, to write ``path`` in pieces as ``atomic_write_bytes`` writes it whole:
    a regular file goes to a temporary file renamed over ``path`` when the block ends without
    an exception (one, or a kill, leaves ``path`` as it was); a FIFO or character device gets
    each piece at once, flushed (a reader downstream sees it); a file with other hard links is
    rewritten in place and cut to the new length at the end. Errors of ``write`` and of the
    final rename are ``OSError``s naming ``path``; the block's own exceptions pass unchanged.
    """
    target, info, how = check_output(path, cut_hard_links=cut_hard_links)
    try:
        if how == "replace":
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        else:
            fd, tmp = os.open(target, os.O_WRONLY | os.O_CLOEXEC), None
    except OSError as error:  # a read-only or missing folder
        raise _naming(error, path) from None
    handle = os.fdopen(fd, "wb")

    def write(piece: bytes) -> None:
        try:
            handle.write(piece)
            handle.flush()
        except OSError as error:  # disk full: the message must say which file
            raise _naming(error, path) from None

    try:
        try:
            if tmp is not None:  # mkstemp's 0600 would hide the file; an existing one keeps its mode
                os.fchmod(fd, stat.S_IMODE(info.st_mode) if info else 0o666 & ~_UMASK)
                if info is not None and os.geteuid() == 0:
                    with contextlib.suppress(OSError):
                        os.fchown(fd, info.st_uid, info.st_gid)
        except OSError as error:
            raise _naming(error, path) from None
        yield write
        try:
            if how != "straight":
                if how == "in place":  # drop what is left of the old content
                    handle.truncate(handle.tell())
                os.fsync(fd)
            handle.close()
            if tmp is not None:
                os.replace(tmp, target)
        except OSError as error:
            raise _naming(error, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            handle.close()
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    if tmp is not None:
        _fsync_dir(target.parent)


def check_output(path: str | Path, cut_hard_links: bool = False
                 ) -> tuple[Path, os.stat_result | None, str]:
    """How ``atomic_write_bytes`` would write ``path``, or the error it would raise, without
    writing: (the symlink-resolved target, its stat or None when new, 'replace' | 'in place' |
    'straight'). Commands call it before long work, so a bad target is refused up front."""
    target = Path(os.path.realpath(path))
    try:
        info: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        return target, None, "replace"
    except OSError as error:
        raise _naming(error, path) from None
    kind = stat.S_IFMT(info.st_mode)
    if kind in (stat.S_IFCHR, stat.S_IFIFO):
        return target, info, "straight"
    if kind == stat.S_IFDIR:
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    if kind != stat.S_IFREG:
        raise OSError(errno.EINVAL, "not a regular file, character device or FIFO; not written",
                      str(path))
    if not info.st_mode & 0o222 or not os.access(target, os.W_OK):
        if os.statvfs(target.parent).f_flag & os.ST_RDONLY:  # the whole file system is
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        raise PermissionError(errno.EACCES, "read-only file, not replaced (make it writable or "
                                            "remove it first)", str(path))
    return target, info, "in place" if info.st_nlink > 1 and not cut_hard_links else "replace"


def _naming(error: OSError, path: Path) -> OSError:
    """The same error (same errno and class) with ``path``, the file being written, as its filename."""
    return OSError(error.errno, error.strerror or str(error), str(path))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading model files -------------------------------------------------------------------
MAX_FILE_BYTES = 64 << 20  # settings, tokenizers, vocabularies: a 256k-piece model is ~5 MB


def read_regular_file(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` when it is a regular file (symlinks followed) of at most ``limit``.

    A model folder may come from anyone: a ``config.yaml`` that is a symlink to ``/dev/zero``
    or a FIFO would otherwise be read until memory runs out, or block forever. The file is
    opened without blocking and checked before anything is read. Raises ``FileNotFoundError``
    (or another ``OSError``) naming the file, or a ``FileError`` naming it and what it is.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise _naming(error, Path(path)) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileError(f"{path}: not a regular file ({file_kind(info.st_mode)}); model "
                             f"files are read only from regular files")
        if info.st_size > limit:
            raise FileError(f"{path}: {info.st_size} bytes, more than the {limit} that a file "
                             f"of this kind may have")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise FileError(f"{path}: more than the {limit} bytes that a file of this kind may have")
    return data


def file_kind(mode: int) -> str:
    kinds = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
             stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}
    return kinds.get(stat.S_IFMT(mode), "not a regular file")


# -- reading files named by data -----------------------------------------------------------
def plain_name(name: Any, source: str | Path, what: str = "file name") -> str:
    """``name`` when it is a plain file name: a non-empty string without a path separator or
    NUL, and not ``.`` or ``..``. A name read from a manifest, config or checkpoint is data: it
    may come from anyone, and ``../x`` or ``/etc/x`` must not reach outside its folder.
    Otherwise a ``FileError`` naming the name and ``source``, the file that gave it."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name
            or (os.altsep is not None and os.altsep in name)):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise FileError(f"{source}: {what} {shown} is not a plain file name (no folder, no "
                         f"'..', not empty); refused")
    return name


def read_named_file(directory: str | Path, name: Any, source: str | Path,
                    limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the file ``name`` in ``directory``, where ``name`` was read from the file
    ``source`` (a manifest, a config): a plain name (``plain_name``), opened without following
    a symlink (``O_NOFOLLOW``) or blocking, read only when a regular file of at most ``limit``
    bytes. A name pointing at ``/dev/zero`` through a link, or at a FIFO, is refused at once.
    Raises ``FileNotFoundError`` naming the path, or a ``FileError`` naming it and ``source``.
    """
    path = Path(directory) / plain_name(name, source)
    fd = open_regular_nofollow(path, source)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise FileError(f"{path} (named by {source}): {info.st_size} bytes, more than the "
                             f"{limit} that a file of this kind may have")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise FileError(f"{path} (named by {source}): more than the {limit} bytes that a file of "
                         f"this kind may have")
    return data


def open_regular_nofollow(path: str | Path, source: str | Path | None = None) -> int:
    """A read-only file descriptor of ``path`` when it is a regular file that is not a symlink.

    ``O_NOFOLLOW`` refuses a symlink as the last part of the path, ``O_NONBLOCK`` keeps a FIFO
    from blocking the open, and ``fstat`` on the open file (not the path, which could change in
    between) refuses anything but a regular file. ``FileNotFoundError`` naming ``path``, or a
    ``FileError`` naming it (and ``source``, the file that named it) and what it is.
    """
    named = f" (named by {source})" if source is not None else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileError(f"{path}{named}: a symbolic link; files named by data are read only "
                             f"from regular files, not through links") from None
        raise _naming(error, Path(path)) from None
    try:
        info = os.fstat(fd)
    except OSError as error:
        os.close(fd)
        raise _naming(error, Path(path)) from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FileError(f"{path}{named}: not a regular file ({file_kind(info.st_mode)}); files "
                         f"named by data are read only from regular files")
    return fd


# -- lock files ----------------------------------------------------------------------------
LOCK_NOTE_BYTES = 256  # a lock file's note (its holder) is written padded to this width


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is its note (``pid N on HOST``)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive ``flock`` on the lock file ``path``, which notes its holder (pid and host).

    A lock file lives in a folder that may hold anything, planted links included, so it is
    opened with ``O_NOFOLLOW`` (a symlink is refused, never followed) and used only when the
    open file is a regular file with one link and no more than a note's bytes: a hard link to
    a user's file, a FIFO or a folder is refused, and nothing is written. It is never
    truncated: the note is written over the old one (padded with blanks to its length), and
    blanked on release; the note is padded to ``LOCK_NOTE_BYTES``, so every holder leaves the
    file the same size. The OS releases the lock when its holder dies, however it dies, so no lock goes
    stale; the file itself stays (a deleted lock file lets two processes lock two files).

    Raises ``LockBusy`` when another process holds it, ``FileError`` when the path is not a
    lock file, or the ``OSError`` of the open (naming ``path``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        for _ in range(10):  # a holder that replaced the folder under us: lock the new file
            self.fd = _open_lock_file(self.path)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                note = os.pread(self.fd, LOCK_NOTE_BYTES, 0).decode("utf-8", "replace").strip()
                os.close(self.fd)
                raise LockBusy(self.path, note or "another process") from None
            if _same_file(self.fd, self.path):
                break
            os.close(self.fd)
        else:
            raise FileError(f"{self.path}: the lock file keeps being replaced; is another process "
                            f"removing it?")
        note = f"pid {os.getpid()} on {socket.gethostname()}".encode()[:LOCK_NOTE_BYTES - 1] + b"\n"
        with contextlib.suppress(OSError):  # the note is for another's error alone: a full disk may refuse it
            # always the full width: an old note is blanked, not cut off, and the file's size
            # does not depend on how many digits the holder's pid has
            os.pwrite(self.fd, note[:-1].ljust(LOCK_NOTE_BYTES - 1) + b"\n", 0)

    def release(self) -> None:
        """Blank the note and let the lock go (closing the file releases it)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            size = os.fstat(self.fd).st_size
            if size:
                os.pwrite(self.fd, b" " * (size - 1) + b"\n", 0)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open_lock_file(path: Path) -> int:
    """A descriptor of the lock file ``path``, made when missing; refused unless a regular file
    with one link and at most ``LOCK_NOTE_BYTES`` bytes. Opening never follows a symlink nor
    blocks (a FIFO), and the checks are on the open file, not on the path."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | flags, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileError(f"{path}: the lock file is a symbolic link; it is not followed: remove "
                            f"the link") from None
        if error.errno == errno.EISDIR:
            raise FileError(f"{path}: the lock file is not a regular file (a folder); it is left "
                            f"untouched: remove it") from None
        if error.errno not in (errno.EACCES, errno.EROFS):
            raise _naming(error, path) from None
        try:  # a read-only lock file can still be locked (its note is not written)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise _naming(error, path) from None
    info = os.fstat(fd)
    problem = ("" if stat.S_ISREG(info.st_mode) else f"not a regular file ({file_kind(info.st_mode)})")
    if not problem and info.st_nlink != 1:
        problem = f"a file with {info.st_nlink} hard links (another name may be someone's file)"
    elif not problem and info.st_size > LOCK_NOTE_BYTES:
        problem = f"{info.st_size} bytes, more than a lock file's note (it may be someone's file)"
    if problem:
        os.close(fd)
        raise FileError(f"{path}: the lock file is {problem}; it is left untouched: remove it")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (not removed or replaced since)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    info = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (info.st_dev, info.st_ino)


# -- the record of the files the project wrote into a folder --------------------------------
MAX_RECORD_BYTES = 1 << 20


def read_plain_json(path: str | Path, limit: int = MAX_RECORD_BYTES) -> Any:
    """The JSON in ``path``, read only from a regular file (a symlink is not followed) of at most
    ``limit`` bytes; None when there is no such file. ``FileError`` naming it otherwise."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileError(f"{path}: a symbolic link; the project's own records are not read "
                            f"through links") from None
        raise _naming(error, path) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileError(f"{path}: not a regular file ({file_kind(info.st_mode)})")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileError(f"{path}: more than the {limit} bytes that a file of this kind may have")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise FileError(f"{path}: not valid JSON ({type(error).__name__}: {str(error)[:200]})") from None


def replace_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a new file renamed over ``path``: whatever ``path`` was (a symlink, a
    hard link), that name alone is replaced; no link is followed, no other file changes.
    For the project's own bookkeeping files, never for a user's output (``atomic_write_bytes``)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _naming(error, path) from None
        raise
    _fsync_dir(path.parent)
