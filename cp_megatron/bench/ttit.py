"""Suite ``ttit``: the planner's TTIT (and TTFT) for a run config against the measured ones.

The run config (``--config``, default ``configs/default.yaml``: SmolLM2-135M, 4,085 prompt
tokens, float32, 24 new tokens) runs at each CP size in turn (CP1, CP2, CP1, CP2, ... for
``repeats`` rounds), each run a fresh job through :func:`cp_megatron.job.run`.  Measured
TTIT is the median over every decode step of every run of that CP size
(``RoundMetrics.time_s`` of the decode rounds), TTFT the median of the prefill rounds.

The prediction is :func:`cp_megatron.planner.plan` for the same model dimensions, TP, CP and
dtype, at the context of the median decode step (prompt + half the generated tokens),
with the hardware profile ``--hardware`` (default ``cpu-gloo``, this machine's measured
constants in round numbers; or a ``hardware.json`` from ``cp-megatron bench hardware``).
The ratio predicted / measured is reported per CP size; nothing is fitted.

Source: arXiv 2411.01783 §4.3 (decode: TTIT, Alg. 4); docs/planner.md (the model).
"""

from __future__ import annotations

import statistics

from cp_megatron.bench.common import (BenchError, BenchOptions, Log, busy_note, machine_info, pyplot, save_figure,
                                      write_json)

FULL = {"cp_sizes": [1, 2], "repeats": 2, "max_new_tokens": None}
QUICK = {**FULL, "repeats": 1, "max_new_tokens": 4}


def measured(turns: list[dict]) -> dict:
    """TTFT and TTIT samples of the first turn of each run: {"ttft_s": [...], "ttit_s": [...],
    "prompt_tokens": n, "new_tokens": n} (every decode step is one TTIT sample)."""
    ttft = [t["rounds"][0]["time_s"] for t in turns]
    ttit = [r["time_s"] for t in turns for r in t["rounds"][1:]]
    return {"ttft_s": ttft, "ttit_s": ttit, "prompt_tokens": turns[0]["fed_tokens"],
            "new_tokens": len(turns[0]["token_ids"])}


def predicted(model_config, profile: str, tp: int, cp: int, prompt_tokens: int, new_tokens: int,
              dtype: str) -> dict:
    """The planner's TTFT (full prefill of the prompt) and TTIT (decode step at the median
    context, prompt + new_tokens // 2) with its decode breakdown."""
    from cp_megatron.planner import plan

    weight_dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, "fp32")
    prefill = plan(model_config, profile, tp=tp, cp=cp, context_tokens=prompt_tokens, dtype=weight_dtype)
    step = plan(model_config, profile, tp=tp, cp=cp, context_tokens=prompt_tokens + max(new_tokens // 2, 1),
                dtype=weight_dtype)
    return {"ttft_s": prefill.ttft_s, "ttit_s": step.ttit_s, "decode": step.decode,
            "context_tokens": step.context_tokens}


def compare(cp_sizes: list[int], runs: dict[int, list[dict]], predictions: dict[int, dict]) -> list[dict]:
    """One row per CP size: measured medians, predictions and predicted / measured."""
    rows = []
    for cp in cp_sizes:
        m, p = measured(runs[cp]), predictions[cp]
        ttft, ttit = statistics.median(m["ttft_s"]), statistics.median(m["ttit_s"])
        rows.append({"cp": cp, "measured": {"ttft_s": ttft, "ttit_s": ttit, "samples": m},
                     "predicted": p, "ttft_ratio": p["ttft_s"] / ttft, "ttit_ratio": p["ttit_s"] / ttit})
    return rows


def table(report: dict) -> str:
    lines = [f"profile {report['profile']} (planner), config {report['config']['run_config']}",
             f"{'CP':>3} {'TTFT measured':>14} {'predicted':>10} {'ratio':>6} "
             f"{'TTIT measured':>14} {'predicted':>10} {'ratio':>6}", "-" * 70]
    for r in report["results"]:
        lines.append(f"{r['cp']:>3} {r['measured']['ttft_s']:>12.3f} s {r['predicted']['ttft_s']:>8.3f} s "
                     f"{r['ttft_ratio']:>6.2f} {r['measured']['ttit_s'] * 1e3:>11.1f} ms "
                     f"{r['predicted']['ttit_s'] * 1e3:>7.1f} ms {r['ttit_ratio']:>6.2f}")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    plt = pyplot()
    rows = report["results"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    cps = [r["cp"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["measured"]["ttit_s"] * 1e3 for r in rows], 0.4, color="#4477aa",
           label="measured (median step)")
    ax.bar([i + 0.2 for i in x], [r["predicted"]["ttit_s"] * 1e3 for r in rows], 0.4, color="#ee6677",
           label=f"planner ({report['profile']})")
    for i, r in zip(x, rows):
        steps = r["measured"]["samples"]["ttit_s"]
        ax.scatter([i - 0.2] * len(steps), [s * 1e3 for s in steps], color="black", s=6, alpha=0.4)
    ax.set_xticks(list(x), [f"CP{c}" for c in cps])
    ax.set_ylabel("TTIT (ms)")
    ax.set_title(f"decode step of {report['config']['run_config']} (dots: every step)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def run(opts: BenchOptions) -> dict:
    """Run the config at each CP size in turn, predict, write ``ttit.json`` / ``ttit.png``."""
    from cp_megatron.config import load_config
    from cp_megatron.hardware import load_profile
    from cp_megatron.job import run as run_job
    from cp_megatron.preflight import prepare

    try:  # a bad profile fails now, not after minutes of measuring
        load_profile(opts.hardware)
    except ValueError as exc:
        raise BenchError(f"--hardware: {exc}") from None
    log = Log("ttit")
    cfg = {**opts.suite_config(FULL, QUICK), "run_config": opts.config}
    load_before = log.load_check()
    overrides = [f"runtime.threads_per_rank={opts.threads}"]
    if cfg["max_new_tokens"]:
        overrides.append(f"generation.max_new_tokens={cfg['max_new_tokens']}")
    runs: dict[int, list[dict]] = {cp: [] for cp in cfg["cp_sizes"]}
    for r in range(cfg["repeats"]):
        for cp in cfg["cp_sizes"]:
            job = load_config(opts.config, overrides + [f"parallel.cp={cp}"])
            log(f"repeat {r + 1}/{cfg['repeats']}: {opts.config} at CP{cp}")
            runs[cp].append(run_job(job)["turns"][0])
    profile = opts.hardware
    first = load_config(opts.config, overrides)
    model_config = prepare(first).model_config
    predictions = {}
    for cp in cfg["cp_sizes"]:
        m = measured(runs[cp])
        predictions[cp] = predicted(model_config, profile, first.parallel.tp, cp, m["prompt_tokens"],
                                    m["new_tokens"], first.model.dtype)
    machine = machine_info(load_before)
    report = {
        "suite": "ttit", "command": opts.command, "quick": opts.quick, "machine": machine,
        "config": cfg, "elapsed_s": log.elapsed(), "profile": profile,
        "results": compare(cfg["cp_sizes"], runs, predictions),
        "notes": [
            "measured.ttit_s: median over every decode step (RoundMetrics.time_s, rank 0) of every run; "
            "measured.ttft_s: median prefill round.",
            "predicted: cp-megatron plan with the same model dimensions, TP, CP and dtype; TTIT at the "
            "context of the median decode step (prompt + new_tokens // 2).",
            "ratio: predicted / measured.",
        ] + busy_note(machine),
    }
    json_path, png_path = opts.path("ttit", "json"), opts.path("ttit", "png")
    write_json(json_path, report)
    plot(report, png_path)
    log(f"wrote {json_path} and {png_path}")
    return report
