"""``python -m mmapstore.bench_convert``: the ``convert`` bench case with its own knobs.

``mmapstore bench --cases convert`` runs the same trials
(:mod:`mmapstore.bench.cases_convert`) on a checkpoint of ``--size``; this
command also reuses a checkpoint (``--source``), adds the blake3 and sha256
checksums (``--checksums``) and writes the samples as JSON.
"""

from __future__ import annotations

import sys

from .bench.cases_convert import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
