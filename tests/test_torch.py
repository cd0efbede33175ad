"""mmapstore.torch: zero-copy CPU tensors over mapped views."""

from __future__ import annotations

import builtins
import warnings

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

import mmapstore.torch as mtorch  # noqa: E402
from mmapstore import CapturedIdsError, FormatError  # noqa: E402
from mmapstore._dtypes import DTYPE_CODES  # noqa: E402
from mmapstore._errors import MmapStoreError, TorchUnavailableError  # noqa: E402
from mmapstore._mapping import MappedFile  # noqa: E402


def mapped_array(tmp_path, array: np.ndarray) -> tuple[MappedFile, np.ndarray]:
    path = tmp_path / "data.bin"
    path.write_bytes(b"\0" * 64 + array.tobytes())
    mapped = MappedFile(str(path))
    return mapped, mapped.view(64, array.dtype, array.shape)


def test_every_file_dtype_has_a_torch_dtype():
    assert set(mtorch.TORCH_DTYPE_NAMES) == set(DTYPE_CODES)
    for code in DTYPE_CODES:
        assert mtorch.torch_dtype(code).itemsize == DTYPE_CODES[code].itemsize


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_tensor_shares_the_mapping_and_reads_the_same_values(tmp_path, code):
    numpy_dtype = DTYPE_CODES[code].numpy
    values = np.arange(24, dtype=np.float32).reshape(4, 6) / 4
    array = values.astype(numpy_dtype) if code != "BOOL" else values > 2
    mapped, view = mapped_array(tmp_path, array)
    assert not view.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning
        tensor = mtorch.as_tensor(view)
        transposed = mtorch.as_tensor(view.T)
    assert tensor.data_ptr() == view.__array_interface__["data"][0]
    assert transposed.data_ptr() == tensor.data_ptr() and transposed.shape == (6, 4)
    assert tensor.dtype == mtorch.torch_dtype(code)
    raw = tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 else tensor
    if code in ("U16", "U32", "U64"):
        raw = tensor.to(torch.int64)
    if code in ("F8_E4M3", "F8_E5M2", "F8_E8M0", "BF16"):
        np.testing.assert_array_equal(tensor.to(torch.float32).numpy(), array.astype(np.float32))
    else:
        np.testing.assert_array_equal(raw.numpy(), array.view(raw.numpy().dtype) if code == "BOOL" else array)
    del tensor, transposed
    mapped.close()


def test_tensor_keeps_the_mapping_alive_after_close(tmp_path):
    array = np.arange(1000, dtype=np.float32)
    mapped, view = mapped_array(tmp_path, array)
    tensor = mtorch.as_tensor(view)
    del view
    mapped.close()
    assert float(tensor.sum()) == float(array.sum())


def test_bf16_values_exact(tmp_path):
    array = (np.linspace(-3, 3, 64, dtype=np.float32)).astype(ml_dtypes.bfloat16)
    _, view = mapped_array(tmp_path, array)
    assert torch.equal(mtorch.as_tensor(view), torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16))


def test_negative_strides_are_refused(tmp_path):
    _, view = mapped_array(tmp_path, np.arange(8, dtype=np.float32))
    with pytest.raises(FormatError, match="strides"):
        mtorch.as_tensor(view[::-1])


def test_expert_tensor_of_a_store(tmp_path):
    from mmapstore import open_store
    from mmapstore._synth import synth_checkpoint

    synth_checkpoint(tmp_path / "ckpt", family="mixtral", layers=1, experts=4, hidden=32, ffn=16)
    with open_store(tmp_path / "ckpt") as store:
        stack = store.layers[0].gate
        for expert in range(stack.num_experts):
            tensor = mtorch.expert_tensor(stack, expert)
            assert tuple(tensor.shape) == (stack.k, stack.n)
            np.testing.assert_array_equal(tensor.to(torch.float32).numpy(), stack.expert(expert).astype(np.float32))
            native = mtorch.expert_tensor(stack, expert, native=True)
            assert tuple(native.shape) == stack.native_shape
        del tensor, native


def test_missing_torch_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(TorchUnavailableError, match=r"mmapstore\[torch\]") as caught:
        mtorch.require_torch("as_tensor")
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, MmapStoreError)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_expert_counts_count_on_the_device_what_the_planner_counts_on_the_host(device):
    from mmapstore._proposals import count_hits_rows

    generator = torch.Generator().manual_seed(0)
    captured = [torch.randint(0, 16, (tokens, 2), generator=generator) for tokens in (0, 1, 7, 300)]
    captured[1] = captured[1].to(torch.int32)
    counts = mtorch.expert_counts([ids.to(device) for ids in captured], 16)
    assert counts.dtype == np.int64 and counts.shape == (4, 16)
    np.testing.assert_array_equal(counts, count_hits_rows([ids.numpy() for ids in captured], 16, [0, 1, 2, 3]))
    assert mtorch.expert_counts([], 16).shape == (0, 16)
    for bad, layer in ((torch.tensor([[3, 16]]), 2), (torch.tensor([[-1, 0]]), 0)):
        wrong = [ids.to(device) for ids in captured]
        wrong[layer] = bad.to(device)
        with pytest.raises(CapturedIdsError, match=f"layer {layer}: .*out of range"):
            mtorch.expert_counts(wrong, 16)
    with pytest.raises(CapturedIdsError, match="layer 1: .*integers"):
        mtorch.expert_counts([captured[0], captured[1].float()], 16)
    with pytest.raises(CapturedIdsError, match="layer 0: .*torch tensor"):
        mtorch.expert_counts([np.array([1, 2])], 16)
    # A wild id costs one spare bin, not a bincount as long as the id.
    with pytest.raises(CapturedIdsError, match="layer 1: .*out of range"):
        mtorch.expert_counts([captured[0].to(device), torch.tensor([2**62], device=device)], 16)
