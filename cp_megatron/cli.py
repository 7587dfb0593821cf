"""The ``cp-megatron`` command line: argument parsing only, no logic.

    cp-megatron run CONFIG.yaml [--set key.path=value ...] [--output result.json]
    cp-megatron plan --model PRESET --hardware PROFILE --tp N --cp N --context TOKENS ...
    cp-megatron convert --from hf|meta|gguf|sharded SRC --to sharded|hf DST [--tp N] ...
    cp-megatron bench scaling|miss-rate|overlap|peers|hardware

Exit codes: 0 success, 2 bad config or arguments (one line on stderr, before any rank
starts), 1 a rank failed or the job timed out, 128+N stopped by signal N (SIGTERM,
SIGINT, SIGHUP: every rank is stopped and temporary files are removed first).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that provides add_parser(subparsers)
SUBCOMMANDS = {
    "plan": "cp_megatron.plan_cli",
    "convert": "cp_megatron.checkpoint.convert",
    "bench": "cp_megatron.bench",
}


def _add_run_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run inference from a YAML config",
                              description="Context-parallel inference from a YAML config. On one "
                              "machine the ranks are started here; under torchrun or the deepspeed "
                              "launcher (RANK/WORLD_SIZE set) this process joins as one rank.")
    p.add_argument("config", help="YAML run config (see configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set parallel.cp=4 (repeatable)")
    p.add_argument("--output", help="write the result (text, token_ids, rounds) as JSON here")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from cp_megatron.config import ConfigError, load_config
    from cp_megatron.launcher import RankFailure
    from cp_megatron.bench.common import output_file_problem
    from cp_megatron.run import format_summary, run

    if args.output:  # a result we could not write: say so now, not after the whole job
        problem = output_file_problem(args.output)
        if problem:
            print(f"cp-megatron: --output {args.output}: {problem}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config, args.overrides)
        result = run(cfg)
    except ConfigError as exc:
        print(f"cp-megatron: config error: {exc}", file=sys.stderr)
        return 2
    except RankFailure as exc:
        print(f"cp-megatron: {str(exc).rstrip()}", file=sys.stderr)
        return 1
    if result is not None:  # global rank 0
        print(format_summary(result))
        if args.output:
            from pathlib import Path

            from cp_megatron.bench.common import write_json

            write_json(Path(args.output), result)
    return 0


def _one_line_error(parser: argparse.ArgumentParser):
    """``parser.error`` that prints ``PROG: error: MESSAGE`` (one line, no usage) and exits 2."""
    def error(message: str) -> None:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
    return error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cp-megatron",
        description="Context-parallel long-context inference for Llama 3 (arXiv 2411.01783).")
    # The deepspeed launcher passes --local_rank=N before the subcommand (LOCAL_RANK is
    # also in the environment, which is what parallel_state reads).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(subparsers)
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    for sub in subparsers.choices.values():  # a bad flag: one line naming it, exit code 2
        sub.error = _one_line_error(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cp-megatron``; returns the process exit code."""
    from cp_megatron.launcher import Interrupted, stop_on_signals

    args = build_parser().parse_args(argv)
    try:
        with stop_on_signals():
            return int(args.func(args) or 0)
    except Interrupted as exc:  # every rank stopped and temporary files removed by now
        print(f"cp-megatron {args.command}: {exc}; every rank stopped", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
