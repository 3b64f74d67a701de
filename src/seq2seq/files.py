"""Files written atomically and read within bounds; no torch here, so every layer may use it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any


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
    target, info, how = check_output(path, cut_hard_links=cut_hard_links)
    if how != "replace":
        return _write_into(target, data, path, sync=how == "in place")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:  # a read-only or missing folder
        raise _naming(error, path) from None
    try:
        # mkstemp's 0600 would hide the files from other users; an existing file keeps its mode
        os.fchmod(fd, stat.S_IMODE(info.st_mode) if info else 0o666 & ~_UMASK)
        if info is not None and os.geteuid() == 0:
            with contextlib.suppress(OSError):
                os.fchown(fd, info.st_uid, info.st_gid)
        with os.fdopen(fd, "wb") as handle:
            half = len(data) // 2
            handle.write(data[:half])
            if delay_s > 0:
                handle.flush()
                time.sleep(delay_s)
            handle.write(data[half:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # disk full: the message must say which file
            raise _naming(error, path) from None
        raise
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


def _write_into(target: Path, data: bytes, path: str | Path, sync: bool) -> None:
    """Write ``data`` into the existing ``target`` (a device, FIFO or hard-linked file)."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:  # a regular file: drop what is left of the old content, then sync
                handle.truncate(len(data))
                os.fsync(handle.fileno())
    except OSError as error:
        raise _naming(error, path) from None


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
    (or another ``OSError``) naming the file, or a ``ValueError`` naming it and what it is.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise _naming(error, Path(path)) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file ({file_kind(info.st_mode)}); model "
                             f"files are read only from regular files")
        if info.st_size > limit:
            raise ValueError(f"{path}: {info.st_size} bytes, more than the {limit} that a file "
                             f"of this kind may have")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise ValueError(f"{path}: more than the {limit} bytes that a file of this kind may have")
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
    Otherwise a ``ValueError`` naming the name and ``source``, the file that gave it."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name
            or (os.altsep is not None and os.altsep in name)):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ValueError(f"{source}: {what} {shown} is not a plain file name (no folder, no "
                         f"'..', not empty); refused")
    return name


def read_named_file(directory: str | Path, name: Any, source: str | Path,
                    limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the file ``name`` in ``directory``, where ``name`` was read from the file
    ``source`` (a manifest, a config): a plain name (``plain_name``), opened without following
    a symlink (``O_NOFOLLOW``) or blocking, read only when a regular file of at most ``limit``
    bytes. A name pointing at ``/dev/zero`` through a link, or at a FIFO, is refused at once.
    Raises ``FileNotFoundError`` naming the path, or a ``ValueError`` naming it and ``source``.
    """
    path = Path(directory) / plain_name(name, source)
    fd = open_regular_nofollow(path, source)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if info.st_size > limit:
            raise ValueError(f"{path} (named by {source}): {info.st_size} bytes, more than the "
                             f"{limit} that a file of this kind may have")
        data = handle.read(limit + 1)
    if len(data) > limit:  # it grew while being read
        raise ValueError(f"{path} (named by {source}): more than the {limit} bytes that a file of "
                         f"this kind may have")
    return data


def open_regular_nofollow(path: str | Path, source: str | Path | None = None) -> int:
    """A read-only file descriptor of ``path`` when it is a regular file that is not a symlink.

    ``O_NOFOLLOW`` refuses a symlink as the last part of the path, ``O_NONBLOCK`` keeps a FIFO
    from blocking the open, and ``fstat`` on the open file (not the path, which could change in
    between) refuses anything but a regular file. ``FileNotFoundError`` naming ``path``, or a
    ``ValueError`` naming it (and ``source``, the file that named it) and what it is.
    """
    named = f" (named by {source})" if source is not None else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path}{named}: a symbolic link; files named by data are read only "
                             f"from regular files, not through links") from None
        raise _naming(error, Path(path)) from None
    try:
        info = os.fstat(fd)
    except OSError as error:
        os.close(fd)
        raise _naming(error, Path(path)) from None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError(f"{path}{named}: not a regular file ({file_kind(info.st_mode)}); files "
                         f"named by data are read only from regular files")
    return fd
