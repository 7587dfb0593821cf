"""Suite ``overlap``: exposed ring communication per variant -- runs benchmarks/ring_overlap.py.

Exposed communication = wall time of one ``context_parallel_attention`` call minus the
local attention inside it, for pass-KV and pass-Q (forced) at CP2 and CP4 and a CP1
reference, full prefill of 16K tokens (NH 8, NKV 2, DH 64, float32).  The benchmark
itself lives in ``benchmarks/ring_overlap.py`` (a script of the repository, not of the
installed package); this suite calls it with the output paths of ``cp-megatron bench``
and writes ``ring_overlap.json`` / ``ring_overlap.png``.

Source: arXiv 2411.01783 §3.5 (Alg. 2, 3), §4.2 (overlap of the ring).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from cp_megatron.bench.common import BenchError, BenchOptions

FULL = ["--tokens", "16384", "--cp", "2,4", "--repeats", "5"]
QUICK = ["--tokens", "512", "--cp", "2", "--repeats", "1"]


def _ring_overlap():
    """``benchmarks.ring_overlap``, from the working directory or the checkout that holds
    this package (spawned ranks import it by name, so its folder goes on sys.path)."""
    try:
        return importlib.import_module("benchmarks.ring_overlap")
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "ring_overlap.py").is_file():
        raise BenchError("benchmarks/ring_overlap.py not found: run from a checkout of the repository")
    sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.ring_overlap")


def run(opts: BenchOptions) -> dict:
    """Run benchmarks/ring_overlap.py with this command's sizes and paths; return its report."""
    module = _ring_overlap()
    argv = list(QUICK if opts.quick else FULL)
    if opts.repeats is not None:
        argv[argv.index("--repeats") + 1] = str(opts.repeats)
    argv += ["--threads-per-rank", str(opts.threads), "--timeout", str(opts.timeout_s),
             "--output", str(opts.path("ring_overlap", "json")),
             "--plot", str(opts.path("ring_overlap", "png"))]
    extra = {"suite": "overlap", "command": opts.command, "quick": opts.quick,
             "benchmark": "benchmarks/ring_overlap.py " + " ".join(argv[:-4])}
    return module.run(module.parse_args(argv), extra=extra)


def table(report: dict) -> str:
    return _ring_overlap()._table(report["results"])
