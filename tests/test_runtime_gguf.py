"""The transformers runtime on a GGUF file: experts served encoded from the mapping, the rest decoded as
transformers' own GGUF loader decodes it; logits compared with ``from_pretrained(dir, gguf_file=...)``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers runtime needs torch (the dev extra installs it)")
transformers = pytest.importorskip("transformers", reason="the transformers runtime needs transformers 5")
gguf = pytest.importorskip("gguf", reason="gguf-py writes the GGUF files")
pytest.importorskip("accelerate", reason="transformers' GGUF loader, the oracle, needs accelerate")

from mmapstore._errors import FormatError, UnsupportedModelError  # noqa: E402
from mmapstore._store.store import ExpertStore  # noqa: E402
from mmapstore.cli import main  # noqa: E402
from mmapstore.transformers import load_model  # noqa: E402

Q = gguf.GGMLQuantizationType
LAYERS, EXPERTS, HIDDEN, VOCAB, TOP_K = 2, 8, 64, 96, 2
INTER = 768  # transformers reads no expert width from a qwen3moe GGUF: it keeps Qwen3MoeConfig's default, 768


def _encode(rng: np.random.Generator, values: np.ndarray, qtype) -> np.ndarray:
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype == Q.Q6_K:  # gguf-py has no K-quant quantizer: whole random blocks with finite f16 scales
        elems, block = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (*values.shape[:-1], values.shape[-1] // elems, block), dtype=np.uint8)
        raw[..., 208:210] = rng.uniform(-0.01, 0.01, raw.shape[:-1]).astype(np.float16)[..., None].view(np.uint8)
        return raw.reshape(*values.shape[:-1], -1)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


class _Adder:
    """Adds tensors to a gguf-py writer, each encoded as asked; ``decoded`` keeps what the quantized ones
    decode to (the values a reference model must then hold)."""

    def __init__(self, writer, rng: np.random.Generator) -> None:
        self.writer, self.rng = writer, rng
        self.decoded: dict[str, np.ndarray] = {}

    def __call__(self, name: str, values: np.ndarray, qtype=Q.F32) -> None:
        encoded = _encode(self.rng, values, qtype)
        self.writer.add_tensor(name, encoded, raw_dtype=qtype if encoded.dtype == np.uint8 else None)
        if encoded.dtype == np.uint8:
            self.decoded[name] = gguf.quants.dequantize(encoded, qtype).reshape(values.shape)


def _close(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def moe_gguf(
    path: str,
    experts_type,
    others_type,
    down_type=None,
    seed: int = 0,
    family: str = "qwen3_moe",
    split: int = 0,
    width: int | None = None,
    tokenizer: tuple[list[str], list[str], int] | None = None,
    tied: bool = False,
) -> None:
    """A Qwen3-MoE (or Qwen2-MoE with its shared expert, or MiniMax-M2) GGUF written with gguf-py's writer under llama.cpp's
    names and metadata: the non-expert weights of a random transformers model, random experts.  Expert widths
    are the config classes' defaults: transformers reads none from these GGUF architectures."""
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, intermediate_size=96, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                  max_position_embeddings=256, tie_word_embeddings=tied)  # fmt: skip
    if width is not None:
        common["moe_intermediate_size"] = width
    if tokenizer is not None:
        common["vocab_size"] = len(tokenizer[0])
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, head_dim=16, norm_topk_prob=True)
        arch, gguf_arch = "qwen3moe", gguf.MODEL_ARCH.QWEN3MOE
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**common)
        arch, gguf_arch = "qwen2moe", gguf.MODEL_ARCH.QWEN2MOE
    else:  # MiniMax-M2: sigmoid routing with a score-correction bias; the expert width is intermediate_size
        common = {key: value for key, value in common.items() if key != "num_experts"}
        common |= {"intermediate_size": 96, "num_local_experts": EXPERTS, "bos_token_id": 0, "eos_token_id": 1}
        config = transformers.MiniMaxM2Config(**common, head_dim=16, rotary_dim=8)
        arch, gguf_arch = "minimax-m2", gguf.MODEL_ARCH.MINIMAXM2
    inter = getattr(config, "moe_intermediate_size", config.intermediate_size)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    names = gguf.get_tensor_name_map(gguf_arch, LAYERS)
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split)  # split: llama.cpp's -0000K-of-0000N.gguf parts
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    if family in ("qwen3_moe", "minimax_m2"):
        writer.add_key_length(16)
        writer.add_value_length(16)
    if family == "minimax_m2":
        writer.add_rope_dimension_count(8)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    elif family == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(TOP_K)
    writer.add_expert_feed_forward_length(inter)
    writer.add_vocab_size(common["vocab_size"])
    if tokenizer is not None:  # what llama.cpp's converter writes for a Qwen byte-level BPE
        tokens, merges, eos = tokenizer
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if index == eos else 1 for index in range(len(tokens))])
        writer.add_token_merges(merges)
        writer.add_eos_token_id(eos)
        writer.add_bos_token_id(eos)

    add = _Adder(writer, rng)

    for key, value in model.state_dict().items():
        if ".mlp.experts." not in key and not (tied and key == "lm_head.weight"):  # tied: no output.weight
            base, suffix = key.rsplit(".", 1)
            if suffix == "e_score_correction_bias":  # llama.cpp writes it as blk.N.exp_probs_b.bias
                name, suffix = f"blk.{base.split('.')[2]}.exp_probs_b", "bias"
                value = 0.02 * torch.randn(value.shape, generator=torch.Generator().manual_seed(seed))  # visible, small
            else:
                name = names.get_name(base)
            values = value.numpy().reshape(-1) if name.endswith("ffn_gate_inp_shexp") else value.numpy()  # [H] in GGUF
            add(f"{name}.{suffix}", values, Q.F32 if values.ndim == 1 else others_type)
    for layer in range(LAYERS):
        for proj, shape in (("gate", (EXPERTS, inter, HIDDEN)), ("up", (EXPERTS, inter, HIDDEN))):
            add(f"blk.{layer}.ffn_{proj}_exps.weight", rng.normal(0, 0.2, shape), experts_type)
        down = rng.normal(0, 0.2, (EXPERTS, HIDDEN, inter))
        add(f"blk.{layer}.ffn_down_exps.weight", down, down_type or experts_type)
    _close(writer)


TYPES = {
    "q8_0-experts-f16": (Q.Q8_0, Q.F16, None, "qwen3_moe"),
    "q4_0-experts-q6_k-down-q8_0": (Q.Q4_0, Q.Q8_0, Q.Q6_K, "qwen3_moe"),
    "f16-experts-f32": (Q.F16, Q.F32, None, "qwen3_moe"),
    "qwen2_moe-shared-expert-q8_0": (Q.Q8_0, Q.Q8_0, None, "qwen2_moe"),
    "minimax_m2-q8_0": (Q.Q8_0, Q.F16, None, "minimax_m2"),
}
SPLIT = "q4_0-experts-q6_k-down-q8_0"


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    paths = {}
    for index, (name, types) in enumerate(TYPES.items()):
        os.makedirs(root / name)
        paths[name] = str(root / name / "model.gguf")
        experts_type, others_type, down_type, family = types
        moe_gguf(paths[name], experts_type, others_type, down_type, seed=index, family=family)
        if name == SPLIT:  # the same tensors in parts of at most 12 tensors (output.weight in the last)
            os.makedirs(root / "split")
            moe_gguf(str(root / "split" / "model.gguf"), experts_type, others_type, down_type, seed=index, split=12)
            paths["split"] = str(root / "split")
    return paths


def reference(path: str):
    directory, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("types", list(TYPES))
def test_gguf_logits_equal_transformers_gguf_loader(gguf_files, types, monkeypatch):
    path = gguf_files[types]
    stock = reference(path)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    want = logits(stock, ids)
    decoded: list[str] = []
    values = ExpertStore.values

    def recording(self, name, *args, **kwargs):
        decoded.append(name)
        return values(self, name, *args, **kwargs)

    monkeypatch.setattr(ExpertStore, "values", recording)
    for capacity, on_miss in ((2, "cpu"), (2, "fetch"), (EXPERTS, "fetch")):
        with load_model(path, capacity=capacity, on_miss=on_miss, dtype=torch.float32) as loaded:
            families = {"qwen2": "Qwen2MoeForCausalLM", "minimax": "MiniMaxM2ForCausalLM"}
            want_class = next((name for key, name in families.items() if key in types), "Qwen3MoeForCausalLM")
            assert type(loaded.model).__name__ == want_class
            got = logits(loaded.model, ids)
            if on_miss == "fetch":  # every pair through the pools: the stock backend's kernels
                assert torch.equal(got, want), capacity
            else:  # misses on the CPU from the mapped slabs, as for any checkpoint
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            stats = loaded.stats()
        assert stats.pairs == ids.numel() * TOP_K * LAYERS
        if capacity < EXPERTS:
            assert stats.cpu_pairs + stats.fetched_pairs > 0
    # The experts are never decoded whole: only the non-expert tensors go through store.values.
    assert decoded and not any("_exps." in name for name in decoded)


@pytest.mark.parametrize("types", ["q4_0-experts-q6_k-down-q8_0", "q8_0-experts-f16"])
def test_gguf_blocks_cross_to_the_device_encoded_and_decode_there(gguf_files, types):
    """With a device copier (always on CUDA; here a CPU one, to run everywhere) a GGUF expert moves as its
    ggml blocks and is decoded after the copy by the device kernels: the logits stay bit-identical."""
    from builders import cpu_copier

    path = gguf_files[types]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    want = logits(reference(path), ids)
    with load_model(path, capacity=2, on_miss="fetch", dtype=torch.float32) as loaded, cpu_copier(loaded) as copier:
        assert torch.equal(logits(loaded.model, ids), want)
        copied = loaded.stats().copied_nbytes
    moved = sum(copier.stats.nbytes.values())
    # 4.5 (Q4_0) or 8.5 (Q8_0) bits a value against float32 pool slots; Q6_K down rows are 6.56.
    assert copied > 0 and copied / 8 < moved < copied / 3.5


def test_a_ggml_type_the_device_kernels_lack_is_decoded_on_the_host_instead(gguf_files, monkeypatch):
    """IQ4_NL, TQ1_0 and the like have no device kernel: with a copier they are not staged but decoded on the
    host (as if Q8_0 were such a type here), the same logits, no expert block through the copier."""
    from builders import cpu_copier

    from mmapstore.gpu import _dequant

    monkeypatch.setattr(_dequant, "GGML_DEVICE_TYPES", frozenset())
    path = gguf_files["q8_0-experts-f16"]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    with load_model(path, capacity=2, on_miss="fetch", dtype=torch.float32) as loaded, cpu_copier(loaded) as copier:
        assert torch.equal(logits(loaded.model, ids), logits(reference(path), ids))
        assert loaded.stats().copied_nbytes > 0
    assert sum(copier.stats.nbytes.values()) == 0


def test_gguf_runs_from_the_command_line(gguf_files, capsys):
    path = gguf_files["q8_0-experts-f16"]
    assert main(["run", path, "--device", "cpu", "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "Qwen3MoeForCausalLM" in out.out + out.err


def _bare_gguf(path, architecture: str, gating=None) -> None:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    if gating is not None:
        writer.add_expert_gating_func(gating)
    for proj in ("gate", "up", "down"):  # a whole MoE layer: the store opens it, the config is what fails
        writer.add_tensor(f"blk.0.ffn_{proj}_exps.weight", np.zeros((4, 32, 32), np.float32))
    _close(writer)


def test_a_gguf_architecture_transformers_cannot_build_is_refused_by_name(tmp_path):
    _bare_gguf(tmp_path / "model.gguf", "grok")
    with pytest.raises(UnsupportedModelError, match=r"model\.gguf: transformers cannot build a model.*grok"):
        load_model(tmp_path / "model.gguf", capacity=2)
    assert main(["run", str(tmp_path / "model.gguf"), "--device", "cpu", "--prompt-ids", "1"]) == 1
    # A deepseek2 file (read without transformers) names the metadata it lacks.
    _bare_gguf(tmp_path / "deepseek.gguf", "deepseek2", gating=gguf.ExpertGatingFuncType.SIGMOID)
    with pytest.raises(FormatError, match=r"deepseek\.gguf: deepseek2\.attention\.head_count must be an integer"):
        load_model(tmp_path / "deepseek.gguf", capacity=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gguf_on_cuda_matches_transformers_gguf_loader_on_the_device(gguf_files):
    path = gguf_files["q4_0-experts-q6_k-down-q8_0"]
    stock = reference(path).to("cuda")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3)).cuda()
    with load_model(path, capacity=2, device="cuda", dtype=torch.float32) as loaded:
        torch.testing.assert_close(logits(loaded.model, ids), logits(stock, ids), rtol=1e-4, atol=1e-4)
        stats = loaded.stats()
    assert stats.fetched_pairs > 0 and stats.cpu_pairs == 0
    with load_model(path, capacity=2, device="cuda") as loaded:  # no dtype: bfloat16 pools on CUDA
        assert {layer.dtype for layer in loaded.layers} == {torch.bfloat16}


def test_a_split_gguf_set_runs_whole_from_its_directory_or_any_part(gguf_files):
    """transformers reads a split set's first part only (its tensors, and whether the output layer is tied);
    the runtime reads every part, so the set gives the logits of the same tensors in one file."""
    parts = sorted(os.listdir(gguf_files["split"]))
    assert len(parts) == 3 and parts[0] == "model-00001-of-00003.gguf"
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    want = logits(reference(gguf_files[SPLIT]), ids)
    for entry in (gguf_files["split"], os.path.join(gguf_files["split"], parts[1])):
        with load_model(entry, capacity=EXPERTS, on_miss="fetch", dtype=torch.float32) as loaded:
            assert loaded.model.config.tie_word_embeddings is False  # output.weight is in the last part
            assert torch.equal(logits(loaded.model, ids), want), entry


def test_the_expert_width_the_file_states_is_used(tmp_path):
    """transformers' GGUF config keeps Qwen3MoeConfig's default expert width (768) whatever the file says; the
    runtime takes ``qwen3moe.expert_feed_forward_length``.  Oracle: transformers' own GGUF tensor conversion
    loaded into a stock model built with that width."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from mmapstore.formats import read_checkpoint
    from mmapstore.transformers._gguf import read_gguf_config

    path = str(tmp_path / "model.gguf")
    moe_gguf(path, Q.Q8_0, Q.F16, width=256)
    config = read_gguf_config(read_checkpoint(path), transformers)
    assert config.moe_intermediate_size == 256
    assert transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="model.gguf").moe_intermediate_size == 768
    stock = transformers.Qwen3MoeForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=stock)["tensors"]
    missing, unexpected = stock.load_state_dict(tensors, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    with load_model(path, capacity=3, on_miss="fetch", dtype=torch.float32) as loaded:
        assert torch.equal(logits(loaded.model, ids), logits(stock, ids))


def test_a_config_json_beside_a_gguf_file_does_not_make_it_a_safetensors_checkpoint(gguf_files, tmp_path):
    """The store opens a directory without safetensors as its GGUF file; so does the runtime, config and all."""
    source = gguf_files["q8_0-experts-f16"]
    os.link(source, tmp_path / "model.gguf")
    (tmp_path / "config.json").write_text('{"model_type": "mixtral", "num_local_experts": 3}')
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(9))
    with load_model(tmp_path, capacity=EXPERTS, on_miss="fetch", dtype=torch.float32) as loaded:
        assert type(loaded.model).__name__ == "Qwen3MoeForCausalLM"
        assert torch.equal(logits(loaded.model, ids), logits(reference(source), ids))
    # A GGUF file by its magic, whatever its name.
    os.link(source, tmp_path / "weights.bin")
    with load_model(tmp_path / "weights.bin", capacity=2, dtype=torch.float32) as loaded:
        assert type(loaded.model).__name__ == "Qwen3MoeForCausalLM"


def byte_level_bpe() -> tuple[list[str], list[str], int, object]:
    """A tiny byte-level BPE trained offline by the tokenizers library: tokens, merges, eos id, tokenizer."""
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library trains the GGUF's vocabulary")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    bpe.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 50, trainer)
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [
        " ".join(pair) if isinstance(pair, list) else pair for pair in json.loads(bpe.to_str())["model"]["merges"]
    ]
    return tokens, merges, vocab["<|endoftext|>"], bpe


def test_run_takes_a_text_prompt_through_the_tokenizer_the_gguf_file_carries(tmp_path, capsys):
    tokens, merges, eos, bpe = byte_level_bpe()
    path = str(tmp_path / "model.gguf")
    moe_gguf(path, Q.Q8_0, Q.F16, tokenizer=(tokens, merges, eos))
    args = ["run", path, "--device", "cpu", "--prompt", "hello world, the lazy fox", "--max-new-tokens", "3"]
    assert main([*args, "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == len(bpe.encode("hello world, the lazy fox").ids) > 1
    assert result["new_tokens"] == 3 and result["text"] == bpe.decode(result["new_ids"])
    assert result["dtype"] == "float32"  # a GGUF names no compute dtype: float32 on the CPU, bfloat16 on CUDA


def test_a_gguf_without_an_output_layer_ties_it_to_the_embeddings(tmp_path):
    path = str(tmp_path / "model.gguf")
    moe_gguf(path, Q.Q8_0, Q.F16, tied=True)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(10))
    with load_model(path, capacity=EXPERTS, on_miss="fetch", dtype=torch.float32) as loaded:
        assert loaded.model.config.tie_word_embeddings is True
        assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()
        assert torch.equal(logits(loaded.model, ids), logits(reference(path), ids))


def test_a_tensor_in_a_type_without_a_decoder_is_refused_before_any_weight_is_read(gguf_files, monkeypatch):
    from mmapstore import UnsupportedEncodingError
    from mmapstore.transformers import _gguf

    def no_reads(self, name, *args, **kwargs):
        raise AssertionError(f"{name} was read before the file was refused")

    monkeypatch.setattr(ExpertStore, "values", no_reads)
    # As if Q8_0 were a type without a decoder (the IQ grid types are; they need rows this fixture lacks).
    monkeypatch.setattr(_gguf, "can_dequantize", lambda dtype: dtype.code != "Q8_0")
    with pytest.raises(UnsupportedEncodingError, match=r"model\.gguf: tensor 'blk\.0\.ffn_gate_exps\.weight' is Q8_0"):
        load_model(gguf_files["q8_0-experts-f16"], capacity=2, dtype=torch.float32)


def _source_model(config, seed: int, spread=lambda name: (0.0, 0.2) if "experts" in name else None):
    """A random transformers model, the reference a GGUF file is written from; ``spread(name)`` gives the
    ``(mean, std)`` some parameters are drawn from (the experts spread apart, so a wrong one shows)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            draw = spread(name)
            if draw is not None:
                parameter.normal_(*draw)
    return model


def _write_source(
    path: str,
    model,
    architecture: str,
    gguf_arch,
    metadata: dict,
    *,
    special=None,
    experts_type=Q.F32,
    seed: int = 0,
    blocks: int | None = None,
    extra=None,
) -> dict:
    """Write ``model`` as llama.cpp's converter writes it: ``metadata`` through the writer's ``add_*``
    methods, the tensors under gguf-py's names, the concatenated ``gate_up_proj`` split into gate and up
    experts, the router bias as ``exp_probs_b.bias``; ``special(add, key, array, layer)`` writes a tensor its
    own way (returning True), ``extra(add)`` adds tensors the model does not have.  Returns what the
    quantized tensors decode to."""  # fmt: skip
    writer = gguf.GGUFWriter(path, architecture)
    for method, value in metadata.items():
        getattr(writer, f"add_{method}")(value)
    add = _Adder(writer, np.random.default_rng(seed))
    names = gguf.get_tensor_name_map(gguf_arch, blocks or model.config.num_hidden_layers)
    for key, value in model.state_dict().items():
        array = value.numpy()
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if special is not None and special(add, key, array, layer):
            continue
        if key.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            half = array.shape[1] // 2
            add(f"blk.{layer}.ffn_gate_exps.weight", array[:, :half], experts_type)
            add(f"blk.{layer}.ffn_up_exps.weight", array[:, half:], experts_type)
        elif key.endswith("mlp.experts.down_proj"):
            add(f"blk.{layer}.ffn_down_exps.weight", array, experts_type)
        elif key.endswith("e_score_correction_bias"):
            add(f"blk.{layer}.exp_probs_b.bias", array)
        else:
            base, suffix = key.rsplit(".", 1)
            add(f"{names.get_name(base)}.{suffix}", array)
    if extra is not None:
        extra(add)
    _close(writer)
    return add.decoded


def _mtp_block(block: int, width: int, experts_type):
    """The multi-token-prediction block a converter appends: a MoE layer of its own and its projection."""

    def extra(add: _Adder) -> None:
        for proj, shape in (("gate", (EXPERTS, width, HIDDEN)), ("up", (EXPERTS, width, HIDDEN)),
                            ("down", (EXPERTS, HIDDEN, width))):  # fmt: skip
            add(f"blk.{block}.ffn_{proj}_exps.weight", add.rng.normal(0, 0.2, shape).astype(np.float32), experts_type)
        add(f"blk.{block}.nextn.eh_proj.weight", add.rng.normal(0, 0.2, (HIDDEN, 2 * HIDDEN)).astype(np.float32))

    return extra


def _hold_decoded(model, decoded: dict) -> None:
    """Quantized experts: the reference (concatenated ``gate_up_proj``) holds the values the file decodes to."""
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            if f"blk.{layer}.ffn_gate_exps.weight" in decoded:
                gate, up, down = (torch.from_numpy(decoded[f"blk.{layer}.ffn_{p}_exps.weight"])
                                  for p in ("gate", "up", "down"))  # fmt: skip
                block.mlp.experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
                block.mlp.experts.down_proj.copy_(down)


def deepseek_gguf(
    path: str, *, split_kv_b: bool, experts_type=Q.F32, seed: int = 0, yarn: bool = False, kimi: bool = False,
    nextn: bool = False, tokenizer: dict | None = None,
):  # fmt: skip
    """A DeepSeek-V3 GGUF written as llama.cpp's converter writes one (``deepseek2``: MLA as one key/value
    head, ``kv_b_proj`` split into ``attn_k_b`` (transposed per head) and ``attn_v_b`` unless ``split_kv_b``
    is false (older files), ``exp_probs_b.bias``, experts stacked per projection).  Returns the random
    transformers model whose weights it holds: the reference.  ``tokenizer``: metadata from
    :func:`tokenizer_metadata`, whose vocabulary the model then has."""
    vocab = VOCAB if tokenizer is None else len(tokenizer["token_list"])
    config = transformers.DeepseekV3Config(
        hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab,
        moe_intermediate_size=32, intermediate_size=96, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K,
        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                      "mscale_all_dim": 0.7, "beta_fast": 1 if kimi else 32, "beta_slow": 1} if yarn else None,
    )  # fmt: skip
    model = _source_model(config, seed, lambda name: (0.0, 0.2) if "experts" in name else
                          (0.0, 0.02) if "e_score_correction_bias" in name else None)  # fmt: skip
    metadata = {
        "block_count": 3 + nextn,  # a multi-token-prediction block counts (GLM-4.7-Flash's files)
        "context_length": 256, "embedding_length": HIDDEN, "feed_forward_length": 96, "head_count": 4,
        "head_count_kv": 1, "rope_freq_base": 10000.0, "layer_norm_rms_eps": 1e-6, "vocab_size": vocab,
        "leading_dense_block_count": 1, "q_lora_rank": 48, "kv_lora_rank": 32, "key_length": 32 + 8,
        "value_length": 32, "key_length_mla": 16 + 8, "value_length_mla": 16, "expert_feed_forward_length": 32,
        "expert_count": EXPERTS, "expert_shared_count": 1, "expert_weights_scale": 2.5, "expert_weights_norm": True,
        "rope_dimension_count": 8, "expert_used_count": TOP_K, "expert_group_count": 2,
        "expert_group_used_count": 1, "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
    }  # fmt: skip
    if nextn:
        metadata["nextn_predict_layers"] = 1
    metadata |= tokenizer or {}
    if yarn:  # as the converter writes DeepSeek-V3's YaRN: the log multiplier is 0.1 * mscale_all_dim
        metadata |= {"rope_scaling_type": gguf.RopeScalingType.YARN, "rope_scaling_factor": 4.0,
                     "rope_scaling_orig_ctx_len": 64, "rope_scaling_yarn_log_mul": 0.1 * 0.7}  # fmt: skip
        if kimi:  # Kimi-K2's betas are 1 and 1; the converter writes them where the config has them
            metadata |= {"rope_scaling_yarn_beta_fast": 1.0, "rope_scaling_yarn_beta_slow": 1.0}

    def split_kv_b_proj(add, key, array, layer) -> bool:  # the converter's split, k_b transposed
        if not (split_kv_b and key.endswith("kv_b_proj.weight")):
            return False
        kv_b = array.reshape(4, 16 + 16, 32)
        add(f"blk.{layer}.attn_k_b.weight", np.ascontiguousarray(kv_b[:, :16].transpose(0, 2, 1)))
        add(f"blk.{layer}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, 16:]))
        return True

    decoded = _write_source(path, model, "deepseek2", gguf.MODEL_ARCH.DEEPSEEK2, metadata, special=split_kv_b_proj,
                            experts_type=experts_type, seed=seed,
                            extra=_mtp_block(3, 32, experts_type) if nextn else None)  # fmt: skip
    _hold_decoded(model, decoded)
    return model


DEEPSEEK_VARIANTS = {
    "k_b-v_b": {"split_kv_b": True},
    "kv_b": {"split_kv_b": False},
    "yarn": {"split_kv_b": True, "yarn": True},
    "kimi-yarn-betas": {"split_kv_b": True, "yarn": True, "kimi": True},
    "q8_0-experts": {"split_kv_b": True, "experts_type": Q.Q8_0},
    "mtp-block": {"split_kv_b": True, "nextn": True},
}


def greedy_tokens(path: str, ids):
    with load_model(path, capacity=3, on_miss="fetch", dtype=torch.float32) as loaded:
        return greedy_tokens_of(loaded.model, ids)


def greedy_tokens_of(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)


def test_deepseek_v2_softmax_routing_is_refused_by_name(tmp_path):
    _bare_gguf(tmp_path / "model.gguf", "deepseek2", gating=gguf.ExpertGatingFuncType.SOFTMAX)
    with pytest.raises(UnsupportedModelError, match="softmax routing"):
        load_model(tmp_path / "model.gguf", capacity=2)
    # No gating key and no exp_probs_b: llama.cpp reads such a file as softmax (DeepSeek-V2/V2.5); so do we.
    _bare_gguf(tmp_path / "old.gguf", "deepseek2")
    with pytest.raises(UnsupportedModelError, match="softmax routing"):
        load_model(tmp_path / "old.gguf", capacity=2)


def gpt_oss_gguf(path: str, *, experts_type=Q.F32, seed: int = 0, vocab: bool = True):
    """A GPT-OSS GGUF written as llama.cpp's converter writes one from bf16 experts (``gpt-oss``: the
    interleaved ``gate_up_proj`` transposed and split into ``ffn_gate_exps``/``ffn_up_exps``, biases split the
    same way, ``self_attn.sinks`` as ``attn_sinks.weight``).  Returns the transformers model it holds."""
    config = transformers.GptOssConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=VOCAB, intermediate_size=32, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = _source_model(config, seed, lambda name: (0.0, 0.2) if "experts" in name or "sinks" in name else None)
    metadata = {
        "block_count": 2, "context_length": config.max_position_embeddings, "embedding_length": HIDDEN,
        "feed_forward_length": 32, "head_count": 4, "head_count_kv": 2, "key_length": 16, "value_length": 16,
        "rope_freq_base": config.rope_parameters["rope_theta"], "layer_norm_rms_eps": config.rms_norm_eps,
        "expert_count": EXPERTS, "expert_used_count": TOP_K, "sliding_window": config.sliding_window,
        "expert_feed_forward_length": 32, "rope_scaling_type": gguf.RopeScalingType.YARN,
        "rope_scaling_factor": config.rope_parameters["factor"],
        "rope_scaling_orig_ctx_len": config.rope_parameters["original_max_position_embeddings"],
    }  # fmt: skip
    if vocab:  # real files carry no gpt-oss.vocab_size: the vocabulary is the token list's length
        metadata["token_list"] = [f"<t{index}>" for index in range(VOCAB)]

    def experts_and_sinks(add, key, array, layer) -> bool:
        if key.endswith("experts.gate_up_proj"):  # [E, H, 2I] interleaved -> [E, 2I, H], then even/odd rows
            rows = array.transpose(0, 2, 1)
            add(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(rows[:, ::2]), experts_type)
            add(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(rows[:, 1::2]), experts_type)
        elif key.endswith("experts.gate_up_proj_bias"):
            add(f"blk.{layer}.ffn_gate_exps.bias", np.ascontiguousarray(array[..., ::2]))
            add(f"blk.{layer}.ffn_up_exps.bias", np.ascontiguousarray(array[..., 1::2]))
        elif key.endswith("experts.down_proj"):
            add(f"blk.{layer}.ffn_down_exps.weight", np.ascontiguousarray(array.transpose(0, 2, 1)), experts_type)
        elif key.endswith("experts.down_proj_bias"):
            add(f"blk.{layer}.ffn_down_exps.bias", array)
        elif key.endswith("self_attn.sinks"):
            add(f"blk.{layer}.attn_sinks.weight", array)
        else:
            return False
        return True

    decoded = _write_source(path, model, "gpt-oss", gguf.MODEL_ARCH.GPT_OSS, metadata, special=experts_and_sinks,
                            experts_type=experts_type, seed=seed)  # fmt: skip
    with torch.no_grad():  # quantized experts: the reference holds the values the file decodes to
        for layer, block in enumerate(model.model.layers):
            experts = block.mlp.experts
            if f"blk.{layer}.ffn_gate_exps.weight" in decoded:
                gate, up = (torch.from_numpy(decoded[f"blk.{layer}.ffn_{p}_exps.weight"]) for p in ("gate", "up"))
                experts.gate_up_proj[:, :, ::2] = gate.transpose(1, 2)
                experts.gate_up_proj[:, :, 1::2] = up.transpose(1, 2)
                experts.down_proj.copy_(torch.from_numpy(decoded[f"blk.{layer}.ffn_down_exps.weight"]).transpose(1, 2))
    return model


def test_gpt_oss_mxfp4_blocks_cross_to_the_device_encoded(tmp_path):
    """GPT-OSS's MXFP4 experts (interleaved into the pool's gate_up slots, with biases) through a device copier
    (a CPU one here) and the device kernels: the same logits."""
    from builders import cpu_copier

    path = str(tmp_path / "model.gguf")
    stock = gpt_oss_gguf(path, experts_type=Q.MXFP4)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(14))
    with load_model(path, capacity=3, on_miss="fetch", dtype=torch.float32) as loaded, cpu_copier(loaded) as copier:
        assert torch.equal(logits(loaded.model, ids), logits(stock, ids))
        copied = loaded.stats().copied_nbytes
    moved = sum(copier.stats.nbytes.values())
    assert copied > 0 and copied / 8 < moved < copied / 3  # 4.25-bit weights (and f32 biases) for f32 slots


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss_mxfp4"])
def test_gguf_files_transformers_cannot_read_run_on_cuda(tmp_path, family):
    path = str(tmp_path / "model.gguf")
    if family == "deepseek_v3":
        stock = deepseek_gguf(path, split_kv_b=True, experts_type=Q.Q8_0)
        ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(15)).cuda()
        with load_model(path, capacity=2, device="cuda", dtype=torch.float32) as loaded:
            got = logits(loaded.model, ids)
        torch.testing.assert_close(got, logits(stock.cuda(), ids), rtol=1e-4, atol=1e-4)
    else:
        stock = gpt_oss_gguf(path, experts_type=Q.MXFP4).cuda()
        ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(15)).cuda()
        with load_model(path, capacity=2, device="cuda", dtype=torch.float32) as loaded:
            torch.testing.assert_close(logits(loaded.model, ids), logits(stock, ids), rtol=1e-4, atol=1e-4)


def glm4moe_gguf(path: str, *, experts_type=Q.F32, seed: int = 0, tokenizer: dict | None = None):
    """A GLM-4.5 GGUF written as llama.cpp's converter writes one (``glm4moe``: one more block for the
    multi-token-prediction layer, partial RoPE in ``rope.dimension_count``, attention biases as tensors,
    ``exp_probs_b.bias``, experts stacked per projection).  Returns the transformers model it holds."""
    vocab = VOCAB if tokenizer is None else len(tokenizer["token_list"])
    config = transformers.Glm4MoeConfig(
        hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=vocab, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=EXPERTS,
        num_experts_per_tok=TOP_K, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, attention_bias=True, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    model = _source_model(config, seed, lambda name: (0.0, 0.2) if "experts" in name else
                          (0.0, 0.02) if "e_score_correction_bias" in name or name.endswith(".bias") else None)  # fmt: skip
    metadata = {
        "block_count": 4, "nextn_predict_layers": 1,  # 3 layers and the multi-token-prediction one
        "context_length": 256, "embedding_length": HIDDEN, "feed_forward_length": 96, "head_count": 4,
        "head_count_kv": 2, "key_length": 16, "value_length": 16,
        "rope_dimension_count": 8,  # head_dim * partial_rotary_factor (0.5)
        "rope_freq_base": config.rope_parameters["rope_theta"], "layer_norm_rms_eps": config.rms_norm_eps,
        "vocab_size": vocab, "expert_count": EXPERTS, "expert_used_count": TOP_K, "expert_feed_forward_length": 32,
        "expert_shared_count": 1, "leading_dense_block_count": 1,
        "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID, "expert_weights_scale": 2.5,
        "expert_weights_norm": True,
    } | (tokenizer or {})  # fmt: skip
    _write_source(path, model, "glm4moe", gguf.MODEL_ARCH.GLM4_MOE, metadata, experts_type=experts_type, seed=seed,
                  blocks=4, extra=_mtp_block(3, 32, experts_type))  # fmt: skip
    return model


def test_metadata_that_make_no_valid_config_are_a_format_error(tmp_path):
    path = str(tmp_path / "model.gguf")
    gpt_oss_gguf(path, vocab=False)  # no vocabulary size anywhere
    with pytest.raises(FormatError, match=r"model\.gguf: gpt-oss metadata make no valid config"):
        load_model(path, capacity=2)


def test_run_takes_prompt_ids_where_the_file_carries_no_tokenizer(tmp_path, capsys):
    path = str(tmp_path / "model.gguf")
    deepseek_gguf(path, split_kv_b=True)
    assert main(["run", path, "--device", "cpu", "--prompt", "hello", "--quiet"]) == 1
    assert "no usable tokenizer for --prompt" in capsys.readouterr().err
    assert main(["run", path, "--device", "cpu", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--quiet"]) == 0


# How the models' own tokenizers split text before the merges, as their tokenizer.json or tiktoken code
# write it (not as llama.cpp adapts it): patterns applied one after the other, each match its own piece.
MODEL_SPLITS = {
    "deepseek-v3": [  # DeepSeek-V3's tokenizer.json: three Split pre-tokenizers before the byte-level one
        r"\p{N}{1,3}",
        "[一-龥\u3040-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
    "glm4": [  # GLM-4.5's tokenizer.json
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ],
    "kimi-k2": [  # Kimi-K2's tokenization_kimi.py (tiktoken): letters that are not Han, with set intersection
        "|".join(
            [
                r"[\p{Han}]+",
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"\p{N}{1,3}",
                r" ?[^\s\p{L}\p{N}]+[\r\n]*",
                r"\s*[\r\n]+",
                r"\s+(?!\S)",
                r"\s+",
            ]
        )
    ],
}
PROMPTS = [
    "def _init(self): return 12345 .Hello",
    "你好世界 Hello你好 it'S THEY'RE ドラゴン",
    "a\n\n  b\r\n c   x=1234567;y=.5e10",
]


def model_split(text: str, pre: str) -> list[str]:
    """``text`` cut as the model's own tokenizer cuts it (the ``regex`` module: it has Kimi's ``&&``)."""
    regex = pytest.importorskip("regex", reason="the regex module splits text as the models' tokenizers do")
    pieces = [text]
    for pattern in MODEL_SPLITS[pre]:
        compiled, cut = regex.compile(pattern, flags=regex.V1), []
        for piece in pieces:
            at = 0
            for match in compiled.finditer(piece):
                cut += [piece[at : match.start()]] if match.start() > at else []
                cut += [match.group()] if match.group() else []
                at = match.end()
            cut += [piece[at:]] if at < len(piece) else []
        pieces = cut
    return pieces


def model_bpe(pre: str):
    """A byte-level BPE learned on ``PROMPTS`` as cut by ``pre``'s rule (no merge crosses a cut): the
    tokenizer, and its GGUF metadata as llama.cpp's converter writes them."""
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library trains the GGUF's vocabulary")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin|>", "<|end|>"],
    )  # fmt: skip
    bpe.train_from_iterator([piece for text in PROMPTS for piece in model_split(text, pre)] * 20, trainer)
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [" ".join(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    metadata = {
        "tokenizer_model": "gpt2", "tokenizer_pre": pre, "token_list": tokens, "token_merges": merges,
        "token_types": [3 if token.startswith("<|") else 1 for token in tokens], "bos_token_id": 0,
        "eos_token_id": 1, "add_bos_token": pre == "deepseek-v3",  # DeepSeek's tokenizer adds its BOS
    }  # fmt: skip
    return bpe, metadata


@pytest.mark.parametrize("pre", sorted(MODEL_SPLITS))
def test_a_text_prompt_is_split_as_the_models_own_tokenizer_splits_it(tmp_path, capsys, monkeypatch, pre):
    """DeepSeek-V3, Kimi-K2 (``deepseek2``) and GLM-4.5 files: transformers builds no config for them (and
    some releases refuse their tokenizers too), and knows none of these split rules (it would cut digits,
    CJK and ``_init`` by GPT-2's rule)."""
    from mmapstore.formats import read_checkpoint
    from mmapstore.transformers._gguf_tokenizer import gguf_tokenizer

    def refused(*args, **kwargs):
        raise ValueError("GGUF model with architecture deepseek2 is not supported yet.")  # an older transformers

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", refused)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refused)

    bpe, metadata = model_bpe(pre)
    path = str(tmp_path / "model.gguf")
    if pre == "glm4":
        glm4moe_gguf(path, tokenizer=metadata)
    else:
        deepseek_gguf(path, split_kv_b=True, tokenizer=metadata)
    tokenizer = gguf_tokenizer(read_checkpoint(path))
    bos = [0] if metadata["add_bos_token"] else []
    for text in PROMPTS:
        expected = bos + [i for piece in model_split(text, pre) for i in bpe.encode(piece).ids]
        assert tokenizer(text).input_ids == expected, text
        assert tokenizer.decode(expected, skip_special_tokens=True) == text
    args = ["run", path, "--device", "cpu", "--prompt", PROMPTS[0], "--max-new-tokens", "2", "--quiet", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(tokenizer(PROMPTS[0]).input_ids)


def test_a_split_rule_known_nowhere_is_named_in_a_warning(tmp_path, caplog):
    from mmapstore.formats import read_checkpoint
    from mmapstore.transformers._gguf_tokenizer import gguf_tokenizer

    _, metadata = model_bpe("glm4")
    path = str(tmp_path / "model.gguf")
    deepseek_gguf(path, split_kv_b=True, tokenizer=metadata | {"tokenizer_pre": "made-up-v9"})
    with caplog.at_level("WARNING"):
        tokenizer = gguf_tokenizer(read_checkpoint(path))
    assert "tokenizer.ggml.pre 'made-up-v9' is not a rule known here" in caplog.text
    assert tokenizer("hello").input_ids  # still a tokenizer: llama.cpp's default rule


def _tokenizer_only(path, metadata: dict):
    """A ``deepseek2`` file holding a tokenizer and one tensor: enough for :func:`gguf_tokenizer`."""
    from mmapstore.formats import read_checkpoint
    from mmapstore.transformers._gguf_tokenizer import gguf_tokenizer

    writer = gguf.GGUFWriter(str(path), "deepseek2")
    for method, value in metadata.items():
        getattr(writer, f"add_{method}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    _close(writer)
    return gguf_tokenizer(read_checkpoint(str(path)))


def test_a_byte_level_vocabulary_is_read_as_llama_cpp_reads_it(tmp_path):
    """Merges naming missing tokens are skipped (the tokenizers library would refuse the vocabulary), a plain
    token named as padding stays plain text, ``add_eos_token`` is honoured, a missing split rule is llama.cpp's
    default (digits in threes), Llama-3's family takes whole tokens first and adds BOS unless told."""
    bpe, metadata = model_bpe("glm4")
    tokens = metadata["token_list"]
    plain = next(index for index, token in enumerate(tokens) if not token.startswith("<|"))
    odd = metadata | {"token_merges": [*metadata["token_merges"], "Ġzz qq"], "pad_token_id": plain,
                      "add_eos_token": True}  # fmt: skip
    tokenizer = _tokenizer_only(tmp_path / "odd.gguf", odd)
    ids = tokenizer(PROMPTS[0]).input_ids
    assert ids[-1] == 1 and ids[:-1] == [i for piece in model_split(PROMPTS[0], "glm4") for i in bpe.encode(piece).ids]
    assert tokenizer.pad_token is None and tokens[plain] in tokenizer.convert_ids_to_tokens(
        tokenizer(tokens[plain]).input_ids
    )
    default = _tokenizer_only(tmp_path / "default.gguf", {k: v for k, v in metadata.items() if k != "tokenizer_pre"})
    pieces = [piece for piece, _ in default.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x 12345")]
    assert pieces == ["x", "Ġ", "123", "45"]
    whole = {"tokenizer_model": "gpt2", "tokenizer_pre": "llama-bpe", "token_list": ["a", "b", "c", "ab", "abc", "<s>"],
             "token_merges": ["a b"], "token_types": [1, 1, 1, 1, 1, 3], "bos_token_id": 5}  # fmt: skip
    assert _tokenizer_only(tmp_path / "llama3.gguf", whole)("abc").input_ids == [5, 4]  # BOS, then "abc" whole


def test_a_vocabulary_that_makes_no_tokenizer_is_one_line_from_run(tmp_path, capsys):
    _, metadata = model_bpe("deepseek-v3")
    tokens = list(metadata["token_list"])
    tokens[0] = "$A"  # a BOS spelled like template syntax would drop itself and double the prompt
    path = str(tmp_path / "model.gguf")
    deepseek_gguf(path, split_kv_b=True, tokenizer=metadata | {"token_list": tokens})
    assert main(["run", path, "--device", "cpu", "--prompt", "hello", "--quiet"]) == 1
    assert "cannot be added around a prompt" in capsys.readouterr().err


@pytest.mark.parametrize("architecture", ["deepseek2", "glm4moe", "gpt-oss"])
def test_hostile_sizes_in_the_metadata_are_a_format_error(tmp_path, architecture):
    """A zero or negative size (a head count of 0 would divide by zero) is refused by name, never a crash."""
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_head_count(0)
    writer.add_embedding_length(64)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    for proj in ("gate", "up", "down"):  # a whole MoE layer: the store opens it, the config is what fails
        writer.add_tensor(f"blk.0.ffn_{proj}_exps.weight", np.zeros((4, 32, 32), np.float32))
    _close(writer)
    with pytest.raises(FormatError, match=rf"model\.gguf: {architecture}\.[a-z_.]+ must be an integer of at least"):
        load_model(path, capacity=2)


@pytest.mark.parametrize("architecture", ["deepseek2", "llama4", "qwen3moe"])
def test_a_block_count_beyond_the_blocks_held_is_a_format_error(tmp_path, architecture):
    """4 billion blocks would become per-layer lists in the config (memory exhausted before any check): refused
    by name against the blocks the tensors hold, for our readers and transformers' alike."""
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2**32 - 1)  # the most a uint32 holds
    writer.add_embedding_length(64)
    for proj in ("gate", "up", "down"):
        writer.add_tensor(f"blk.0.ffn_{proj}_exps.weight", np.zeros((4, 32, 32), np.float32))
    _close(writer)
    with pytest.raises(
        FormatError, match=rf"{architecture}\.block_count is {2**32 - 1}, but the tensors hold blocks 0\.\.0"
    ):
        load_model(path, capacity=2)


@pytest.mark.parametrize(
    ("architecture", "key", "value", "kind"),
    [
        ("qwen3moe", "attention.key_length", 1.5, gguf.GGUFValueType.FLOAT32),  # transformers' config takes it
        ("olmoe", "vocab_size", 0, gguf.GGUFValueType.UINT32),  # an embedding of no rows
    ],
)
def test_config_values_that_build_no_model_are_a_format_error(tmp_path, architecture, key, value, kind):
    """Values a config accepts but the model's constructor cannot build from (found by fuzzing the metadata):
    refused by name, not a TypeError or AssertionError from torch."""
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), architecture)
    sizes = {"block_count": 1, "embedding_length": 64, "attention.head_count": 2, "expert_count": 4,
             "expert_used_count": 2, "feed_forward_length": 32, "expert_feed_forward_length": 32,
             "context_length": 256, "vocab_size": 32}  # fmt: skip
    for name, size in sizes.items():
        writer.add_key_value(f"{architecture}.{name}", size, gguf.GGUFValueType.UINT32)
    writer.add_key_value(f"{architecture}.{key}", value, kind)
    for proj, shape in (("gate", (4, 32, 64)), ("up", (4, 32, 64)), ("down", (4, 64, 32))):  # a whole MoE layer
        writer.add_tensor(f"blk.0.ffn_{proj}_exps.weight", np.zeros(shape, np.float32))
    _close(writer)
    with pytest.raises(FormatError, match=r"model\.gguf: its config makes no [a-z0-9_]+ model: \w+Error"):
        load_model(path, capacity=2)


def _llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order (``LlamaModel.permute``): each head's rotary halves interleaved."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def mixtral_gguf(path: str, *, experts_type=Q.F32, seed: int = 0, legacy: bool = False):
    """A Mixtral GGUF written as llama.cpp's converter writes one (``llama`` with ``expert_count``: Q and K rows
    permuted for its RoPE, experts merged per projection, or one tensor per expert in older files).  Returns
    the transformers model it holds."""
    config = transformers.MixtralConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        intermediate_size=32, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = _source_model(config, seed)
    metadata = {
        "block_count": 2, "context_length": 256, "embedding_length": HIDDEN, "feed_forward_length": 32,
        "head_count": 4, "head_count_kv": 2, "rope_dimension_count": HIDDEN // 4,
        "rope_freq_base": config.rope_parameters["rope_theta"], "layer_norm_rms_eps": config.rms_norm_eps,
        "expert_count": EXPERTS, "expert_used_count": TOP_K, "vocab_size": VOCAB,
    }  # fmt: skip

    def permuted_and_per_expert(add, key, array, layer) -> bool:
        if key.endswith("q_proj.weight") or key.endswith("k_proj.weight"):
            heads = 4 if key.endswith("q_proj.weight") else 2
            add(f"blk.{layer}.attn_{key.split('.')[-2][0]}.weight", _llama_permute(array, heads))
        elif legacy and key.endswith("mlp.experts.gate_up_proj"):  # older files: one tensor per expert
            for expert in range(EXPERTS):
                add(f"blk.{layer}.ffn_gate.{expert}.weight", array[expert, :32], experts_type)
                add(f"blk.{layer}.ffn_up.{expert}.weight", array[expert, 32:], experts_type)
        elif legacy and key.endswith("mlp.experts.down_proj"):
            for expert in range(EXPERTS):
                add(f"blk.{layer}.ffn_down.{expert}.weight", array[expert], experts_type)
        else:
            return False
        return True

    _write_source(path, model, "llama", gguf.MODEL_ARCH.LLAMA, metadata, special=permuted_and_per_expert,
                  experts_type=experts_type, seed=seed)  # fmt: skip
    return model


def olmoe_gguf(path: str, *, seed: int = 0):
    """An OLMoE GGUF written as llama.cpp's converter writes one (``olmoe``: llama.cpp's names, unpermuted,
    experts merged per projection).  Returns the transformers model it holds."""
    config = transformers.OlmoeConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
        intermediate_size=32, num_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = _source_model(config, seed, lambda name: (0.0, 0.2) if "experts" in name else
                          (0.5, 0.2) if "norm" in name else None)  # fmt: skip
    metadata = {
        "block_count": 2, "context_length": 256, "embedding_length": HIDDEN, "feed_forward_length": 32,
        "head_count": 4, "head_count_kv": 4, "rope_freq_base": config.rope_parameters["rope_theta"],
        "layer_norm_rms_eps": 1e-5, "expert_count": EXPERTS, "expert_used_count": TOP_K, "vocab_size": VOCAB,
    }  # fmt: skip
    _write_source(path, model, "olmoe", gguf.MODEL_ARCH.OLMOE, metadata, seed=seed)
    return model


def llama4_rope_freqs(rope: dict, dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama-3 scaling (its code, float32 tensors)."""
    factor, low, high, old = (rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"))  # fmt: skip
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    divisors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            divisors.append(1)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32).numpy()


def llama4_gguf(path: str, *, experts_type=Q.F32, seed: int = 0, scaled: bool = True):
    """A Llama-4 GGUF written as llama.cpp's converter writes one (``llama4``: Q/K unpermuted, the transposed
    ``gate_up_proj`` split into gate and up experts, Llama-3 RoPE scaling as a ``rope_freqs`` tensor).  Four
    layers, experts in every second, the fourth without RoPE.  Returns the transformers model it holds."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}  # fmt: skip
    config = transformers.Llama4TextConfig(
        hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        vocab_size=VOCAB, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=EXPERTS,
        num_experts_per_tok=1, interleave_moe_layer_step=2, max_position_embeddings=4096,
        rope_parameters=rope if scaled else {"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    model = _source_model(config, seed)
    metadata = {
        "block_count": 4, "context_length": 4096, "embedding_length": HIDDEN, "feed_forward_length": 96,
        "head_count": 2, "head_count_kv": 1, "key_length": 32, "value_length": 32, "rope_dimension_count": 32,
        "rope_freq_base": 10000.0, "layer_norm_rms_eps": config.rms_norm_eps, "vocab_size": VOCAB,
        "expert_count": EXPERTS, "expert_used_count": 1, "expert_feed_forward_length": 32,
        "interleave_moe_layer_step": 2,
    }  # fmt: skip

    def experts(add, key, array, layer) -> bool:  # [E, H, 2I] and [E, I, H]: transposed, gate_up split
        if key.endswith("experts.gate_up_proj"):
            rows = array.transpose(0, 2, 1)
            half = rows.shape[1] // 2
            add(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(rows[:, :half]), experts_type)
            add(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(rows[:, half:]), experts_type)
        elif key.endswith("experts.down_proj"):
            add(f"blk.{layer}.ffn_down_exps.weight", np.ascontiguousarray(array.transpose(0, 2, 1)), experts_type)
        else:
            return False
        return True

    def rope_freqs(add) -> None:
        if scaled:
            add("rope_freqs.weight", llama4_rope_freqs(rope, 32))

    decoded = _write_source(path, model, "llama4", gguf.MODEL_ARCH.LLAMA4, metadata, special=experts,
                            experts_type=experts_type, seed=seed, extra=rope_freqs)  # fmt: skip
    with torch.no_grad():  # quantized experts: the reference holds the values the file decodes to
        for layer, block in enumerate(model.model.layers):
            if f"blk.{layer}.ffn_gate_exps.weight" in decoded:
                gate, up, down = (torch.from_numpy(decoded[f"blk.{layer}.ffn_{p}_exps.weight"])
                                  for p in ("gate", "up", "down"))  # fmt: skip
                block.feed_forward.experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1).transpose(1, 2))
                block.feed_forward.experts.down_proj.copy_(down.transpose(1, 2))
    return model


@pytest.mark.parametrize(
    ("theta", "dim", "rope"),
    [
        (5e5, 128, {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192}),  # Llama-4 Scout: a step, no smoothed band
        (5e5, 128, {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),  # Llama-3's curve at Scout's factor
        (5e5, 128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),  # Llama-3.1
        (1e4, 64, {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                   "original_max_position_embeddings": 2048}),  # another low factor: another curve, same shape
    ],
)  # fmt: skip
def test_llama3_scaling_is_recovered_from_the_divisors_llama_cpp_writes(theta, dim, rope):
    from mmapstore.transformers._gguf_llama4 import llama3_divisors, rope_from_freqs

    freqs = llama4_rope_freqs({"rope_theta": theta, **rope}, dim)
    got = rope_from_freqs(freqs, theta, dim, {"max_position_embeddings": 1 << 20})
    assert got["rope_type"] == "llama3"
    if rope["low_freq_factor"] == 1.0:  # the parameters themselves where the file's choice is the usual one
        assert got == {"rope_type": "llama3", "rope_theta": theta, **rope}
    args = (got[key] for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    np.testing.assert_allclose(llama3_divisors(theta, dim, *args), freqs, rtol=2e-6)  # every divisor, either way


def test_divisors_of_another_shape_become_longrope_and_none_default():
    from mmapstore.transformers._gguf_llama4 import rope_from_freqs

    odd = np.array([1.0, 3.0, 1.5, 2.0], np.float32)  # not monotone: no Llama-3 curve gives it
    got = rope_from_freqs(odd, 1e4, 8, {"max_position_embeddings": 4096})
    assert got["rope_type"] == "longrope" and got["attention_factor"] == 1.0
    assert got["short_factor"] == got["long_factor"] == odd.tolist()
    assert rope_from_freqs(np.ones(4, np.float32), 1e4, 8, {}) == {"rope_type": "default", "rope_theta": 1e4}
    step = np.array([1.0, 1.0, 8.0, 8.0], np.float32)  # no divisor in the band: thresholds anywhere between
    assert rope_from_freqs(step, 1e4, 8, {})["rope_type"] == "llama3"


def test_llama4_sizes_llama_cpp_asserts_are_a_format_error(tmp_path):
    """A RoPE size other than the head size (llama.cpp asserts they are equal) and a missing MoE interleave
    step are refused by name, not a traceback from the rotary embedding."""
    path = str(tmp_path / "model.gguf")
    llama4_gguf(path)
    for name, change in (
        ("rope", {"llama4.rope.dimension_count": 16}),
        ("step", {"llama4.interleave_moe_layer_step": None}),
    ):
        _rewrite(path, str(tmp_path / f"{name}.gguf"), change)
    with pytest.raises(FormatError, match=r"rope\.dimension_count = attention\.key_length .* found 16, 32, 32"):
        load_model(tmp_path / "rope.gguf", capacity=2)
    with pytest.raises(FormatError, match=r"llama4\.interleave_moe_layer_step must be an integer"):
        load_model(tmp_path / "step.gguf", capacity=2)


def _rewrite(source: str, target: str, change: dict, tensors: dict | None = None) -> None:
    """``source`` written again with its architecture's scalar metadata ``change``d (None drops the key) and
    ``tensors`` replaced."""
    reader = gguf.GGUFReader(source)
    architecture = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(target, architecture)
    for field in reader.fields.values():
        scalar = field.types and field.types[0] != gguf.GGUFValueType.ARRAY
        if field.name.startswith(f"{architecture}.") and scalar:
            value = change.get(field.name, field.contents())
            if value is not None:
                writer.add_key_value(field.name, value, field.types[0])
    for tensor in reader.tensors:
        values = (tensors or {}).get(tensor.name, np.array(tensor.data))
        writer.add_tensor(tensor.name, values, raw_dtype=tensor.tensor_type if values.dtype == np.uint8 else None)
    _close(writer)


def test_a_rope_freqs_tensor_of_the_wrong_shape_is_a_format_error(tmp_path):
    path = str(tmp_path / "model.gguf")
    llama4_gguf(path)
    _rewrite(path, str(tmp_path / "bad.gguf"), {}, {"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(FormatError, match=r"bad\.gguf: tensor 'rope_freqs\.weight' must be F32 of shape \(16,\)"):
        load_model(tmp_path / "bad.gguf", capacity=2)


# Files written from a transformers model, as llama.cpp writes them, for architectures transformers builds
# no model from GGUF (or reads wrongly): (builder, its arguments, the model class the runtime builds).
SOURCES = {
    "mixtral": (mixtral_gguf, {}, "MixtralForCausalLM"),
    "mixtral-per-expert": (mixtral_gguf, {"legacy": True}, "MixtralForCausalLM"),
    "olmoe": (olmoe_gguf, {}, "OlmoeForCausalLM"),
    "glm4moe": (glm4moe_gguf, {}, "Glm4MoeForCausalLM"),
    "llama4": (llama4_gguf, {}, "Llama4ForCausalLM"),
    "llama4-q8_0-unscaled": (llama4_gguf, {"experts_type": Q.Q8_0, "scaled": False}, "Llama4ForCausalLM"),
    "gpt_oss-f32": (gpt_oss_gguf, {}, "GptOssForCausalLM"),
    "gpt_oss-mxfp4": (gpt_oss_gguf, {"experts_type": Q.MXFP4}, "GptOssForCausalLM"),
    **{
        f"deepseek-{name}": (deepseek_gguf, kwargs, "DeepseekV3ForCausalLM")
        for name, kwargs in DEEPSEEK_VARIANTS.items()
    },
}


def _check_config(source: str, loaded) -> None:
    config = loaded.model.config
    if source.startswith("deepseek"):
        assert (config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank, config.q_lora_rank) == (16, 16, 32, 48)
        assert len(loaded.layers) == 2  # the first layer is dense
    elif source == "glm4moe":
        assert (config.num_hidden_layers, config.attention_bias, config.rope_parameters["partial_rotary_factor"]) == (
            3,
            True,
            0.5,
        )
        assert [layer.experts.layer_index for layer in loaded.layers] == [1, 2]  # not the MTP block's
    elif source.startswith("llama4"):
        assert config.no_rope_layers == [1, 1, 1, 0] and config.attention_chunk_size == 8192
        assert [layer.experts.layer_index for layer in loaded.layers] == [1, 3]
        want = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024} if source == "llama4" else {"rope_type": "default"}  # fmt: skip
        assert {key: config.rope_parameters[key] for key in want} == want


@pytest.mark.parametrize("source", list(SOURCES))
def test_a_gguf_file_runs_with_the_logits_of_the_model_it_was_written_from(tmp_path, source):
    """transformers reads these files not at all (or wrongly); the runtime reads them as llama.cpp writes them,
    bit for bit (with quantized experts, the reference holds what the blocks decode to; Llama-4's stock block
    computes every expert for every token, so there the logits agree to rounding and the greedy tokens
    exactly)."""
    builder, kwargs, model_class = SOURCES[source]
    path = str(tmp_path / "model.gguf")
    stock = builder(path, **kwargs)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(12))
    want = logits(stock, ids)
    for capacity in (2, EXPERTS):
        with load_model(path, capacity=capacity, on_miss="fetch", dtype=torch.float32) as loaded:
            assert type(loaded.model).__name__ == model_class
            _check_config(source, loaded)
            if source.startswith("llama4"):  # the stock block runs every expert on every token: kernels round
                torch.testing.assert_close(logits(loaded.model, ids), want, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(logits(loaded.model, ids), want), capacity
    if source.startswith(("deepseek", "llama4")):
        assert torch.equal(greedy_tokens(path, ids), greedy_tokens_of(stock, ids))


def test_the_gguf_headers_are_read_once_by_the_store_and_serve_as_the_config(gguf_files, monkeypatch):
    from transformers import modeling_gguf_pytorch_utils as gguf_loading

    from mmapstore.formats import _gguf

    reads: list[str] = []
    original = _gguf.read_gguf_header

    def counting(path):
        reads.append(os.path.basename(path))
        return original(path)

    monkeypatch.setattr(_gguf, "read_gguf_header", counting)  # every part's header, whoever asks
    parses: list[str] = []
    legacy = gguf_loading.load_gguf_checkpoint

    def parsing(path, *args, **kwargs):  # transformers' full parse of a file (every array of its metadata)
        parses.append(os.path.basename(path))
        return legacy(path, *args, **kwargs)

    monkeypatch.setattr(gguf_loading, "load_gguf_checkpoint", parsing)
    with load_model(gguf_files["split"], capacity=2, dtype=torch.float32) as loaded:
        assert loaded.model.config.tie_word_embeddings is False
    assert sorted(reads) == sorted(os.listdir(gguf_files["split"])), reads  # each of the 3 parts once
    # Some transformers releases parse the first part once to build the config they read; the tensor processor
    # takes the model's config rather than parsing the file again (it did: a second parse).
    assert parses in ([], ["model-00001-of-00003.gguf"]), parses
