"""The public surface: which modules a user may import, and what the root exports."""

from __future__ import annotations

import importlib
import pkgutil

import mmapstore

# Modules a user may import; everything else is named ``_private``.  The bench
# case modules and the two ``python -m`` benchmark entry points are public too.
PUBLIC = {
    "mmapstore",
    "mmapstore.__main__",
    "mmapstore.bench",
    "mmapstore.bench_convert",
    "mmapstore.bench_gpu",
    "mmapstore.cli",
    "mmapstore.dequant",
    "mmapstore.formats",
    "mmapstore.gpu",
    "mmapstore.io",
    "mmapstore.testing",
    "mmapstore.testing.sinks",
    "mmapstore.torch",
    "mmapstore.transformers",
}


def _modules() -> list[str]:
    names = ["mmapstore"]
    for info in pkgutil.walk_packages(mmapstore.__path__, "mmapstore.", onerror=lambda name: None):
        names.append(info.name)
    return names


def test_every_module_is_public_by_list_or_private_by_name():
    public = [
        name
        for name in _modules()
        if not any(part.startswith("_") and part != "__main__" for part in name.split("."))
        and not name.startswith("mmapstore.bench.")
    ]
    assert sorted(public) == sorted(PUBLIC)


def test_public_packages_export_what_they_list():
    for package in ("", ".formats", ".dequant", ".io", ".gpu", ".testing"):
        module = importlib.import_module(f"mmapstore{package}")
        for name in module.__all__:
            assert hasattr(module, name), f"mmapstore{package} lists {name} but has no such name"
