"""Every family opens with correct values, in the right orientation, for every dtype."""

from __future__ import annotations

import gc
import os

import ml_dtypes
import numpy as np
import pytest
from builders import pack_safetensors, write_bytes, write_family

import mmapstore
from mmapstore import (
    ExpertIndexError,
    LayerNotFoundError,
    StoreClosedError,
    TensorNotFoundError,
    geometries_of,
    open_store,
    plan_full_push,
)
from mmapstore._mapping import resident_nbytes

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "llada2_moe", "gpt_oss", "llama4"]
ALL_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint8,
    np.bool_,
]
LIBRARY_DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int8, np.uint8, np.bool_]
SHAPE = {"layers": 2, "experts": 4, "hidden": 12, "ffn": 6}


def expected_slabs(family: str, arrays: dict[str, np.ndarray], layer: int, expert: int) -> dict[str, np.ndarray]:
    """The [k, n] slabs, computed from the written arrays by the family's own rules."""
    if family in ("gpt_oss", "llama4"):
        block = "mlp" if family == "gpt_oss" else "feed_forward"
        fused = arrays[f"model.layers.{layer}.{block}.experts.gate_up_proj"][expert]
        ffn = fused.shape[1] // 2
        gate, up = (fused[:, 0::2], fused[:, 1::2]) if family == "gpt_oss" else (fused[:, :ffn], fused[:, ffn:])
        down = arrays[f"model.layers.{layer}.{block}.experts.down_proj"][expert]
        return {"gate": gate, "up": up, "down": down}
    if family == "mixtral":
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        names = {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    return {proj: arrays[f"{prefix}.{name}.weight"].T for proj, name in names.items()}


def check_store(path: str, family: str, arrays: dict[str, np.ndarray]) -> None:
    with open_store(path) as store:
        expected_layers = [1] if family == "deepseek_v3" else [0, 1]  # DeepSeek's layer 0 is dense
        assert store.layer_indices == expected_layers
        assert store.num_layers == len(expected_layers)
        for layer in store.layers:
            assert layer.gate.num_experts == SHAPE["experts"]
            assert (layer.gate.k, layer.gate.n) == (SHAPE["hidden"], SHAPE["ffn"])
            assert (layer.down.k, layer.down.n) == (SHAPE["ffn"], SHAPE["hidden"])
            for expert in range(layer.num_experts):
                want = expected_slabs(family, arrays, layer.layer_index, expert)
                for proj, stack in layer.stacks:
                    got = stack.expert(expert)
                    assert got.shape == (stack.k, stack.n)
                    assert got.dtype == want[proj].dtype
                    assert not got.flags.writeable
                    np.testing.assert_array_equal(got, want[proj], err_msg=f"{family} {proj} e{expert}")
                    assert stack.weight_nbytes == got.nbytes


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
def test_hand_packed_family_every_dtype(tmp_path, family, dtype):
    arrays = write_family(tmp_path, family, np.dtype(dtype), via="packed", **SHAPE)
    check_store(str(tmp_path), family, arrays)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", LIBRARY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_library_written_family(tmp_path, family, dtype):
    arrays = write_family(tmp_path, family, np.dtype(dtype), via="library", **SHAPE)
    check_store(str(tmp_path), family, arrays)


def test_single_file_and_plain_directory(tmp_path):
    arrays = write_family(tmp_path / "sharded", "olmoe", np.dtype(np.float32), via="packed", shards=1, **SHAPE)
    single = write_bytes(tmp_path / "model.safetensors", pack_safetensors(arrays))
    check_store(single, "olmoe", arrays)
    plain = tmp_path / "plain"
    plain.mkdir()
    write_bytes(plain / "a.safetensors", pack_safetensors(dict(list(arrays.items())[:40])))
    write_bytes(plain / "b.safetensors", pack_safetensors(dict(list(arrays.items())[40:])))
    check_store(str(plain), "olmoe", arrays)


def test_fused_layout_follows_config_model_type(tmp_path):
    """model_type decides interleaved against concatenated; without it the split is refused."""
    arrays = write_family(tmp_path, "gpt_oss", np.dtype(np.float32), via="packed", **SHAPE)
    with open_store(tmp_path) as store:
        assert store.layout == "fused_interleaved"
        layer = store.layers[0]
        assert all(set(stack.parts) == {"weight", "bias"} for _, stack in layer.stacks)
        bias = arrays["model.layers.0.mlp.experts.gate_up_proj_bias"]
        for expert in range(SHAPE["experts"]):
            np.testing.assert_array_equal(layer.up.part("bias", expert), bias[expert, 1::2])
            np.testing.assert_array_equal(layer.gate.part("bias", expert), bias[expert, 0::2])
            np.testing.assert_array_equal(
                layer.down.part("bias", expert), arrays["model.layers.0.mlp.experts.down_proj_bias"][expert]
            )
    (tmp_path / "config.json").write_text(f'{{"model_type": "llama4_text", "hidden_size": {SHAPE["hidden"]}}}')
    with open_store(tmp_path) as store:
        assert store.layout == "fused_concatenated"
    os.remove(tmp_path / "config.json")
    with pytest.raises(mmapstore.FormatError, match="cannot tell whether gate and up are interleaved"):
        open_store(tmp_path)


def test_views_share_memory_with_the_mapping(tmp_path):
    arrays = write_family(tmp_path, "mixtral", np.dtype(np.float32), via="packed", **SHAPE)
    with open_store(tmp_path) as store:
        stack = store.layers[0].gate
        view = stack.expert(2)
        mapped = stack.part_span("weight", 2).mapped
        low = view.__array_interface__["data"][0]
        assert mapped.address <= low < mapped.address + mapped.nbytes
        assert view.base is not None
        assert not stack.native(2).flags.owndata
        with pytest.raises(ValueError):
            view[0, 0] = 1
        # one mapping per file, shared by every view of that file
        assert len(store.mapped_files()) <= 2
        raw = store.view("model.layers.0.block_sparse_moe.experts.2.w1.weight")
        np.testing.assert_array_equal(raw, arrays["model.layers.0.block_sparse_moe.experts.2.w1.weight"])


def test_close_is_clean_and_refuses_new_views(tmp_path):
    arrays = write_family(tmp_path, "mixtral", np.dtype(np.float32), via="packed", **SHAPE)
    store = open_store(tmp_path)
    kept = store.layers[0].up.expert(1)
    store.close()
    assert store.closed
    store.close()  # idempotent
    with pytest.raises(StoreClosedError):
        store.layers[0].up.expert(0)
    # a view taken before close stays valid (the mapping lives with it)
    np.testing.assert_array_equal(kept, arrays["model.layers.0.block_sparse_moe.experts.1.w3.weight"].T)
    del kept
    gc.collect()
    with open_store(tmp_path) as again:
        assert not again.closed
    assert again.closed


def test_lookup_errors_are_typed(tmp_path):
    write_family(tmp_path, "deepseek_v3", np.dtype(np.float32), via="packed", **SHAPE)
    with open_store(tmp_path) as store:
        with pytest.raises(LayerNotFoundError) as info:
            store.layer(0)  # dense layer
        assert isinstance(info.value, KeyError) and "MoE layers are [1]" in str(info.value)
        with pytest.raises(TensorNotFoundError):
            store.view("nope")
        stack = store.layer(1).down
        for bad in (4, -1, 1.0, "1", True):
            with pytest.raises(ExpertIndexError) as error:
                stack.expert(bad)
            assert isinstance(error.value, IndexError)
        assert stack.expert(np.int64(3)).shape == (stack.k, stack.n)
        assert issubclass(mmapstore.FormatError, ValueError)


def test_sparse_file_of_tens_of_gb_opens_instantly_without_disk(tmp_path):
    from mmapstore._dtypes import dtype_from_code
    from mmapstore.formats import SafetensorsWriter, TensorSpec

    bf16 = dtype_from_code("BF16")
    experts, hidden, ffn = 64, 4096, 2048
    specs = [
        TensorSpec(
            f"blk.{layer}.ffn_{proj}_exps.weight",
            bf16,
            (experts, hidden, ffn) if proj != "down" else (experts, ffn, hidden),
        )
        for layer in range(16)
        for proj in ("gate", "up", "down")
    ]
    path = str(tmp_path / "huge.safetensors")
    with SafetensorsWriter(path, specs, align=4096, sparse=True):
        pass
    size = os.stat(path).st_size
    assert size > 40e9
    assert os.stat(path).st_blocks * 512 < 1 << 20  # nothing allocated
    with open_store(path) as store:
        assert store.num_layers == 16
        slab = store.layer(7).up.expert(63)
        assert slab.shape == (hidden, ffn)
        assert resident_nbytes(slab) == 0  # opening and viewing read nothing
        assert float(np.asarray(slab[0, :4], dtype=np.float32).sum()) == 0.0  # holes read as zeros
    assert os.stat(path).st_blocks * 512 < 1 << 20


def test_per_expert_adjacent_slabs_give_one_range_view(tmp_path):
    arrays = write_family(tmp_path, "olmoe", np.dtype(np.float32), via="packed", shards=1, **SHAPE)
    with open_store(tmp_path) as store:
        stack = store.layers[0].gate
        # experts are interleaved with up/down in the file: never evenly spaced
        assert stack.geometry.stride is None and stack.geometry.run_of(0, 2) is None
        table = plan_full_push(geometries_of(store)).table
        rows = [row for row in range(table.rows) if table.param_name(row) == "blk.0.ffn_gate_exps.weight"]
        assert table.count[rows].tolist() == [1] * stack.num_experts  # one row per expert, none coalesced
        single = store.byte_source().view(table, rows[1])
        np.testing.assert_array_equal(single[0], arrays["model.layers.0.mlp.experts.1.gate_proj.weight"])
