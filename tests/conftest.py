from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long fuzzing and stress passes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long pass: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small per-family checkpoints, made once for every converter test."""
    from builders import SMALL_FAMILIES

    from mmapstore.testing import synth_checkpoint

    root = tmp_path_factory.mktemp("src")
    return {
        family: synth_checkpoint(
            root / family, family, layers=2, experts=4, hidden=40, ffn=24, shard_nbytes=40_000
        ).path
        for family in SMALL_FAMILIES
    }
