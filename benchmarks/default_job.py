"""TTFT and TTIT of the default job at several CP sizes, interleaved, for one or more checkouts.

    python -m benchmarks.default_job --cp 1 2 --repeats 3 \
        --checkout after=. --checkout before=/tmp/cp_megatron_before --output docs/bench/default_job.json

Each repeat runs ``cp-megatron run configs/default.yaml --set parallel.cp=N`` once per
(checkout, CP size), in that interleaved order, each in a fresh process with the checkout
on PYTHONPATH, and reads TTFT and the median TTIT of the first turn from ``--output``.
Reported: medians over repeats, and per checkout the ratio TTIT(CP N) / TTIT(CP 1).
The machine is shared and noisy: compare only figures from one invocation.

Source: issue "A GPU-ready hot path" (benchmark acceptance); docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cp_megatron.atomic import write_json

REPO = Path(__file__).resolve().parents[1]


def run_once(checkout: Path, cp: int, overrides: list[str], timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "cp_megatron.cli", "run", str(REPO / "configs/default.yaml"),
               "--set", f"parallel.cp={cp}", "--output", str(out)]
        for o in overrides:
            cmd += ["--set", o]
        env = dict(os.environ, PYTHONPATH=str(checkout))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{checkout} cp={cp}: exit {proc.returncode}: {proc.stderr[-2000:]}")
        result = json.loads(out.read_text())
    turn = result["turns"][0]
    return {"ttft_s": turn["ttft_s"], "ttit_s": turn["ttit_s"], "text": turn["text"].strip(),
            "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", default=[], metavar="LABEL=PATH",
                        help="a checkout to measure (repeatable); default: this one as 'current'")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--output", help="JSON file for the samples and medians")
    args = parser.parse_args(argv)
    checkouts = {}
    for item in args.checkout or [f"current={REPO}"]:
        label, _, path = item.partition("=")
        if not path or not (Path(path) / "cp_megatron").is_dir():
            parser.error(f"--checkout {item!r}: expected LABEL=PATH of a cp_megatron checkout")
        checkouts[label] = Path(path).resolve()
    samples = {label: {cp: [] for cp in args.cp} for label in checkouts}
    for rep in range(args.repeats):
        for label, path in checkouts.items():
            for cp in args.cp:
                s = run_once(path, cp, args.overrides, args.timeout)
                samples[label][cp].append(s)
                print(f"[default_job] repeat {rep + 1} {label} cp={cp}: TTFT {s['ttft_s']:.3f} s, "
                      f"TTIT {s['ttit_s']:.4f} s ({s['wall_s']:.0f} s)", flush=True)
    report = {"config": "configs/default.yaml", "overrides": args.overrides, "repeats": args.repeats,
              "checkouts": {k: str(v) for k, v in checkouts.items()}, "results": {}}
    for label in checkouts:
        med = {cp: {"ttft_s": statistics.median(s["ttft_s"] for s in samples[label][cp]),
                    "ttit_s": statistics.median(s["ttit_s"] for s in samples[label][cp])}
               for cp in args.cp}
        base = med[args.cp[0]]["ttit_s"]
        report["results"][label] = {
            "median": {str(cp): m for cp, m in med.items()},
            "ttit_ratio_to_first_cp": {str(cp): m["ttit_s"] / base for cp, m in med.items()},
            "samples": {str(cp): v for cp, v in samples[label].items()}}
        for cp, m in med.items():
            print(f"[default_job] {label} cp={cp}: median TTFT {m['ttft_s']:.3f} s, TTIT {m['ttit_s']:.4f} s, "
                  f"TTIT / TTIT(cp={args.cp[0]}) = {m['ttit_s'] / base:.2f}")
    if args.output:
        write_json(Path(args.output), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
