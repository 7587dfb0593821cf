"""Prefill past the trained length: TTFT and peak RSS per rank of ``cp-megatron run`` at CP 2.

The ``tiny-64k`` dummy preset is "trained" to 65,536 positions; ``model.max_context`` lets
prompts of 32K, 64K, 128K tokens (and more) run on it, as the paper's 1M-token runs do on a
128K model.  Each size is one fresh ``cp-megatron run`` (random prompt, one new token) under
``/usr/bin/time -v``, whose "Maximum resident set size" is the largest single process of the
job: a rank (the two ranks hold the same amounts).  TTFT is the prefill round's ``ttft_s``
from the job's JSON.  A least-squares line RSS = a + b * tokens / CP shows the per-rank
memory growing linearly (KV cache, activations, ring buffers all scale with tokens / CP).

Run (from the repository root; CPU-heavy: 128K takes minutes on 2 cores)::

    python -m benchmarks.long_context                       # 32768 65536 131072
    python -m benchmarks.long_context --tokens 32768 65536 131072 196608

Results: ``docs/bench/long_context.json`` (written atomically).

Source: arXiv 2411.01783 §4.2.1 (1M-token prefill on a 128K-trained model); GNU time ``-v``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.convert_memory import REPO_ROOT, timed

PRESET = "tiny-64k"
MAX_CONTEXT = 1 << 20


def run_size(tokens: int, cp: int, work: Path, timeout_s: float) -> dict:
    """One ``cp-megatron run`` of a ``tokens``-token random prompt at CP ``cp``."""
    cfg, out = work / f"run-{tokens}.yaml", work / f"run-{tokens}.json"
    cfg.write_text(f"model: {{format: dummy, preset: {PRESET}, max_context: {MAX_CONTEXT}}}\n"
                   f"parallel: {{tp: 1, cp: {cp}, pp: 1}}\n"
                   f"runtime: {{device: cpu, threads_per_rank: 1, seed: 0, timeout_s: {timeout_s}}}\n"
                   f"prompt: {{random_tokens: {tokens}}}\ngeneration: {{max_new_tokens: 1}}\n")
    run = timed([sys.executable, "-m", "cp_megatron.cli", "run", str(cfg), "--output", str(out)])
    result = json.loads(out.read_text())
    first = result["rounds"][0]
    return {"tokens": tokens, "cp": cp, "tokens_per_rank": tokens / cp, "ttft_s": first["ttft_s"],
            "strategy": first["strategy"], "kv_cache_bytes_rank0": first["kv_cache_bytes"],
            "peak_rss_bytes_per_rank": run["peak_rss_bytes"], "wall_s": run["wall_s"]}


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b x; with the largest relative residual."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))
    return {"intercept_bytes": a, "bytes_per_token_per_rank": b, "max_relative_residual": worst}


def main(argv=None) -> int:
    from cp_megatron.bench.common import busy_note, load_average, machine_info, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--output", default=str(REPO_ROOT / "docs" / "bench" / "long_context.json"))
    args = parser.parse_args(argv)

    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="long_context_") as work:
        for tokens in args.tokens:
            rows.append(run_size(tokens, args.cp, Path(work), args.timeout))
            r = rows[-1]
            print(f"{tokens:>8} tokens CP{args.cp}: TTFT {r['ttft_s']:8.1f} s, peak RSS/rank "
                  f"{r['peak_rss_bytes_per_rank'] / 2**20:7.0f} MiB ({r['strategy']})", flush=True)
    report = {"benchmark": "long_context", "preset": PRESET, "max_position_embeddings": 65536,
              "model.max_context": MAX_CONTEXT, "runs": rows,
              "machine": machine_info(load_before)}
    report["notes"] = busy_note(report["machine"])
    if len(rows) >= 2:
        report["rss_fit"] = linear_fit([r["tokens_per_rank"] for r in rows],
                                       [r["peak_rss_bytes_per_rank"] for r in rows])
        fit = report["rss_fit"]
        print(f"peak RSS/rank = {fit['intercept_bytes'] / 2**20:.0f} MiB + "
              f"{fit['bytes_per_token_per_rank']:.0f} B x tokens/CP (max residual "
              f"{fit['max_relative_residual']:.1%})")
    write_json(Path(args.output), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
