"""Greedy decode with next-layer prefetch against without, in one process, on CUDA.

The model is ``bench_gguf_fill.py``'s: a Qwen3-MoE GGUF of Qwen3-30B-A3B's
per-layer shape (hidden 2048, 128 experts of width 768, top-8, Q4_K experts
decoded on the GPU) with ``--layers`` layers, random weights.  Each run loads
it with ``on_miss="fetch"`` and ``--capacity`` experts of 128 per layer,
generates ``--tokens`` tokens after a warm-up, and reports tokens per second
and the pool statistics; runs alternate between ``prefetch=False`` and
``prefetch=True`` (the file stays in the page cache: the copies are page
cache -> pinned ring -> GPU, then the device's Q4_K decode).  The greedy tokens
of the two must be equal.

Random weights make routing hard to predict (a trained model's residual
stream carries more from layer to layer); ``prefetch_used`` says how many
prefetched experts the next forward routed to.

    python tools/bench_prefetch.py --dir /scratch --layers 8 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from mmapstore.transformers import load_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gguf_fill import write_gguf


def decode(path: str, capacity: int, tokens: int, prefetch: bool) -> tuple[float, torch.Tensor, dict[str, object]]:
    with load_model(
        path, capacity=capacity, on_miss="fetch", device="cuda", dtype=torch.bfloat16, prefetch=prefetch
    ) as loaded:
        ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            loaded.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
            loaded.reset_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = loaded.model.generate(
                ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return tokens / seconds, out.cpu(), loaded.stats().to_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"qwen3moe-q4_k-{args.layers}.gguf")
    if not os.path.exists(path):
        write_gguf(path, args.layers, 2048, 128, 768)
    rates: dict[bool, list[float]] = {False: [], True: []}
    stats: dict[bool, dict[str, object]] = {}
    outputs: dict[bool, torch.Tensor] = {}
    for rep in range(args.reps):
        for prefetch in (False, True) if rep % 2 == 0 else (True, False):
            rate, outputs[prefetch], stats[prefetch] = decode(path, args.capacity, args.tokens, prefetch)
            rates[prefetch].append(rate)
    same = torch.equal(outputs[False], outputs[True])
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    result = {
        "gpu": torch.cuda.get_device_name(),
        "layers": args.layers,
        "capacity": args.capacity,
        "tokens": args.tokens,
        "tokens_per_s": {"off": rates[False], "on": rates[True]},
        "median": {"off": off, "on": on, "ratio": on / off},
        "same_tokens": same,
        "stats": {"off": stats[False], "on": stats[True]},
    }
    for name, key in (("off", False), ("on", True)):
        s = stats[key]
        print(
            f"prefetch {name:3s}: {statistics.median(rates[key]):7.2f} tok/s  hit rate {s['hit_rate']:.3f}  "
            f"fetched pairs {s['fetched_pairs']}  prefetched {s['prefetched_experts']} (used {s['prefetch_used']})  "
            f"copied {s['copied_nbytes'] / 1e9:.2f} GB"
        )
    print(f"ratio {on / off:.2f}x; same greedy tokens: {same}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
