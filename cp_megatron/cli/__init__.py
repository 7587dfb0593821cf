"""The ``cp-megatron`` command line: one module per subcommand, each on the library below.

    cp-megatron run CONFIG.yaml [--set key.path=value ...] [--output result.json]
    cp-megatron plan --model PRESET --hardware PROFILE --tp N --cp N --context TOKENS ...
    cp-megatron convert --from hf|meta|gguf|sharded SRC --to sharded|hf DST [--tp N] ...
    cp-megatron bench scaling|miss-rate|overlap|peers|hardware|convert-memory|ttit [--output-dir DIR]
    cp-megatron serve CONFIG.yaml [--host 127.0.0.1] [--port 8000] [--set key.path=value ...]

Every subcommand module provides ``add_parser(subparsers)``.  The tool layer (this package
and :mod:`cp_megatron.bench`) imports the library (engine, model, checkpoint, attention,
planner); the library never imports the tools (tests/test_layering.py checks it).

Exit codes: 0 success, 2 bad config or arguments (one line on stderr, before any rank
starts), 1 a rank failed or the job timed out, 128+N stopped by signal N (SIGTERM,
SIGINT, SIGHUP: every rank is stopped and temporary files are removed first).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from typing import Any, Callable

# subcommand -> module that provides add_parser(subparsers)
SUBCOMMANDS = {
    "run": "cp_megatron.cli.run",
    "plan": "cp_megatron.cli.plan",
    "dryrun": "cp_megatron.cli.dryrun",
    "convert": "cp_megatron.cli.convert",
    "bench": "cp_megatron.cli.bench",
    "serve": "cp_megatron.cli.serve",
}


def _one_line_error(parser: argparse.ArgumentParser):
    """``parser.error`` that prints ``PROG: error: MESSAGE`` (one line, no usage) and exits 2."""
    def error(message: str) -> None:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    return error


def cli_job(job: Callable[[], Any]) -> tuple[int, Any]:
    """Run a job (pre-flight, then ranks) and map its failures to exit codes, each with one
    line on stderr: ``(2, None)`` for a :class:`~cp_megatron.config.ConfigError`, ``(1, None)``
    for a :class:`~cp_megatron.launcher.RankFailure`, else ``(0, job's result)``."""
    from cp_megatron.config import ConfigError
    from cp_megatron.launcher import RankFailure

    try:
        return 0, job()
    except ConfigError as exc:
        print(f"cp-megatron: config error: {exc}", file=sys.stderr)
        return 2, None
    except RankFailure as exc:
        print(f"cp-megatron: {str(exc).rstrip()}", file=sys.stderr)
        return 1, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cp-megatron",
        description="Context-parallel long-context inference for Llama 3 (arXiv 2411.01783).")
    # The deepspeed launcher passes --local_rank=N before the subcommand (LOCAL_RANK is
    # also in the environment, which is what parallel_state reads).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    for sub in subparsers.choices.values():  # a bad flag: one line naming it, exit code 2
        sub.error = _one_line_error(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cp-megatron``; returns the process exit code.

    ``argv`` None (the program: the console script, ``python -m cp_megatron.cli``): the
    arguments are ``sys.argv[1:]``, and since the process exits next, the garbage collector's
    view of everything alive is frozen (``gc.freeze``) on the way out, so that the
    interpreter's final collections skip torch's objects (~0.6 s of every command's exit on the
    CI box; ~1.6 s more for a rank under torchrun, which has megatron-core loaded).  Callers
    that go on running (tests) pass ``argv``.
    """
    from cp_megatron.launcher import Interrupted, stop_on_signals

    try:
        args = build_parser().parse_args(argv)
        try:
            with stop_on_signals():
                return int(args.func(args) or 0)
        except Interrupted as exc:  # every rank stopped and temporary files removed by now
            print(f"cp-megatron {args.command}: {exc}; every rank stopped", file=sys.stderr)
            return exc.exit_code
    finally:
        if argv is None:
            gc.freeze()
