"""The transformers runtime: tiny random models of every family, compared with the stock model on CPU."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers runtime needs torch (the dev extra installs it)")
transformers = pytest.importorskip("transformers", reason="the transformers runtime needs transformers 5")
if not hasattr(transformers, "integrations") or not hasattr(
    __import__("transformers.integrations.moe", fromlist=["ExpertsInterface"]), "ExpertsInterface"
):
    pytest.skip("transformers without the experts interface (needs 5.x)", allow_module_level=True)

from mmapstore import FormatError, MmapStoreError  # noqa: E402
from mmapstore._errors import RuntimeConfigError, StaleRefreshError, UnsupportedModelError  # noqa: E402
from mmapstore._store.store import ExpertStore  # noqa: E402
from mmapstore._trace import Phase, load_trace  # noqa: E402
from mmapstore.cli import main  # noqa: E402
from mmapstore.transformers import BACKEND_NAME, load_model  # noqa: E402
from mmapstore.transformers._backend import mmapstore_experts_forward  # noqa: E402
from mmapstore.transformers._layer import OnMiss  # noqa: E402
from mmapstore.transformers._loader import _on_miss  # noqa: E402
from mmapstore.transformers._slots import SlotWriter  # noqa: E402

EXPERTS = 8
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
LLAMA4 = dict(SMALL, intermediate_size=16, intermediate_size_mlp=24, num_local_experts=EXPERTS, head_dim=8)


def configs() -> dict[str, object]:
    t = transformers
    return {
        "mixtral": t.MixtralConfig(**SMALL, intermediate_size=16, num_local_experts=EXPERTS, num_experts_per_tok=2),
        "qwen2_moe": t.Qwen2MoeConfig(
            **SMALL,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            intermediate_size=24,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
        ),
        "qwen3_moe": t.Qwen3MoeConfig(
            **SMALL,
            moe_intermediate_size=16,
            intermediate_size=24,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            head_dim=8,
        ),
        "deepseek_v3": t.DeepseekV3Config(
            **SMALL,
            moe_intermediate_size=16,
            intermediate_size=24,
            n_routed_experts=EXPERTS,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=8,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        ),
        "olmoe": t.OlmoeConfig(**SMALL, intermediate_size=16, num_experts=EXPERTS, num_experts_per_tok=2),
        "gpt_oss": t.GptOssConfig(
            **SMALL, intermediate_size=16, num_local_experts=EXPERTS, num_experts_per_tok=2, head_dim=8
        ),
        "llama4_text": t.Llama4TextConfig(**LLAMA4, num_experts_per_tok=1),
        # Maverick's pattern: a dense layer, then a MoE one
        "llama4_top2": t.Llama4TextConfig(**LLAMA4, num_experts_per_tok=2, interleave_moe_layer_step=2),
        # MoE whose experts are not in the experts interface (mixture of attention heads and MLP experts)
        "jetmoe": t.JetMoeConfig(
            **{key: value for key, value in SMALL.items() if key != "num_attention_heads"},
            kv_channels=8,
            intermediate_size=16,
            num_local_experts=EXPERTS,
            num_experts_per_tok=2,
        ),
    }


# Families dispatched through transformers' experts interface: the stock model runs the same kernels.
INTERFACE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]
# Llama-4's stock block runs every expert on every token in one batched matmul; the runtime runs the
# routed pairs only (mmapstore.transformers._llama4), equal up to the matmul kernels' rounding.
SERVED = [*INTERFACE, "llama4_text", "llama4_top2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family saved with ``save_pretrained`` (float32, random weights with a visible spread)."""
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for index, (family, config) in enumerate(configs().items()):
        torch.manual_seed(index)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "experts" in name:  # spread the experts apart, so a wrong expert shows in the logits
                    parameter.normal_(0.0, 0.2)
        paths[family] = str(root / family)
        model.save_pretrained(paths[family])
    return paths


_STOCK: dict[tuple[str, object], object] = {}


def stock(path: str, dtype=torch.float32):
    key = (path, dtype)
    if key not in _STOCK:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        _STOCK[key] = model.eval()
    return _STOCK[key]


def prompt(batch: int = 2, length: int = 7, seed: int = 0):
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, new_tokens: int = 8):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", SERVED)
@pytest.mark.parametrize("capacity", [1, 3, EXPERTS])
def test_logits_and_greedy_tokens_equal_the_stock_model(checkpoints, family, capacity):
    path = checkpoints[family]
    reference = stock(path)
    ids = prompt()
    with load_model(path, capacity=capacity, every=2, dtype=torch.float32) as loaded:
        if family in INTERFACE:
            assert loaded.model.config._experts_implementation == BACKEND_NAME
        torch.testing.assert_close(logits(loaded.model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy(loaded.model, ids), greedy(reference, ids))
        stats = loaded.stats()
    assert stats.pairs > 0
    if capacity < EXPERTS:
        assert stats.cpu_pairs > 0, "a pool smaller than the experts must send some tokens to the CPU path"
    else:
        assert (stats.hit_rate, stats.cpu_pairs, stats.copied_nbytes) == (1.0, 0, 0)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_fetch_on_miss_equals_the_stock_model(checkpoints, family):
    path = checkpoints[family]
    ids = prompt(batch=1, length=5, seed=3)
    with load_model(path, capacity=2, on_miss="fetch", dtype=torch.float32) as loaded:
        assert torch.equal(greedy(loaded.model, ids, 10), greedy(stock(path), ids, 10))
        stats = loaded.stats()
    assert stats.promotions > 0 and stats.copied_nbytes > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", INTERFACE)
def test_fetch_is_bit_identical_to_the_stock_model_at_every_capacity(checkpoints, family, dtype):
    path = checkpoints[family]
    reference = stock(path, dtype)
    ids = prompt(batch=2, length=7, seed=11)
    want_logits, want_tokens = logits(reference, ids), greedy(reference, ids, 5)
    chunked = 0
    for capacity in range(1, EXPERTS + 1):
        with load_model(path, capacity=capacity, on_miss="fetch", dtype=dtype) as loaded:
            assert torch.equal(logits(loaded.model, ids), want_logits), f"capacity {capacity}"
            assert torch.equal(greedy(loaded.model, ids, 5), want_tokens), f"capacity {capacity}"
            stats = loaded.stats()
        assert stats.cpu_pairs == 0 and stats.pairs == stats.resident_pairs + stats.fetched_pairs
        if capacity < EXPERTS:
            assert stats.fetched_pairs > 0 and stats.copied_nbytes > 0
        chunked += stats.chunked_forwards
    assert chunked > 0, "a 14-token prompt over 8 experts must route past the smaller pools"


def test_fetch_is_the_default_on_cuda_and_cpu_on_miss_on_the_cpu(checkpoints):
    with load_model(checkpoints["olmoe"], capacity=2, dtype=torch.float32) as loaded:
        assert {layer.on_miss for layer in loaded.layers} == {OnMiss.CPU}
    assert _on_miss(None, torch.device("cuda", 0)) is OnMiss.FETCH
    assert _on_miss(None, torch.device("cpu")) is OnMiss.CPU
    assert _on_miss("cpu", torch.device("cuda", 0)) is OnMiss.CPU


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_plain_slabs_go_through_the_device_copier_as_byte_jobs(checkpoints, family):
    from mmapstore.gpu import DeviceCopier

    path = checkpoints[family]
    ids = prompt(batch=1, length=6, seed=4)
    with load_model(path, capacity=2, on_miss="fetch", dtype=torch.float32) as loaded:
        copier = DeviceCopier(torch.device("cpu"))
        writer = SlotWriter(torch.device("cpu"), copier=copier)
        for layer in loaded.layers:
            layer.writer = writer
        assert torch.equal(greedy(loaded.model, ids, 6), greedy(stock(path), ids, 6))
        copied = loaded.stats().copied_nbytes
        moved = copier.stats.nbytes.get("direct", 0)
        reference = stock(path)
        for layer in loaded.layers:
            module = reference.get_submodule(next(n for n, m in loaded.model.named_modules() if m is layer.module))
            for expert, slot in enumerate(layer.slot_map.tolist()):
                if slot >= 0:
                    assert torch.equal(layer.gate_up[slot], module.gate_up_proj[expert])
                    assert torch.equal(layer.down[slot], module.down_proj[expert])
        writer.close()
    if family == "mixtral":  # per-expert [out, in] tensors: every slab is the slot's bytes
        assert moved == copied > 0
    else:  # GPT-OSS's interleaved halves are strided: torch lays them out; only the biases are plain
        assert 0 < moved < copied


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_bfloat16_equals_the_stock_model_in_bfloat16(checkpoints, family):
    path = checkpoints[family]
    ids = prompt(batch=1, length=6, seed=5)
    reference = stock(path, torch.bfloat16)
    with load_model(path, capacity=2, dtype="bfloat16") as loaded:
        ours = logits(loaded.model, ids)
        assert ours.dtype == torch.bfloat16 and loaded.layers[0].gate_up.dtype == torch.bfloat16
        torch.testing.assert_close(ours, logits(reference, ids), rtol=2e-2, atol=2e-2)
        assert torch.equal(greedy(loaded.model, ids, 6), greedy(reference, ids, 6))


def test_refreshes_on_prefill_and_every_n_decode_steps(checkpoints):
    with load_model(checkpoints["qwen3_moe"], capacity=2, every=2, dtype=torch.float32) as loaded:
        greedy(loaded.model, prompt(batch=1), new_tokens=7)  # 1 prefill + decode steps 1..6
        stats = loaded.stats()
        assert (stats.prefill_forwards, stats.decode_forwards) == (1, 6)
        assert stats.refreshes == 2 * (1 + 3)  # per layer: the prefill, decode steps 2, 4, 6
        loaded.reset_stats()
        greedy(loaded.model, prompt(batch=1), new_tokens=2)  # a new prompt refreshes again
        assert loaded.stats().refreshes == 2 * 1


def test_pool_slots_hold_exactly_the_stores_experts(checkpoints):
    path = checkpoints["gpt_oss"]  # fused, interleaved, transposed, with biases: the hardest layout
    with load_model(path, capacity=3, on_miss="fetch", dtype=torch.float32) as loaded:
        greedy(loaded.model, prompt(), new_tokens=5)
        reference = stock(path)
        for layer in loaded.layers:
            module = reference.get_submodule(next(n for n, m in loaded.model.named_modules() if m is layer.module))
            for expert, slot in enumerate(layer.slot_map.tolist()):
                if slot < 0:
                    continue
                assert torch.equal(layer.gate_up[slot], module.gate_up_proj[expert])
                assert torch.equal(layer.down[slot], module.down_proj[expert])
                assert torch.equal(layer.gate_up_bias[slot], module.gate_up_proj_bias[expert])
                assert torch.equal(layer.down_bias[slot], module.down_proj_bias[expert])
            assert sorted(np.flatnonzero(layer.slot_map >= 0).tolist()) == sorted(
                layer.pool.resident_experts().tolist()
            )


def test_routed_experts_are_never_materialized_in_full(checkpoints):
    path = checkpoints["mixtral"]
    with load_model(path, capacity=2, dtype=torch.float32) as loaded:
        expert_params = {name: tensor for name, tensor in loaded.model.named_parameters() if ".experts." in f".{name}."}
        assert expert_params and all(tensor.shape[0] == 2 for tensor in expert_params.values())
        state = loaded.model.state_dict(keep_vars=True)
        total = sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())
        stats = loaded.stats()
        assert total == loaded.non_expert_nbytes + stats.pool_nbytes
        assert stats.pool_nbytes == 2 * loaded.layers[0].layout.expert_nbytes(4) * len(loaded.layers)
        full = sum(p.numel() * p.element_size() for p in stock(path).parameters())
        assert total < full


def test_trace_capture_records_the_routers_top_k(checkpoints, tmp_path):
    path = checkpoints["olmoe"]
    reference = stock(path)
    seen: list[list[np.ndarray]] = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args: seen[-1].append(args[1].numpy().copy()))
        for name, module in reference.named_modules()
        if name.endswith("mlp.experts")
    ]
    hooks.append(reference.register_forward_pre_hook(lambda module, args: seen.append([])))  # a step begins
    ids = prompt(batch=2, length=5)
    try:
        greedy(reference, ids, new_tokens=3)  # a prefill and two decode steps
    finally:
        for hook in hooks:
            hook.remove()
    trace_file = tmp_path / "run.npz"
    with load_model(path, capacity=2, trace_path=trace_file, dtype=torch.float32) as loaded:
        greedy(loaded.model, ids, new_tokens=3)
    trace = load_trace(trace_file)
    assert trace.num_steps == 3 and trace.layer_indices == (0, 1)
    assert trace.phase.tolist() == [Phase.PREFILL, Phase.DECODE, Phase.DECODE]
    assert trace.tokens().tolist() == [10, 2, 2]
    for step in range(3):
        expected = np.stack(seen[step], axis=1)  # [tokens, layers, top_k]
        np.testing.assert_array_equal(trace.step_ids(step), expected)


def test_run_command_generates_the_stock_tokens_and_its_trace_replays(checkpoints, tmp_path, capsys):
    path = checkpoints["qwen2_moe"]
    trace_file = str(tmp_path / "t.npz")
    code = main(
        [
            "run",
            path,
            "--prompt-ids",
            "5,9,2,40",
            "--capacity",
            "3",
            "--every",
            "2",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-new-tokens",
            "6",
            "--trace",
            trace_file,
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    expected = greedy(stock(path), torch.tensor([[5, 9, 2, 40]]), 6)[0, 4:].tolist()
    assert report["new_ids"] == expected
    assert 0.0 <= report["stats"]["hit_rate"] <= 1.0 and report["prompt_tokens"] == 4
    assert report["memory"]["peak_rss_nbytes"] > 0
    assert load_trace(trace_file).num_steps == 6
    assert main(["simulate", "--trace", trace_file, path, "--json"]) == 0
    capsys.readouterr()
    assert (
        main(["run", path, "--prompt-ids", "1,2", "--capacity", "2", "--device", "cpu", "--max-new-tokens", "2"]) == 0
    )
    text = capsys.readouterr().out
    assert "hit rate" in text and "tok/s" in text and "MB into the pools" in text


@pytest.fixture
def no_weight_read(monkeypatch):
    """Fail the test if any checkpoint tensor is viewed (bad input must be refused before that)."""

    def refuse(self, name):
        raise AssertionError(f"weight {name} read before the input was refused")

    monkeypatch.setattr(ExpertStore, "view", refuse)


def test_a_family_without_the_experts_interface_is_refused_by_name(checkpoints, no_weight_read):
    with pytest.raises(UnsupportedModelError, match=r"JetMoeForCausalLM.*jetmoe.*experts interface.*JetMoeMoA"):
        load_model(checkpoints["jetmoe"], capacity=2)


def test_llama4_traces_record_the_routers_top_k(checkpoints, tmp_path):
    """The adapted block hands the layers one row per pair; the trace still records each token's Top-K."""
    path = checkpoints["llama4_top2"]
    reference = stock(path)
    moe = [module for name, module in reference.named_modules() if type(module).__name__ == "Llama4TextMoe"]
    seen: list[torch.Tensor] = []
    hook = moe[0].router.register_forward_hook(
        lambda module, args, out: seen.append(torch.topk(out[1], 2, dim=1).indices)  # (scores, logits)
    )
    ids = prompt(batch=1, length=5)
    try:
        logits(reference, ids)
    finally:
        hook.remove()
    with load_model(path, capacity=2, trace_path=tmp_path / "t.npz", dtype=torch.float32) as loaded:
        logits(loaded.model, ids)
    trace = load_trace(tmp_path / "t.npz")
    assert trace.num_steps == 1 and len(trace.layer_indices) == 1
    np.testing.assert_array_equal(trace.step_ids(0)[:, 0, :], seen[0].numpy())


@pytest.mark.parametrize("family", ["llama4_text", "llama4_top2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_llama4_runs_only_the_routed_experts_and_matches_the_stock_block(checkpoints, family, dtype):
    path = checkpoints[family]
    reference = stock(path, dtype)
    ids = prompt(batch=2, length=7, seed=5)
    want = logits(reference, ids)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for capacity, on_miss in ((1, "fetch"), (3, "cpu"), (EXPERTS, "fetch")):
        with load_model(path, capacity=capacity, on_miss=on_miss, dtype=dtype) as loaded:
            torch.testing.assert_close(logits(loaded.model, ids), want, rtol=tolerance, atol=tolerance)
            stats = loaded.stats()  # of the one prompt forward
            moe_layers = len(loaded.layers)
            if dtype == torch.float32:
                assert torch.equal(greedy(loaded.model, ids, 5), greedy(reference, ids, 5))
                with torch.no_grad():  # the router module runs, so transformers records its logits
                    ours = loaded.model(ids, output_router_logits=True)
                    theirs = reference(ids, output_router_logits=True)
                if hasattr(theirs, "router_logits"):  # transformers releases that return them
                    assert len(ours.router_logits) == len(theirs.router_logits) == moe_layers
                    for a, b in zip(ours.router_logits, theirs.router_logits, strict=True):
                        # later layers' inputs differ by the kernels' rounding
                        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
        top_k = reference.config.num_experts_per_tok
        # every token's Top-K pairs and nothing else: the stock block computes all experts for every token
        assert stats.pairs == ids.numel() * top_k * moe_layers, (stats.pairs, moe_layers)
        assert moe_layers == (1 if family == "llama4_top2" else 2)
        if capacity < EXPERTS:
            assert stats.fetched_pairs + stats.cpu_pairs > 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"budget_nbytes": 1000}, RuntimeConfigError, "too small for one expert per layer"),
        ({"capacity": 0}, RuntimeConfigError, "at least one expert per layer"),
        ({"capacity": [2, 2, 2]}, RuntimeConfigError, "3 capacities for 2 MoE layers"),
        ({"device": "cuda:7"}, RuntimeConfigError, "cuda:7"),
        ({"device": "no-such-device"}, RuntimeConfigError, "not a device torch knows"),
        ({"device": "meta"}, RuntimeConfigError, "meta device"),
        ({"every": 0}, RuntimeConfigError, "positive integer"),
        ({"on_miss": "swap"}, RuntimeConfigError, "on_miss"),
        ({"source": "carrier-pigeon"}, RuntimeConfigError, "source must be one of"),
        ({"dtype": "int8"}, RuntimeConfigError, "floating-point"),
        ({"capacity": 2, "budget_nbytes": 1 << 20}, RuntimeConfigError, "not both"),
    ],
)
def test_bad_input_is_refused_before_any_weight_is_read(checkpoints, no_weight_read, kwargs, error, match):
    if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has an eighth GPU")
    with pytest.raises(error, match=match):
        load_model(checkpoints["mixtral"], **kwargs)


def test_unwritable_trace_paths_are_refused_before_any_weight_is_read(checkpoints, tmp_path, no_weight_read):
    with pytest.raises(RuntimeConfigError, match="does not exist"):
        load_model(checkpoints["mixtral"], trace_path=tmp_path / "missing" / "t.npz")
    with pytest.raises(RuntimeConfigError, match="is a directory"):
        load_model(checkpoints["mixtral"], trace_path=tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running with permissions that ignore the mode (root)")
    with pytest.raises(RuntimeConfigError, match="cannot be written"):
        load_model(checkpoints["mixtral"], trace_path=locked / "t.npz")


def test_a_directory_without_config_or_with_mismatched_experts_is_a_format_error(checkpoints, tmp_path):
    with pytest.raises(FormatError, match="no config.json"):
        load_model(tmp_path)
    # The config says 16 experts, the tensors hold 8.
    bent = with_config(checkpoints["mixtral"], tmp_path / "bent", {"num_local_experts": 16})
    with pytest.raises(FormatError, match=r"gate is \[8, 32, 16\], expected \[16, 32, 16\]"):
        load_model(bent, capacity=2)


def with_config(source: str, target, change: dict):
    """A copy of checkpoint ``source`` at ``target`` with ``change`` written over its config.json."""
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(source):
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | change))
    return target


def test_command_line_bad_input_exits_1_with_the_reason(checkpoints, capsys):
    assert main(["run", checkpoints["jetmoe"], "--device", "cpu", "--prompt-ids", "1"]) == 1
    assert "experts interface" in capsys.readouterr().err
    assert main(["run", checkpoints["mixtral"], "--device", "cpu", "--budget", "1K", "--prompt-ids", "1"]) == 1
    assert "too small for one expert per layer" in capsys.readouterr().err
    assert main(["run", checkpoints["mixtral"], "--device", "cpu", "--prompt-ids", "1,999"]) == 1
    assert "--prompt-ids" in capsys.readouterr().err


def test_the_backend_refuses_a_module_it_did_not_prepare(checkpoints):
    module = next(m for n, m in stock(checkpoints["mixtral"]).named_modules() if n.endswith("experts"))
    with pytest.raises(MmapStoreError, match="load_model"):
        mmapstore_experts_forward(module, torch.zeros(1, 32), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))


def test_llama4_multimodal_checkpoint_runs_its_text_model(tmp_path):
    """Llama-4 ships as Llama4ForConditionalGeneration (``language_model.`` keys, a vision tower): the
    runtime loads the causal-LM text model from it, as ``AutoModelForCausalLM.from_pretrained`` does."""
    text = dict(LLAMA4, num_experts_per_tok=1)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)  # fmt: skip
    torch.manual_seed(7)
    model = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text, vision_config=vision)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "experts" in name:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "scout")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "scout", dtype=torch.float32).eval()
    ids = prompt(batch=1, length=6, seed=2)
    with load_model(tmp_path / "scout", capacity=2, on_miss="fetch", dtype=torch.float32) as loaded:
        assert type(loaded.model).__name__ == "Llama4ForCausalLM"
        torch.testing.assert_close(logits(loaded.model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
        assert loaded.stats().fetched_pairs > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["mixtral", "llama4_text", "llama4_top2"])
def test_cuda_fetch_matches_the_stock_model_on_the_device(checkpoints, family):
    path = checkpoints[family]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    ids = prompt(batch=2, length=7, seed=9)
    with load_model(path, capacity=2, device="cuda", dtype=torch.float32) as loaded:
        assert {layer.on_miss for layer in loaded.layers} == {OnMiss.FETCH}
        got, want = logits(loaded.model, ids.cuda()), logits(reference, ids.cuda())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(greedy(loaded.model, ids.cuda(), 5), greedy(reference, ids.cuda(), 5))
        assert loaded.stats().fetched_pairs > 0


def test_a_fetch_that_fails_part_way_is_raised_and_its_pool_is_never_read_again(checkpoints):
    """A read error after the first slab of an expert: that slot holds half of the promoted expert while the
    pool still lists the demoted one there, so the layer refuses to run again."""
    with load_model(checkpoints["qwen3_moe"], capacity=2, on_miss="fetch") as loaded:
        writer = loaded.layers[0].writer
        slab, calls = type(writer).slab, []

        def failing(*args, **kwargs):
            calls.append(args)
            if len(calls) == 2:
                raise OSError("injected read error")
            return slab(writer, *args, **kwargs)

        writer.slab = failing
        with pytest.raises(OSError, match="injected read error"):
            greedy(loaded.model, prompt())
        broken = [layer for layer in loaded.layers if layer._broken is not None]
        assert len(broken) == 1
        writer.slab = lambda *args, **kwargs: slab(writer, *args, **kwargs)  # the disk is fine again
        with pytest.raises(StaleRefreshError, match=rf"MoE layer {broken[0].experts.layer_index}: an earlier copy"):
            greedy(loaded.model, prompt())


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("mixtral", {"num_hidden_layers": 2**32}, r"config\.json: num_hidden_layers is 4294967296, but the tensors "
         r"hold 2 layers"),
        ("mixtral", {"hidden_size": "wide"}, r"config\.json: values of the wrong type"),
        ("mixtral", {"intermediate_size": 1.5}, r"config\.json: values of the wrong type"),
        ("mixtral", {"hidden_act": "wiggle"}, r"its config makes no mixtral model: KeyError"),
        ("mixtral", {"num_experts_per_tok": 0}, r"the router picks 0 experts of 8"),
        ("mixtral", {"num_experts_per_tok": 9}, r"the router picks 9 experts of 8"),
        # DeepSeek-V3 picks topk_group of n_group groups: 3 of 2 would fail inside its router's topk
        ("deepseek_v3", {"topk_group": 3}, r"expert groups 3 of 2 do not fit 8 experts"),
    ],
)  # fmt: skip
def test_a_hostile_config_json_is_a_format_error(checkpoints, tmp_path, family, change, message):
    """A layer count of 4 billion would become per-layer lists in transformers' config and exhaust memory
    before any other check; values of the wrong type, an unknown activation or a top-k the experts cannot
    give would escape as TypeError, KeyError or RuntimeError from the config, the constructor or the router
    (found by fuzzing config.json)."""
    with pytest.raises(FormatError, match=message):
        load_model(with_config(checkpoints[family], tmp_path, change), capacity=2)
