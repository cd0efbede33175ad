"""Routing traces written by other tools, as :class:`~mmapstore._trace.Trace` values.

- vLLM ``--enable-return-routed-experts``: per request ``[tokens, layers, top_k]``
  (``prompt_routed_experts`` and ``routed_experts``); the prompt is one
  prefill step, each generated token one decode step.
- llama.cpp ``moe-trace`` CSV: one ``layer,expert`` row per routed activation,
  layers in order within a forward; a forward ends where the layer index
  drops.  An optional ``step`` column (``step,layer,expert``) marks forwards
  explicitly.
- plain arrays ``[steps, layers, tokens, top_k]`` (every step the same size).

Every importer refuses malformed input with a :class:`FormatError` that names
the file (or array) and the line or index.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ._errors import FormatError
from ._trace import Phase, Trace

__all__ = ["from_llama_csv", "from_step_array", "from_vllm"]


def from_vllm(
    requests: Sequence[npt.ArrayLike | tuple[npt.ArrayLike, npt.ArrayLike]], *, source: str = "vllm"
) -> Trace:
    """One trace from vLLM's routed experts, requests one after another.

    Each request is either a ``[tokens, layers, top_k]`` array of generated
    tokens (all decode steps), or a pair ``(prompt_routed_experts,
    routed_experts)``: the prompt becomes one prefill step.

    Raises
    ------
    FormatError
        An array is not 3-d integers, or requests disagree on layers or top_k.
    """
    pieces: list[npt.NDArray[np.int64]] = []
    phases: list[int] = []
    tokens: list[int] = []
    shape: tuple[int, int] | None = None
    for number, request in enumerate(requests):
        parts = request if isinstance(request, tuple) else (None, request)
        for role, part in zip(("prompt_routed_experts", "routed_experts"), parts, strict=True):
            if part is None:
                continue
            array = _int_array(part, f"{source}: request {number} {role}", ndim=3)
            if shape is None:
                shape = (array.shape[1], array.shape[2])
            elif (array.shape[1], array.shape[2]) != shape:
                raise FormatError(
                    f"{source}: request {number} {role}: [layers, top_k] = "
                    f"{list(array.shape[1:])}, earlier requests had {list(shape)}"
                )
            if role == "prompt_routed_experts":
                if array.shape[0]:
                    pieces.append(array)
                    phases.append(Phase.PREFILL)
                    tokens.append(array.shape[0])
            else:
                pieces.append(array)
                phases += [Phase.DECODE] * array.shape[0]
                tokens += [1] * array.shape[0]
    if shape is None:
        raise FormatError(f"{source}: no requests")
    ids = np.concatenate(pieces) if pieces else np.zeros((0, *shape), dtype=np.int64)
    return Trace.build(
        _narrow(ids),
        np.concatenate([[0], np.cumsum(tokens, dtype=np.int64)]),
        phase=np.asarray(phases, dtype=np.int8),
        source=source,
    )


def from_step_array(array: npt.ArrayLike, *, phase: Phase = Phase.DECODE, source: str = "array") -> Trace:
    """A trace from a ``[steps, layers, tokens, top_k]`` integer array.

    Raises
    ------
    FormatError
        The array is not 4-d integers, or holds a negative id.
    """
    ids = _int_array(array, source, ndim=4)
    steps, layers, tokens, top_k = ids.shape
    rows = ids.transpose(0, 2, 1, 3).reshape(steps * tokens, layers, top_k)
    offsets = np.arange(steps + 1, dtype=np.int64) * tokens
    return Trace.build(_narrow(rows), offsets, phase=np.full(steps, int(phase), dtype=np.int8), source=source)


def from_llama_csv(path: str | os.PathLike[str], top_k: int) -> Trace:
    """A trace from llama.cpp's ``moe-trace`` CSV.

    A forward is a run of rows whose layer never decreases (or, with a
    ``step`` column, the rows of one step); within it each layer must have a
    multiple of ``top_k`` rows, the same number for every layer.  Each token
    is ``top_k`` consecutive rows of its layer.  Forwards of more than one
    token are marked prefill.  Layers are the distinct layer numbers seen,
    in order.

    Raises
    ------
    FormatError
        A row is not integers, has the wrong number of fields, an id is
        negative, or a forward's layers disagree on their token counts; the
        message names the file and the line.
    """
    path = os.fspath(path)
    if type(top_k) is not int or top_k < 1:
        raise FormatError(f"{path}: top_k must be a positive integer, got {top_k!r}")
    rows_read: list[list[int]] = []  # (forward, layer, expert) per row
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        columns = 2
        explicit = False
        previous_layer = -1
        step = -1
        start_line: list[int] = []
        for row in reader:
            line = reader.line_num
            fields = [field.strip() for field in row]
            if not fields or fields == [""] or fields[0].startswith("#"):
                continue
            if line == 1 and not fields[0].lstrip("-").isdigit():
                header = [field.lower() for field in fields]
                if header not in (["layer", "expert"], ["step", "layer", "expert"]):
                    raise FormatError(f"{path}: line 1: header {row!r}, expected 'layer,expert' or 'step,layer,expert'")
                columns, explicit = len(header), len(header) == 3
                continue
            if len(fields) != columns:
                raise FormatError(f"{path}: line {line}: {len(fields)} fields, expected {columns}")
            try:
                values = [int(field) for field in fields]
            except ValueError:
                raise FormatError(f"{path}: line {line}: not integers: {row!r}") from None
            if min(values) < 0:
                raise FormatError(f"{path}: line {line}: negative value in {row!r}")
            *marks, layer, expert = values
            new_step = (marks[0] != step) if explicit else layer < previous_layer or step < 0
            if new_step:
                if explicit and marks[0] < step:
                    raise FormatError(f"{path}: line {line}: step {marks[0]} after step {step}")
                step = marks[0] if explicit else step + 1
                start_line.append(line)
            previous_layer = layer
            rows_read.append([len(start_line) - 1, layer, expert])
    if not rows_read:
        raise FormatError(f"{path}: no routing rows")
    table = np.asarray(rows_read, dtype=np.int64)
    layer_numbers = np.unique(table[:, 1])
    layer_of = np.searchsorted(layer_numbers, table[:, 1])
    forward = table[:, 0]
    forwards = int(forward[-1]) + 1
    counts = np.zeros((forwards, layer_numbers.size), dtype=np.int64)
    np.add.at(counts, (forward, layer_of), 1)
    for number in range(forwards):
        per_layer = counts[number]
        if np.any(per_layer != per_layer[0]) or per_layer[0] % top_k:
            raise FormatError(
                f"{path}: forward starting at line {start_line[number]}: rows per layer "
                f"{dict(zip(layer_numbers.tolist(), per_layer.tolist(), strict=True))}, expected the same multiple of top_k={top_k}"
            )
    tokens = counts[:, 0] // top_k
    offsets = np.concatenate([[0], np.cumsum(tokens)])
    ids = np.empty((int(offsets[-1]), layer_numbers.size, top_k), dtype=np.int64)
    # Stable sort by (forward, layer) keeps each layer's rows in file order.
    order = np.lexsort((layer_of, forward))
    experts = table[order, 2]
    position = 0
    for number in range(forwards):
        block = experts[position : position + counts[number].sum()]
        position += block.size
        ids[offsets[number] : offsets[number + 1]] = block.reshape(layer_numbers.size, tokens[number], top_k).transpose(
            1, 0, 2
        )
    phase = np.where(tokens > 1, int(Phase.PREFILL), int(Phase.DECODE)).astype(np.int8)
    return Trace.build(_narrow(ids), offsets, phase=phase, layer_indices=layer_numbers.tolist(), source=path)


def _int_array(value: npt.ArrayLike, where: str, ndim: int) -> npt.NDArray[np.int64]:
    array = np.asarray(value)
    if array.ndim != ndim:
        raise FormatError(f"{where}: expected a {ndim}-d array, got shape {array.shape}")
    if array.size and (array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer)):
        raise FormatError(f"{where}: expected integer expert ids, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and int(array.min()) < 0:
        index = np.unravel_index(int(np.argmin(array)), array.shape)
        raise FormatError(f"{where}: negative expert id {int(array.min())} at index {tuple(int(i) for i in index)}")
    return array


def _narrow(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.integer]:
    """The smallest signed dtype that holds every id (int16 covers 32,767 experts)."""
    highest = int(ids.max()) if ids.size else 0
    for dtype in (np.int16, np.int32):
        if highest <= np.iinfo(dtype).max:
            return ids.astype(dtype)
    return ids
