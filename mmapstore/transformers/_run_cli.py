"""``mmapstore run``: generate with a model whose experts are served from the store, and report."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import RuntimeConfigError
from ..formats import Checkpoint, read_checkpoint
from ._gguf import is_gguf_checkpoint, read_gguf_config
from ._gguf_tokenizer import gguf_tokenizer
from ._loader import load_model

__all__ = ["memory_now", "run_command"]


@dataclass(slots=True)
class _Timer:
    """A ``generate`` streamer: times the prompt's first token and the rest, draws progress."""

    bar: Any = None
    started: float = 0.0
    first: float | None = None
    last: float = 0.0
    new_tokens: int = 0
    calls: int = field(default=0)

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        self.calls += 1
        if self.calls == 1:  # the prompt
            return
        self.new_tokens += 1
        if self.first is None:
            self.first = now
        self.last = now
        if self.bar is not None:
            self.bar.update(1)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()


def memory_now() -> dict[str, int]:
    """Peak resident bytes of this process, and its anonymous/file-backed parts now (Linux)."""
    usage = {"peak_rss_nbytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    usage[f"{key.lower()}_nbytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return usage


def _prompt(args: argparse.Namespace, vocab: int, checkpoint: Checkpoint | None) -> tuple[torch.Tensor, Any]:
    """The prompt's ids and the tokenizer that made them (None for ids given or drawn); ``checkpoint``
    is the GGUF checkpoint whose metadata carry the tokenizer, None for a transformers directory."""
    tokenizer = None
    if args.prompt_ids is not None:
        try:
            ids = [int(token) for token in args.prompt_ids.split(",") if token.strip()]
        except ValueError:
            raise RuntimeConfigError(
                f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}"
            ) from None
        bad = [token for token in ids if not 0 <= token < vocab]
        if not ids or bad:
            raise RuntimeConfigError(f"--prompt-ids: need ids in [0, {vocab}), got {bad or 'none'}")
        return torch.tensor([ids]), None
    if args.prompt is None:
        count = args.prompt_tokens if args.prompt_tokens is not None else 16
        if count < 1:
            raise RuntimeConfigError("--prompt-tokens must be positive")
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab, (1, count), generator=generator), None
    from transformers import AutoTokenizer

    try:
        if checkpoint is not None:  # the tokenizer GGUF files carry in their metadata
            tokenizer = gguf_tokenizer(checkpoint)
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    except (OSError, ValueError, KeyError, NotImplementedError, TypeError, AttributeError, IndexError) as exc:
        raise RuntimeConfigError(
            f"{args.checkpoint}: no usable tokenizer for --prompt ({exc}); use --prompt-ids or --prompt-tokens"
        ) from None
    return tokenizer(args.prompt, return_tensors="pt").input_ids, tokenizer


def run_command(args: argparse.Namespace) -> int:
    """Check the arguments and the prompt, load, generate, report; exit code 0.

    Arguments are those of ``mmapstore run`` (see :mod:`mmapstore.cli`);
    ``args.device`` None means the first CUDA device when there is one.
    """
    if args.max_new_tokens < 1:
        raise RuntimeConfigError("--max-new-tokens must be positive")
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompt, tokenizer = None, None
    gguf = is_gguf_checkpoint(args.checkpoint)
    if gguf or os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        import transformers  # else load_model names the problem

        checkpoint = read_checkpoint(args.checkpoint) if gguf else None
        if checkpoint is not None:
            config = read_gguf_config(checkpoint, transformers)
        else:
            config = transformers.AutoConfig.from_pretrained(args.checkpoint)
        vocab = int(config.get_text_config().vocab_size)
        prompt, tokenizer = _prompt(args, vocab, checkpoint)
    started = time.perf_counter()
    loaded = load_model(
        args.checkpoint,
        capacity=args.capacity,
        budget_nbytes=args.budget,
        every=args.every,
        on_miss=args.on_miss,
        device=device_name,
        dtype=args.dtype,
        trace_path=args.trace,
    )
    with loaded:
        model = loaded.model
        load_seconds = time.perf_counter() - started
        assert prompt is not None  # load_model refuses a directory without config.json, or a non-GGUF file
        device = loaded.layers[0].device
        prompt = prompt.to(device)
        loaded.reset_stats()
        timer = _Timer()
        if not args.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            timer.bar = tqdm(total=args.max_new_tokens, unit="tok", desc="generate", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer.started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                streamer=timer,
                pad_token_id=model.generation_config.pad_token_id or 0,
            )
        stats = loaded.stats()
        report = _report(args, loaded, timer, prompt, output, stats, load_seconds, device, tokenizer)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_report(report)
    return 0


def _report(
    args: argparse.Namespace,
    loaded: Any,
    timer: _Timer,
    prompt: torch.Tensor,
    output: torch.Tensor,
    stats: Any,
    load_seconds: float,
    device: torch.device,
    tokenizer: Any,
) -> dict[str, Any]:
    prompt_tokens = int(prompt.shape[1])
    new_ids = output[0, prompt_tokens:].tolist()
    first = timer.first if timer.first is not None else timer.started
    prefill_seconds = first - timer.started
    decode_tokens = max(0, timer.new_tokens - 1)
    decode_seconds = timer.last - first
    report: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "model": type(loaded.model).__name__,
        "device": str(device),
        "dtype": str(loaded.layers[0].dtype).removeprefix("torch."),
        "capacities": sorted(set(stats.capacities)),
        "every": args.every,
        "on_miss": loaded.layers[0].on_miss.value if loaded.layers else args.on_miss,
        "load_seconds": load_seconds,
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(new_ids),
        "prefill_seconds": prefill_seconds,
        "prefill_tokens_per_s": prompt_tokens / prefill_seconds if prefill_seconds > 0 else None,
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds > 0 else None,
        "new_ids": new_ids,
        "text": tokenizer.decode(new_ids) if tokenizer is not None else None,
        "stats": stats.to_json(),
        "copied_nbytes_per_token": stats.copied_nbytes / max(1, len(new_ids)),
        "non_expert_nbytes": loaded.non_expert_nbytes,
        "memory": memory_now(),
        "trace": args.trace,
    }
    if device.type == "cuda":
        report["memory"]["device_peak_nbytes"] = int(torch.cuda.max_memory_allocated(device))
    return report


def _print_report(report: dict[str, Any]) -> None:
    from ..cli import escape

    stats = report["stats"]
    if report["text"] is not None:
        print(escape(report["text"]))
    else:
        print("generated ids:", " ".join(str(token) for token in report["new_ids"]))

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    print(
        f"{escape(report['model'])} on {report['device']} ({report['dtype']}), capacity {report['capacities']} "
        f"per MoE layer, refresh every {report['every']} ({report['on_miss']} on miss)"
    )
    print(
        f"  prefill: {report['prompt_tokens']} tokens in {report['prefill_seconds']:.3f} s "
        f"({rate(report['prefill_tokens_per_s'])} tok/s); decode: {rate(report['decode_tokens_per_s'])} tok/s"
    )
    print(
        f"  hit rate {stats['hit_rate']:.3f} ({stats['resident_pairs']} of {stats['pairs']} routed pairs found their "
        f"expert in the pool, {stats['fetched_pairs']} fetched it, {stats['cpu_pairs']} ran on the CPU); "
        f"{stats['refreshes']} refreshes, {stats['promotions']} promotions"
    )
    print(
        f"  moved {stats['copied_nbytes'] / 1e6:.1f} MB into the pools "
        f"({report['copied_nbytes_per_token'] / 1e6:.2f} MB per token); CPU read {stats['cpu_read_nbytes'] / 1e6:.1f} MB "
        f"of mapped experts"
    )
    memory = report["memory"]
    line = (
        f"  memory: pools {stats['pool_nbytes'] / 2**20:.0f} MiB, non-expert weights "
        f"{report['non_expert_nbytes'] / 2**20:.0f} MiB, peak RSS {memory['peak_rss_nbytes'] / 2**20:.0f} MiB"
    )
    if "device_peak_nbytes" in memory:
        line += f", device peak {memory['device_peak_nbytes'] / 2**20:.0f} MiB"
    print(line)
    if report["trace"]:
        print(f"  trace: {escape(report['trace'])}")
