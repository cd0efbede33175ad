"""Atomic, locked publication of a directory.

A writer builds its output in ``.{name}.partial-{pid}-{token}`` beside the
destination, fsyncs every file and the directory, then renames it into place
(an atomic exchange with the old directory where the kernel supports
``renameat2(RENAME_EXCHANGE)``).  A ``filelock`` lock on ``.{name}.lock``
serialises writers of one destination; it is an ``flock``, so a killed holder
releases it and a stale lock file never blocks anyone.  Published files are
never modified in place: a reader that has them mapped keeps its old inode.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator

from filelock import FileLock, Timeout

from ._errors import ConvertError

__all__ = ["clean_partials", "fsync_tree", "lock_path", "locked", "staged_dir"]

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def lock_path(dst: str) -> str:
    parent, name = os.path.split(os.path.abspath(dst))
    return os.path.join(parent, f".{name}.lock")


def _partial_prefix(dst: str) -> tuple[str, str]:
    parent, name = os.path.split(os.path.abspath(dst))
    return parent, f".{name}.partial-"


@contextlib.contextmanager
def locked(dst: str, timeout: float = -1) -> Iterator[None]:
    """Hold the writer lock of ``dst`` (waits; ``timeout`` seconds, -1 for ever)."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    lock = FileLock(lock_path(dst), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise ConvertError(f"{dst}: another writer holds {lock_path(dst)} (waited {timeout} s)") from None
    try:
        yield
    finally:
        lock.release()


def _leftover_pattern(name: str) -> re.Pattern[str]:
    """Exactly the staging and old-directory names that writers of ``name`` make
    (so cleaning ``m`` never touches the staging directory of ``m.old-1``)."""
    escaped = re.escape(name)
    return re.compile(rf"\.{escaped}\.(?:partial-\d+-[0-9a-f]{{8}}|old-[0-9a-f]{{8}})")


def _remove(path: str) -> None:
    """Remove a directory tree, a file or a symlink (never following it)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def clean_partials(dst: str) -> list[str]:
    """Remove what interrupted writers left beside ``dst``; call with the lock held."""
    parent, name = os.path.split(os.path.abspath(dst))
    pattern = _leftover_pattern(name)
    removed = []
    for entry in os.listdir(parent):
        if pattern.fullmatch(entry):
            path = os.path.join(parent, entry)
            _remove(path)
            removed.append(path)
    if removed:
        log.info("removed %d leftover partial outputs of %s", len(removed), dst)
    return removed


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root``, then ``root`` itself."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(directory)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(first: str, second: str) -> bool:
    """Atomically swap two paths; False where the kernel or filesystem cannot."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), first)


@contextlib.contextmanager
def staged_dir(dst: str, *, replace: bool) -> Iterator[str]:
    """Yield a fresh staging directory; publish it as ``dst`` when the block ends.

    Call with :func:`locked` held.  On an exception the staging directory is
    removed and ``dst`` is untouched.  With ``replace=False`` an existing
    ``dst`` raises :class:`ConvertError` before anything is written.
    """
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not replace:
        raise ConvertError(f"{dst} already exists (use --force to replace it)")
    parent, prefix = _partial_prefix(dst)
    staging = os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(staging)
    try:
        yield staging
        fsync_tree(staging)
        if os.path.lexists(dst):
            if not _exchange(staging, dst):
                old = os.path.join(parent, f".{os.path.basename(dst)}.old-{secrets.token_hex(4)}")
                os.rename(dst, old)
                os.rename(staging, dst)
                staging = old
            # `staging` now names the previous dst: readers keep its inodes.
        else:
            os.rename(staging, dst)
            staging = ""
        _fsync_dir(parent)
    finally:
        if staging:
            _remove(staging)  # the old dst may have been a file or a symlink
