"""Benchmark the transformers runtime against all-on-GPU and accelerate offloading, in one process.

A Qwen3-MoE model of Qwen3-30B-A3B's per-layer shape (hidden 2048, 128
experts, top-8, expert width 768) with fewer layers and random bf16 weights
is made on the GPU and saved with ``save_pretrained``; then, in this order:

1. all on the GPU, ``grouped_mm`` experts (the ceiling);
2. mmapstore at the given capacities and refresh settings (the stock model
   waits on the CPU meanwhile, so the device numbers are the runtime's own);
3. accelerate ``dispatch_model``: routed experts on the CPU, everything else
   on the GPU, and again with the first layers' experts on the GPU so the
   GPU memory matches each mmapstore capacity.

Each result is a JSON line appended to ``--out`` as soon as it is measured.
``--tiny`` runs the same code on a small model (CPU is fine) to check it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from mmapstore.transformers import load_model
from mmapstore.transformers._run_cli import _Timer, memory_now


def log(out: str, record: dict[str, Any]) -> None:
    record = {"wall": time.time(), **record}
    print(json.dumps(record), flush=True)
    with open(out, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: Any,
    prompt: torch.Tensor,
    new_tokens: int,
    device: torch.device,
    reps: int = 3,
    warmup_tokens: int = 4,
    random_tokens: int = 32,
    before: Any = None,
) -> dict[str, Any]:
    """Prefill seconds (median forward of the prompt) and greedy decode tokens/s."""
    with torch.no_grad():
        # Warm-up of both shapes (prompt and one-token decode): kernels, allocator, page cache.
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=warmup_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        sync(device)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model(prompt)
            sync(device)
            times.append(time.perf_counter() - start)
        if before is not None:
            before("greedy")
        timer = _Timer()
        timer.started = time.perf_counter()
        output = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            streamer=timer,
            pad_token_id=0,
        )
        sync(device)
        # Decode with seeded random next tokens instead of the argmax: a random-weight model
        # repeats one token, whose routing barely changes; random inputs route near-uniformly.
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        if before is not None:
            before("random")
        feed = torch.randint(
            0, model.config.vocab_size, (random_tokens, 1, 1), generator=torch.Generator().manual_seed(2)
        )
        sync(device)
        start = time.perf_counter()
        for token in feed:
            cache = model(token.to(prompt.device), past_key_values=cache, use_cache=True).past_key_values
        sync(device)
        random_seconds = time.perf_counter() - start
        if before is not None:
            before("end")
    first = timer.first or timer.started
    decode_seconds = timer.last - first
    prefill = statistics.median(times)
    return {
        "prefill_s": prefill,
        "prefill_tok_s": prompt.shape[1] / prefill,
        "decode_tok_s": (timer.new_tokens - 1) / decode_seconds if decode_seconds > 0 else None,
        "new_tokens": timer.new_tokens,
        "random_decode_tok_s": random_tokens / random_seconds if random_tokens else None,
        "ids": output[0, prompt.shape[1] :].tolist(),
    }


def split_map(model: torch.nn.Module, cpu_names: set[str]) -> dict[str, int | str]:
    """A complete accelerate device map: ``cpu_names`` on the CPU, every other module on GPU 0."""
    device_map: dict[str, int | str] = {}

    def place(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in cpu_names:
                device_map[path] = "cpu"
            elif any(target.startswith(path + ".") for target in cpu_names):
                if any(True for _ in child.parameters(recurse=False)) or any(
                    True for _ in child.buffers(recurse=False)
                ):
                    raise ValueError(f"{path} holds tensors of its own and a CPU child")
                place(path + ".", child)
            else:
                device_map[path] = 0

    place("", model)
    return device_map


def cpu_matmul_probe(hidden: int, width: int) -> dict[str, float]:
    """Seconds for one decode token through one expert on the CPU, bf16 and float32."""
    result = {}
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, hidden, dtype=dtype)
        w = torch.randn(width, hidden, dtype=dtype).T  # [k, n] view of an nn.Linear weight, as the runtime uses
        x @ w
        start = time.perf_counter()
        for _ in range(20):
            x @ w
        result[f"cpu_gemv_{str(dtype).removeprefix('torch.')}_ms"] = (time.perf_counter() - start) / 20 * 1e3
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="where the checkpoint is written")
    parser.add_argument("--out", required=True, help="JSON lines file")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--accelerate-tokens", type=int, default=4)
    parser.add_argument(
        "--runs",
        default="32:1:fetch,64:1:fetch,32:1:cpu,64:1:cpu,128:1:fetch",
        help="capacity:every:on_miss[:source],... (source: how bytes reach the pools, default auto)",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--skip-accelerate", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    shape = dict(
        hidden_size=2048,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        intermediate_size=6144,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
    )
    if args.tiny:
        shape = dict(
            hidden_size=128,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=512,
        )
    config = Qwen3MoeConfig(**shape, num_hidden_layers=args.layers, norm_topk_prob=True, tie_word_embeddings=False)
    log(
        args.out,
        {
            "case": "machine",
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            **cpu_matmul_probe(shape["hidden_size"], shape["moe_intermediate_size"]),
        },
    )

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    sync(device)
    made = time.perf_counter() - start
    model.save_pretrained(args.dir)
    size = sum(os.path.getsize(os.path.join(args.dir, n)) for n in os.listdir(args.dir))
    log(args.out, {"case": "checkpoint", "make_s": made, "save_s": time.perf_counter() - start - made, "nbytes": size})

    prompt = torch.randint(
        0, shape["vocab_size"], (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1)
    ).to(device)
    experts_modules = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    expert_layer_nbytes = sum(p.numel() * p.element_size() for p in experts_modules[0].parameters())

    # 1. All on the GPU.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ceiling = measure(model, prompt, args.new_tokens, device)
    with torch.no_grad():
        ceiling_logits = model(prompt).logits.float().cpu()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    log(
        args.out,
        {
            "case": "all_on_gpu",
            "experts": model.config._experts_implementation,
            "device_peak_nbytes": peak,
            **{k: v for k, v in ceiling.items() if k != "ids"},
        },
    )
    model.set_experts_implementation("batched_mm")
    batched = measure(model, prompt, args.new_tokens, device)
    log(
        args.out,
        {
            "case": "all_on_gpu",
            "experts": "batched_mm",
            "tokens_equal_grouped_mm": batched["ids"] == ceiling["ids"],
            **{k: v for k, v in batched.items() if k != "ids"},
        },
    )
    model.set_experts_implementation("grouped_mm")
    model.to("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. mmapstore.
    peaks = {}
    for spec in args.runs.split(","):
        capacity, every, on_miss, *rest = spec.split(":")
        source = rest[0] if rest else "auto"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        started = time.perf_counter()
        with load_model(
            args.dir,
            capacity=int(capacity),
            every=int(every),
            on_miss=on_miss,
            device=device,
            dtype=torch.bfloat16,
            source=source,  # type: ignore[arg-type]
        ) as loaded:
            load_s = time.perf_counter() - started
            with torch.no_grad():
                ours_logits = loaded.model(prompt).logits.float().cpu()
            prefill_chunks = loaded.stats().chunked_forwards
            loaded.reset_stats()
            copier = loaded.writer.copier if loaded.writer is not None else None
            snapshots = {}

            def snapshot(phase: str, loaded: Any = loaded, snapshots: dict[str, Any] = snapshots) -> None:
                snapshots[phase] = loaded.stats()
                loaded.reset_stats()

            result = measure(loaded.model, prompt, args.new_tokens, device, before=snapshot)
            stats = snapshots["random"]  # the greedy generate (prefill + decode)
            random_stats = snapshots["end"]
            peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else 0
            peaks[int(capacity)] = max(peak, peaks.get(int(capacity), 0))
            tokens = max(1, stats.pairs // len(loaded.layers) // shape["num_experts_per_tok"])
            log(
                args.out,
                {
                    "case": "mmapstore",
                    "capacity": int(capacity),
                    "every": int(every),
                    "on_miss": on_miss,
                    "source": source,
                    "load_s": load_s,
                    "device_peak_nbytes": peak,
                    "pool_nbytes": stats.pool_nbytes,
                    "non_expert_nbytes": loaded.non_expert_nbytes,
                    "hit_rate": stats.hit_rate,
                    "fetched_pairs": stats.fetched_pairs,
                    "cpu_pairs": stats.cpu_pairs,
                    "chunked_forwards": stats.chunked_forwards,
                    "prefill_chunked_forwards": prefill_chunks,
                    "copier": None
                    if copier is None
                    else {"nbytes": copier.stats.nbytes, "fallbacks": copier.stats.fallbacks},
                    "copied_nbytes_per_token": stats.copied_nbytes / tokens,
                    "cpu_read_nbytes_per_token": stats.cpu_read_nbytes / tokens,
                    "refreshes": stats.refreshes,
                    "random_hit_rate": random_stats.hit_rate,
                    "random_copied_nbytes_per_token": random_stats.copied_nbytes / max(1, random_stats.forwards),
                    "random_cpu_read_nbytes_per_token": random_stats.cpu_read_nbytes / max(1, random_stats.forwards),
                    "tokens_equal_ceiling": result["ids"] == ceiling["ids"],
                    "first_diverging_token": next(
                        (i for i, (a, b) in enumerate(zip(result["ids"], ceiling["ids"], strict=True)) if a != b), None
                    ),
                    "prompt_logits_max_abs_diff": float((ours_logits - ceiling_logits).abs().max()),
                    "prompt_logits_equal": bool(torch.equal(ours_logits, ceiling_logits)),
                    **memory_now(),
                    **{k: v for k, v in result.items() if k != "ids"},
                },
            )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.skip_accelerate or device.type != "cuda":
        return 0

    # 3. accelerate: experts of layers >= first_cpu on the CPU, everything else on the GPU.
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules

    minimum, done = None, set()
    for label, budget in [("min", None), *[(f"same_as_capacity_{c}", p) for c, p in sorted(peaks.items())]]:
        on_gpu = 0 if minimum is None else max(0, min(args.layers, int((budget - minimum) // expert_layer_nbytes)))
        if on_gpu in done:
            log(args.out, {"case": "accelerate", "label": label, "expert_layers_on_gpu": on_gpu, "same_as": on_gpu})
            continue
        done.add(on_gpu)
        cpu_names = {f"model.layers.{i}.mlp.experts" for i in range(on_gpu, args.layers)}
        device_map = split_map(model, cpu_names)
        remove_hook_from_submodules(model)
        model.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        dispatch_model(model, device_map=device_map, main_device=0)
        result = measure(model, prompt, args.accelerate_tokens, device, reps=1, warmup_tokens=2, random_tokens=0)
        peak = torch.cuda.max_memory_allocated()
        if minimum is None:
            minimum = peak
        log(
            args.out,
            {
                "case": "accelerate",
                "label": label,
                "expert_layers_on_gpu": on_gpu,
                "device_peak_nbytes": peak,
                **{k: v for k, v in result.items() if k != "ids"},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
