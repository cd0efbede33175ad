"""Cold rows through the numpy sinks and the service: one source choice per
row, values identical whichever source served it, truncation, cancellation,
prefetch, page-cache policy and memory budgets."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmapstore import (
    ArraySink,
    ByteSource,
    DictSink,
    ExpertIndexError,
    ExpertPool,
    FormatError,
    LayerNotFoundError,
    OptionError,
    RefreshPolicy,
    Sink,
    SinkError,
    SlabService,
    WriteResult,
    WriteTable,
    convert,
    geometries_of,
    open_store,
    plan_refresh,
)
from mmapstore import _service as service_module
from mmapstore._coldrows import ROW_SOURCES
from mmapstore._mapping import MADV_DONTNEED, MappedFile
from mmapstore.io import ColdReader, ReaderConfig, ReadRequest, aligned_empty, evict
from mmapstore.io import _reader as io_reader
from mmapstore.testing import FileSource, synth_checkpoint
from mmapstore.testing.sinks import Destination, Scenario, SinkTests

READ_SOURCES = {"direct", "bounced", "buffered", "prefetched"}


def drop_cache(directory: str | Path, store: Any = None) -> None:
    """Evict every file of ``directory`` from the page cache (fsynced first: dirty
    pages stay), unmapping ``store``'s pages first (mapped pages stay too)."""
    if store is not None:
        for mapped in store.mapped_files():
            mapped.advise(0, mapped.nbytes, MADV_DONTNEED)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            evict(path)


def warm(directory: str | Path, name: str) -> None:
    with open(os.path.join(directory, name), "rb") as handle:
        while handle.read(1 << 20):
            pass


# -- the conformance suite with the bytes in files ------------------------------------------


class _FromFiles(SinkTests):
    """The suite over files: every row of every scenario comes from a file,
    cold (dropped from the page cache), and the sink reads it by ``read``."""

    read_mode = "auto"
    warm_file: str | None = None  # a file read into the page cache first (its rows are resident)
    bounce_nbytes = 1 << 20

    @pytest.fixture(autouse=True)
    def _directory(self, tmp_path: Path) -> Iterator[None]:
        self.directory = tmp_path
        self.sources: list[FileSource] = []
        yield
        for source in self.sources:
            source.close()

    def source_of(self, scenario: Scenario) -> ByteSource:
        directory = self.directory / f"s{len(self.sources)}"
        directory.mkdir()
        source = scenario.source.write_files(str(directory))
        if self.warm_file is not None:
            warm(directory, self.warm_file)
        self.sources.append(source)
        return source

    def make_sink(self, destinations: Mapping[str, Destination]) -> Sink:
        shapes = {name: (d.shape, d.dtype) for name, d in destinations.items()}
        transpose = [name for name, d in destinations.items() if d.transpose]
        return ArraySink.allocate(shapes, transpose, read=self.read_mode, bounce_nbytes=self.bounce_nbytes)  # type: ignore[arg-type]

    def read(self, sink: Sink, param: str) -> np.ndarray:
        assert isinstance(sink, ArraySink)
        return np.asarray(sink.buffers[param]).copy()

    def _write(self, sink: Sink, table: WriteTable, source: ByteSource) -> None:
        sink.check(table)
        result = sink.submit(table, source).wait()
        assert result.nbytes == table.nbytes and result.rows == table.rows
        assert sum(nbytes for _, nbytes in result.source_nbytes) == table.nbytes
        self.check_sources(result, table)
        assert isinstance(sink, DictSink)
        sink.close()

    def check_sources(self, result: WriteResult, table: WriteTable) -> None:
        sources = {source for source, _ in result.source_nbytes}
        assert sources <= set(ROW_SOURCES)
        if table.nbytes:
            assert sources and sources <= READ_SOURCES | {"resident"}


class TestColdAuto(_FromFiles):
    def check_sources(self, result: WriteResult, table: WriteTable) -> None:
        super().check_sources(result, table)
        if table.nbytes:
            assert result.device_nbytes > 0  # something was read, not faulted in


class TestColdAutoTinyBounce(_FromFiles):
    """Bounce batches of one block: many batches, each range in its own."""

    bounce_nbytes = 1


class TestColdAutoOneFileWarm(_FromFiles):
    """File ``mem1`` in the page cache, ``mem0`` cold: both sources in one table."""

    warm_file = "mem1"


class TestReaderMode(_FromFiles):
    read_mode = "reader"
    warm_file = "mem0"  # resident, and still read explicitly

    def check_sources(self, result: WriteResult, table: WriteTable) -> None:
        assert {source for source, _ in result.source_nbytes} <= READ_SOURCES


class TestMapMode(_FromFiles):
    read_mode = "map"

    def check_sources(self, result: WriteResult, table: WriteTable) -> None:
        assert result.source_nbytes == ((("mapped", table.nbytes),) if table.nbytes else ())
        assert result.device_nbytes == 0


def test_read_mode_is_checked() -> None:
    with pytest.raises(SinkError, match="read"):
        DictSink({}, read="mmap")  # type: ignore[arg-type]


# -- whole stores through the service ----------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("coldstores")
    paths = {}
    for family in ("mixtral", "gpt_oss", "qwen3_moe"):
        paths[family] = str(synth_checkpoint(root / family, family, layers=2, experts=8, hidden=64, ffn=32).path)
    paths["slab"] = str(convert(paths["mixtral"], root / "slab").path)
    return paths


def _captured(store: Any, experts: list[int]) -> list[np.ndarray]:
    return [np.array([experts])] * store.num_layers


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_moe", "slab"])
@pytest.mark.parametrize(("dtype", "orientation"), [(None, "native"), (np.float32, "kn")])
def test_values_identical_whichever_source(stores: dict[str, str], family: str, dtype: Any, orientation: str) -> None:
    buffers = {}
    for read, cold in (("map", False), ("auto", True), ("auto", False), ("reader", False)):
        with open_store(stores[family]) as store:
            if cold:
                drop_cache(stores[family])
            with SlabService(
                store,
                3,
                RefreshPolicy.every_forward(),
                dtype=dtype,
                orientation=orientation,
                read=read,  # type: ignore[arg-type]
            ) as service:
                result = service.step(_captured(store, [5, 6, 7]))
                assert result.refreshed and sum(n for _, n in result.source_nbytes) == result.nbytes
                sources = {source for source, _ in result.source_nbytes}
                if read == "reader":
                    assert sources <= READ_SOURCES
                if read == "auto" and cold:
                    assert sources & READ_SOURCES
                if read == "map":
                    assert sources == {"mapped"}
                buffers[read, cold] = {name: array.copy() for name, array in service.buffers.items()}  # type: ignore[attr-defined]
    first = buffers["map", False]
    for key, got in buffers.items():
        assert got.keys() == first.keys()
        for name in first:
            assert got[name].tobytes() == first[name].tobytes(), (key, name)


def test_cold_native_rows_land_straight_in_the_slots(stores: dict[str, str]) -> None:
    """A page-aligned slab store, native orientation: O_DIRECT reads into the pool, nothing bounced."""
    with open_store(stores["slab"]) as store:
        drop_cache(stores["slab"], store)
        with SlabService(store, 3, RefreshPolicy.every_forward()) as service:
            drop_cache(stores["slab"], store)
            result = service.step(_captured(store, [5, 6, 7]))
    sources = dict(result.source_nbytes)
    if "buffered" in sources:
        pytest.skip("this file system refuses O_DIRECT")
    assert sources.get("direct", 0) > 0.9 * result.nbytes
    assert "resident" not in sources and "mapped" not in sources


@pytest.mark.parametrize("read", ["auto", "reader"])
@pytest.mark.parametrize("warm_first", [False, True])
def test_file_truncated_between_plan_and_read_is_a_typed_error(
    stores: dict[str, str], tmp_path: Path, read: str, warm_first: bool
) -> None:
    copy = tmp_path / "store"
    copy.mkdir()
    for name in os.listdir(stores["slab"]):
        (copy / name).write_bytes(Path(stores["slab"], name).read_bytes())
    shard = next(str(copy / name) for name in os.listdir(copy) if name.endswith(".safetensors"))
    with open_store(copy) as store:
        geometry = geometries_of(store)
        pools = [ExpertPool(layer.num_experts, 2) for layer in geometry.layers]
        plan = plan_refresh(geometry, pools, _captured(store, [6, 7]), 0)
        assert plan is not None
        source = store.byte_source()
        source.check(plan.table)  # what apply checks first: the file is whole
        sink = ArraySink.for_geometries(geometry, 2, read=read)  # type: ignore[arg-type]
        sink.check(plan.table)
        drop_cache(copy, store)
        if warm_first:
            warm(copy, os.path.basename(shard))
        os.truncate(shard, os.path.getsize(shard) // 2)  # after the plan and its checks, before the read
        with pytest.raises(FormatError, match=os.path.basename(shard)):
            sink.submit(plan.table, source).wait()
        sink.close()


def test_a_failed_read_commits_nothing(stores: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(stores["slab"]) as store, SlabService(store, 2, RefreshPolicy.every_forward()) as service:
        before = [pool.resident_experts().copy() for pool in service.pools]
        drop_cache(stores["slab"], store)
        calls = []

        def failing(*args: Any, **kwargs: Any) -> int:
            calls.append(args)
            if len(calls) > 2:
                raise FormatError("slab: failed on purpose")
            return io_reader.__dict__["_real_pread"](*args, **kwargs)  # type: ignore[no-any-return]

        monkeypatch.setitem(io_reader.__dict__, "_real_pread", io_reader.pread_exact)
        monkeypatch.setattr(io_reader, "pread_exact", failing)
        with pytest.raises(FormatError, match="on purpose"):
            service.step(_captured(store, [5, 6]))
        for pool, resident in zip(service.pools, before, strict=True):
            assert np.array_equal(pool.resident_experts(), resident)
        monkeypatch.setattr(io_reader, "pread_exact", io_reader.__dict__["_real_pread"])
        result = service.step(_captured(store, [5, 6]))  # the next refresh moves the same experts, whole
        assert {update.new_expert for update in result.updates} == {5, 6}
        for layer, pool in zip(store.layers, service.pools, strict=True):
            for slot, expert in enumerate(pool.resident_experts().tolist()):
                name = f"blk.{layer.layer_index}.ffn_up_exps.weight"
                assert service.buffers[name][slot].tobytes() == layer.up.native(expert).tobytes()  # type: ignore[index]


# -- prefetch ------------------------------------------------------------------------------------


def _gate(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event, list[int]]:
    started, release = threading.Event(), threading.Event()
    real = io_reader.pread_exact
    reads: list[int] = []

    def gated(fd: int, view: memoryview, offset: int, *args: Any, **kwargs: Any) -> int:
        reads.append(len(view))
        started.set()
        assert release.wait(10)
        return real(fd, view, offset, *args, **kwargs)

    monkeypatch.setattr(io_reader, "pread_exact", gated)
    return started, release, reads


def test_prefetch_serves_the_next_refresh(stores: dict[str, str]) -> None:
    with (
        open_store(stores["slab"]) as store,
        SlabService(store, 2, RefreshPolicy.every_forward(), prefetch_nbytes=64 << 20) as service,
    ):
        drop_cache(stores["slab"], store)
        layer = store.layers[0].layer_index
        ticket = service.prefetch(layer, [5, 6, 0])  # 0 is resident already: skipped
        assert ticket is not None and not ticket.skipped and ticket.handle is not None
        ticket.handle.wait()
        assert ticket.accepted_nbytes == 2 * store.layers[0].expert_nbytes
        result = service.step(_captured(store, [5, 6]))
        prefetched = result.source_nbytes and dict(result.source_nbytes).get("prefetched", 0)
        assert prefetched == ticket.accepted_nbytes  # layer 0 from staging, layer 1 read
        for slot, expert in enumerate(service.pools[0].resident_experts().tolist()):
            name = f"blk.{layer}.ffn_down_exps.weight"
            assert service.buffers[name][slot].tobytes() == store.layers[0].down.native(expert).tobytes()  # type: ignore[index]
        with pytest.raises(LayerNotFoundError):
            service.prefetch(99, [1])
        with pytest.raises(ExpertIndexError):
            service.prefetch(layer, [8])


def test_refresh_waits_for_a_prefetch_in_flight(stores: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        open_store(stores["slab"]) as store,
        SlabService(store, 2, RefreshPolicy.every_forward(), prefetch_nbytes=64 << 20) as service,
    ):
        drop_cache(stores["slab"], store)
        layers = [layer.layer_index for layer in store.layers]
        started, release, reads = _gate(monkeypatch)
        for layer in layers:
            service.prefetch(layer, [5])
        assert started.wait(10)
        done: list[Any] = []
        worker = threading.Thread(target=lambda: done.append(service.step(_captured(store, [5]))))
        worker.start()
        worker.join(0.2)
        assert worker.is_alive()  # waiting for the prefetch
        release.set()
        worker.join(10)
        result = done[0]
        assert dict(result.source_nbytes) == {"prefetched": result.nbytes}
        assert sum(reads) <= result.nbytes + 2 * 4096 * len(reads)  # read once, by the prefetch


def test_cancelled_prefetch_reads_the_disk(stores: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        open_store(stores["slab"]) as store,
        SlabService(store, 2, RefreshPolicy.every_forward(), prefetch_nbytes=64 << 20) as service,
    ):
        drop_cache(stores["slab"], store)
        started, release, _ = _gate(monkeypatch)
        ticket = service.prefetch(store.layers[0].layer_index, [7])
        assert started.wait(10)
        service.cancel_prefetch(ticket)
        release.set()
        result = service.step(_captured(store, [7]))
        assert dict(result.source_nbytes).get("prefetched", 0) == 0
        for layer, pool in zip(store.layers, service.pools, strict=True):
            slot = pool.slot_of(7)
            assert slot is not None
            name = f"blk.{layer.layer_index}.ffn_gate_exps.weight"
            assert service.buffers[name][slot].tobytes() == layer.gate.native(7).tobytes()  # type: ignore[index]


def test_prefetch_is_bounded(stores: dict[str, str]) -> None:
    with open_store(stores["slab"]) as store:
        one_expert = store.layers[0].expert_nbytes
        with SlabService(store, 2, RefreshPolicy.every_forward(), prefetch_nbytes=one_expert) as service:
            drop_cache(stores["slab"], store)
            ticket = service.prefetch(store.layers[0].layer_index, [4, 6])  # not adjacent: one range per part each
            assert ticket is not None and ticket.skipped
            assert service.prefetcher is not None and service.prefetcher.staged_nbytes <= one_expert


# -- page cache and budgets ----------------------------------------------------------------------


def test_cache_drop_leaves_nothing_of_the_refresh_in_the_page_cache(stores: dict[str, str]) -> None:
    shard = next(os.path.join(stores["slab"], n) for n in os.listdir(stores["slab"]) if n.endswith(".safetensors"))
    for cache in ("keep", "drop"):
        with open_store(stores["slab"]) as store:
            drop_cache(stores["slab"], store)
            with SlabService(store, 2, RefreshPolicy.every_forward(), read="map", cache=cache) as service:
                service.step(_captured(store, [5, 6]))
                with MappedFile(shard) as probe:
                    ranges = [
                        (int(part.offsets[expert]), part.extent)
                        for layer in service.geometry.layers
                        for stack in layer.stacks
                        for part in stack.parts
                        for expert in (5, 6)
                    ]
                    resident = sum(probe.resident_nbytes(offset, nbytes) for offset, nbytes in ranges)
        if cache == "keep":
            if resident == 0:
                pytest.skip("the page cache kept nothing here")
        else:
            assert resident == 0


def test_budget_counts_pool_buffers(stores: dict[str, str]) -> None:
    with open_store(stores["slab"]) as store:
        expert_nbytes = sum(layer.expert_nbytes for layer in store.layers)
        with pytest.raises(OptionError, match="pools"):
            SlabService(store, 4, budget_nbytes=4 * expert_nbytes)  # the bounce and reader buffers do not fit
        with SlabService(store, 4, read="map", budget_nbytes=4 * expert_nbytes) as fits:
            assert fits.pools[0].capacity == 4
        config = ReaderConfig(queue_depth=2, chunk_nbytes=4 << 20)
        # Native slabs read straight into their slots: no sink bounce buffers,
        # and each reader thread's bounce buffer is a 1 MiB step plus two blocks.
        overhead = 2 * ((1 << 20) + 2 * 4096)
        with SlabService.from_budget(store, overhead + 5 * expert_nbytes + 1, reader=config) as service:
            assert [pool.capacity for pool in service.pools] == [5] * store.num_layers
            arrays = service.buffers.values()  # type: ignore[attr-defined]
            assert sum(array.nbytes for array in arrays) == 5 * expert_nbytes
        with pytest.raises(OptionError, match="no pool slot"):
            SlabService.from_budget(store, overhead, reader=config)
        # A prefetcher reads with threads of its own: their bounce buffers count too.
        with pytest.raises(OptionError, match=f"reader buffers {2 * overhead}, prefetch staging {1 << 20}"):
            SlabService(store, 5, reader=config, prefetch_nbytes=1 << 20,
                        budget_nbytes=overhead + 5 * expert_nbytes + (1 << 20))  # fmt: skip
        # Transposed pools lay slabs out through the sink's two bounce buffers: counted.
        transposed = overhead + 2 * ((32 << 20) + 4096)
        with pytest.raises(OptionError, match="bounce buffers 67117056"):
            SlabService(store, 5, orientation="kn", reader=config, budget_nbytes=overhead + 5 * expert_nbytes)
        with SlabService(store, 5, orientation="kn", reader=config, budget_nbytes=transposed + 5 * expert_nbytes):
            pass


def test_service_reader_probe_or_config(stores: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    probed = ReaderConfig(queue_depth=3, chunk_nbytes=1 << 20)
    asked: list[list[str]] = []

    def probe(paths: list[str]) -> ReaderConfig:
        asked.append(paths)
        return probed

    monkeypatch.setattr(service_module, "probe_files", probe)
    with open_store(stores["slab"]) as store:
        with SlabService(store, 2) as service:  # the default: probed
            reader = service._serving_reader()
            assert reader is not None and reader.config == probed
        assert len(asked) == 1 and all(os.path.isfile(path) for path in asked[0])
        with SlabService(store, 2, read="map"):  # reads nothing explicitly: nothing to measure
            pass
        with SlabService(store, 2, reader=None) as service:  # the fixed default, unmeasured
            reader = service._serving_reader()
            assert reader is not None and reader.config == ReaderConfig()
        assert len(asked) == 1
        # A sink of the caller's that reads no cold rows, with a prefetch budget: no reader, no prefetcher,
        # so nothing to measure (for the service, and for the budget of one).
        plain = DictSink({}, read="map")
        with SlabService(store, 2, sink=plain, load=False, prefetch_nbytes=64 << 20) as service:
            assert service.prefetcher is None
        assert SlabService.capacity_for_budget(store, 1 << 30, sink=plain) > 0
        assert len(asked) == 1
        with pytest.raises(OptionError, match="reader must be"):
            SlabService(store, 2, reader=4)  # type: ignore[arg-type]


def test_reader_reads_the_mapped_file_after_a_rename(tmp_path: Path) -> None:
    """The file read is the one mapped, even once a re-conversion renamed another over its path."""
    path = tmp_path / "slabs.bin"
    old = np.arange(1 << 16, dtype=np.uint8)
    old.tofile(path)
    with MappedFile(str(path)) as mapped, ColdReader(ReaderConfig(queue_depth=2, chunk_nbytes=64 << 10)) as reader:
        replacement = tmp_path / "new.bin"
        (old + 1).tofile(replacement)
        os.replace(replacement, path)
        destination = aligned_empty(old.nbytes)
        reader.read([ReadRequest(str(path), 0, destination, mapped)], residency=False)
        assert np.array_equal(destination, old)
        fresh = aligned_empty(old.nbytes)
        reader.read([ReadRequest(str(path), 0, fresh)], residency=False)  # no mapping: the path as it is now
        assert np.array_equal(fresh, old + 1)


def test_bench_replay_moves_the_same_bytes_by_every_method(tmp_path: Path) -> None:
    from mmapstore.bench import CASES
    from mmapstore.bench.cold_replay import replay
    from mmapstore.bench.data import write_slab_store

    assert {"cold", "beyond_ram"} <= set(CASES)
    path = str(tmp_path / "store")
    write_slab_store(path, 2, 8, 64, 32, sparse=False)
    per_slot = 2 * 3 * 64 * 32 * 2
    overhead = 2 * ((1 << 20) + 2 * 4096)  # two reader threads bounce 1 MiB steps; native slabs: no sink bounce
    reports = {
        method: replay(path, 6, overhead + 2 * per_slot, method, depth=2) for method in ("auto", "map", "direct")
    }
    moved = {report["planned_nbytes"] for report in reports.values()}
    assert len(moved) == 1 and moved.pop() > 0  # the same plans, whatever reads them
    for report in reports.values():
        assert "capacity 2/8" in str(report["note"]) and float(report["gbps"]) > 0  # type: ignore[arg-type]
