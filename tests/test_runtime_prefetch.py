"""Next-layer prefetch in the transformers runtime: the next MoE layer's router predicts, a worker thread
copies, the next forward joins it; outputs never change, only which experts are resident."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers runtime needs torch (the dev extra installs it)")
transformers = pytest.importorskip("transformers", reason="the transformers runtime needs transformers 5")

from mmapstore._errors import RuntimeConfigError, StaleRefreshError  # noqa: E402
from mmapstore.cli import main  # noqa: E402
from mmapstore.transformers import load_model  # noqa: E402
from mmapstore.transformers._layer import LayerRuntime  # noqa: E402

EXPERTS, CAPACITY = 16, 4
SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)


def configs() -> dict[str, object]:
    """Four MoE layers (three for DeepSeek-V3, whose first is dense), each family's router kind: plain
    (Qwen3-MoE), sigmoid with a correction bias (DeepSeek-V3), with a bias (GPT-OSS), Llama-4's."""
    t = transformers
    return {
        "qwen3_moe": t.Qwen3MoeConfig(**SMALL, moe_intermediate_size=16, intermediate_size=24, num_experts=EXPERTS,
                                      num_experts_per_tok=2, head_dim=8),
        "deepseek_v3": t.DeepseekV3Config(**SMALL, moe_intermediate_size=16, intermediate_size=24,
                                          n_routed_experts=EXPERTS, num_experts_per_tok=2, n_shared_experts=1,
                                          first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=8,
                                          q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
        "gpt_oss": t.GptOssConfig(**SMALL, intermediate_size=16, num_local_experts=EXPERTS, num_experts_per_tok=2,
                                  head_dim=8),
        "llama4": t.Llama4TextConfig(**SMALL, intermediate_size=16, intermediate_size_mlp=24,
                                     num_local_experts=EXPERTS, head_dim=8, num_experts_per_tok=1),
    }  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    paths = {}
    for index, (family, config) in enumerate(configs().items()):
        torch.manual_seed(index)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "experts" in name:
                    parameter.normal_(0.0, 0.2)
        paths[family] = str(root / family)
        model.save_pretrained(paths[family])
    return paths


def greedy(model, ids, new_tokens: int = 16):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )


IDS = torch.randint(0, SMALL["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(0))


def run(path: str, prefetch: bool | float):
    """Greedy tokens and stats; ``prefetch=True`` acts on every prediction (random weights route too
    unpredictably for the default precision gate ever to open)."""
    with load_model(path, capacity=CAPACITY, on_miss="fetch", prefetch=0.0 if prefetch is True else prefetch) as loaded:
        return greedy(loaded.model, IDS), loaded.stats()


@pytest.mark.parametrize("family", list(configs()))
def test_prefetch_turns_misses_into_hits_and_changes_no_token(checkpoints, family):
    stock = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()
    plain, plain_stats = run(checkpoints[family], prefetch=False)
    ahead, stats = run(checkpoints[family], prefetch=True)
    assert torch.equal(ahead, plain) and torch.equal(ahead, greedy(stock, IDS))
    assert plain_stats.prefetched_experts == plain_stats.prefetch_used == 0
    assert stats.prefetched_experts > 0 and 0 < stats.prefetch_used <= stats.prefetched_experts
    assert stats.resident_pairs > plain_stats.resident_pairs  # the router's guesses were right often enough
    assert stats.pairs == plain_stats.pairs


def test_the_next_layer_copies_the_prediction_before_it_reads_its_pool(checkpoints, monkeypatch):
    """Each layer (but the first) is handed the experts its predecessor's sync predicted, and copies them
    at its own entry, before its pool is read; they come most likely first."""
    events: list[tuple[str, int, tuple[int, ...]]] = []
    prefetch, forward_fetch = LayerRuntime.prefetch, LayerRuntime._forward_fetch

    def recording_prefetch(self, experts):
        events.append(("prefetch", self.position, tuple(experts.tolist())))
        prefetch(self, experts)

    def recording_fetch(self, *args):
        events.append(("fetch", self.position, ()))
        return forward_fetch(self, *args)

    monkeypatch.setattr(LayerRuntime, "prefetch", recording_prefetch)
    monkeypatch.setattr(LayerRuntime, "_forward_fetch", recording_fetch)
    run(checkpoints["qwen3_moe"], prefetch=True)
    prefetches = [index for index, event in enumerate(events) if event[0] == "prefetch"]
    assert prefetches and all(events[i][1] > 0 for i in prefetches)  # the first MoE layer has no predecessor
    assert all(events[i + 1][:2] == ("fetch", events[i][1]) for i in prefetches)
    assert all(len(events[i][2]) == 2 for i in prefetches)  # the router's top-2 for one decoded token


def test_ranked_puts_the_most_predicted_experts_first():
    from mmapstore.transformers._prefetch import ranked

    predicted = np.array([[5, 2], [7, 2], [9, 5], [1, 3]])  # rows best first
    # 5 and 2 twice (5 once first: ahead of 2, never first), then the singles by their best place, then id
    assert ranked(predicted, 8).tolist() == [5, 2, 1, 7, 9, 3]
    assert ranked(predicted, 3).tolist() == [5, 2, 1]


def test_a_prefetch_that_fails_part_way_is_raised_and_its_pool_is_never_read_again(checkpoints, monkeypatch):
    inside = []
    prefetch = LayerRuntime.prefetch

    def flagged(self, experts):
        inside.append(True)
        try:
            prefetch(self, experts)
        finally:
            inside.pop()

    monkeypatch.setattr(LayerRuntime, "prefetch", flagged)
    with load_model(checkpoints["qwen3_moe"], capacity=CAPACITY, on_miss="fetch", prefetch=0.0) as loaded:
        writer = loaded.layers[0].writer
        slab, calls = type(writer).slab, []

        def failing(*args, **kwargs):
            if inside:
                calls.append(args)
                if len(calls) == 2:  # the second slab of the first prefetched expert: a slot half rewritten
                    raise OSError("injected read error")
            return slab(writer, *args, **kwargs)

        writer.slab = failing
        with pytest.raises(OSError, match="injected read error"):
            greedy(loaded.model, IDS)
        broken = [layer for layer in loaded.layers if layer._broken is not None]
        assert len(broken) == 1
        with pytest.raises(StaleRefreshError, match=rf"MoE layer {broken[0].experts.layer_index}: an earlier copy"):
            greedy(loaded.model, IDS)


def test_prefetch_needs_fetch(checkpoints):
    with pytest.raises(RuntimeConfigError, match="prefetch needs on_miss='fetch'"):
        load_model(checkpoints["qwen3_moe"], capacity=CAPACITY, on_miss="cpu", prefetch=True)
    for wrong in ("yes", 1.5, -0.1):
        with pytest.raises(RuntimeConfigError, match=r"prefetch must be True, False or a precision in \[0, 1\]"):
            load_model(checkpoints["qwen3_moe"], capacity=CAPACITY, on_miss="fetch", prefetch=wrong)


def test_a_layer_acts_on_predictions_only_once_they_have_been_right_often_enough(checkpoints):
    """The default gate (0.9 over the last 16 predictions): random weights' routers guess far worse, so
    nothing is copied ahead, yet every prediction is measured."""
    tokens, stats = run(checkpoints["qwen3_moe"], prefetch=0.9)
    assert torch.equal(tokens, run(checkpoints["qwen3_moe"], prefetch=False)[0])
    assert stats.predicted_experts > 0 and stats.prefetched_experts == 0
    assert stats.prediction_precision == stats.predicted_routed / stats.predicted_experts < 0.9
    assert run(checkpoints["qwen3_moe"], prefetch=True)[1].prefetched_experts > 0  # gate open: copies


def test_the_gate_opens_on_a_full_window_of_good_predictions():
    from mmapstore.transformers._prefetch import PRECISION_WINDOW, Prefetcher

    gate = Prefetcher(torch.device("cpu"), 0.75)
    assert not gate.trusts([(2, 2)] * (PRECISION_WINDOW - 1))  # too few to judge
    assert gate.trusts([(3, 4)] * PRECISION_WINDOW)  # 75% routed: at the threshold
    assert not gate.trusts([(3, 4)] * (PRECISION_WINDOW - 1) + [(2, 4)])
    assert Prefetcher(torch.device("cpu"), 0.0).trusts([])  # 0: always


def test_run_prefetch_reports_what_it_copied(checkpoints, capsys):
    args = ["run", checkpoints["gpt_oss"], "--device", "cpu", "--on-miss", "fetch", "--capacity", str(CAPACITY),
            "--prompt-tokens", "5", "--max-new-tokens", "8", "--quiet"]  # fmt: skip
    assert main([*args, "--prefetch", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefetch"] is True and report["stats"]["prefetched_experts"] > 0
    assert 0 < report["stats"]["prediction_precision"] < 1
    assert main([*args, "--prefetch"]) == 0  # the default gate: predictions measured, none acted on
    assert "predicted experts routed to; 0 copied ahead of their layer" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_prefetch_on_cuda_copies_on_its_own_stream_and_changes_no_token(checkpoints, family, monkeypatch):
    """The prefetch stream is held back (a GPU sleep before its copies): a layer that did not wait for its
    event would read slots the copies have not reached."""
    streams = []
    prefetch = LayerRuntime.prefetch

    def slow(self, experts):
        streams.append(torch.cuda.current_stream())
        torch.cuda._sleep(20_000_000)  # on the prefetch stream, ahead of its copies
        prefetch(self, experts)

    outputs, stats = {}, {}
    for ahead in (False, True):
        if ahead:
            monkeypatch.setattr(LayerRuntime, "prefetch", slow)
        with load_model(
            checkpoints[family], capacity=CAPACITY, device="cuda", prefetch=0.0 if ahead else False
        ) as loaded:
            outputs[ahead] = greedy(loaded.model, IDS.cuda())
            stats[ahead] = loaded.stats()
    assert torch.equal(outputs[True], outputs[False])
    assert streams and all(stream != torch.cuda.default_stream() for stream in streams)
    assert stats[True].prefetch_used > 0 and stats[True].resident_pairs > stats[False].resident_pairs
