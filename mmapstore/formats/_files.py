"""Opening the files of a checkpoint: regular files only, never blocking,
inside the store, and by identity.

Every file mmapstore reads goes through :func:`open_regular`: it is opened
with ``O_NONBLOCK`` (a FIFO named like a manifest cannot hang the reader) and
refused unless ``fstat`` says it is a regular file.  A directory is opened
once (:class:`Directory`) and every file below it is opened relative to that
descriptor, so a store renamed over the directory while it is being read is
seen as a change (:class:`~mmapstore._errors.FileChangedError`), never as a
mixture of two stores.  :class:`FileIdentity` records what was validated, so
whoever maps the file later can check it is still the same one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .._errors import FileChangedError, FormatError
from ._records import MAX_MANIFEST_NBYTES, parse_json_object, read_exact

__all__ = [
    "OPEN_FLAGS",
    "Directory",
    "FileIdentity",
    "check_name",
    "load_json_object",
    "open_regular",
    "read_json_fd",
    "resolve_inside",
]

OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_DIRECTORY", 0)
# A Hugging Face hub cache: <cache>/models--org--name/snapshots/<rev>/<file> are
# symlinks to ../../blobs/<sha256>.  Links from a snapshot into its own
# repository's blobs/ are the one exception to "nothing outside the store".
_HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What makes a file the one that was validated: device, inode, size and mtime."""

    device: int
    inode: int
    nbytes: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileIdentity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def same_inode(self, info: os.stat_result) -> bool:
        return (self.device, self.inode) == (info.st_dev, info.st_ino)

    def describe_change(self, info: os.stat_result) -> str | None:
        """None if ``info`` is this file unchanged, else what changed."""
        if not self.same_inode(info):
            return "was replaced by another file"
        if info.st_size != self.nbytes:
            return f"changed size from {self.nbytes} to {info.st_size} bytes"
        if info.st_mtime_ns != self.mtime_ns:
            return "was modified in place"
        return None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _encodable(name: str, *, what: str, source: str) -> None:
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        raise FormatError(f"{source}: {what}: file name {name!r:.80} cannot be encoded for this filesystem") from None


def open_regular(
    path: str, *, what: str, dir_fd: int | None = None, display: str | None = None
) -> tuple[int, os.stat_result]:
    """Open ``path`` (relative to ``dir_fd`` if given) read-only without blocking;
    return the descriptor and its ``fstat``.

    Raises
    ------
    FormatError
        The file is missing, unreadable, or not a regular file (a FIFO, a
        device, a directory).  Nothing is left open.
    """
    name = display or path
    _encodable(path, what=what, source=name)
    try:
        fd = os.open(path, OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FormatError(f"{name}: {what} does not exist") from None
    except OSError as exc:
        raise FormatError(f"{name}: cannot open {what}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FormatError(f"{name}: {what} is {_kind(info.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_json_fd(fd: int, info: os.stat_result, *, path: str, what: str) -> dict[str, Any]:
    """Read a JSON object from an open regular file, refusing it by size first."""
    if info.st_size > MAX_MANIFEST_NBYTES:
        raise FormatError(f"{path}: {what} is {info.st_size} bytes, over the {MAX_MANIFEST_NBYTES} byte limit")
    raw = read_exact(fd, info.st_size, 0, path=path, what=what)
    return parse_json_object(raw, path=path, what=what)


def load_json_object(path: str, *, what: str) -> dict[str, Any]:
    """Read a small JSON file (manifest, index, config) with a size cap."""
    fd, info = open_regular(path, what=what)
    try:
        return read_json_fd(fd, info, path=path, what=what)
    finally:
        os.close(fd)


def check_name(relative: object, *, what: str, source: str) -> str:
    """A file name from an index or manifest: a non-empty relative path with
    no NUL, no ``..`` component, encodable for the filesystem."""
    if not isinstance(relative, str) or not relative:
        raise FormatError(f"{source}: {what}: file name must be a non-empty string, found {relative!r:.80}")
    if "\x00" in relative:
        raise FormatError(f"{source}: {what}: file name {relative!r:.80} contains a NUL byte")
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise FormatError(f"{source}: {what}: file name {relative!r:.80} is absolute")
    if ".." in relative.replace("\\", "/").split("/"):
        raise FormatError(f"{source}: {what}: file name {relative!r:.80} escapes the store with '..'")
    _encodable(relative, what=what, source=source)
    return relative


def _allowed_roots(real_root: str) -> tuple[str, ...]:
    snapshots = os.path.dirname(real_root)
    repository = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repository).startswith(_HUB_REPO_PREFIXES):
        return real_root, os.path.join(repository, "blobs")
    return (real_root,)


def _resolve(root: str, relative: object, *, what: str, source: str) -> tuple[str, os.stat_result]:
    name = check_name(relative, what=what, source=source)
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, name))
    if not any(os.path.commonpath([allowed, target]) == allowed for allowed in _allowed_roots(real_root)):
        raise FormatError(f"{source}: {what}: file {name!r:.80} resolves to {target!r}, outside {real_root!r}")
    try:
        info = os.stat(target)
    except FileNotFoundError:
        raise FormatError(f"{source}: {what}: file {name!r:.80} does not exist") from None
    except OSError as exc:
        raise FormatError(f"{source}: {what}: cannot stat {name!r:.80}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"{source}: {what}: {name!r:.80} is {_kind(info.st_mode)}, not a regular file")
    return target, info


def resolve_inside(root: str, relative: object, *, what: str, source: str) -> str:
    """Resolve ``relative`` against ``root``; refuse anything that escapes it.

    Refused: non-strings, empty or unencodable names, NUL bytes, absolute
    paths, ``..`` components, and symlinks whose target lies outside ``root``
    (except, in a Hugging Face hub snapshot, links into the same repository's
    ``blobs/``).  The file must exist and be a regular file.
    """
    return _resolve(root, relative, what=what, source=source)[0]


class Directory:
    """A directory opened once; every file below it is opened relative to its
    descriptor and checked to be the file the path check resolved.

    Raises
    ------
    FormatError
        ``path`` is missing, not a directory, or unreadable.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        _encodable(path, what="directory", source=path)
        try:
            self.fd = os.open(path, _DIRECTORY_FLAGS)
        except FileNotFoundError:
            raise FormatError(f"{path}: no such file or directory") from None
        except OSError as exc:
            raise FormatError(f"{path}: cannot open directory: {exc.strerror}") from None
        self.identity = FileIdentity.of(os.fstat(self.fd))

    def listdir(self) -> list[str]:
        try:
            return os.listdir(self.fd)
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot list directory: {exc.strerror}") from None

    def has(self, name: str) -> bool:
        """Whether an entry ``name`` exists (of any kind: a FIFO counts, and is refused when opened)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot stat {name!r}: {exc.strerror}") from None
        return True

    def open(self, relative: object, *, what: str, source: str) -> tuple[int, os.stat_result, str]:
        """Open a file named in ``source`` (an index or manifest, or the directory
        itself): the descriptor, its ``fstat`` and its resolved path."""
        target, expected = _resolve(self.path, relative, what=what, source=source)
        assert isinstance(relative, str)
        fd, info = open_regular(relative, what=what, dir_fd=self.fd, display=target)
        if (info.st_dev, info.st_ino) != (expected.st_dev, expected.st_ino):
            os.close(fd)
            raise FileChangedError(f"{target}: {what} was replaced while the store was being opened")
        return fd, info, target

    def load_json(self, name: str, *, what: str) -> dict[str, Any]:
        fd, info, target = self.open(name, what=what, source=self.path)
        try:
            return read_json_fd(fd, info, path=target, what=what)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
