"""``cp-megatron run CONFIG.yaml``: the command line of a run job (:mod:`cp_megatron.job`:
pre-flight, ranks, turns) and its summary table.

Source: arXiv 2411.01783 §3 (what runs), §3.4 (multi-turn prefill), §3.6 (heuristic).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cp_megatron.job import run, status
from cp_megatron.launcher import under_launcher


SUMMARY_LEGEND = (
    "T new: tokens fed this turn; P cached: tokens already in the KV cache; miss rate = T/(T+P); "
    "variant: ring variant of the prefill round and of the decode rounds (Alg. 1/5 per round, or "
    "forced); TTFT: prefill round (s); TTIT: median decode step (s); decode tok/s: decode steps per "
    "second; KV bytes: K/V cache held by rank 0 after the turn (valid slots); KV capacity: K/V storage "
    "rank 0 has reserved (runtime.kv_cache_margin_tokens, kv_cache_growth_tokens).")


def format_summary(result: dict) -> str:
    """The answers and the per-turn table printed at the end (stdout)."""
    lines = []
    for t in result["turns"]:
        lines.append(f"--- turn {t['turn']} answer ---")
        lines.append(t["text"].strip())
    lines.append("")
    lines.append(f"{'turn':>4} {'T new':>8} {'P cached':>9} {'miss rate':>9} {'prefill variant':>15} "
                 f"{'decode variant':>14} {'TTFT s':>8} {'TTIT s':>8} {'decode tok/s':>12} {'KV bytes':>12} "
                 f"{'KV capacity':>14}")
    for t in result["turns"]:
        ttit = f"{t['ttit_s']:.4f}" if t["ttit_s"] is not None else "-"
        rate = f"{t['decode_tokens_per_s']:.2f}" if t["decode_tokens_per_s"] is not None else "-"
        lines.append(f"{t['turn']:>4} {t['fed_tokens']:>8,} {t['cached_tokens']:>9,} {t['miss_rate']:>9.3f} "
                     f"{t['prefill_strategy']:>15} {t['decode_strategy'] or '-':>14} {t['ttft_s']:>8.3f} "
                     f"{ttit:>8} {rate:>12} {t['kv_cache_bytes_rank0']:>12,} "
                     f"{t['kv_cache_capacity_bytes_rank0']:>14,}")
    lines.append(SUMMARY_LEGEND)
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register ``cp-megatron run`` (sets ``func=run_command``)."""
    p = subparsers.add_parser("run", help="run inference from a YAML config",
                              description="Context-parallel inference from a YAML config. On one "
                              "machine the ranks are started here; under torchrun or the deepspeed "
                              "launcher (RANK/WORLD_SIZE set) this process joins as one rank.")
    p.add_argument("config", help="YAML run config (see configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set parallel.cp=4 (repeatable); string fields "
                        "take the text verbatim, relative paths resolve from the working directory")
    p.add_argument("--output", help="write the result (text, token_ids, turns, rounds) as JSON here")
    p.add_argument("--profile", action="store_true",
                   help="time ring attention per round (same as --set runtime.profile=true)")
    p.set_defaults(func=run_command)


def run_command(args) -> int:
    """``cp-megatron run``: exit code 0, 2 (config error, before any rank), 1 (a rank failed)."""
    from cp_megatron.atomic import output_file_problem, write_json
    from cp_megatron.cli import cli_job
    from cp_megatron.config import load_config

    if not under_launcher() or os.environ.get("RANK") == "0":
        status(f"pre-flight: {args.config}")
    if args.output:  # a result we could not write: say so now, not after the whole job
        problem = output_file_problem(args.output)
        if problem:
            print(f"cp-megatron: --output {args.output}: {problem}", file=sys.stderr)
            return 2
    overrides = args.overrides + (["runtime.profile=true"] if args.profile else [])
    code, result = cli_job(lambda: run(load_config(args.config, overrides)))
    if code:
        return code
    if result is not None:  # global rank 0
        print(format_summary(result))
        if args.output:
            write_json(Path(args.output), result)
    return 0
