"""``cp-megatron bench SUITE``: measured benchmarks, written as JSON and PNG with a table.

    cp-megatron bench scaling    [--output-dir DIR] [--quick]   # CP1 vs CP2 full prefill
    cp-megatron bench miss-rate  ...                            # pass-KV vs pass-Q vs miss rate
    cp-megatron bench overlap    ...                            # exposed ring communication
    cp-megatron bench peers      ...                            # vs Hugging Face transformers
    cp-megatron bench hardware   ...                            # measure a hardware profile
    cp-megatron bench convert-memory ...                        # peak RSS of convert vs checkpoint size
    cp-megatron bench ttit       ...                            # planner TTIT vs the run config's

Results go to ``./bench-results`` unless ``--output-dir`` says otherwise; the figures of
docs/performance.md are regenerated on purpose with ``--output-dir docs/bench``.  The
suites live in :mod:`cp_megatron.bench` and share its report template; ``--quick`` runs
tiny sizes and writes ``<suite>-quick.*`` so measured results are never overwritten.
This module imports nothing heavy: suites load on demand.

Source: arXiv 2411.01783 §4 (what is measured).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import tempfile
from pathlib import Path

DEFAULT_OUTPUT_DIR = "bench-results"  # in the working directory, never the tracked docs by default
# suite -> module providing run(BenchOptions) -> report and table(report) -> str
SUITES = {
    "scaling": "cp_megatron.bench.scaling",
    "miss-rate": "cp_megatron.bench.miss_rate",
    "overlap": "cp_megatron.bench.overlap",
    "peers": "cp_megatron.bench.peers",
    "hardware": "cp_megatron.bench.hardware",
    "ttit": "cp_megatron.bench.ttit",
    "convert-memory": "cp_megatron.bench.convert_memory",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cp-megatron bench`` (sets ``func=run_bench``)."""
    p = subparsers.add_parser(
        "bench", help=f"run a benchmark suite (JSON + PNG into ./{DEFAULT_OUTPUT_DIR}, table on stdout)",
        description="Benchmark suites: scaling (CP1 vs CP2 full prefill TTFT), miss-rate (pass-KV vs "
                    "pass-Q partial prefill), overlap (exposed ring communication), peers (vs Hugging "
                    "Face transformers), hardware (measure this machine's profile for the planner "
                    "and the heuristic), convert-memory (peak memory of cp-megatron convert). See "
                    "docs/performance.md and docs/convert.md.")
    p.add_argument("suite", choices=list(SUITES), help="which suite to run")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help=f"folder for the JSON and PNG (default ./{DEFAULT_OUTPUT_DIR}; the figures of "
                        "docs/performance.md are regenerated with --output-dir docs/bench)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test); writes <suite>-quick.*")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed rounds per configuration (default: the suite's; fewer with --quick)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads per rank / per process (default 1)")
    p.add_argument("--timeout", type=_positive_seconds, default=1800.0, help="limit of each job in seconds")
    p.add_argument("--config", default="configs/default.yaml",
                   help="peers, ttit: the run config (default configs/default.yaml)")
    p.add_argument("--hardware", default="cpu-gloo",
                   help="ttit: the planner's hardware profile, a name or a .json such as "
                        "docs/bench/hardware.json (default cpu-gloo)")
    p.set_defaults(func=run_bench)
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Run one suite; returns the exit code (2: bad request, 1: a rank failed)."""
    from cp_megatron.bench.common import BenchError, BenchOptions
    from cp_megatron.config import ConfigError
    from cp_megatron.launcher import RankFailure

    out = Path(args.output_dir)
    try:  # a folder we cannot write: say so now, not after minutes of measuring
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        print(f"cp-megatron bench {args.suite}: --output-dir {args.output_dir}: cannot write there: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUITES[args.suite])
    command = "cp-megatron bench " + " ".join(shlex.quote(a) for a in _argv_after_bench())
    opts = BenchOptions(output_dir=out, quick=args.quick, repeats=args.repeats,
                        threads=args.threads, timeout_s=args.timeout, config=args.config,
                        hardware=args.hardware,
                        command=command.strip())
    try:
        report = module.run(opts)
    except (BenchError, ConfigError) as exc:
        print(f"cp-megatron bench {args.suite}: {exc}", file=sys.stderr)
        return 2
    except RankFailure as exc:
        print(f"cp-megatron bench {args.suite}: {str(exc).rstrip()}", file=sys.stderr)
        return 1
    print(module.table(report))
    return 0


def _argv_after_bench() -> list[str]:
    argv = sys.argv[1:]
    return argv[argv.index("bench") + 1:] if "bench" in argv else argv
