"""Data and timing helpers shared by the bench cases."""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from .._dtypes import dtype_from_code
from .._mapping import PAGE_NBYTES, MappedFile
from .._planner import RefreshPlan, geometries_of, plan_refresh
from .._pool import ExpertPool
from .._store import ExpertStore
from ..formats import MANIFEST_NAME, Manifest, ManifestTensor, SafetensorsWriter, TensorSpec
from ..io import evict

__all__ = [
    "BF16",
    "cached_nbytes",
    "data_store",
    "drop_cache",
    "half_refresh",
    "prefaulted",
    "times",
    "warm",
    "write_slab_store",
]

BF16 = dtype_from_code("BF16")
DATA_FILE = "experts-00001-of-00001.safetensors"


def times(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of ``repeat`` calls of ``fn`` (``setup`` before each, untimed)."""
    samples = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def drop_cache(paths: list[str]) -> None:
    """Evict the files from the page cache (they must be clean and unmapped)."""
    for path in paths:
        evict(path)


def cached_nbytes(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with MappedFile(path) as probe:
            total += probe.resident_nbytes()
    return total


def warm(path: str) -> None:
    """Read every page of ``path`` into the page cache."""
    with MappedFile(path) as mapped:
        int(np.asarray(mapped.view(0, np.dtype(np.uint8), (mapped.nbytes,)))[::PAGE_NBYTES].sum())


def prefaulted(nbytes: int) -> npt.NDArray[np.uint8]:
    buffer = np.empty(nbytes, dtype=np.uint8)
    buffer[:] = 0
    return buffer


def small_page_buffer(nbytes: int) -> npt.NDArray[np.uint8]:
    region = mmap.mmap(-1, nbytes)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    buffer = np.frombuffer(region, dtype=np.uint8)
    buffer[:] = 1
    return buffer


def write_slab_store(path: str, layers: int, experts: int, k: int, n: int, *, sparse: bool) -> list[str]:
    """A slab store of ``layers * 3`` stacks written directly (no source needed)."""
    os.makedirs(path, exist_ok=True)
    specs = [
        TensorSpec(f"blk.{layer}.ffn_{proj}_exps.weight", BF16, (experts, k, n) if proj != "down" else (experts, n, k))
        for layer in range(layers)
        for proj in ("gate", "up", "down")
    ]
    file_path = os.path.join(path, DATA_FILE)
    rng = np.random.default_rng(0)
    chunk = rng.integers(-100, 100, size=(k * n,), dtype=np.int16).astype(np.float32).astype(BF16.numpy)
    with SafetensorsWriter(file_path, specs, {"format": "mmapstore"}, align=PAGE_NBYTES, sparse=sparse) as writer:
        if not sparse:
            for _spec in specs:
                for _ in range(experts):
                    writer.append(chunk)
    tensors = {spec.name: ManifestTensor(DATA_FILE, "BF16", spec.shape) for spec in specs}
    manifest = Manifest(storage="safetensors", tensors=tensors, layout="slab", orientation="kn")
    with open(os.path.join(path, MANIFEST_NAME), "w") as handle:
        json.dump(manifest.to_json(), handle)
    return [file_path]


SLAB_SHAPE = (2048, 1024)  # 4 MiB of bf16
EXPERTS = 32


def data_store(scratch: str, size: int) -> tuple[str, str, int]:
    """The store of the copy cases: 4 MiB slabs, 32 experts per stack, about
    ``size`` bytes; returns (store path, its data file, MoE layers)."""
    path = os.path.join(scratch, "data")
    k, n = SLAB_SHAPE
    layers = max(1, size // (3 * EXPERTS * k * n * 2))
    if not os.path.exists(path):
        write_slab_store(path, layers, EXPERTS, k, n, sparse=False)
    return path, os.path.join(path, DATA_FILE), layers


def half_refresh(store: ExpertStore) -> RefreshPlan:
    """Half of every layer's pool (of ``EXPERTS``) promoted to random experts,
    the same experts into the same slots for every store of the bench shape."""
    geometry = geometries_of(store)
    rng = np.random.default_rng(0)
    pools = [ExpertPool(EXPERTS, EXPERTS // 2) for _ in geometry.layers]
    captured = [rng.choice(EXPERTS, EXPERTS // 2, replace=False) for _ in geometry.layers]
    plan = plan_refresh(geometry, pools, captured, 0)
    assert plan is not None
    return plan
