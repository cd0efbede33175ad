"""The ``mmapstore`` command: synth, convert, inspect, verify, simulate, trace, tune, bench, run.

Exit codes: 0 success, 1 bad input or damage, 2 usage errors.  Text output
by default, ``--json`` for machines; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from ._errors import MmapStoreError

__all__ = ["escape", "main", "parse_size", "torch_device"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


def reader_option(text: str) -> object:
    """``--reader``: ``probe``, or ``QD`` / ``QD,SIZE`` (reads in flight, largest read)
    as a :class:`~mmapstore.io.ReaderConfig`."""
    from ._errors import OptionError
    from .io import ReaderConfig

    if text == "probe":
        return text
    depth, _, size = text.partition(",")
    try:
        return ReaderConfig(queue_depth=int(depth), chunk_nbytes=parse_size(size) if size else 4 << 20)
    except (ValueError, OptionError, argparse.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError(f"not probe, QD or QD,SIZE (e.g. 16,4MiB): {text!r} ({exc})") from None


def parse_size(text: str) -> int:
    """``"4GiB"``, ``"512M"``, ``"1000"`` -> bytes (powers of 1024 for units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M, 4GiB)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def user_dtype(text: str) -> str:
    """A dtype name the library knows (``bf16``, ``f32``, ``F16``...)."""
    from ._dtypes import parse_user_dtype

    try:
        parse_user_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def torch_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked on use)."""
    from ._simulate import DEVICE_PATTERN

    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)")
    return text


def escape(text: object) -> str:
    """Make a name read from a file safe to print: control and format
    characters (terminal escapes included) become ``\\x..`` / ``\\u....``."""
    out = []
    for char in str(text):
        if unicodedata.category(char)[0] == "C":
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


@contextlib.contextmanager
def _progress(total: Callable[[], int], label: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A tqdm byte counter on stderr, or None when quiet or not a terminal
    (``total`` is only computed when a bar is drawn)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total(), unit="B", unit_scale=True, desc=label, file=sys.stderr) as bar:
        yield bar.update


class _ByteBar:
    """A tqdm byte counter whose total is learnt when the work is planned
    (so it counts what is written, after ``--dtype`` and ``--layers``)."""

    def __init__(self, label: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=None, unit="B", unit_scale=True, desc=label, file=sys.stderr)

    def start(self, total: int) -> None:
        self._bar.reset(total=total)

    def update(self, nbytes: int) -> None:
        self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()


@contextlib.contextmanager
def _bar(label: str, quiet: bool) -> Iterator[_ByteBar | None]:
    """A :class:`_ByteBar` on stderr, or None when quiet or not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    bar = _ByteBar(label)
    try:
        yield bar
    finally:
        bar.close()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _cmd_synth(args: argparse.Namespace) -> int:
    from ._synth import synth_checkpoint

    with _progress(lambda: 0, "synth", args.quiet or args.sparse) as progress:
        result = synth_checkpoint(
            args.out,
            args.family,
            layers=args.layers,
            experts=args.experts,
            hidden=args.hidden,
            ffn=args.ffn,
            top_k=args.top_k,
            dtype=args.dtype,
            shard_nbytes=args.shard_size,
            sparse=args.sparse,
            seed=args.seed,
            force=args.force,
            progress=progress,
        )
    if args.json:
        _print_json(
            {
                "path": result.path,
                "files": list(result.files),
                "num_tensors": result.num_tensors,
                "nbytes": result.nbytes,
            }
        )
    else:
        print(
            f"wrote {escape(result.path)}: {args.family}, {result.num_tensors} tensors, "
            f"{result.nbytes / 1e6:.1f} MB in {len(result.files)} shard(s){' (sparse)' if args.sparse else ''}"
        )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ._convert import convert

    with _bar("convert", args.quiet) as bar:
        result = convert(
            args.src,
            args.dst,
            storage=args.format,
            dtype=args.dtype,
            orientation=args.orientation,
            layout=args.layout,
            checksum=args.checksum,
            shard_nbytes=args.shard_size,
            layers=args.layers,
            force=args.force,
            progress=None if bar is None else bar.update,
            on_plan=None if bar is None else bar.start,
        )
    if args.json:
        _print_json(
            {
                "path": result.path,
                "files": list(result.files),
                "num_tensors": result.num_tensors,
                "nbytes": result.nbytes,
                "skipped": result.skipped,
            }
        )
    elif result.skipped:
        print(f"{escape(result.path)} already holds this conversion; nothing to do")
    else:
        print(
            f"converted {escape(args.src)} -> {escape(result.path)}: {result.num_tensors} stacks, "
            f"{result.nbytes / 1e6:.1f} MB in {len(result.files)} file(s)"
        )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ._report import describe

    info = describe(args.path)
    if args.json:
        _print_json(info)
        return 0
    print(f"{escape(info['path'])}")
    print(f"  kind: {info['kind']}  layout: {info['layout']}  model_type: {escape(info['model_type'])}")
    print(
        f"  MoE layers: {info['moe_layers']}  tensors: {info['num_tensors']}  "
        f"expert bytes: {info['expert_nbytes'] / 1e6:.1f} MB"
    )
    for layer in info["layers"]:
        parts = []
        for proj, stack in layer["stacks"].items():
            shape = "x".join(str(dim) for dim in stack["shape"])
            extra = "+".join(name for name in stack["parts"] if name != "weight")
            parts.append(
                f"{proj} [{shape}] {stack['encoding']}{' +' + extra if extra else ''} "
                f"{stack['orientation']} {stack['storage']}"
            )
        print(f"  layer {layer['layer']:>3}: " + "; ".join(parts))
    print(f"  files: {len(info['files'])}, {info['total_nbytes'] / 1e6:.1f} MB")
    for entry in info["files"]:
        print(f"    {escape(os.path.basename(entry['path']))}  {entry['nbytes']}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from ._report import verify

    report = verify(args.path)
    if args.json:
        _print_json(
            {
                "path": report.path,
                "ok": report.ok,
                "checked_tensors": report.checked_tensors,
                "checked_nbytes": report.checked_nbytes,
                "problems": [{"file": p.file, "tensor": p.tensor, "message": p.message} for p in report.problems],
            }
        )
    elif report.ok:
        print(
            f"ok: {escape(report.path)}: {report.checked_tensors} tensors, {report.checked_nbytes / 1e6:.1f} MB checked"
        )
    else:
        for problem in report.problems:
            where = f"tensor {escape(problem.tensor)} in " if problem.tensor else ""
            print(f"DAMAGED: {where}{escape(problem.file)}: {escape(problem.message)}")
        print(f"{len(report.problems)} problem(s) in {escape(report.path)}")
    return 0 if report.ok else 1


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.trace is not None:
        from ._trace_cli import run_simulate_trace

        if args.device is not None:
            print("mmapstore simulate: error: --device moves real slabs; --trace replays without them", file=sys.stderr)
            return 2

        return run_simulate_trace(args)
    from ._simulate import simulate

    with tempfile.TemporaryDirectory(prefix="mmapstore-demo-") as scratch:
        path = args.path
        if path is None:
            from ._synth import synth_checkpoint

            path = synth_checkpoint(
                os.path.join(scratch, "mixtral"), "mixtral", layers=2, experts=8, hidden=256, ffn=128
            ).path
            if not args.json:
                print(f"synthesized a small mixtral checkpoint: {path}")
        summary = simulate(
            path,
            capacity=args.capacity,
            read=args.read,
            cache=args.cache,
            reader=args.reader,
            budget_nbytes=args.budget,
            steps=args.steps,
            every=args.every,
            tokens=args.tokens,
            top_k=args.top_k,
            seed=args.seed,
            dtype=args.dtype,
            orientation=args.orientation,
            device=args.device,
        )
    if args.json:
        _print_json(summary)
        return 0 if summary["verified"] else 1
    pools = "numpy buffers" if args.device is None else f"torch tensors on {summary['device']}"
    print(
        f"store: {summary['layout']}, {summary['moe_layers']} MoE layers x {summary['experts']} experts; "
        f"pool capacity {summary['capacity']} per layer ({pools}), refresh every {args.every} step(s)"
    )
    for event in summary["events"]:
        moves = ", ".join(f"L{u['layer']} slot {u['slot']}: {u['old']}->{u['new']}" for u in event["updates"]) or "none"
        print(
            f"  step {event['step']:>3}: moved {len(event['updates'])} expert(s), "
            f"{event['nbytes'] / 1e6:.2f} MB [{moves}]"
        )
    stats = summary["stats"]
    sources = ", ".join(f"{source} {nbytes / 1e6:.2f}" for source, nbytes in stats["source_nbytes"].items())
    print(
        f"total: {stats['refreshes']} refreshes, {stats['promotions']} promotions, "
        f"{stats['nbytes'] / 1e6:.2f} MB copied{f' ({sources} MB)' if sources else ''}; "
        f"every resident slot matches the store: {summary['verified']}"
    )
    return 0 if summary["verified"] else 1


def _cmd_trace(args: argparse.Namespace) -> int:
    from ._trace_cli import cmd_trace

    if args.synth and args.top_k is None:
        args.top_k = 8
    if args.synth and (args.steps < 1 or args.blocks < 1 or args.steps < args.blocks):
        print("mmapstore trace: error: --steps and --blocks must be positive, steps >= blocks", file=sys.stderr)
        return 2
    return cmd_trace(args)


def _cmd_tune(args: argparse.Namespace) -> int:
    from ._trace_cli import run_tune

    if args.max_interval < 1:
        print("mmapstore tune: error: --max-interval must be positive", file=sys.stderr)
        return 2
    return run_tune(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from .transformers._run_cli import run_command

    return run_command(args)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``mmapstore simulate: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {escape(message)}\n")


def _parser() -> argparse.ArgumentParser:
    from ._families import FAMILIES
    from ._trace_cli import SYNTH_KINDS, add_trace_arguments

    parser = _Parser(prog="mmapstore", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="mmapstore 0.1.0")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic Hugging Face-layout MoE checkpoint")
    synth.add_argument("out")
    synth.add_argument("--family", required=True, choices=sorted(FAMILIES))
    synth.add_argument("--layers", type=positive_int, default=2)
    synth.add_argument("--experts", type=positive_int, default=8)
    synth.add_argument("--hidden", type=positive_int, default=64)
    synth.add_argument("--ffn", type=positive_int, default=32)
    synth.add_argument("--top-k", type=positive_int, default=2)
    synth.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    synth.add_argument("--shard-size", type=parse_size, default=parse_size("1GiB"))
    synth.add_argument("--sparse", action="store_true", help="valid headers over holes: no disk used")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--force", action="store_true", help="replace OUT if it exists")
    synth.add_argument("--quiet", action="store_true")
    synth.add_argument("--json", action="store_true")
    synth.set_defaults(run=_cmd_synth)

    convert = commands.add_parser("convert", help="convert a checkpoint into a slab store")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--format", choices=["safetensors", "raw"], default="safetensors")
    convert.add_argument("--dtype", choices=["keep", "f32", "f16", "bf16"], default="keep")
    convert.add_argument(
        "--orientation",
        choices=["native", "kn"],
        default="native",
        help="native: keep the source's slab orientation (no transpose; [k, n] stays a view); "
        "kn: write GroupedMatMul [E, k, n]",
    )
    convert.add_argument(
        "--layout",
        choices=["slab", "expert-major"],
        default="slab",
        help="slab: each part one [E, ...] tensor; expert-major: all parts of one expert in one "
        "contiguous record (a promotion is one read)",
    )
    convert.add_argument(
        "--checksum",
        choices=["xxh3_128", "blake3", "sha256"],
        default="xxh3_128",
        help="per-tensor checksum that verify checks (blake3 needs the [blake3] extra)",
    )
    convert.add_argument("--shard-size", type=parse_size, default=parse_size("4GiB"))
    convert.add_argument("--layers", help="model layer range A-B (inclusive)")
    convert.add_argument("--force", action="store_true", help="replace DST if it exists")
    convert.add_argument("--quiet", action="store_true")
    convert.add_argument("--json", action="store_true")
    convert.set_defaults(run=_cmd_convert)

    inspect = commands.add_parser("inspect", help="show layout, layers, stacks and files")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=_cmd_inspect)

    verify = commands.add_parser("verify", help="check structure and checksums")
    verify.add_argument("path")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(run=_cmd_verify)

    simulate = commands.add_parser("simulate", help="replay a routing trace through SlabService")
    simulate.add_argument("path", nargs="?", help="a store; omitted: a small synthetic checkpoint")
    simulate.add_argument("--capacity", type=non_negative_int, default=4)
    simulate.add_argument("--steps", type=positive_int, default=8)
    simulate.add_argument("--every", type=positive_int, default=2, help="refresh every N decode steps")
    simulate.add_argument("--tokens", type=positive_int, default=4, help="tokens per step")
    simulate.add_argument("--top-k", type=positive_int, default=2)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--dtype", type=user_dtype, default=None, help="sink dtype (default: the store's)")
    simulate.add_argument("--orientation", choices=["native", "kn"], default="native")
    simulate.add_argument(
        "--device", type=torch_device, default=None, help="pools as torch tensors on cpu, cuda, cuda:N (default: numpy)"
    )
    simulate.add_argument(
        "--read", choices=["auto", "map", "reader"], default="auto",
        help="cold rows: auto (resident rows copied, the rest read with O_DIRECT), map (mmap + WILLNEED), "
        "reader (every byte read)",
    )  # fmt: skip
    simulate.add_argument(
        "--cache", choices=["keep", "drop"], default="keep",
        help="drop: refreshed ranges leave the page cache (stores larger than memory)",
    )  # fmt: skip
    simulate.add_argument(
        "--reader", type=reader_option, default="probe", metavar="probe|QD[,SIZE]",
        help="reads in flight and largest read (e.g. 16,4MiB); default: probe the disk once (16,4MiB unless "
        "another reads 5%% faster)",
    )  # fmt: skip
    simulate.add_argument(
        "--budget", type=parse_size, default=None, metavar="SIZE",
        help="the largest capacity whose pools and buffers fit SIZE (instead of --capacity)",
    )  # fmt: skip
    simulate.add_argument("--json", action="store_true")
    simulate.add_argument(
        "--trace",
        metavar="FILE.npz",
        help="replay this trace with every policy over tau (geometry from PATH or --experts)",
    )
    simulate.set_defaults(run=_cmd_simulate)
    add_trace_arguments(simulate)

    trace = commands.add_parser("trace", help="write a routing trace (.npz): synthetic or imported")
    trace.add_argument("out", metavar="OUT.npz")
    source = trace.add_mutually_exclusive_group(required=True)
    source.add_argument("--synth", choices=SYNTH_KINDS)
    source.add_argument("--llama-csv", metavar="FILE", help="llama.cpp moe-trace CSV (needs --top-k)")
    source.add_argument("--array", metavar="FILE.npy", help="[steps, layers, tokens, top_k] ids")
    trace.add_argument("--steps", type=int, default=256)
    trace.add_argument("--blocks", type=int, default=8, help="denoising blocks (block-diffusion)")
    trace.add_argument("--layers", type=int, default=8)
    trace.add_argument("--experts", type=int, default=64)
    trace.add_argument("--top-k", type=int, default=None, help="default 8 for --synth")
    trace.add_argument("--tokens", type=int, default=128, help="tokens per step")
    trace.add_argument("--cosine", type=float, default=0.985, help="adjacent-step cosine (block-diffusion)")
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--json", action="store_true")
    trace.set_defaults(run=_cmd_trace)

    tune = commands.add_parser("tune", help="recommend policy, tau and capacity per layer from a trace")
    tune.add_argument("path", nargs="?", help="a store (headers only); omitted: --experts and --expert-size")
    tune.add_argument("--trace", metavar="FILE.npz", required=True)
    tune.add_argument("--budget", help="resident expert bytes over all layers, e.g. 24GiB (default: no limit)")
    tune.add_argument("--max-interval", type=int, default=31)
    tune.add_argument("--json", action="store_true")
    add_trace_arguments(tune)
    tune.set_defaults(run=_cmd_tune)

    bench = commands.add_parser("bench", help="benchmarks against baselines measured in the same run")
    bench.add_argument("--size", type=parse_size, default=parse_size("2GiB"), help="synthetic data size")
    bench.add_argument("--repeat", type=positive_int, default=5)
    bench.add_argument("--cases", nargs="*", default=None)
    bench.add_argument("--json", dest="json_out", metavar="FILE")
    bench.add_argument("--plot", metavar="FILE.png")
    bench.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    bench.set_defaults(run=_cmd_bench)

    run = commands.add_parser("run", help="generate with a transformers MoE model, experts served from the store")
    run.add_argument(
        "checkpoint", help="a Hugging Face MoE checkpoint directory, or a GGUF file (or split set, or its directory)"
    )
    prompt = run.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids")
    prompt.add_argument("--prompt-tokens", type=int, help="this many seeded random token ids (default 16)")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--capacity", type=int, help="experts per MoE layer on the device (default: all)")
    size.add_argument("--budget", type=parse_size, help="device bytes for the expert pools, e.g. 8GiB")
    run.add_argument("--every", type=int, default=1, help="refresh every N decode steps (and on each prefill)")
    run.add_argument(
        "--on-miss",
        choices=["cpu", "fetch"],
        default=None,
        help="non-resident experts: fetch into the pool (default on a GPU: exact at any capacity), "
        "or compute on the CPU from the mapping (default on the CPU)",
    )
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when present)")
    run.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16 (default: config.json's)")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--trace", metavar="FILE.npz", help="capture every MoE layer's Top-K ids (simulate --trace)")
    run.add_argument("--seed", type=int, default=0, help="seed of --prompt-tokens")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true")
    run.set_defaults(run=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        result: int = args.run(args)
        return result
    except MmapStoreError as exc:
        print(f"mmapstore {args.command}: error: {escape(exc)}", file=sys.stderr)
        return 1
    except ImportError as exc:  # an optional extra (plot) is missing
        print(f"mmapstore {args.command}: error: {escape(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:  # a missing path, no permission, a full or read-only disk
        print(f"mmapstore {args.command}: error: {escape(exc)}", file=sys.stderr)
        return 1
