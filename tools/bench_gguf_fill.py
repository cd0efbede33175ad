"""Fill a GPU's expert pools from a Q4_K GGUF file: ggml blocks decoded on the device against on the host.

A Qwen3-MoE GGUF of Qwen3-30B-A3B's per-layer shape (hidden 2048, 128 experts
of width 768, top-8) with fewer layers is written with gguf-py's writer under
llama.cpp's names: the non-expert weights of a random transformers model (F16)
and random Q4_K expert blocks with finite scales (gguf-py has no K-quant
quantizer; the fill does not care what the values are).  It is loaded with
:func:`mmapstore.transformers.load_model` on CUDA twice in the same process:

- ``device``: the default, the experts' ggml blocks cross the link through
  the device copier and torch kernels decode them on the GPU;
- ``host``: the writer declines to stage ggml blocks, so every expert
  is decoded by the numpy reference on the host and copied as bf16 (what
  the runtime did before).

With every expert resident, the pools are refilled from the page cache
(warm) and from a dropped cache (cold); the figure is bf16 pool bytes filled
per second.  Then greedy decode with ``--capacity`` experts of 128 resident per
layer (``on_miss="fetch"``; random weights spread the routing, so most steps
copy experts in), tokens per second.  Runs alternate between the two paths.

    python tools/bench_gguf_fill.py --dir /scratch --layers 4 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from mmapstore.io import evict
from mmapstore.transformers import load_model


def write_gguf(path: str, layers: int, hidden: int, experts: int, width: int) -> None:
    import gguf
    import transformers

    config = transformers.Qwen3MoeConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=2048, moe_intermediate_size=width, num_experts=experts, num_experts_per_tok=8,
        norm_topk_prob=True, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):  # shapes only: the experts would be gigabytes of float32
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rng = np.random.default_rng(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, layers)
    writer = gguf.GGUFWriter(path, "qwen3moe")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(6144)
    writer.add_head_count(32)
    writer.add_head_count_kv(4)
    writer.add_key_length(128)
    writer.add_value_length(128)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(8)
    writer.add_expert_feed_forward_length(width)
    writer.add_vocab_size(2048)
    for key, value in model.state_dict().items():
        if ".mlp.experts." not in key:
            base, suffix = key.rsplit(".", 1)
            shape = tuple(value.shape)
            array = np.ones(shape, np.float32) if len(shape) == 1 else rng.normal(0, 0.02, shape).astype(np.float16)
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", array)
    q4_k = gguf.GGMLQuantizationType.Q4_K
    for layer in range(layers):
        for proj, (rows, cols) in (("gate", (width, hidden)), ("up", (width, hidden)), ("down", (hidden, width))):
            raw = rng.integers(0, 256, (experts, rows, cols // 256, 144), dtype=np.uint8)
            for start in (0, 2):  # d and dmin: small finite f16
                raw[..., start : start + 2] = (
                    rng.uniform(0, 1e-3, raw.shape[:-1]).astype(np.float16)[..., None].view(np.uint8)
                )
            writer.add_tensor(f"blk.{layer}.ffn_{proj}_exps.weight", raw.reshape(experts, rows, -1), raw_dtype=q4_k)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def refill(loaded, path: str, cold: bool) -> float:
    """Seconds to copy every expert into its slot again (cold: page cache dropped first)."""
    if cold:
        evict(path)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for runtime in loaded.layers:
        runtime.fill_initial()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_rate(path: str, capacity: int, tokens: int) -> float:
    with load_model(path, capacity=capacity, on_miss="fetch", device="cuda", dtype=torch.bfloat16) as loaded:
        ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            loaded.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
            torch.cuda.synchronize()
            start = time.perf_counter()
            loaded.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from mmapstore.transformers._slots import SlotWriter

    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "qwen3moe-q4_k.gguf")
    if not os.path.exists(path):
        write_gguf(path, args.layers, 2048, 128, 768)
    on_device = SlotWriter._stage_ggml
    # The host arm declines to stage ggml blocks, so every expert is decoded on the host (the decision point).
    paths = {"device": on_device, "host": lambda *args: False}
    rates: dict[str, dict[str, list[float]]] = {name: {"warm": [], "cold": [], "decode": []} for name in paths}
    pool_nbytes = 0
    for rep in range(args.reps):
        for name in paths if rep % 2 == 0 else reversed(list(paths)):
            SlotWriter._stage_ggml = paths[name]  # type: ignore[method-assign]
            with load_model(path, device="cuda", dtype=torch.bfloat16) as loaded:
                pool_nbytes = loaded.stats().pool_nbytes
                refill(loaded, path, cold=False)  # page tables and registrations settle
                rates[name]["warm"].append(pool_nbytes / refill(loaded, path, cold=False) / 1e9)
                rates[name]["cold"].append(pool_nbytes / refill(loaded, path, cold=True) / 1e9)
            rates[name]["decode"].append(decode_rate(path, args.capacity, args.tokens))
    SlotWriter._stage_ggml = on_device  # type: ignore[method-assign]
    result = {
        "file_nbytes": os.path.getsize(path),
        "pool_nbytes": pool_nbytes,
        "layers": args.layers,
        "capacity": args.capacity,
        "gpu": torch.cuda.get_device_name(),
        "median": {name: {kind: statistics.median(values) for kind, values in r.items()} for name, r in rates.items()},
        "samples": rates,
    }
    median = result["median"]
    for kind, unit in (("warm", "GB/s"), ("cold", "GB/s"), ("decode", "tok/s")):
        device, host = median["device"][kind], median["host"][kind]
        print(f"{kind:6s} device {device:8.2f} {unit}  host {host:8.2f} {unit}  ratio {device / host:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
