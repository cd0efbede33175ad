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
prefetched experts the next forward routed to.  So a third variant,
``oracle``, prefetches with the next layer's *actual* ids, recorded from a
run without prefetch (greedy decoding routes the same way every run): what
the overlap is worth when the prediction is right, the bound a trained
model's router approaches.  ``router`` is the default (a layer acts on its
predictions once 90% of its last 16 were routed to), ``router-always`` acts
on every prediction.

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
from mmapstore.transformers._layer import LayerRuntime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gguf_fill import write_gguf

Recorded = dict[tuple[int, int], torch.Tensor]


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode(
    path: str,
    capacity: int,
    tokens: int,
    prefetch: bool | float,
    record: Recorded | None = None,
    oracle: bool = False,
    device: str = "cuda",
) -> tuple[float, torch.Tensor, dict[str, object]]:
    """Tokens per second of greedy decode; ``record`` collects each (forward, layer)'s ids, ``oracle``
    predicts the next layer's ids from them."""
    forward, predict = LayerRuntime.forward, LayerRuntime._predict_next
    if record is not None and not oracle:

        def recording(self, hidden, top_k_index, top_k_weights, **kwargs):  # type: ignore[no-untyped-def]
            record[(self.state.forward, self.position)] = top_k_index.detach().clone()
            return forward(self, hidden, top_k_index, top_k_weights, **kwargs)

        LayerRuntime.forward = recording  # type: ignore[method-assign]
    if oracle:
        assert record is not None

        def replayed(self, hidden, top_k):  # type: ignore[no-untyped-def]
            upcoming = predict(self, hidden, top_k)  # the same gates (decode steps, a next layer...)
            if upcoming is None or self.next is None:
                return upcoming
            return record.get((self.state.forward, self.next.position))

        LayerRuntime._predict_next = replayed  # type: ignore[method-assign]
    try:
        with load_model(
            path, capacity=capacity, on_miss="fetch", device=device, dtype=torch.bfloat16, prefetch=prefetch
        ) as loaded:
            vocab = int(loaded.model.config.get_text_config().vocab_size)
            ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
            with torch.no_grad():
                loaded.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up
                loaded.reset_stats()
                loaded.state.forward = 0  # the same forward numbers in every run, for the oracle
                sync(device)
                start = time.perf_counter()
                out = loaded.model.generate(
                    ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
                )
                sync(device)
                seconds = time.perf_counter() - start
            return tokens / seconds, out.cpu(), loaded.stats().to_json()
    finally:
        LayerRuntime.forward, LayerRuntime._predict_next = forward, predict  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", default=None)
    parser.add_argument("--checkpoint", default=None, help="a model of your own (Hugging Face or GGUF) instead")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = args.checkpoint or os.path.join(args.dir, f"qwen3moe-q4_k-{args.layers}.gguf")
    if not os.path.exists(path):
        write_gguf(path, args.layers, 2048, 128, 768)
    record: Recorded = {}
    decode(path, args.capacity, args.tokens, False, record, device=args.device)  # the ids the oracle replays
    variants: dict[str, dict[str, object]] = {
        "off": {"prefetch": False},
        "router": {"prefetch": True},  # the default gate: acts once a layer's predictions were 90% right
        "router-always": {"prefetch": 0.0},  # acts on every prediction
        "oracle": {"prefetch": 0.0, "oracle": True},  # right every time: no gate needed
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    stats: dict[str, dict[str, object]] = {}
    outputs: dict[str, torch.Tensor] = {}
    names = list(variants)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotated: no variant always first
            kwargs = variants[name]
            oracle = bool(kwargs.get("oracle"))
            rate, outputs[name], stats[name] = decode(
                path, args.capacity, args.tokens, kwargs["prefetch"], record if oracle else None, oracle,  # type: ignore[arg-type]
                args.device,
            )  # fmt: skip
            rates[name].append(rate)
    same = all(torch.equal(outputs["off"], output) for output in outputs.values())
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else args.device,
        "checkpoint": path,
        "layers": args.layers,
        "capacity": args.capacity,
        "tokens": args.tokens,
        "tokens_per_s": rates,
        "median": median,
        "ratio": {name: median[name] / median["off"] for name in variants},
        "same_tokens": same,
        "stats": stats,
    }
    for name in variants:
        s = stats[name]
        print(
            f"{name:13s}: {median[name]:7.2f} tok/s ({median[name] / median['off']:.2f}x)  hit rate "
            f"{s['hit_rate']:.3f}  fetched pairs {s['fetched_pairs']}  prediction precision "
            f"{s['prediction_precision'] or 0:.2f}  prefetched {s['prefetched_experts']} (used {s['prefetch_used']})  "
            f"copied {s['copied_nbytes'] / 1e9:.2f} GB"
        )
    print(f"same greedy tokens: {same}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
