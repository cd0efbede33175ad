"""Tools of the cold bench cases: baselines that share nothing with the
library's read path (a plain ``preadv`` thread pool, ``fio``), storage
counters, page-cache drops and memory cgroups."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._mapping import MADV_WILLNEED, MappedFile
from ..io import evict

__all__ = [
    "PIECE_NBYTES",
    "cgroup_peak",
    "drop_file",
    "fio_gbps",
    "join_cgroup",
    "limited_cgroup",
    "memory_cgroup",
    "pread_pool",
    "remove_cgroup",
    "storage_read_nbytes",
    "willneed_copy",
]

PIECE_NBYTES = 4 << 20
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def storage_read_nbytes() -> int:
    """Bytes this process has caused to be read from storage (``/proc/self/io``)."""
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def drop_file(path: str, mapped: MappedFile | None = None) -> None:
    """Evict ``path`` from the page cache (unmapping ``mapped``'s pages first)."""
    evict(path, mapped)


def pread_pool(
    path: str, spans: Sequence[tuple[int, int]], destination: npt.NDArray[np.uint8], depth: int, direct: bool
) -> None:
    """The baseline: ``depth`` threads each ``preadv`` 4 MiB pieces of ``spans``
    into consecutive bytes of ``destination`` (page-aligned for ``direct``)."""
    fd = os.open(path, os.O_RDONLY | (_O_DIRECT if direct else 0))
    pieces: list[tuple[int, int, int]] = []
    position = 0
    for offset, nbytes in spans:
        for start in range(0, nbytes, PIECE_NBYTES):
            pieces.append((offset + start, min(PIECE_NBYTES, nbytes - start), position + start))
        position += -(-nbytes // 4096) * 4096
    lock = threading.Lock()
    view = memoryview(destination.data)
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not pieces:
                    return
                offset, nbytes, at = pieces.pop()
            try:
                done = 0
                while done < nbytes:
                    got = os.preadv(fd, [view[at + done : at + nbytes]], offset + done)
                    if got == 0:
                        raise OSError(f"{path}: short read")
                    done += got
            except BaseException as exc:  # surfaced after join
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.close(fd)
    if errors:
        raise errors[0]


def willneed_copy(mapped: MappedFile, spans: Sequence[tuple[int, int]], destination: npt.NDArray[np.uint8]) -> None:
    """The mapping path by hand: chunked ``MADV_WILLNEED`` on exactly the ranges, then one copy each."""
    for offset, nbytes in spans:
        for start in range(offset, offset + nbytes, PIECE_NBYTES):
            mapped.advise(start, min(PIECE_NBYTES, offset + nbytes - start), MADV_WILLNEED)
    position = 0
    for offset, nbytes in spans:
        np.copyto(destination[position : position + nbytes], mapped.view(offset, np.dtype(np.uint8), (nbytes,)))
        position += -(-nbytes // 4096) * 4096


def fio_gbps(path: str, spans: Sequence[tuple[int, int]], depth: int, scratch: str) -> float | None:
    """GB/s of ``fio`` replaying exactly ``spans`` with ``O_DIRECT`` at ``depth`` (None if not installed)."""
    binary = shutil.which("fio")
    if binary is None:
        return None
    log = os.path.join(scratch, "ranges.iolog")
    with open(log, "w") as handle:
        handle.write(f"fio version 2 iolog\n{path} add\n{path} open\n")
        for offset, nbytes in spans:
            for start in range(0, nbytes, PIECE_NBYTES):
                handle.write(f"{path} read {offset + start} {min(PIECE_NBYTES, nbytes - start)}\n")
    engines = subprocess.run([binary, "--enghelp"], capture_output=True, text=True).stdout
    engine = "io_uring" if "io_uring" in engines else "libaio"
    done = subprocess.run(
        [binary, "--name=cold", f"--read_iolog={log}", "--replay_no_stall=1", f"--ioengine={engine}", "--direct=1",
         f"--iodepth={depth}", "--output-format=json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]["read"]
    seconds = job["runtime"] / 1e3
    return sum(nbytes for _, nbytes in spans) / seconds / 1e9 if seconds > 0 else None


def memory_cgroup() -> tuple[str, int] | None:
    """(directory to create a child cgroup in, cgroup version), or None where we cannot."""
    with open("/proc/self/cgroup") as handle:
        lines = handle.read().splitlines()
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            # Our own cgroup first, then the root of the hierarchy (where the
            # process may move a child, as root).  A child gets memory.max only
            # where its parent hands the controller down (cgroup.subtree_control).
            for base in ("/sys/fs/cgroup" + where.rstrip("/"), "/sys/fs/cgroup"):
                try:
                    with open(os.path.join(base, "cgroup.subtree_control")) as handle:
                        delegated = "memory" in handle.read().split()
                except OSError:
                    delegated = False
                if delegated and os.access(base, os.W_OK):
                    return base, 2
        if "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory" + where
            if os.access(base, os.W_OK):
                return base, 1
    return None


def join_cgroup(procs: str) -> None:
    """Move the calling process into the cgroup whose ``cgroup.procs`` is ``procs``."""
    with open(procs, "w") as handle:
        handle.write(str(os.getpid()))


def cgroup_peak(group: str, version: int) -> tuple[int, int]:
    """(peak memory in bytes, OOM kills) of a cgroup."""

    def read(name: str) -> str:
        try:
            with open(os.path.join(group, name)) as handle:
                return handle.read()
        except OSError:
            return ""

    if version == 2:
        peak = int(read("memory.peak") or 0)
        events = dict(line.split() for line in read("memory.events").splitlines())
        return peak, int(events.get("oom_kill", 0))
    control = dict(line.split() for line in read("memory.oom_control").splitlines())
    return int(read("memory.max_usage_in_bytes") or 0), int(control.get("oom_kill", 0))


def limited_cgroup(base: str, version: int, name: str, limit: int) -> str:
    """Create cgroup ``base/name`` with a memory limit of ``limit`` bytes; returns its path.

    Raises
    ------
    OSError
        It cannot be created or limited here (the group is removed again).
    """
    group = os.path.join(base, name)
    os.mkdir(group)
    try:
        with open(os.path.join(group, "memory.max" if version == 2 else "memory.limit_in_bytes"), "w") as handle:
            handle.write(str(limit))
    except OSError:
        remove_cgroup(group)
        raise
    return group


def remove_cgroup(group: str) -> None:
    """Remove a cgroup once its processes are gone (they may take a moment to leave)."""
    for _ in range(50):
        try:
            os.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
