"""``python -m mmapstore.bench_gpu``: the ``gpu`` bench case with its own knobs.

``mmapstore bench --cases gpu`` runs the same measurements
(:mod:`mmapstore.bench.cases_gpu`) with defaults derived from ``--size``;
this command also chooses the slab size, the bytes per refresh, the cold
repeats, the fill threads and the device, and prints the extra facts
(residency after close, registrations left) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict

from .bench.cases_gpu import GIB, MIB, measure
from .bench.figures import render
from .gpu._ring import default_threads
from .torch import require_torch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmapstore.bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=4.0, help="GiB of slabs to write (default 4)")
    parser.add_argument("--slab", type=int, default=16, help="MiB per slab (default 16)")
    parser.add_argument("--refresh", type=float, default=2.0, help="GiB moved per refresh (default 2)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold-repeat", type=int, default=3, help="repeats of each cold read (default 3)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dir", default=None, help="where to write the data (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    torch = require_torch("the GPU benchmark")
    if not torch.cuda.is_available():
        print("mmapstore bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    started = time.time()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        figures, info = measure(
            directory,
            size_nbytes=int(args.size * GIB),
            slab_nbytes=args.slab * MIB,
            refresh_nbytes=int(args.refresh * GIB),
            repeat=args.repeat,
            cold_repeat=args.cold_repeat,
            threads=args.threads,
            device_name=args.device,
            emit=lambda line: print(line, file=sys.stderr, flush=True),
        )
    header = (
        f"mmapstore bench_gpu: {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, data {args.size} GiB, slabs {args.slab} MiB, "
        f"refresh {info['refresh_nbytes'] / GIB:.2f} GiB, repeat {args.repeat}, {time.time() - started:.0f} s"
    )
    print(header)
    print(render(figures))
    print(json.dumps({key: value for key, value in info.items() if key != "stats"}))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"header": header, "figures": [asdict(fig) | {"ratio": fig.ratio} for fig in figures], "info": info},
                handle,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
