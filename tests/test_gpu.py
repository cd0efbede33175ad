"""mmapstore.gpu: byte sources, fallbacks, windows and on-device dequantization.

The CPU tests run everywhere torch is installed; the ``cuda`` ones need a GPU
(``python -m pytest -q tests/test_gpu.py`` on a GPU machine).
"""

from __future__ import annotations

import errno
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from mmapstore import FormatError  # noqa: E402
from mmapstore._mapping import PAGE_NBYTES, MappedFile  # noqa: E402
from mmapstore.dequant import dequantize_fp8_block as numpy_fp8  # noqa: E402
from mmapstore.dequant import dequantize_mxfp4 as numpy_mxfp4  # noqa: E402
from mmapstore.gpu import (  # noqa: E402
    CopyJob,
    DeviceCopier,
    PinnedBudget,
    dequantize_fp8_block,
    dequantize_mxfp4,
    is_resident,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.fixture
def data_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=9 * (1 << 20) + 123, dtype=np.uint8)
    path = tmp_path / "slabs.bin"
    data.tofile(path)
    mapped = MappedFile(str(path))
    yield mapped, data
    mapped.close()


def ranges(data: np.ndarray) -> list[tuple[int, int]]:
    # Unaligned starts and lengths, one crossing several ring slots, one at the end of the file.
    return [(777, 3_000_001), (4 << 20, 1 << 20), (5 << 20, 17), (len(data) - 4099, 4099), (0, PAGE_NBYTES)]


def jobs_for(mapped: MappedFile, data: np.ndarray, device: str) -> tuple[list[CopyJob], list[np.ndarray]]:
    jobs, expected = [], []
    for offset, nbytes in ranges(data):
        destination = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        jobs.append(CopyJob(mapped, offset, nbytes, destination))
        expected.append(data[offset : offset + nbytes])
    return jobs, expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("source", "direct"),
    [("auto", False), ("registered", False), ("staged", False), ("pread", False), ("pread", True), ("direct", False)],
)
def test_every_source_delivers_the_exact_bytes(data_file, device, source, direct):
    mapped, data = data_file
    copier = DeviceCopier(torch.device(device), source=source, slot_nbytes=1 << 20, slots=3, threads=3, direct=direct)
    try:
        for _ in range(2):  # the second pass reuses windows and ring slots
            jobs, expected = jobs_for(mapped, data, device)
            copier.copy(jobs)
            if device == "cuda":
                torch.cuda.synchronize()
            for job, want in zip(jobs, expected, strict=True):
                np.testing.assert_array_equal(job.destination.cpu().numpy(), want)
        assert sum(copier.stats.nbytes.values()) == 2 * sum(nbytes for _, nbytes in ranges(data))
    finally:
        copier.close()


def test_cpu_auto_copies_directly(data_file):
    mapped, data = data_file
    copier = DeviceCopier(torch.device("cpu"))
    jobs, _ = jobs_for(mapped, data, "cpu")
    copier.copy(jobs)
    copier.close()
    assert set(copier.stats.nbytes) == {"direct"} and copier.stats.peak_pinned_nbytes == 0


def test_pread_reads_the_mapped_file_after_a_rename(data_file, tmp_path):
    """A re-conversion renamed another file over the path: the ring still
    reads the file that was mapped and validated, as the CPU sinks do."""
    mapped, data = data_file
    replacement = tmp_path / "new.bin"
    (data + 1).tofile(replacement)
    replacement.replace(mapped.path)
    copier = DeviceCopier(torch.device("cpu"), source="pread", slot_nbytes=1 << 20)
    jobs, expected = jobs_for(mapped, data, "cpu")
    copier.copy(jobs)
    copier.close()
    for job, want in zip(jobs, expected, strict=True):
        np.testing.assert_array_equal(job.destination.numpy(), want)


def test_pread_ring_counts_a_refused_o_direct_and_reads_buffered(data_file, monkeypatch):
    from mmapstore.io import _reader as io_reader

    def refusing(self, handles, offset, view):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(io_reader.ColdReader, "_read_direct", refusing)
    mapped, data = data_file
    copier = DeviceCopier(torch.device("cpu"), source="pread", slot_nbytes=1 << 20, direct=True)
    jobs, expected = jobs_for(mapped, data, "cpu")
    copier.copy(jobs)
    copier.close()
    for job, want in zip(jobs, expected, strict=True):
        np.testing.assert_array_equal(job.destination.numpy(), want)
    assert copier.stats.fallbacks.get("O_DIRECT refused", 0) == 1  # once per file, whichever thread saw it


def test_resident_ranges_after_a_read(data_file):
    mapped, data = data_file
    assert int(mapped.view(0, np.dtype(np.uint8), (len(data),)).sum()) == int(data.sum())
    assert is_resident(mapped, 777, 3_000_001) and is_resident(mapped, len(data) - 10, 10)


def test_budget_accounting_and_memlock():
    budget = PinnedBudget(100)
    assert budget.take(60) and not budget.take(50) and budget.used_nbytes == 60
    budget.give(60)
    assert budget.take(100) and budget.peak_nbytes == 100


def test_bad_source_name():
    with pytest.raises(ValueError, match="source must be one of"):
        DeviceCopier(torch.device("cpu"), source="dma")  # type: ignore[arg-type]


# -- CUDA: fallbacks, windows, close ------------------------------------------------------------


@cuda
def test_budget_too_small_falls_back_counted_and_logged_once(data_file, caplog):
    mapped, data = data_file
    copier = DeviceCopier(
        torch.device("cuda"),
        source="registered",
        pinned_budget_nbytes=1 << 20,
        window_nbytes=4 << 20,
        slot_nbytes=1 << 20,
        slots=4,
    )
    with caplog.at_level(logging.WARNING, logger="mmapstore.gpu"):
        for _ in range(2):
            jobs, expected = jobs_for(mapped, data, "cuda")
            copier.copy(jobs)
            torch.cuda.synchronize()
            for job, want in zip(jobs, expected, strict=True):
                np.testing.assert_array_equal(job.destination.cpu().numpy(), want)
    copier.close()
    assert copier.stats.fallbacks.get("pinned budget full", 0) >= 2
    assert copier.stats.fallbacks.get("staging ring unavailable", 0) >= 2  # 4 MiB ring > 1 MiB budget
    assert copier.stats.nbytes == {"direct": 2 * sum(n for _, n in ranges(data))}
    assert sum("pinned budget full" in record.getMessage() for record in caplog.records) == 1
    assert copier.stats.peak_pinned_nbytes <= 1 << 20


@cuda
def test_windows_are_unregistered_at_close_and_pages_become_evictable(data_file):
    from mmapstore.gpu._driver import CudaDriver

    mapped, data = data_file
    copier = DeviceCopier(torch.device("cuda"), source="registered", window_nbytes=2 << 20)
    jobs, _ = jobs_for(mapped, data, "cuda")
    copier.copy(jobs)
    assert copier.windows is not None and len(copier.windows) > 0
    addresses = [window.address for window in copier.windows._windows.values() if window.ok]
    assert copier.stats.registrations == len(addresses)
    copier.close()
    assert copier.stats.unregistrations == copier.stats.registrations
    driver = CudaDriver.load(0)
    assert driver is not None
    assert all(driver.unregister(address) != 0 for address in addresses)  # not registered any more
    driver.release()


@cuda
def test_windows_of_a_closed_mapping_are_swept(tmp_path):
    path = tmp_path / "a.bin"
    np.arange(1 << 20, dtype=np.uint8).tofile(path)
    mapped = MappedFile(str(path))
    copier = DeviceCopier(torch.device("cuda"), source="registered", window_nbytes=1 << 20)
    destination = torch.empty(4096, dtype=torch.uint8, device="cuda")
    copier.copy([CopyJob(mapped, 0, 4096, destination)])
    torch.cuda.synchronize()
    mapped.close()
    assert copier.windows is not None
    copier.windows.sweep()
    assert len(copier.windows) == 0 and copier.stats.unregistrations == 1
    copier.close()


# -- dequantization on the device, against the numpy reference --------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(256, 384), (200, 130)])
def test_fp8_block_matches_numpy(device, shape):
    import ml_dtypes

    rng = np.random.default_rng(1)
    rows, cols = shape
    weight = rng.normal(0, 2, size=(3, rows, cols)).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(1e-4, 1e-2, size=(3, -(-rows // 128), -(-cols // 128))).astype(np.float32)
    codes = torch.from_numpy(weight.view(np.uint8)).view(torch.float8_e4m3fn).to(device)
    result = dequantize_fp8_block(codes, torch.from_numpy(scale).to(device), (128, 128))
    for expert in range(3):
        np.testing.assert_array_equal(
            result[expert].cpu().numpy(), numpy_fp8(weight[expert], scale[expert], (128, 128))
        )


@pytest.mark.parametrize("device", DEVICES)
def test_mxfp4_matches_numpy(device):
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, size=(2, 48, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, size=(2, 48, 4), dtype=np.uint8)
    result = dequantize_mxfp4(
        torch.from_numpy(blocks).to(device), torch.from_numpy(scales).to(device), 128, dtype=torch.float32
    )
    assert tuple(result.shape) == (2, 48, 128)
    for expert in range(2):
        np.testing.assert_array_equal(result[expert].cpu().numpy(), numpy_mxfp4(blocks[expert], scales[expert], 128))


def test_dequant_shape_errors():
    with pytest.raises(FormatError, match="scale grid"):
        dequantize_fp8_block(torch.zeros(256, 256), torch.zeros(3, 2), (128, 128))
    with pytest.raises(FormatError, match="MXFP4"):
        dequantize_mxfp4(torch.zeros(4, 2, 16, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8), 64)
