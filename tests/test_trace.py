"""Trace values, .npz files, importers and synthetic generators."""

from __future__ import annotations

import numpy as np
import pytest

from mmapstore import CapturedIdsError, FormatError, from_llama_csv, from_step_array, from_vllm
from mmapstore._trace import Phase, Trace, load_trace, save_trace
from mmapstore._trace_synth import (
    adjacent_cosine,
    block_diffusion_trace,
    bursty_trace,
    recency_trace,
    uniform_trace,
    zipf_trace,
)


def small_trace() -> Trace:
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 1], [0, 2]]])  # 3 rows, 2 layers, top-2
    return Trace.build(ids, [0, 2, 3], phase=[Phase.PREFILL, Phase.DECODE], weights=np.ones(ids.shape))


def test_hit_counts_are_per_step_layer_expert():
    counts = small_trace().hit_counts([4, 4])
    np.testing.assert_array_equal(counts[0, 0], [1, 2, 1, 0])
    np.testing.assert_array_equal(counts[0, 1], [1, 0, 1, 2])
    np.testing.assert_array_equal(counts[1, 0], [0, 1, 0, 1])
    assert counts.sum() == 3 * 2 * 2


def test_ids_beyond_the_models_experts_are_refused():
    with pytest.raises(CapturedIdsError, match="expert 3, the model has 3"):
        small_trace().hit_counts([4, 3])
    with pytest.raises(CapturedIdsError, match="2 MoE layers, the model has 3"):
        small_trace().check_experts([4, 4, 4])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ids": np.zeros((2, 2)), "step_offsets": [0, 2]}, "rows, layers, top_k"),
        ({"ids": np.zeros((2, 1, 1)), "step_offsets": [0, 2]}, "integers"),
        ({"ids": np.zeros((2, 1, 1), int), "step_offsets": [0, 3]}, "rise from 0 to 2"),
        ({"ids": np.zeros((2, 1, 1), int), "step_offsets": [0, 2, 1, 2]}, "rise from 0"),
        ({"ids": -np.ones((2, 1, 1), int), "step_offsets": [0, 2]}, "negative"),
        ({"ids": np.zeros((2, 1, 1), int), "step_offsets": [0, 2], "phase": [7]}, "phase codes"),
        ({"ids": np.zeros((2, 1, 1), int), "step_offsets": [0, 1, 2], "block": [0]}, "block must be 2"),
        ({"ids": np.zeros((2, 1, 1), int), "step_offsets": [0, 2], "weights": np.ones((2, 1, 2))}, "weights"),
    ],
)
def test_malformed_arrays_are_refused_naming_the_array(kwargs, match):
    with pytest.raises(FormatError, match=match):
        Trace.build(**kwargs)


@pytest.mark.parametrize("mmap", [False, True])
def test_npz_round_trip(tmp_path, mmap):
    trace = small_trace()
    path = tmp_path / "t.npz"
    save_trace(trace, path)
    loaded = load_trace(path, mmap=mmap)
    np.testing.assert_array_equal(loaded.ids, trace.ids)
    np.testing.assert_array_equal(loaded.step_offsets, trace.step_offsets)
    np.testing.assert_array_equal(loaded.phase, trace.phase)
    np.testing.assert_array_equal(loaded.weights, trace.weights)
    assert loaded.layer_indices == trace.layer_indices
    if mmap:
        assert not loaded.ids.flags.writeable and not loaded.ids.flags.owndata


def test_not_a_trace_file(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, ids=np.zeros(3))
    with pytest.raises(FormatError, match="'format' is missing"):
        load_trace(other)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(FormatError, match="junk.npz"):
        load_trace(junk)


def test_vllm_prompt_is_one_prefill_step_and_tokens_decode():
    prompt = np.array([[[0, 1]], [[2, 3]], [[1, 2]]])  # 3 tokens, 1 layer, top-2
    generated = np.array([[[3, 0]], [[1, 3]]])
    trace = from_vllm([(prompt, generated), generated])
    assert trace.num_steps == 1 + 2 + 2
    assert trace.phase.tolist() == [Phase.PREFILL, Phase.DECODE, Phase.DECODE, Phase.DECODE, Phase.DECODE]
    np.testing.assert_array_equal(trace.step_ids(0), prompt)
    np.testing.assert_array_equal(trace.step_ids(4), generated[1:])


@pytest.mark.parametrize(
    ("requests", "match"),
    [
        ([np.zeros((3, 2))], "request 0 routed_experts: expected a 3-d array"),
        ([np.zeros((3, 2, 2), np.float32)], "request 0 routed_experts: expected integer"),
        ([np.zeros((3, 2, 2), int), np.zeros((3, 4, 2), int)], "request 1 routed_experts"),
        ([np.array([[[0, -4]]])], r"negative expert id -4 at index \(0, 0, 1\)"),
        ([], "no requests"),
    ],
)
def test_vllm_malformed_requests(requests, match):
    with pytest.raises(FormatError, match=match):
        from_vllm(requests)


def test_step_array_import():
    array = np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2) % 7  # steps, layers, tokens, top_k
    trace = from_step_array(array)
    assert (trace.num_steps, trace.num_layers, trace.top_k) == (2, 3, 2)
    np.testing.assert_array_equal(trace.step_ids(1), array[1].transpose(1, 0, 2))
    with pytest.raises(FormatError, match="array: expected a 4-d array"):
        from_step_array(array[0])


def test_llama_csv_forwards_split_where_the_layer_drops(tmp_path):
    path = tmp_path / "moe_trace.csv"
    # forward 1: 2 tokens x top-2 on layers 0 and 3; forward 2: 1 token.
    rows = ["layer,expert", "0,1", "0,2", "0,5", "0,4", "3,0", "3,7", "3,1", "3,2", "0,6", "0,1", "3,3", "3,4"]
    path.write_text("\n".join(rows) + "\n")
    trace = from_llama_csv(path, top_k=2)
    assert trace.num_steps == 2 and trace.layer_indices == (0, 3)
    np.testing.assert_array_equal(trace.step_ids(0)[:, 0], [[1, 2], [5, 4]])
    np.testing.assert_array_equal(trace.step_ids(0)[:, 1], [[0, 7], [1, 2]])
    np.testing.assert_array_equal(trace.step_ids(1), [[[6, 1], [3, 4]]])
    assert trace.phase.tolist() == [Phase.PREFILL, Phase.DECODE]


def test_llama_csv_with_a_step_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("step,layer,expert\n0,0,1\n0,0,2\n1,0,3\n1,0,0\n")
    trace = from_llama_csv(path, top_k=2)
    assert trace.num_steps == 2
    np.testing.assert_array_equal(trace.step_ids(1), [[[3, 0]]])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("layer,expert\n0,1\n0,x\n", "line 3: not integers"),
        ("layer,expert\n0,1,2\n", "line 2: 3 fields, expected 2"),
        ("0,1\n0,-2\n", "line 2: negative"),
        ("layer,expert\n0,1\n0,2\n1,3\n", "forward starting at line 2: rows per layer"),
        ("layer,expert\n0,1\n", "expected the same multiple of top_k=2"),
        ("lair,expert\n0,1\n", "line 1: header"),
        ("layer,expert\n", "no routing rows"),
        ("step,layer,expert\n1,0,1\n1,0,2\n0,0,1\n0,0,1\n", "line 4: step 0 after step 1"),
    ],
)
def test_llama_csv_malformed_names_the_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(FormatError, match=match) as info:
        from_llama_csv(path, top_k=2)
    assert "bad.csv" in str(info.value)


@pytest.mark.parametrize("maker", [uniform_trace, zipf_trace, recency_trace, bursty_trace])
def test_generators_are_deterministic_and_valid(maker):
    first = maker(20, 3, 16, 4, tokens=2, seed=5)
    second = maker(20, 3, 16, 4, tokens=2, seed=5)
    np.testing.assert_array_equal(first.ids, second.ids)
    assert first.ids.shape == (40, 3, 4)
    ids = np.asarray(first.ids)
    assert ids.min() >= 0 and ids.max() < 16
    assert all(np.unique(row).size == 4 for row in ids.reshape(-1, 4))  # Top-K ids never repeat


def test_block_diffusion_hits_its_target_cosine():
    trace = block_diffusion_trace(3, 12, 2, 32, 4, tokens=32, cosine=0.985, seed=2)
    assert trace.num_steps == 36 and set(trace.phase.tolist()) == {Phase.DENOISE}
    assert trace.block.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    assert adjacent_cosine(trace, 32) == pytest.approx(0.985, abs=0.01)
    uniform = uniform_trace(36, 2, 32, 4, tokens=32)
    assert adjacent_cosine(uniform, 32) < 0.9
