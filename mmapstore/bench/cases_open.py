"""Opening at DeepSeek-V3 scale: a per-expert checkpoint of ~47,000 tensors."""

from __future__ import annotations

import glob
import os
import statistics

from .._store import open_store
from .._synth import synth_checkpoint
from .data import times
from .figures import Figure
from .registry import Context, case

__all__ = ["case_open_scale"]


@case("open_scale")
def case_open_scale(ctx: Context) -> list[Figure]:
    """DeepSeek-V3's expert layout (58 MoE layers of 256 experts, 3 dense,
    46,752 tensors in 258 shards), sparse: ``open_store`` with every layer's
    stacks ready against ``safe_open`` + shapes over the same shards."""
    from safetensors import safe_open

    path = os.path.join(ctx.scratch, "deepseek_v3_shape")
    synth_checkpoint(path, family="deepseek_v3", layers=61, experts=256, hidden=7168, ffn=2048,
                     shard_nbytes=5 << 30, sparse=True)  # fmt: skip
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))

    def ours() -> None:
        with open_store(path) as store:
            assert store.num_layers

    def library() -> None:
        for shard in shards:
            with safe_open(shard, framework="numpy") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    handle.get_slice(name).get_shape()

    ours_times, library_times = [], []
    for _ in range(max(3, ctx.repeat)):  # interleaved, so both see the same machine
        ours_times += times(ours, 1)
        library_times += times(library, 1)
    median = statistics.median(ours_times)
    return [
        Figure("open_scale", f"open_store, DeepSeek-V3 shape ({len(shards)} shards, 46,752 tensors)", "ms",
               [t * 1e3 for t in ours_times], "safe_open + get_slice().get_shape() per tensor, same shards",
               [t * 1e3 for t in library_times], target="<= 1.0x safetensors, < 200 ms",
               met=median <= statistics.median(library_times) and median < 0.2),
    ]  # fmt: skip
