"""Synthetic Hugging Face-layout MoE checkpoints and routing traces.

Values follow :mod:`mmapstore._synth_values`, so any slab can be recomputed
from ``(seed, tensor name, element index)`` without reading the file.  With
``sparse=True`` the files hold valid headers over holes: checkpoints of
hundreds of GB that take no disk (they read back as zeros).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ._dtypes import DType, parse_user_dtype
from ._errors import OptionError
from ._families import FamilyShape, family_tensors
from ._publish import clean_partials, locked, staged_dir
from ._synth_values import CHUNK_ELEMENTS, synth_values
from .formats import INDEX_NAME, SafetensorsWriter, TensorSpec
from .formats._records import split_by_size

__all__ = ["SynthResult", "routing_trace", "synth_checkpoint"]


@dataclass(frozen=True, slots=True)
class SynthResult:
    path: str
    files: tuple[str, ...]
    num_tensors: int
    nbytes: int


def synth_checkpoint(
    out: str | os.PathLike[str],
    family: str,
    *,
    layers: int = 2,
    experts: int = 8,
    hidden: int = 64,
    ffn: int = 32,
    top_k: int = 2,
    dtype: str = "bf16",
    shard_nbytes: int = 1 << 30,
    sparse: bool = False,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SynthResult:
    """Write a synthetic ``family`` checkpoint to directory ``out``, atomically.

    ``progress`` is called with the bytes written after each chunk.

    Raises
    ------
    OptionError
        Fewer than one layer or expert, or a non-positive hidden or ffn size.
    """
    out = os.fspath(out)
    for option, value in (("layers", layers), ("experts", experts), ("hidden", hidden), ("ffn", ffn), ("top_k", top_k)):
        if type(value) is not int or value < 1:
            raise OptionError(f"{option} must be a positive integer, got {value!r}")
    data_type: DType = parse_user_dtype(dtype)
    shape = FamilyShape(layers=layers, experts=experts, hidden=hidden, ffn=ffn, top_k=min(top_k, experts))
    config, tensors = family_tensors(family, shape)
    config["torch_dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(data_type.code, "bfloat16")
    specs = [TensorSpec(name, data_type, tensor_shape) for name, tensor_shape in tensors]
    shards = split_by_size(specs, lambda spec: spec.nbytes, shard_nbytes)
    files: list[str] = []
    weight_map: dict[str, str] = {}
    with locked(out):
        clean_partials(out)
        with staged_dir(out, replace=force) as staging:
            for number, shard in enumerate(shards, start=1):
                file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                file_path = os.path.join(staging, file_name)
                with SafetensorsWriter(file_path, shard, {"format": "pt"}, sparse=sparse) as writer:
                    if not sparse:
                        for spec in shard:
                            writer.write_tensor(spec.name, _chunks(seed, spec, progress))
                files.append(os.path.join(out, file_name))
                weight_map.update({spec.name: file_name for spec in shard})
            total = sum(spec.nbytes for spec in specs)
            _write_json(
                os.path.join(staging, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
            _write_json(os.path.join(staging, "config.json"), config)
    return SynthResult(out, tuple(files), len(specs), total)


def _chunks(seed: int, spec: TensorSpec, progress: Callable[[int], None] | None) -> Iterator[npt.NDArray[np.generic]]:
    count = spec.nbytes // spec.dtype.itemsize
    for start in range(0, count, CHUNK_ELEMENTS):
        chunk = synth_values(seed, spec.name, start, min(CHUNK_ELEMENTS, count - start), spec.dtype.numpy)
        yield chunk
        if progress is not None:
            progress(chunk.nbytes)


def _write_json(path: str, value: object) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")


def routing_trace(
    num_steps: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    tokens_per_step: int = 1,
    *,
    skew: float = 1.2,
    drift_every: int = 16,
    seed: int = 0,
) -> list[list[npt.NDArray[np.int64]]]:
    """A synthetic router trace: ``trace[step][layer]`` is ``[tokens, top_k]`` int64 ids.

    Experts are drawn from a Zipf-like popularity (``skew``) whose ranking
    is reshuffled every ``drift_every`` steps, so hot sets change over time
    as they do when a prompt changes topic.
    """
    rng = np.random.default_rng(seed)
    top_k = min(top_k, num_experts)
    weights = 1.0 / np.arange(1, num_experts + 1) ** skew
    weights /= weights.sum()
    orders = [rng.permutation(num_experts) for _ in range(num_layers)]
    trace: list[list[npt.NDArray[np.int64]]] = []
    for step in range(num_steps):
        if step and drift_every and step % drift_every == 0:
            orders = [rng.permutation(num_experts) for _ in range(num_layers)]
        layers = []
        for order in orders:
            ids = np.empty((tokens_per_step, top_k), dtype=np.int64)
            for token in range(tokens_per_step):
                ids[token] = order[rng.choice(num_experts, size=top_k, replace=False, p=weights)]
            layers.append(ids)
        trace.append(layers)
    return trace
