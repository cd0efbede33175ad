"""A GGUF file as the runtime's checkpoint: transformers' reading of it, our bytes.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``) by
dequantizing *every* tensor into a full model: the routed experts of a
Qwen3-30B-A3B at Q4_K_M (17 GB) become about 60 GB of bfloat16.  The runtime takes from
transformers only what describes the model, and serves the bytes itself:

- the config, as ``AutoConfig.from_pretrained(dir, gguf_file=...)`` builds
  it from the file's metadata;
- the GGUF -> model name map and the per-tensor fix-ups, from the same
  helpers ``load_gguf_checkpoint`` uses (``get_gguf_hf_weights_map``, the
  architecture's ``TensorProcessor``: Llama's Q/K un-permutation, Qwen-MoE's
  shared-expert gate shape);
- every non-expert tensor decoded by :meth:`ExpertStore.values` (the ggml
  reference formulas, equal to gguf-py's) and put through that processor;
- the routed experts stay encoded in the mapping and reach the pools as
  every other quantized expert does (decoded on the way in).

Where transformers does not read a GGUF architecture, the load is refused
with :class:`~mmapstore._errors.UnsupportedModelError` naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import FormatError, MmapStoreError, UnsupportedEncodingError, UnsupportedModelError
from .._store import ExpertStore
from ..dequant import DEQUANTIZABLE, can_dequantize
from ..formats import MANIFEST_NAME, Checkpoint, TensorRecord, is_gguf
from ..formats._checkpoint import INDEX_NAME
from . import _gguf_deepseek as deepseek
from . import _gguf_glm4moe as glm4moe
from . import _gguf_gpt_oss as gpt_oss
from . import _gguf_llama4 as llama4
from . import _gguf_mixtral as mixtral
from . import _gguf_olmoe as olmoe
from ._gguf_meta import plain_names

__all__ = ["GgufSource", "is_gguf_checkpoint", "own_architecture", "read_gguf_config"]

# The routed experts' tensors: served by the pools, never loaded into the model.
_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(?:gate|up|down|gate_up)_exps\.(?:weight|bias)")


def is_gguf_checkpoint(path: str) -> bool:
    """Whether the store opens ``path`` as a GGUF checkpoint (the same rule
    as :func:`~mmapstore.formats.read_checkpoint`): a file that starts with
    the GGUF magic (a single file or any part of a split set), or a
    directory with no manifest, index or ``*.safetensors`` file that holds
    ``.gguf`` files.  A ``config.json`` beside GGUF files does not change
    that: the tensors are the GGUF's, so its metadata is the config."""
    if os.path.isfile(path):
        return is_gguf(path)
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    if MANIFEST_NAME in names or INDEX_NAME in names or any(name.endswith(".safetensors") for name in names):
        return False
    return any(name.endswith(".gguf") for name in names)


def read_gguf_config(checkpoint: Checkpoint, transformers: Any) -> Any:
    """The model config of a GGUF checkpoint (its headers, as the store read
    them): built here for the architectures of :data:`_OWN`, else by
    transformers from the first part's metadata, with two corrections:

    - ``tie_word_embeddings`` decided by transformers' own rule (no
      ``output.weight``) over *every* part: transformers looks at the first
      part only, and a split set whose ``output.weight`` lies in a later
      part would otherwise tie the output layer to the embeddings;
    - the expert widths the file states (``{arch}.expert_feed_forward_length``,
      ``{arch}.expert_shared_feed_forward_length``), which transformers'
      mapping leaves at the config class's defaults.

    Raises
    ------
    UnsupportedModelError
        Neither transformers nor a reader here builds this GGUF architecture
        (or the gguf package is missing); a routing transformers' model
        does not have (DeepSeek-V2's softmax).
    FormatError
        Metadata a reader here needs are missing, not positive integers, or
        make no valid config.
    """
    path = checkpoint.files[0]  # the first part: it holds the metadata
    names = checkpoint.tensors
    metadata = checkpoint.metadata or {}
    architecture = str(metadata.get("general.architecture", ""))
    _check_block_count(path, architecture, metadata, names)
    own = _reader_for(metadata)
    if own is not None:  # transformers reads none (or reads it wrong): as llama.cpp wrote it
        try:
            config = own.config(path, metadata, names, transformers)
        except MmapStoreError:
            raise
        except _CONFIG_ERRORS as exc:  # values the config class refuses
            raise FormatError(f"{path}: {architecture} metadata make no valid config: {exc}") from None
    else:
        try:
            directory, name = os.path.dirname(path) or ".", os.path.basename(path)
            config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
        except _READ_ERRORS as exc:
            raise UnsupportedModelError(
                f"{path}: transformers cannot build a model from this GGUF file: {type(exc).__name__}: {exc}"
            ) from None
    if architecture not in ("falcon", "bloom"):  # transformers ties those whatever the file holds
        config.tie_word_embeddings = "output.weight" not in names
    for key, attribute in _EXPERT_WIDTHS.items():
        value = metadata.get(f"{architecture}.{key}")
        if isinstance(value, int) and not isinstance(value, bool) and hasattr(config, attribute):
            setattr(config, attribute, value)
    return config


_BLOCK = re.compile(r"blk\.(\d+)\.")


def _check_block_count(path: str, architecture: str, metadata: dict[str, object], tensors: Iterable[str]) -> None:
    """``{arch}.block_count`` at most the blocks the tensors hold: every block has tensors, and a hostile
    count (2**40, say) would otherwise become per-layer lists in the config, exhausting memory.

    Raises
    ------
    FormatError
        The count names more blocks than the file holds.
    """
    count = metadata.get(f"{architecture}.block_count")
    if not isinstance(count, int) or isinstance(count, bool):
        return  # a reader (or transformers) refuses what is not a count
    held = 1 + max((int(match.group(1)) for name in tensors if (match := _BLOCK.match(name))), default=-1)
    if count > held:
        raise FormatError(
            f"{path}: {architecture}.block_count is {count}, but the tensors hold "
            + (f"blocks 0..{held - 1}" if held else "no block")
        )


def _config_errors() -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError)
    try:  # transformers' config classes validate fields through huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - an older huggingface_hub
        return errors
    return (*errors, StrictDataclassError)


_CONFIG_ERRORS = _config_errors()
_READ_ERRORS: tuple[type[Exception], ...] = (
    *_CONFIG_ERRORS,
    NotImplementedError,
    ImportError,
    AttributeError,
    IndexError,
)


# Architectures whose config is read here rather than by transformers.
@dataclass(frozen=True, slots=True)
class _Reader:
    """How one architecture is read without transformers' GGUF loader: its
    config from the metadata (and which tensors the file holds), and its
    ``GGUF tensor -> model key`` map with the tensors joined in pairs."""

    config: Callable[[str, dict[str, object], Mapping[str, TensorRecord], Any], Any]
    names: Callable[[Any, set[str]], tuple[dict[str, str], dict[str, str]]]
    process: Callable[[Any], _Process] | None = None  # per-tensor fix-ups, from the built model


_Process = Callable[[npt.NDArray[np.float32], str], tuple[npt.NDArray[np.float32], str | None]]

_OWN = {
    deepseek.ARCHITECTURE: _Reader(deepseek.deepseek_config, deepseek.deepseek_names),
    gpt_oss.ARCHITECTURE: _Reader(gpt_oss.gpt_oss_config, gpt_oss.gpt_oss_names),
    glm4moe.ARCHITECTURE: _Reader(glm4moe.glm4moe_config, glm4moe.glm4moe_names),
    olmoe.ARCHITECTURE: _Reader(olmoe.olmoe_config, plain_names(olmoe.ARCHITECTURE)),
    llama4.ARCHITECTURE: _Reader(llama4.llama4_config, plain_names(llama4.ARCHITECTURE)),
}
_MIXTRAL = _Reader(mixtral.mixtral_config, plain_names(mixtral.ARCHITECTURE), mixtral.mixtral_process)


def own_architecture(metadata: dict[str, object]) -> bool:
    """Whether the config of a GGUF file with these metadata is built here (transformers builds none)."""
    return _reader_for(metadata) is not None


def _reader_for(metadata: dict[str, object]) -> _Reader | None:
    """The reader of an architecture read here (a ``llama`` file with experts is Mixtral), or None."""
    architecture = str(metadata.get("general.architecture", ""))
    if architecture == mixtral.ARCHITECTURE and mixtral.is_mixtral(metadata):
        return _MIXTRAL
    return _OWN.get(architecture)


# Expert widths llama.cpp writes and transformers' GGUF config mapping leaves
# out for the MoE architectures (a Qwen3-235B-A22B file would otherwise get
# Qwen3MoeConfig's default 768 instead of its 1536).
_EXPERT_WIDTHS = {
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
}


@dataclass(frozen=True, slots=True)
class GgufSource:
    """How a GGUF file's non-expert tensors become model weights."""

    path: str
    names: dict[str, str]  # GGUF tensor name -> model key
    process: Callable[[npt.NDArray[np.float32], str], tuple[npt.NDArray[np.float32], str | None]]
    pairs: dict[str, str] = field(default_factory=dict)  # attn_k_b -> attn_v_b: joined into kv_b_proj

    @classmethod
    def for_model(cls, model: Any, store: ExpertStore) -> GgufSource:
        """The name map and processor transformers' own GGUF loader would use
        (for the architectures read here: their own modules')."""
        path = store.checkpoint.files[0]
        metadata = store.checkpoint.metadata or {}
        architecture = str(metadata.get("general.architecture", ""))
        own = _reader_for(metadata)
        if own is not None:
            joined, pairs = own.names(model, set(store.tensors))
            fix_up: _Process = own.process(model) if own.process is not None else (lambda values, name: (values, name))
            return cls(path, joined, fix_up, pairs)
        try:
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
            )
        except ImportError as exc:  # pragma: no cover - transformers moved its GGUF helpers
            raise UnsupportedModelError(f"{path}: this transformers has no GGUF loader to follow: {exc}") from None
        # The processors read the config under its Hugging Face names (head counts for Llama's Q/K order): the
        # model's own config has them, without parsing the file's headers once more.
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
        try:
            names: dict[str, str] = get_gguf_hf_weights_map(model, processor)
        except NotImplementedError as exc:
            raise UnsupportedModelError(f"{path}: {exc}") from None

        def process(values: npt.NDArray[np.float32], name: str) -> tuple[npt.NDArray[np.float32], str | None]:
            result = processor.process(
                weights=values, name=name, tensor_key_mapping=names, parsed_parameters={"tensors": {}}
            )
            return result.weights, result.name

        return cls(path, names, process)

    def plan(
        self, store: ExpertStore, served_layers: Iterable[int], expert_prefixes: tuple[str, ...]
    ) -> dict[str, str]:
        """``model key -> GGUF tensor`` for every tensor the model takes, the served experts left out.

        Raises
        ------
        UnsupportedEncodingError
            A tensor the model takes (a served expert included) is in a ggml
            type no decoder here reads (the IQ grid types, say): refused
            before any weight is read.
        """
        served = set(served_layers)
        plan: dict[str, str] = {}
        for tensor in store.tensors:
            match = _EXPERTS.fullmatch(tensor)
            if match is not None and int(match.group(1)) in served:
                _check_decodable(store, tensor)
                continue
            key = self.names.get(tensor)
            if key is None or key.startswith(expert_prefixes):
                continue  # a tensor the model has no place for, as transformers skips it
            if key in plan:
                raise FormatError(f"{self.path}: tensors {plan[key]!r} and {tensor!r} both map to {key!r}")
            _check_decodable(store, tensor)
            if tensor in self.pairs:
                _check_decodable(store, self.pairs[tensor])
            plan[key] = tensor
        return plan

    def values(self, store: ExpertStore, tensor: str) -> npt.NDArray[np.float32]:
        """A tensor's values as the model takes them: decoded, then the architecture's fix-up."""
        decoded: npt.NDArray[np.float32] = store.values(tensor, np.float32).astype(np.float32, copy=False)
        partner = self.pairs.get(tensor)
        if partner is not None:
            v_b: npt.NDArray[np.float32] = store.values(partner, np.float32).astype(np.float32, copy=False)
            return deepseek.join_kv_b(f"{self.path}: {tensor}", decoded, v_b)
        values, name = self.process(decoded, tensor)
        if name != tensor:
            raise FormatError(f"{self.path}: tensor {tensor!r} is not a model weight on its own (it became {name!r})")
        return np.ascontiguousarray(values, dtype=np.float32)


def _check_decodable(store: ExpertStore, tensor: str) -> None:
    record = store.checkpoint.tensors[tensor]
    if record.dtype.is_block and not can_dequantize(record.dtype):
        raise UnsupportedEncodingError(
            f"{record.path}: tensor {tensor!r} is {record.dtype.code}, a ggml type mmapstore cannot decode; "
            f"decodable: {', '.join(sorted(DEQUANTIZABLE))}"
        )
