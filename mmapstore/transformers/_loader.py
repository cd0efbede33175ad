"""``load_model``: a checkpoint directory -> a ready model with its experts served from the store.

Everything that can be refused is checked before the first weight is read:
the family (its transformers class must dispatch through the experts
interface), the expert shapes against the store, the device, the budget and
the trace path.  Then the non-expert weights are copied from the mapping to
the device, each routed-expert parameter is replaced by a pool of
``capacity`` slots, and the pools are filled with their first residents.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import FormatError, RuntimeConfigError, UnsupportedModelError
from .._pool import ExpertPool, RefreshPolicy, capacity_from_budget
from .._store import ExpertStore, LayerExperts, open_store
from ..gpu._jobs import SOURCES, Source
from . import _hf
from ._backend import BACKEND_NAME, LAYER_ATTRIBUTE, register_backend
from ._capture import TraceRecorder
from ._gguf import GgufSource, is_gguf_checkpoint, read_gguf_config
from ._layer import ExpertsLayout, LayerRuntime, OnMiss, StepState
from ._llama4 import adapt_llama4
from ._runtime import OffloadedModel
from ._slots import SlotWriter
from ._torch import as_tensor, resolve_device

__all__ = ["load_model"]

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(0|[1-9][0-9]*)\.")


@dataclass(frozen=True, slots=True)
class _MoeLayer:
    """A store layer matched to its experts module (before anything is loaded)."""

    name: str
    module: torch.nn.Module
    experts: LayerExperts
    layout: ExpertsLayout


def load_model(
    checkpoint: str | os.PathLike[str],
    *,
    capacity: int | Sequence[int] | None = None,
    budget_nbytes: int | None = None,
    every: int = 1,
    on_miss: str | OnMiss | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    trace_path: str | os.PathLike[str] | None = None,
    capture_trace: bool = False,
    source: Source = "auto",
) -> OffloadedModel:
    """Open a Hugging Face MoE checkpoint (or GGUF file) with its routed experts served from the store.

    Parameters
    ----------
    checkpoint
        A directory with ``config.json`` and safetensors weights (single or
        sharded), as ``save_pretrained`` writes it; or a GGUF checkpoint (a
        file, any part of a split set, or a directory of one), read as
        :mod:`mmapstore.transformers._gguf` describes.
    capacity
        Experts per MoE layer held on the device: one number for every
        layer, or one per MoE layer.  ``None`` with no budget: all experts.
    budget_nbytes
        Device bytes for the expert pools over all layers (instead of
        ``capacity``); spread evenly over the layers.
    every
        Refresh each pool every ``every`` decode steps (and on every
        prefill), TIDE-style.
    on_miss
        ``"fetch"`` (the default on a CUDA device): missing experts are
        copied into the pool before they run (least recently used leave);
        a forward that routes to more experts than the pool holds runs in
        chunks of at most ``capacity`` experts, so every token runs on the
        device with the stock backend's kernel and the outputs are the stock
        model's, bit for bit, at any capacity.  ``"cpu"`` (the default on the
        CPU): tokens routed to non-resident experts run on the CPU from the
        mapped slabs and the pools change only on refreshes (TIDE); on a GPU
        their outputs differ from the device's by rounding.
    device
        Where the non-expert weights and the pools live (``"cpu"``, ``"cuda:0"``...).
    dtype
        Compute dtype (a ``torch.dtype`` or its name); default: ``config.json``'s,
        else float32 (a GGUF file, which names none: bfloat16 on CUDA, float32
        on the CPU).
    trace_path
        Capture every MoE layer's Top-K ids and write them there (a trace
        ``mmapstore simulate --trace`` replays) on :meth:`OffloadedModel.close`.
    capture_trace
        Capture without a path (read with :meth:`OffloadedModel.trace`).
    source
        How expert bytes reach a CUDA device's pools (``"auto"``: DMA from
        registered page-cache windows for resident ranges, ``pread`` through
        a pinned ring for cold ones; ``"direct"``: a pageable torch copy);
        see :data:`mmapstore.gpu._jobs.Source`.

    Returns
    -------
    OffloadedModel
        ``.model`` is the transformers model, in eval mode, gradients off.

    Raises
    ------
    UnsupportedModelError
        The family's transformers class does not use the experts interface
        (and is not Llama-4 text, whose block is adapted), a weight outside the routed experts
        is quantized, or the experts have a shape the runtime does not serve.
    RuntimeConfigError
        A device that does not exist, a budget or capacity below one expert
        per layer, an unwritable trace path, or bad arguments.
    FormatError
        No ``config.json`` (in a checkpoint that is not GGUF), expert stacks that disagree with the model, or a
        non-expert weight the checkpoint lacks.
    """
    import transformers

    path = os.fspath(checkpoint)
    if type(every) is not int or every < 1:
        raise RuntimeConfigError(f"every must be a positive integer, got {every!r}")
    if capacity is not None and budget_nbytes is not None:
        raise RuntimeConfigError("give capacity or budget_nbytes, not both")
    if source not in SOURCES:
        raise RuntimeConfigError(f"source must be one of {list(SOURCES)}, got {source!r}")
    target = resolve_device(device)
    mode = _on_miss(on_miss, target)
    trace_file = None if trace_path is None else _check_trace_path(os.fspath(trace_path))
    gguf = is_gguf_checkpoint(path)
    if not gguf and not os.path.isfile(os.path.join(path, "config.json")):
        raise FormatError(f"{path}: no config.json; the runtime needs a Hugging Face checkpoint directory")
    store = open_store(path)  # the headers first: a GGUF's are its config, and they bound a config.json's
    writer: SlotWriter | None = None
    try:
        if gguf:
            config, quantized = read_gguf_config(store.checkpoint, transformers), None
        else:
            config, quantized = _read_config(path, transformers, store.checkpoint.tensors)
        if dtype is None and gguf and target.type == "cuda":
            dtype = torch.bfloat16  # a GGUF file names no compute dtype; float32 pools would double the memory
        compute_dtype = _dtype(dtype, config)
        model = _meta_model(path, config, compute_dtype, transformers)
    except BaseException:
        store.close()
        raise
    try:
        layers = _match_layers(path, model, store, config)
        _check_routing(path, model.config, layers)
        capacities = _capacities(capacity, budget_nbytes, layers, compute_dtype)
        gguf_source = GgufSource.for_model(model, store) if gguf else None
        plan = _weight_plan(path, model, store, layers, quantized, gguf_source)
        # -- nothing was read but headers up to here; from here weights move --
        non_expert_nbytes = _load_non_experts(model, store, plan, target, gguf_source)
        writer = SlotWriter(target, source)
        state = StepState()
        recorder = None
        if trace_file is not None or capture_trace:
            top_k = int(
                getattr(model.config, "num_experts_per_tok", 0) or getattr(model.config, "experts_per_token", 0)
            )
            recorder = TraceRecorder([layer.experts.layer_index for layer in layers], top_k)
        runtimes = []
        for position, (layer, slots) in enumerate(zip(layers, capacities, strict=True)):
            pool = ExpertPool(layer.layout.num_experts, slots, RefreshPolicy.every_n_decode_steps(every))
            runtime = LayerRuntime(
                position,
                layer.experts,
                layer.module,
                layer.layout,
                pool,
                device=target,
                dtype=compute_dtype,
                on_miss=mode,
                state=state,
                recorder=None if recorder is None else recorder.record,
                writer=writer,
            )
            for name, tensor in runtime.pool_tensors().items():
                _set_tensor(layer.module, name, tensor)
            runtimes.append(runtime)
        _finish(model, target, path)
        initial_nbytes = sum(runtime.fill_initial() for runtime in runtimes)
        register_backend()
        if type(model)._can_set_experts_implementation():  # an adapted Llama-4 block calls the layers itself
            model.set_experts_implementation(BACKEND_NAME)
        for layer, runtime in zip(layers, runtimes, strict=True):
            setattr(layer.module, LAYER_ATTRIBUTE, runtime)
        model.eval()
        model.requires_grad_(False)
        return OffloadedModel(
            model,
            store,
            runtimes,
            state,
            recorder,
            writer,
            trace_path=trace_file,
            initial_nbytes=initial_nbytes,
            non_expert_nbytes=non_expert_nbytes,
        )
    except BaseException:
        if writer is not None:
            writer.close()
        store.close()
        raise


# -- checks (no weights read) ---------------------------------------------------
def _on_miss(value: str | OnMiss | None, device: torch.device) -> OnMiss:
    if value is None:  # fetch is exact everywhere; the CPU path is exact only where the device is the CPU
        return OnMiss.FETCH if device.type == "cuda" else OnMiss.CPU
    try:
        return value if isinstance(value, OnMiss) else OnMiss(value)
    except ValueError:
        raise RuntimeConfigError(f"on_miss must be one of {[m.value for m in OnMiss]}, got {value!r}") from None


def _check_trace_path(path: str) -> str:
    """``path`` if a trace can be written there, else :class:`RuntimeConfigError`."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise RuntimeConfigError(f"trace path {path!r} is a directory")
    if not os.path.isdir(parent):
        raise RuntimeConfigError(f"trace path {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise RuntimeConfigError(f"trace path {path!r} cannot be written (no write permission)")
    return path


def _read_config(path: str, transformers: Any, tensors: Iterable[str]) -> tuple[Any, str | None]:
    """The model config, and the checkpoint's ``quant_method`` if it is quantized.

    Raises
    ------
    FormatError
        ``config.json`` is not a JSON object, a layer count beyond the
        layers the checkpoint's ``tensors`` hold (a hostile count would
        become per-layer lists in the config and exhaust memory), or values
        of the wrong type.
    UnsupportedModelError
        transformers does not know the model type.
    """
    name = os.path.join(path, "config.json")
    try:
        with open(name, "rb") as handle:
            raw = json.loads(handle.read())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{name}: not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{name}: not a JSON object")
    held = 1 + max((int(match.group(1)) for key in tensors if (match := _LAYER.search(key))), default=-1)
    for where, fields in (("", raw), ("text_config.", raw.get("text_config"))):
        count = fields.get("num_hidden_layers") if isinstance(fields, dict) else None
        if isinstance(count, int) and not isinstance(count, bool) and count > max(held, 1):
            raise FormatError(f"{name}: {where}num_hidden_layers is {count}, but the tensors hold {held} layers")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"{path}: transformers cannot read config.json: {exc}") from None
    except _CONFIG_VALUE_ERRORS as exc:
        raise FormatError(f"{name}: values of the wrong type: {exc}") from None
    quantization = getattr(config, "quantization_config", None)
    method = None
    if quantization:
        method = str(quantization.get("quant_method") if isinstance(quantization, dict) else quantization)
        # Routed experts are dequantized on their way into the pools, and every
        # other weight must be plain (checked per tensor in _weight_plan): the
        # model is built as the unquantized architecture.
        del config.quantization_config
    return config, method


def _dtype(dtype: str | torch.dtype | None, config: Any) -> torch.dtype:
    chosen = dtype if dtype is not None else getattr(config, "dtype", None) or torch.float32
    if isinstance(chosen, str):
        resolved = getattr(torch, chosen, None)
        if not isinstance(resolved, torch.dtype):
            raise RuntimeConfigError(f"dtype {chosen!r} is not a torch dtype")
        chosen = resolved
    if not isinstance(chosen, torch.dtype) or not chosen.is_floating_point:
        raise RuntimeConfigError(f"dtype must be a floating-point torch dtype, got {chosen!r}")
    return chosen


def _meta_model(path: str, config: Any, dtype: torch.dtype, transformers: Any) -> Any:
    """The model built on the meta device (no memory), its family checked.

    Raises
    ------
    UnsupportedModelError
        transformers has no causal-LM class for the config, or the class
        does not serve its experts through the experts interface.
    FormatError
        The config's values make no model (a float where a size goes, a
        vocabulary of 0...): a hostile or broken checkpoint.
    """
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModelError(f"{path}: model_type {config.model_type!r} has no causal-LM class")
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except _BUILD_ERRORS as exc:
        raise FormatError(
            f"{path}: its config makes no {config.model_type} model: {type(exc).__name__}: {exc}"
        ) from None
    adapted = adapt_llama4(model)  # a block that runs every expert on every token: routed pairs only
    if not _hf.experts_modules(model) or not (adapted or type(model)._can_set_experts_implementation()):
        experts = sorted({type(module).__name__ for name, module in model.named_modules() if name.endswith("experts")})
        raise UnsupportedModelError(
            f"{path}: {type(model).__name__} (model_type {config.model_type!r}) does not use transformers' experts "
            f"interface{' (' + ', '.join(experts) + ')' if experts else ''}; its experts cannot be served by the "
            f"{BACKEND_NAME!r} backend"
        )
    return model


# What transformers' config classes raise on values of the wrong type (strict dataclasses).
_CONFIG_VALUE_ERRORS: tuple[type[Exception], ...] = (TypeError, AttributeError)
try:
    from huggingface_hub.errors import StrictDataclassError

    _CONFIG_VALUE_ERRORS = (*_CONFIG_VALUE_ERRORS, StrictDataclassError)
except ImportError:  # pragma: no cover - an older huggingface_hub
    pass

# What a model's constructor raises on config values it cannot build from.
_BUILD_ERRORS = (
    ValueError, TypeError, KeyError, AssertionError, RuntimeError, ZeroDivisionError, IndexError, OverflowError,
)  # fmt: skip


def _layout(path: str, name: str, module: Any, experts: LayerExperts) -> ExpertsLayout:
    if not module.has_gate or getattr(module, "has_post_expert_norm", False):
        raise UnsupportedModelError(
            f"{path}: {name} ({type(module).__name__}): only gated experts without a post-expert norm are served"
        )
    gate_up = module.gate_up_proj.shape
    hidden, two = (gate_up[1], gate_up[2]) if module.is_transposed else (gate_up[2], gate_up[1])
    layout = ExpertsLayout(
        int(gate_up[0]),
        int(hidden),
        int(two) // 2,
        bool(module.is_transposed),
        bool(module.is_concatenated),
        bool(module.has_bias),
    )
    problems = []
    for proj, stack in experts.stacks:
        k, n = (layout.hidden, layout.intermediate) if proj != "down" else (layout.intermediate, layout.hidden)
        if (stack.num_experts, stack.k, stack.n) != (layout.num_experts, k, n):
            problems.append(
                f"{proj} is [{stack.num_experts}, {stack.k}, {stack.n}], expected "
                f"[{layout.num_experts}, {k}, {n}] ({stack.tensor_names[0]})"
            )
        has_bias = "bias" in stack.parts
        if has_bias != layout.has_bias:
            found = "has a bias the model does not expect" if has_bias else "has no bias, the model expects one"
            problems.append(f"{proj} {found} ({stack.tensor_names[0]})")
    if problems:
        raise FormatError(f"{path}: MoE layer {experts.layer_index} ({name}): " + "; ".join(problems))
    return layout


def _check_routing(path: str, config: Any, layers: Sequence[_MoeLayer]) -> None:
    """The router's top-k (and expert groups) fit the experts, else the first forward fails inside
    transformers' router (``topk`` out of range).

    Raises
    ------
    FormatError
        A top-k of 0 or above the experts, or groups that do not divide them.
    """
    if not layers:
        return
    experts = min(layer.layout.num_experts for layer in layers)
    top_k = getattr(config, "num_experts_per_tok", None)
    top_k = getattr(config, "experts_per_token", None) if top_k is None else top_k
    if isinstance(top_k, int) and not 1 <= top_k <= experts:
        raise FormatError(f"{path}: the router picks {top_k} experts of {experts}")
    groups, used = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    if (
        isinstance(groups, int)
        and isinstance(used, int)
        and (groups < 1 or experts % groups or not 1 <= used <= groups)
    ):
        raise FormatError(f"{path}: expert groups {used} of {groups} do not fit {experts} experts")


def _match_layers(path: str, model: Any, store: ExpertStore, config: Any) -> list[_MoeLayer]:
    """Each experts module with its store layer, in model order."""
    if store.layout == "slab" and store.kind != "gguf":
        raise FormatError(f"{path}: a slab store holds only experts; the runtime needs the Hugging Face checkpoint")
    modules: dict[int, tuple[str, torch.nn.Module]] = {}
    for name, module in _hf.experts_modules(model):
        match = _LAYER.search(f".{name}")
        if match is None:
            raise UnsupportedModelError(f"{path}: experts module {name!r} is not under a numbered layer")
        modules[int(match.group(1))] = (name, module)
    layers_in_model = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    stored = {index for index in store.layer_indices if not layers_in_model or index < layers_in_model}
    extra = sorted(set(store.layer_indices) - stored)
    if extra:  # e.g. DeepSeek-V3's multi-token-prediction layer: the causal-LM class has no such layer
        log.info("%s: MoE layers %s are beyond the model's %d layers; not served", path, extra, layers_in_model)
    if stored != set(modules):
        raise FormatError(
            f"{path}: the checkpoint has experts in layers {sorted(stored)}, the "
            f"{type(model).__name__} model in layers {sorted(modules)}"
        )
    matched = []
    for index in sorted(modules):
        name, module = modules[index]
        experts = store.layer(index)
        matched.append(_MoeLayer(name, module, experts, _layout(path, name, module, experts)))
    return matched


def _capacities(
    capacity: int | Sequence[int] | None, budget_nbytes: int | None, layers: Sequence[_MoeLayer], dtype: torch.dtype
) -> list[int]:
    experts = [layer.layout.num_experts for layer in layers]
    if budget_nbytes is not None:
        if type(budget_nbytes) is not int or budget_nbytes < 0:
            raise RuntimeConfigError(f"budget_nbytes must be a non-negative integer, got {budget_nbytes!r}")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        expert_nbytes = max(layer.layout.expert_nbytes(itemsize) for layer in layers)
        per_layer = capacity_from_budget(budget_nbytes, 0, expert_nbytes, len(layers), max(experts))
        if per_layer < 1:
            raise RuntimeConfigError(
                f"budget of {budget_nbytes} bytes is too small for one expert per layer: {len(layers)} MoE layers "
                f"x {expert_nbytes} bytes per expert ({dtype}) need at least {len(layers) * expert_nbytes}"
            )
        return [min(per_layer, count) for count in experts]
    if capacity is None:
        return experts
    wanted = [capacity] * len(layers) if isinstance(capacity, int) else list(capacity)
    if len(wanted) != len(layers):
        raise RuntimeConfigError(f"{len(wanted)} capacities for {len(layers)} MoE layers")
    for value in wanted:
        if type(value) is not int or value < 1:
            raise RuntimeConfigError(f"capacity must be at least one expert per layer, got {value!r}")
    return [min(value, count) for value, count in zip(wanted, experts, strict=True)]


def _weight_plan(
    path: str,
    model: Any,
    store: ExpertStore,
    layers: Sequence[_MoeLayer],
    quantized: str | None = None,
    gguf: GgufSource | None = None,
) -> dict[str, str]:
    """``model key -> checkpoint tensor`` for every non-expert parameter and buffer.

    Raises
    ------
    FormatError
        A non-expert weight of the model is in no checkpoint tensor (and is
        not tied to one that is).
    """
    expert_prefixes = tuple(f"{layer.name}." for layer in layers)
    meta = model.state_dict()
    if gguf is not None:  # GGUF names; quantized tensors are decoded at load
        plan = gguf.plan(store, [layer.experts.layer_index for layer in layers], expert_prefixes)
    else:
        plan = _checkpoint_plan(path, model, store, meta, expert_prefixes)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [key for key in meta if key not in plan and key not in tied and not key.startswith(expert_prefixes)]
    if missing:
        names = f"{missing[:8]}{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}"
        if quantized is not None:
            raise UnsupportedModelError(
                f"{path}: no plain checkpoint tensor for model weights {names}: the checkpoint is quantized "
                f"(quant_method {quantized!r}) beyond its routed experts, and the runtime dequantizes those only"
            )
        raise FormatError(f"{path}: no checkpoint tensor for model weights {names}")
    return plan


# -- loading -------------------------------------------------------------------
def _checkpoint_plan(
    path: str, model: Any, store: ExpertStore, meta: dict[str, torch.Tensor], expert_prefixes: tuple[str, ...]
) -> dict[str, str]:
    """``model key -> tensor`` of a Hugging Face checkpoint (its names through transformers' key mapping).

    Raises
    ------
    UnsupportedModelError
        A weight outside the routed experts is quantized.
    """
    mapper = _hf.key_mapper(model)
    plan: dict[str, str] = {}
    for tensor in store.tensors:
        key, converted = mapper(tensor)
        if converted or key is None or key.startswith(expert_prefixes):
            continue  # routed experts (served by the pools), or a tensor the model has no place for
        stored = store.view(tensor).dtype  # a header lookup: no weight is read
        wanted = meta[key].dtype if key in meta else None
        if wanted is not None and wanted.is_floating_point and (stored.itemsize == 1 or stored.kind in "iub"):
            raise UnsupportedModelError(
                f"{path}: {tensor} is {stored} (quantized) for the model's {wanted} {key!r}; the runtime "
                "dequantizes routed experts only, every other weight must be plain"
            )
        plan[key] = tensor
    return plan


def _set_tensor(root: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``key`` (a parameter or buffer name), marked initialized for transformers."""
    owner_name, _, name = key.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    tensor: torch.Tensor
    if name in owner._parameters:
        tensor = torch.nn.Parameter(value, requires_grad=False)
        owner._parameters[name] = tensor
    else:
        tensor = value
        owner._buffers[name] = tensor
    tensor._is_hf_initialized = True  # type: ignore[attr-defined]  # transformers' init skips these


def _load_non_experts(
    model: Any, store: ExpertStore, plan: dict[str, str], device: torch.device, gguf: GgufSource | None = None
) -> int:
    """Copy every planned tensor from the mapping to ``device``; return the bytes placed."""
    override = _hf.dtype_overrides(model, model.dtype)
    meta = model.state_dict()
    placed = 0
    for key, tensor_name in plan.items():
        empty = meta[key]
        source = (
            as_tensor(store.view(tensor_name)) if gguf is None else torch.from_numpy(gguf.values(store, tensor_name))
        )
        if tuple(source.shape) != tuple(empty.shape):
            raise FormatError(
                f"{store.path}: tensor {tensor_name!r} is {list(source.shape)}, the model's {key!r} "
                f"is {list(empty.shape)}"
            )
        dtype = override(key) or empty.dtype
        # Never alias the read-only mapping; decoded GGUF values are a fresh array already.
        value = source.to(device=device, dtype=dtype, copy=gguf is None)
        _set_tensor(model, key, value)
        placed += value.numel() * value.element_size()
    return placed


def _finish(model: Any, device: torch.device, path: str) -> None:
    """Tie, materialize non-persistent buffers (transformers recomputes them), check nothing is left on meta."""
    model.tie_weights()
    for key, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            _set_placeholder(model, key, torch.empty_like(buffer, device=device))
    model.initialize_weights()
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise FormatError(f"{path}: model tensors {left[:8]} were not loaded")
    generation = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)


def _set_placeholder(root: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    owner_name, _, name = key.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._buffers[name] = value
