#!/usr/bin/env bash
# The checks too long or too strict for CI: the long fuzzing and crash passes
# (100,000 mutated inputs per entry point, a SIGKILL at every event of a
# conversion, a minute of opens racing re-conversions, 40 truncations under
# convert and under verify), lint and type checks, and a benchmark run. Run from the repository root inside the dev environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q --run-slow
ruff check mmapstore tests
mypy || echo "mypy: see the open notes on numpy stub strictness" >&2
mmapstore bench --size "${BENCH_SIZE:-2GiB}" --json bench.json
