"""``SinkTests``: the conformance suite every sink passes.

Subclass it in a test module and implement two methods::

    class TestMySink(SinkTests):
        def make_sink(self, destinations):
            return MySink({name: zeros(d.shape, d.dtype) for name, d in destinations.items()},
                          transpose=[name for name, d in destinations.items() if d.transpose])

        def read(self, sink, param):
            return numpy_copy_of(sink.buffers[param])

``make_sink`` gets ``param -> Destination`` and returns a sink whose
destinations are zero-filled; ``read`` returns a destination as a numpy
array.  The suite runs without files (sources are in memory) unless
``source_of`` is overridden to serve the same bytes from files: values of
plain stacks, strided fused halves, gathered experts across files, every
part (weight, scale, bias) of encoded and plain stacks, transposed
destinations, casts, refreshes that touch only the planned slots, the
completion's report, and bad destinations (each refused by ``check`` and by
``submit``, with nothing written).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest

from .._dtypes import DType, code_of, dtype_from_code
from .._errors import SinkError
from .._geometry import Encoding, PartGeometry
from .._planner import LayerGeometry, StackGeometry, StoreGeometry, param_name, plan_full_push, plan_refresh
from .._pool import ExpertPool
from .._sinks import Sink
from .._source import ByteSource
from .._writes import WriteTable
from ._memory import ArraySource, InMemoryFiles

__all__ = ["Destination", "SinkTests"]

EXPERTS, K, N = 6, 8, 12  # [k, n] = [in, out]; native "nk" slabs are [n, k]
BF16 = np.dtype(ml_dtypes.bfloat16)
NAMES = "blk.{layer}.ffn_{proj}_exps.{part}"


@dataclass(frozen=True, slots=True)
class Destination:
    """One parameter a sink must hold: ``shape`` (leading slot axis), ``dtype``,
    and whether its slabs are the source's transposed."""

    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]
    transpose: bool = False


@dataclass(frozen=True, slots=True)
class Scenario:
    """A store-like set of geometries over in-memory files, and the values each part holds."""

    geometry: StoreGeometry
    source: ArraySource
    values: dict[str, npt.NDArray[np.generic]]  # param -> [E, *native slab]

    def destinations(
        self, slots: int | None = None, *, dtype: npt.DTypeLike | None = None, transpose: frozenset[str] = frozenset()
    ) -> dict[str, Destination]:
        result = {}
        for name, values in self.values.items():
            shape = values.shape[1:][::-1] if name in transpose else values.shape[1:]
            cast = np.dtype(dtype) if dtype is not None and name.endswith(".weight") else values.dtype
            result[name] = Destination((slots or values.shape[0], *shape), cast, name in transpose)
        return result


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
    """Distinct, nonzero, exactly representable values (so an unwritten zero shows)."""
    base = rng.permutation(np.prod(shape)).reshape(shape) % 251 + 1
    return (base.astype(np.float32) / 8).astype(dtype)


def _scenario(kind: str, dtype: npt.DTypeLike = BF16) -> Scenario:
    """``stacked``: three stacked ``[E, n, k]`` stacks.  ``gathered``: one tensor
    per expert across two files.  ``fused_interleaved`` / ``fused_halves``:
    gate and up as strided halves of one fused ``[E, k, 2n]`` tensor.
    ``parts``: FP8-block weights with F32 scales and a bias, plus a plain
    stack with a bias."""
    rng = np.random.default_rng(7)
    files = InMemoryFiles(2)
    stacks: list[StackGeometry] = []
    values: dict[str, npt.NDArray[np.generic]] = {}
    plain = Encoding("plain", _dtype_of(dtype))

    def add(proj: str, encoding: Encoding, parts: list[tuple[PartGeometry, npt.NDArray[np.generic]]]) -> None:
        stacks.append(StackGeometry(proj, encoding, tuple(geometry for geometry, _ in parts)))
        for geometry, array in parts:
            values[param_name(NAMES, 0, proj, geometry.part)] = array

    if kind == "stacked":
        for proj in ("gate", "up", "down"):
            array = _values(rng, (EXPERTS, N, K), dtype)
            add(proj, plain, [(files.stacked(f"layers.0.{proj}", "weight", array, orientation="nk"), array)])
    elif kind == "gathered":
        for proj in ("gate", "up", "down"):
            array = _values(rng, (EXPERTS, N, K), dtype)
            geometry = files.gathered(
                f"layers.0.{proj}", "weight", list(array), files=[e % 2 for e in range(EXPERTS)], orientation="nk"
            )
            add(proj, plain, [(geometry, array)])
    elif kind in ("fused_interleaved", "fused_halves"):
        fused = _values(rng, (EXPERTS, K, 2 * N), dtype)
        gate, up = files.fused(
            ("layers.0.gate", "layers.0.up"), "weight", fused, axis=1, interleaved=kind == "fused_interleaved"
        )
        if kind == "fused_interleaved":
            halves = fused[:, :, 0::2], fused[:, :, 1::2]
        else:
            halves = fused[:, :, :N], fused[:, :, N:]
        add("gate", plain, [(gate, np.ascontiguousarray(halves[0]))])
        add("up", plain, [(up, np.ascontiguousarray(halves[1]))])
        down = _values(rng, (EXPERTS, N, K), dtype)
        add("down", plain, [(files.stacked("layers.0.down", "weight", down), down)])
    elif kind == "parts":
        fp8 = Encoding("fp8_block", _dtype_of(ml_dtypes.float8_e4m3fn), (128, 128))
        for proj in ("gate", "up"):
            weight = _values(rng, (EXPERTS, N, K), ml_dtypes.float8_e4m3fn)
            scale = _values(rng, (EXPERTS, 1, 1), np.float32)
            bias = _values(rng, (EXPERTS, N), np.float32)
            add(
                proj,
                fp8,
                [
                    (files.stacked(f"layers.0.{proj}", "weight", weight, orientation="nk"), weight),
                    (files.gathered(f"layers.0.{proj}", "scale", list(scale), files=[1] * EXPERTS), scale),
                    (files.stacked(f"layers.0.{proj}", "bias", bias, file=1), bias),
                ],
            )
        down = _values(rng, (EXPERTS, N, K), dtype)
        bias = _values(rng, (EXPERTS, K), dtype)
        add(
            "down",
            plain,
            [
                (files.stacked("layers.0.down", "weight", down, orientation="nk"), down),
                (files.stacked("layers.0.down", "bias", bias), bias),
            ],
        )
    else:  # pragma: no cover - a typo in a test
        raise ValueError(kind)
    store = StoreGeometry((LayerGeometry(0, tuple(stacks)),), files.files)
    return Scenario(store, files.source(), values)


def _dtype_of(dtype: npt.DTypeLike) -> DType:
    return dtype_from_code(code_of(np.dtype(dtype)))


class SinkTests:
    """The conformance suite; see the module docstring."""

    def make_sink(self, destinations: Mapping[str, Destination]) -> Sink:
        raise NotImplementedError

    def read(self, sink: Sink, param: str) -> npt.NDArray[np.generic]:
        raise NotImplementedError

    def source_of(self, scenario: Scenario) -> ByteSource:
        """The source the tests read ``scenario`` through: in memory by default;
        override it to serve the same bytes from files (see :meth:`InMemoryFiles.write`)."""
        return scenario.source

    # -- helpers ---------------------------------------------------------------
    def _write(self, sink: Sink, table: WriteTable, source: ByteSource) -> None:
        sink.check(table)
        result = sink.submit(table, source).wait()
        assert result.nbytes == table.nbytes and result.rows == table.rows

    def _assert_holds(self, sink: Sink, param: str, want: npt.NDArray[np.generic]) -> None:
        got = np.asarray(self.read(sink, param))
        assert got.shape == want.shape, (param, got.shape, want.shape)
        assert got.dtype == want.dtype, (param, got.dtype, want.dtype)
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), param

    def _assert_untouched(self, sink: Sink, destinations: Mapping[str, Destination]) -> None:
        for name in destinations:
            assert not np.asarray(self.read(sink, name)).view(np.uint8).any(), f"{name} was written"

    # -- values ----------------------------------------------------------------
    @pytest.mark.parametrize("kind", ["stacked", "gathered", "fused_interleaved", "fused_halves", "parts"])
    def test_full_push_values(self, kind: str) -> None:
        scenario = _scenario(kind)
        sink = self.make_sink(scenario.destinations())
        self._write(sink, plan_full_push(scenario.geometry).table, self.source_of(scenario))
        for name, values in scenario.values.items():
            self._assert_holds(sink, name, values)

    @pytest.mark.parametrize("kind", ["stacked", "gathered", "fused_interleaved", "parts"])
    def test_refresh_writes_exactly_the_planned_slots(self, kind: str) -> None:
        scenario = _scenario(kind)
        destinations = scenario.destinations(slots=3)
        sink = self.make_sink(destinations)
        pools = [ExpertPool(EXPERTS, 3)]
        plan = plan_refresh(scenario.geometry, pools, [np.array([[1, 4], [5, 4]])], step=0)
        assert plan is not None and len(plan.updates) == 2
        self._write(sink, plan.table, self.source_of(scenario))
        plan.commit(pools)
        residents = pools[0].resident_experts()
        for name, values in scenario.values.items():
            got = np.asarray(self.read(sink, name))
            for slot, expert in enumerate(residents.tolist()):
                if expert in (4, 5):  # promoted: written, whole slab, every part
                    assert got[slot].tobytes() == np.ascontiguousarray(values[expert]).tobytes(), (name, slot)
                else:  # not planned: never written
                    assert not got[slot].view(np.uint8).any(), (name, slot)

    def test_gathered_rows_are_one_per_expert(self) -> None:
        scenario = _scenario("gathered")
        table = plan_full_push(scenario.geometry).table
        assert table.rows == 3 * EXPERTS and set(table.count.tolist()) == {1}
        assert set(table.file.tolist()) == {0, 1}

    # -- orientation and casts -------------------------------------------------
    def test_transposed_destination(self) -> None:
        scenario = _scenario("stacked")
        flipped = frozenset(scenario.values)
        sink = self.make_sink(scenario.destinations(transpose=flipped))
        self._write(sink, plan_full_push(scenario.geometry).table, self.source_of(scenario))
        for name, values in scenario.values.items():
            self._assert_holds(sink, name, values.swapaxes(-1, -2))

    @pytest.mark.parametrize(
        "source_dtype, destination_dtype",
        [
            (BF16, np.float32),
            (np.float32, np.float16),
            (np.float16, np.float32),
            (BF16, BF16),
        ],
    )
    @pytest.mark.parametrize("transpose", [False, True])
    def test_casts(self, source_dtype: npt.DTypeLike, destination_dtype: npt.DTypeLike, transpose: bool) -> None:
        scenario = _scenario("stacked", source_dtype)
        flipped = frozenset(scenario.values) if transpose else frozenset()
        sink = self.make_sink(scenario.destinations(dtype=destination_dtype, transpose=flipped))
        self._write(sink, plan_full_push(scenario.geometry).table, self.source_of(scenario))
        for name, values in scenario.values.items():
            want = values.swapaxes(-1, -2) if transpose else values
            self._assert_holds(sink, name, want.astype(destination_dtype))

    # -- completion ------------------------------------------------------------
    def test_completion_reports_and_can_be_waited_twice(self) -> None:
        scenario = _scenario("parts")
        sink = self.make_sink(scenario.destinations())
        table = plan_full_push(scenario.geometry).table
        sink.check(table)
        completion = sink.submit(table, self.source_of(scenario))
        first = completion.wait()
        assert completion.done()
        assert completion.wait() == first
        assert first.nbytes == table.nbytes == sum(values.nbytes for values in scenario.values.values())
        assert first.rows == table.rows and first.seconds >= 0

    def test_empty_table_writes_nothing(self) -> None:
        scenario = _scenario("stacked")
        destinations = scenario.destinations(slots=2)
        sink = self.make_sink(destinations)
        pools = [ExpertPool(EXPERTS, 2)]
        plan = plan_refresh(scenario.geometry, pools, [np.array([0, 1])], step=0)  # both resident already
        assert plan is not None and plan.table.rows == 0
        self._write(sink, plan.table, self.source_of(scenario))
        self._assert_untouched(sink, destinations)

    # -- bad destinations ------------------------------------------------------
    @pytest.mark.parametrize(
        "damage", ["missing", "shape", "dtype", "slots", "transpose_1d", "encoded_cast", "encoded_transpose"]
    )
    def test_bad_destination_is_refused_and_nothing_is_written(self, damage: str) -> None:
        scenario = _scenario("parts")
        destinations = scenario.destinations()
        weight, bias = "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.bias"
        plain = "blk.0.ffn_down_exps.weight"
        if damage == "missing":
            del destinations[plain]
        elif damage == "shape":
            old = destinations[plain]
            destinations[plain] = Destination((old.shape[0], old.shape[1] + 1, old.shape[2]), old.dtype)
        elif damage == "dtype":
            destinations[plain] = Destination(destinations[plain].shape, np.dtype(np.int8))
        elif damage == "slots":
            old = destinations[plain]
            destinations[plain] = Destination((old.shape[0] - 1, *old.shape[1:]), old.dtype)
        elif damage == "transpose_1d":
            old = destinations[bias]
            destinations[bias] = Destination(old.shape, old.dtype, transpose=True)
        elif damage == "encoded_cast":
            destinations[weight] = Destination(destinations[weight].shape, np.dtype(np.float32))
        elif damage == "encoded_transpose":
            old = destinations[weight]
            destinations[weight] = Destination((old.shape[0], K, N), old.dtype, transpose=True)
        sink = self.make_sink(destinations)
        table = plan_full_push(scenario.geometry).table
        with pytest.raises(SinkError):
            sink.check(table)
        with pytest.raises(SinkError):
            sink.submit(table, self.source_of(scenario)).wait()
        self._assert_untouched(sink, destinations)
