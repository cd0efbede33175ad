"""Builders for synthetic and hostile test files, byte by byte."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mmapstore._dtypes import code_of
from mmapstore.testing import FamilyShape, family_tensors, synth_tensor

# The families the converter tests run (stacked per-expert, MLA, fused interleaved, fused concatenated).
SMALL_FAMILIES = ["mixtral", "deepseek_v3", "gpt_oss", "llama4"]


def header_bytes(header: Mapping[str, object]) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def pack_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file packed by hand with struct (independent of the library and our writer)."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    position = 0
    blobs = []
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()
        header[name] = {
            "dtype": code_of(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [position, position + len(blob)],
        }
        position += len(blob)
        blobs.append(blob)
    return header_bytes(header) + b"".join(blobs)


def write_bytes(path: os.PathLike[str] | str, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return os.fspath(path)


def family_arrays(family: str, dtype: np.dtype, seed: int = 0, **shape: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Config and every tensor of a family, with synth values, in memory."""
    config, tensors = family_tensors(family, FamilyShape(**shape))
    return config, {name: synth_tensor(seed, name, tensor_shape, dtype) for name, tensor_shape in tensors}


def write_family(
    directory: os.PathLike[str] | str,
    family: str,
    dtype: np.dtype,
    *,
    via: str,
    shards: int = 2,
    seed: int = 0,
    **shape: int,
) -> dict[str, np.ndarray]:
    """Write a family checkpoint with config.json and an index, through the
    ``safetensors`` library (``via="library"``) or hand-packed bytes (``via="packed"``)."""
    os.makedirs(directory, exist_ok=True)
    config, arrays = family_arrays(family, dtype, seed, **shape)
    names = list(arrays)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for number in range(shards):
        part = {name: arrays[name] for name in names[number * per_shard : (number + 1) * per_shard]}
        file_name = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        path = os.path.join(directory, file_name)
        if via == "library":
            import safetensors.numpy

            safetensors.numpy.save_file(part, path, metadata={"format": "pt"})
        else:
            write_bytes(path, pack_safetensors(part, {"format": "pt"}))
        weight_map.update({name: file_name for name in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle)
    return arrays


def write_checkpoint(
    directory: os.PathLike[str] | str,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, object] | None,
    *,
    via: str = "packed",
) -> str:
    """One ``model.safetensors`` (hand-packed bytes, or the real ``safetensors``
    library with ``via="library"``) and, unless None, its ``config.json``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.safetensors")
    if via == "library":
        import safetensors.numpy

        safetensors.numpy.save_file(dict(tensors), path, metadata={"format": "pt"})
    else:
        write_bytes(path, pack_safetensors(tensors, {"format": "pt"}))
    if config is not None:
        with open(os.path.join(directory, "config.json"), "w") as handle:
            json.dump(config, handle)
    return os.fspath(directory)


def assert_convert_keeps_or_dequantizes(src: str, out: os.PathLike[str] | str, experts: int) -> dict:
    """``convert`` of quantized checkpoint ``src`` (layer 0) under ``out``: kept, every
    part of every expert byte-equal and the manifest naming each encoding and
    part, and the store verifies; with ``--dtype bf16``, plain bf16 weights equal
    to the dequantized values.  Returns the kept store's manifest."""
    import ml_dtypes

    from mmapstore import convert, open_store, verify

    kept = convert(src, os.path.join(out, "kept"))
    with open(os.path.join(out, "kept", "mmapstore.json")) as handle:
        manifest = json.load(handle)
    with open_store(src) as source, open_store(kept.path) as store:
        assert manifest["orientation"] == source.layer(0).gate.native_orientation
        for proj, stack in store.layer(0).stacks:
            original = getattr(source.layer(0), proj)
            assert manifest["encodings"][f"blk.0.ffn_{proj}_exps"]["kind"] == original.encoding.kind
            assert stack.encoding == original.encoding and set(stack.parts) == set(original.parts)
            assert (stack.k, stack.n) == (original.k, original.n)
            for part in stack.parts:
                assert f"blk.0.ffn_{proj}_exps.{part}" in manifest["tensors"]
            for expert in range(experts):
                for part in stack.parts:
                    np.testing.assert_array_equal(stack.part(part, expert), original.part(part, expert))
                np.testing.assert_array_equal(stack.dequantize(expert), original.dequantize(expert))
    assert verify(kept.path).ok
    as_bf16 = convert(src, os.path.join(out, "bf16"), dtype="bf16")
    with open_store(src) as source, open_store(as_bf16.path) as store:
        for proj, stack in store.layer(0).stacks:
            assert not stack.encoding.encoded and stack.dtype == ml_dtypes.bfloat16 and set(stack.parts) == {"weight"}
            for expert in range(experts):
                want = getattr(source.layer(0), proj).dequantize(expert).astype(ml_dtypes.bfloat16)
                np.testing.assert_array_equal(stack.expert(expert), want)
    return manifest


@contextlib.contextmanager
def cpu_copier(loaded: Any) -> Iterator[Any]:
    """Every MoE layer of a loaded model writing through one CPU ``DeviceCopier`` (``pread``): the path
    bytes take to a GPU, encoded blocks included, on the CPU.  Yields the copier (its ``stats`` say
    what moved); the writer is closed on exit."""
    import torch

    from mmapstore.gpu import DeviceCopier
    from mmapstore.transformers._slots import SlotWriter

    copier = DeviceCopier(torch.device("cpu"), source="pread")
    writer = SlotWriter(torch.device("cpu"), copier=copier)
    for layer in loaded.layers:
        layer.writer = writer
    try:
        yield copier
    finally:
        writer.close()
