"""The mapping layer: one read-only map per file, madvise and mincore helpers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mmapstore import FormatError, StoreClosedError
from mmapstore._mapping import (
    MADV_DONTNEED,
    MADV_POPULATE_READ,
    MADV_WILLNEED,
    PAGE_NBYTES,
    MappedFile,
    byte_span,
    resident_nbytes,
)
from mmapstore.io import evict


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    values = np.arange(64 * PAGE_NBYTES // 4, dtype=np.float32)
    path.write_bytes(values.tobytes())
    return str(path), values


def test_views_are_read_only_and_correct(data_file):
    path, values = data_file
    with MappedFile(path) as mapped:
        view = mapped.view(PAGE_NBYTES, np.dtype(np.float32), (4, 8))
        np.testing.assert_array_equal(view.reshape(-1), values[PAGE_NBYTES // 4 : PAGE_NBYTES // 4 + 32])
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view.flags.writeable = True
        assert mapped.offset_of(view) == PAGE_NBYTES
        assert byte_span(view.T)[1] - byte_span(view.T)[0] == view.nbytes


def test_residency_follows_madvise(data_file):
    path, values = data_file
    with MappedFile(path) as mapped:
        view = mapped.view(0, np.dtype(np.uint8), (mapped.nbytes,))
        try:
            mapped.advise(0, mapped.nbytes, MADV_POPULATE_READ)
        except OSError:  # kernels before 5.14
            view.sum()
        assert mapped.resident_nbytes() == mapped.nbytes
        assert resident_nbytes(view[:PAGE_NBYTES]) == PAGE_NBYTES
        mapped.advise(0, mapped.nbytes, MADV_DONTNEED)
        # DONTNEED on a read-only file mapping only unmaps: the bytes read back unchanged
        np.testing.assert_array_equal(view.view(np.float32), values)
        mapped.advise(3, 10, MADV_WILLNEED)  # unaligned offsets are rounded to pages


def test_page_resident_agrees_with_resident_pages(data_file):
    path, _ = data_file
    evict(path)
    with MappedFile(path) as mapped:
        assert not mapped.page_resident(5 * PAGE_NBYTES + 7)
        mapped.advise(5 * PAGE_NBYTES, PAGE_NBYTES, MADV_POPULATE_READ)
        assert mapped.page_resident(5 * PAGE_NBYTES + 7)
        assert mapped.page_resident(5 * PAGE_NBYTES) == bool(mapped.resident_pages(5 * PAGE_NBYTES, 1).all())
        assert not mapped.page_resident(mapped.nbytes)  # past the end: absent
        assert not mapped.page_resident(-1)


def test_truncated_or_shrunk_file_is_refused(data_file, tmp_path):
    path, _ = data_file
    with pytest.raises(FormatError, match="truncated"):
        MappedFile(path, os.path.getsize(path) + 1)
    with MappedFile(path) as mapped:
        mapped.check_size()
        os.truncate(path, PAGE_NBYTES)
        with pytest.raises(FormatError, match="shrank"):
            mapped.check_size()
    with pytest.raises(FormatError, match="does not exist"):
        MappedFile(str(tmp_path / "absent"))


def test_close_refuses_new_views_but_old_ones_live(data_file):
    path, values = data_file
    mapped = MappedFile(path)
    view = mapped.view(0, np.dtype(np.float32), (4,))
    mapped.close()
    mapped.close()
    with pytest.raises(StoreClosedError):
        mapped.view(0, np.dtype(np.float32), (4,))
    np.testing.assert_array_equal(view, values[:4])


def test_empty_file_serves_empty_views(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with MappedFile(str(path)) as mapped:
        assert mapped.view(0, np.dtype(np.float32), (0,)).size == 0
