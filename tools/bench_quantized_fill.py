"""Fill a GPU's expert pools from a bf16 and an MXFP4 copy of one GPT-OSS-shaped checkpoint.

A GPT-OSS model of GPT-OSS-20B's per-layer expert shape (hidden 2880, 32
experts of width 2880, biases) with fewer layers and random bf16 weights is
saved with ``save_pretrained``; its experts are then encoded to MXFP4 (OCP
block scaling, as OpenAI ships GPT-OSS) into a second checkpoint.  Each is
loaded with :func:`mmapstore.transformers.load_model` on CUDA with every
expert resident, and the pools are refilled from the page cache (warm) and
from a dropped cache (cold); the figure is bf16 pool bytes filled per second,
so the two checkpoints compare on what the model gets.  Then greedy decode
with ``--capacity`` experts of 32 resident per layer (``on_miss="fetch"``,
random weights: routing is spread, so most steps copy experts in), tokens
per second for each.  Every run is in the same process, one after the
other, on the same disk and GPU.

    python tools/bench_quantized_fill.py --dir /scratch --layers 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import torch

from mmapstore.io import evict
from mmapstore.transformers import load_model

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def encode(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` float rows -> MXFP4 blocks ``[R, C/32, 16]`` (low nibble first), E8M0 scales ``[R, C/32]``."""
    count, cols = rows.shape
    groups = rows.float().reshape(count, cols // 32, 32)
    peak = groups.abs().amax(-1)
    exponent = torch.where(peak > 0, torch.ceil(torch.log2(peak.clamp_min(1e-30) / 6.0)), torch.full_like(peak, -127))
    exponent = exponent.clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    table = torch.tensor(E2M1, device=rows.device)
    codes = (scaled.abs()[..., None] - table).abs().argmin(-1) + 8 * (scaled < 0)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8).contiguous()


def make_checkpoints(root: str, layers: int) -> tuple[str, str]:
    import transformers
    from safetensors.torch import load_file, save_file

    config = transformers.GptOssConfig(
        hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
        num_hidden_layers=layers, num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    plain = os.path.join(root, "bf16")
    model.save_pretrained(plain)
    quantized = os.path.join(root, "mxfp4")
    os.makedirs(quantized, exist_ok=True)
    tensors = {}
    for name in sorted(os.listdir(plain)):
        if name.endswith(".safetensors"):
            for key, value in load_file(os.path.join(plain, name)).items():
                if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    rows = value.cuda().transpose(1, 2)  # [E, out, in]
                    encoded = [encode(rows[expert]) for expert in range(rows.shape[0])]
                    tensors[key + "_blocks"] = torch.stack([blocks for blocks, _ in encoded]).cpu()
                    tensors[key + "_scales"] = torch.stack([scales for _, scales in encoded]).cpu()
                else:
                    tensors[key] = value
    save_file(tensors, os.path.join(quantized, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(plain, "config.json")) as handle:
        saved = json.load(handle)
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    with open(os.path.join(quantized, "config.json"), "w") as handle:
        json.dump(saved, handle)
    del model
    torch.cuda.empty_cache()
    return plain, quantized


def fill_gbps(path: str, reps: int, cold: bool) -> tuple[list[float], int, int]:
    """bf16 pool GB/s of refilling every expert of every layer, and the pool and checkpoint expert bytes."""
    # Cold refills read with pread (registered windows would pin the pages they serve).
    with load_model(path, device="cuda", dtype=torch.bfloat16, source="pread" if cold else "auto") as loaded:
        store_nbytes = sum(layer.nbytes for layer in loaded.store.layers)
        source = loaded.store.byte_source()
        samples, pool_nbytes = [], 0
        for _ in range(reps):
            if cold:
                for file in range(len(source.files)):
                    evict(source.path(file), source.mapping(file))
            torch.cuda.synchronize()
            start = time.perf_counter()
            pool_nbytes = sum(runtime.fill_initial() for runtime in loaded.layers)
            torch.cuda.synchronize()
            samples.append(pool_nbytes / (time.perf_counter() - start) / 1e9)
    return samples, pool_nbytes, store_nbytes


def decode_tokens_per_second(path: str, capacity: int, reps: int, new_tokens: int = 32) -> list[float]:
    """Greedy decode tokens/s with ``capacity`` of 32 experts resident per layer
    (``on_miss="fetch"``: a missing expert is copied in before its tokens run)."""
    with load_model(path, device="cuda", dtype=torch.bfloat16, capacity=capacity) as loaded:
        model = loaded.model
        prompt = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
        mask = torch.ones_like(prompt)
        with torch.no_grad():
            model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            samples = []
            for _ in range(reps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)  # fmt: skip
                torch.cuda.synchronize()
                samples.append(new_tokens / (time.perf_counter() - start))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=8, help="experts resident per layer for the decode run")
    args = parser.parse_args()
    root = os.path.join(args.dir, "quantized-fill")
    os.makedirs(root, exist_ok=True)
    try:
        plain, quantized = make_checkpoints(root, args.layers)
        results = {}
        for label, path in (("bf16", plain), ("mxfp4", quantized)):
            for cold in (False, True):
                samples, pool, stored = fill_gbps(path, args.reps, cold)
                key = f"{label} {'cold' if cold else 'warm'}"
                results[key] = statistics.median(samples)
                print(json.dumps({"case": key, "pool_gbps": samples, "pool_nbytes": pool, "expert_bytes_on_disk": stored}),
                      flush=True)  # fmt: skip
        for state in ("warm", "cold"):
            ratio = results[f"mxfp4 {state}"] / results[f"bf16 {state}"]
            print(f"{state}: mxfp4 fills the bf16 pools at {ratio:.2f}x the bf16 checkpoint's rate")
        decode = {}
        for label, path in (("bf16", plain), ("mxfp4", quantized)):
            samples = decode_tokens_per_second(path, args.capacity, args.reps)
            decode[label] = statistics.median(samples)
            print(json.dumps({"case": f"{label} decode, capacity {args.capacity}/32", "tokens_per_s": samples}),
                  flush=True)  # fmt: skip
        print(f"decode at capacity {args.capacity}/32: mxfp4 {decode['mxfp4'] / decode['bf16']:.2f}x bf16 tokens/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
