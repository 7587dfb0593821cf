"""The ``cp-megatron`` command line: argument parsing only, no logic.

Subcommands (each module owns its arguments through ``add_parser(subparsers)``,
which sets ``func`` on the parsed namespace):

    cp-megatron run CONFIG.yaml [--set key.path=value ...] [--output result.json]
    cp-megatron plan --model PRESET --hardware PROFILE --tp N --cp N --context TOKENS ...
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that provides add_parser(subparsers)
SUBCOMMANDS = {
    "plan": "cp_megatron.planner",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cp-megatron",
        description="Context-parallel long-context inference for Llama 3 (arXiv 2411.01783).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cp-megatron``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
