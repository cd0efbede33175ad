"""TorchSink: device pools fed by write tables (CPU everywhere, CUDA where present)."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from mmapstore import SinkError, StoreClosedError, open_store  # noqa: E402
from mmapstore._service import SlabService  # noqa: E402
from mmapstore._sinks import Sink  # noqa: E402
from mmapstore._synth import synth_checkpoint  # noqa: E402
from mmapstore.gpu import TorchSink  # noqa: E402
from mmapstore.testing.sinks import Destination, SinkTests  # noqa: E402
from mmapstore.torch import torch_dtype  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.fixture
def store(tmp_path):
    synth_checkpoint(tmp_path / "ckpt", family="mixtral", layers=2, experts=8, hidden=64, ffn=32)
    with open_store(tmp_path / "ckpt") as opened:
        yield opened


def check_pools(service: SlabService, orientation: str) -> None:
    for layer, pool in zip(service.store.layers, service.pools, strict=True):
        for proj, stack in layer.stacks:
            tensor = service.buffers[f"blk.{layer.layer_index}.ffn_{proj}_exps.weight"]
            for slot in range(pool.capacity):
                expert = pool.expert_in(slot)
                expected = stack.expert(expert) if orientation == "kn" else stack.native(expert)
                got = tensor[slot].to(torch.float32).cpu().numpy()  # type: ignore[union-attr]
                np.testing.assert_array_equal(got, expected.astype(np.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("orientation", "dtype", "source"),
    [("native", None, "auto"), ("kn", torch.float32, "auto"), ("native", None, "staged"), ("kn", None, "pread")],
)
def test_slab_service_refreshes_torch_pools(store, device, orientation, dtype, source):
    sink = TorchSink(device, orientation=orientation, dtype=dtype, source=source)
    service = SlabService(store, capacity=3, sink=sink)
    rng = np.random.default_rng(0)
    check_pools(service, orientation)
    for _ in range(6):
        service.step([rng.integers(0, 8, size=(4, 2)) for _ in store.layers])
        check_pools(service, orientation)
    assert all(str(t.device).startswith(device) for t in sink.buffers.values())
    sink.close()


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_pools_are_refused_before_any_copy(store, device):
    sink = TorchSink.for_store(store, 3, device)
    name = "blk.0.ffn_gate_exps.weight"
    good = sink.pools[name]
    for bad, message in [
        (torch.zeros((3, 5, 5), dtype=good.dtype, device=device), "slab shape"),
        (torch.zeros(good.shape, dtype=torch.int8, device=device), "cannot cast"),
    ]:
        sink.pools[name] = bad
        before = [t.clone() for t in sink.pools.values()]
        with pytest.raises(SinkError, match=message):
            SlabService(store, capacity=3, sink=sink)
        assert all(torch.equal(a, b) for a, b in zip(before, sink.pools.values(), strict=True))
    sink.close()


@cuda
def test_pool_on_the_wrong_device_and_tiny_budget(store):
    sink = TorchSink.for_store(store, 3, "cuda")
    sink.pools["blk.0.ffn_up_exps.weight"] = sink.pools["blk.0.ffn_up_exps.weight"].cpu()
    with pytest.raises(SinkError, match="pool is on cpu"):
        SlabService(store, capacity=3, sink=sink)
    with pytest.raises(SinkError, match="cannot hold one slab"):
        SlabService(store, capacity=3, sink=TorchSink("cuda", pinned_budget_nbytes=16))


def test_unknown_device_and_closed_store(tmp_path):
    with pytest.raises(SinkError):
        TorchSink("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SinkError, match="CUDA is not available"):
            TorchSink("cuda")
    synth_checkpoint(tmp_path / "c", family="mixtral", layers=1, experts=4, hidden=32, ffn=16)
    store = open_store(tmp_path / "c")
    service = SlabService(store, capacity=2, sink=TorchSink("cpu"))
    store.close()
    with pytest.raises(StoreClosedError):
        service.step([np.array([[3, 2]])])


class TestTorchSinkConformance(SinkTests):
    """TorchSink on the CPU passes the same suite as the numpy sinks (CI has no GPU)."""

    def make_sink(self, destinations: Mapping[str, Destination]) -> Sink:
        pools = {name: torch.zeros(d.shape, dtype=torch_dtype(d.dtype)) for name, d in destinations.items()}
        return TorchSink("cpu", pools=pools, transpose=[name for name, d in destinations.items() if d.transpose])

    def read(self, sink: Sink, param: str) -> np.ndarray:
        assert isinstance(sink, TorchSink)
        tensor = sink.pools[param].detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            code = ml_dtypes.float8_e4m3fn if tensor.dtype == torch.float8_e4m3fn else ml_dtypes.float8_e5m2
            return tensor.view(torch.uint8).numpy().view(code).copy()
        return tensor.numpy().copy()


@pytest.mark.parametrize("device", DEVICES)
def test_coalesced_runs_read_their_own_bytes(tmp_path, device):
    # A converted store keeps each stack as one [E, ...] tensor, so runs of
    # consecutive experts become one row whose extent spans the whole run; the
    # last stack's run of 7 of 8 experts ends at the end of the file.
    from mmapstore._convert import convert

    synth_checkpoint(tmp_path / "c", family="mixtral", layers=1, experts=8, hidden=64, ffn=32)
    convert(str(tmp_path / "c"), str(tmp_path / "s"))
    with open_store(tmp_path / "s") as stacked:
        sink = TorchSink(device)
        service = SlabService(stacked, capacity=7, sink=sink)
        check_pools(service, "native")
        service.step([np.array([[7, 6], [5, 4]])])
        check_pools(service, "native")
        sink.close()


def test_torch_sink_registers_ahead_only_on_cuda(store):
    from mmapstore._planner import plan_full_push

    sink = TorchSink("cpu")
    service = SlabService(store, capacity=3, sink=sink)
    assert not sink.registers_ahead
    assert sink.register_ahead(plan_full_push(service.geometry).table, service.source) == 0
    sink.close()


@cuda
def test_register_ahead_serves_the_next_refresh_from_registered_windows(store):
    from mmapstore._mapping import PAGE_NBYTES
    from mmapstore._pool import RefreshPolicy

    # Page-sized windows: each expert's slab has its own, so the windows of
    # experts 6 and 7 exist only if they were registered for them.
    sink = TorchSink("cuda", source="registered", window_nbytes=PAGE_NBYTES)
    service = SlabService(store, 3, RefreshPolicy.every_n_decode_steps(2), sink)
    service.step([np.array([[0, 1]]), np.array([[2, 1]])])
    stats = sink.copier.stats
    before = stats.registrations
    service.step([np.array([[6, 7]]), np.array([[6, 7]])])  # no refresh: 6 and 7 registered ahead
    sink.copier.settle()
    registered = stats.registrations
    assert registered > before
    service.step([np.array([[6, 7]]), np.array([[6, 7]])])  # the refresh that promotes them
    assert stats.registrations == registered and stats.nbytes["registered"] > 0
    check_pools(service, "native")
    sink.close()
    assert stats.unregistrations == stats.registrations
