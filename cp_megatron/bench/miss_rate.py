"""Suite ``miss-rate``: partial-prefill TTFT of pass-KV and pass-Q against the miss rate.

The shape of the paper's Table 4 on this machine: a fixed context T + P (16K tokens at
CP2, ``tiny-long`` with seeded random weights) and miss rates T / (T + P) from 1% to
100%.  For each point the first P tokens are prefilled (untimed; the points run in
order of growing P, each extending the cache of the one before by a partial prefill,
load-balanced like any later turn), then the round with the T new tokens is timed with
pass-KV and pass-Q forced and with ``auto`` (the engine's Alg. 1 / Alg. 5 choice,
recorded from ``RoundMetrics.strategy`` / ``heuristic``).  After each timed round the
cache is rolled back to the P tokens (every rank truncates its cache to what it held
before the round: the round only appended), so every repeat sees the same cache.
Variants rotate in order from repeat to repeat.  TTFT is ``RoundMetrics.time_s`` of the
round (slowest rank).

Source: arXiv 2411.01783 §3.6 (Alg. 1, 5; Eq. 5), §4.3 Table 4 (TTFT vs miss rate).
"""

from __future__ import annotations

import time

from cp_megatron.bench.common import (BenchOptions, dummy_engine, finish_report, pyplot, start_suite,
                                      random_prompt, save_figure, summary)

VARIANTS = ("pass-kv", "pass-q", "auto")
# The ring variant family of what auto ran: all-gather-Q is pass-Q with the queries gathered at
# once instead of rotated (docs/performance.md §7), so it counts as pass-Q against the two
# forced variants.
FAMILY = {"pass-kv": "pass-kv", "pass-q": "pass-q", "all-gather-q": "pass-q"}
FULL = {"preset": "tiny-long", "context_tokens": 16384, "cp": 2,
        "miss_rates": [0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0], "repeats": 5, "warmup_tokens": 2048,
        "seed": 0}
QUICK = {**FULL, "context_tokens": 512, "miss_rates": [0.05, 0.5, 1.0], "repeats": 1, "warmup_tokens": 64}


def points(cfg: dict) -> list[dict]:
    """(T, P) per miss rate, sorted by growing P (the order the cache is built in)."""
    total = cfg["context_tokens"]
    out = []
    for m in cfg["miss_rates"]:
        t = min(total, max(2, round(total * m)))  # T > 1: a partial prefill, not a decode step
        out.append({"miss_rate_target": m, "new_tokens": t, "cached_tokens": total - t})
    return sorted(out, key=lambda p: p["cached_tokens"])


def _job(cfg: dict) -> dict:
    import torch.distributed as dist

    from cp_megatron import parallel_state

    cp = cfg["cp"]
    topo = parallel_state.initialize(tp=1, cp=cp, pp=1)
    engine = dummy_engine(cfg["preset"], cfg["seed"], topo,
                          kv_capacity=cfg["context_tokens"] // cp + 4 * cp * len(cfg["miss_rates"]))
    ids = random_prompt(cfg["context_tokens"], engine.stage.config.vocab_size, cfg["seed"])
    engine.forward({0: ids[: cfg["warmup_tokens"]]})
    engine.reset()
    rounds, cached = [], 0
    for point in points(cfg):
        t, p = point["new_tokens"], point["cached_tokens"]
        if p > cached:  # extend the cache to P tokens (untimed)
            engine.strategy = "auto"
            engine.forward({0: ids[cached:p]})
            cached = p
        held = engine.kv_cache.num_tokens
        for r in range(cfg["repeats"]):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                engine.strategy = variant
                dist.barrier()
                cpu_start = time.process_time()
                _, metrics = engine.forward({0: ids[p: p + t]})
                cpu_s = time.process_time() - cpu_start
                engine.truncate(0, p)  # roll the round back: the cache holds P tokens again
                rounds.append({"variant": variant, "repeat": r, "cpu_s": cpu_s,
                               "kv_tokens_held": held, **metrics.to_dict()})
    return {"cp_rank": topo.cp_rank, "rounds": rounds}


def summarise(cfg: dict, per_rank: list[dict]) -> list[dict]:
    rows = []
    for point in points(cfg):
        t, p = point["new_tokens"], point["cached_tokens"]
        row = {**point, "miss_rate": t / (t + p), "variants": {}}
        for variant in VARIANTS:
            samples = []
            for r in range(cfg["repeats"]):
                mine = [next(x for x in rank["rounds"] if x["new_tokens"] == t and x["cached_tokens"] == p
                             and x["variant"] == variant and x["repeat"] == r) for rank in per_rank]
                samples.append({"ttft_s": max(x["time_s"] for x in mine),
                                "attention_s": max(x["attention_s"] for x in mine),
                                "comm_s": max(x["comm_s"] for x in mine),
                                "cpu_s": max(x["cpu_s"] for x in mine),
                                "strategy": mine[0]["strategy"], "kind": mine[0]["kind"],
                                "kv_tokens_held": [x["kv_tokens_held"] for x in mine]})
            row["variants"][variant] = {"ttft_s": summary([s["ttft_s"] for s in samples]),
                                        "comm_s_median": summary([s["comm_s"] for s in samples])["median"],
                                        "strategy": samples[0]["strategy"], "samples": samples}
        auto_round = next(x for x in per_rank[0]["rounds"] if x["new_tokens"] == t
                          and x["cached_tokens"] == p and x["variant"] == "auto")
        kv, q = (row["variants"][v]["ttft_s"] for v in ("pass-kv", "pass-q"))
        fast, slow = (kv, q) if kv["median"] <= q["median"] else (q, kv)
        row.update(auto_picked=auto_round["strategy"], heuristic=auto_round["heuristic"],
                   kind=auto_round["kind"], faster_measured="pass-kv" if fast is kv else "pass-q",
                   pass_q_over_pass_kv=q["median"] / kv["median"],
                   pass_q_over_pass_kv_of_minima=q["min"] / kv["min"],
                   # every sample of the faster variant beat every sample of the slower one
                   separated=fast["max"] < slow["min"])
        rows.append(row)
    return sorted(rows, key=lambda r: r["miss_rate"])


def crossover(rows: list[dict]) -> dict:
    """Where the faster variant changes, walking up the miss rate.

    ``measured_switches`` follows the medians at every point; ``resolved_switches`` only
    the points where the two variants' samples do not overlap (``separated``), which is
    the crossover this machine can actually resolve.
    """
    def switches(points: list[dict]) -> list[dict]:
        return [{"between_miss_rates": [a["miss_rate"], b["miss_rate"]],
                 "from": a["faster_measured"], "to": b["faster_measured"]}
                for a, b in zip(points, points[1:]) if a["faster_measured"] != b["faster_measured"]]

    resolved = [r for r in rows if r["separated"]]
    auto_switches = [[a["miss_rate"], b["miss_rate"]] for a, b in zip(rows, rows[1:])
                     if a["auto_picked"] != b["auto_picked"]]
    agree = sum(FAMILY[r["auto_picked"]] == r["faster_measured"] for r in rows)
    worst = max(rows, key=lambda r: r["variants"][FAMILY[r["auto_picked"]]]["ttft_s"]["median"]
                / min(r["variants"][v]["ttft_s"]["median"] for v in ("pass-kv", "pass-q")))
    if not resolved:
        verdict = ("no crossover resolved: at every miss rate the two variants' samples overlap "
                   "(the difference is within the run-to-run spread)")
    elif not switches(resolved):
        verdict = (f"{resolved[0]['faster_measured']} is faster wherever the difference is resolved "
                   f"({len(resolved)}/{len(rows)} points)")
    else:
        verdict = "; ".join(f"{s['from']} -> {s['to']} between {s['between_miss_rates'][0]:.1%} and "
                            f"{s['between_miss_rates'][1]:.1%}" for s in switches(resolved))
    return {"verdict": verdict, "resolved_points": [r["miss_rate"] for r in resolved],
            "resolved_switches": switches(resolved), "measured_switches": switches(rows),
            "auto_switches": auto_switches, "auto_agrees_with_measurement": f"{agree}/{len(rows)}",
            "auto_worst_cost": {"miss_rate": worst["miss_rate"], "auto_picked": worst["auto_picked"],
                                "picked_variant_over_best_variant": worst["variants"][FAMILY[worst["auto_picked"]]]
                                ["ttft_s"]["median"] / min(worst["variants"][v]["ttft_s"]["median"]
                                                           for v in ("pass-kv", "pass-q"))}}


def table(report: dict) -> str:
    head = (f"{'miss':>6} {'T':>6} {'P':>6} {'pass-KV s':>10} {'pass-Q s':>9} {'Q/KV':>6} "
            f"{'(minima)':>8} {'auto s':>8} {'auto picks':>10} {'faster':>8} {'separated':>9}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        v = r["variants"]
        lines.append(f"{r['miss_rate']:>6.1%} {r['new_tokens']:>6} {r['cached_tokens']:>6} "
                     f"{v['pass-kv']['ttft_s']['median']:>10.3f} {v['pass-q']['ttft_s']['median']:>9.3f} "
                     f"{r['pass_q_over_pass_kv']:>6.2f} {r['pass_q_over_pass_kv_of_minima']:>8.2f} "
                     f"{v['auto']['ttft_s']['median']:>8.3f} {r['auto_picked']:>10} {r['faster_measured']:>8} "
                     f"{'yes' if r['separated'] else 'no':>9}")
    c = report["crossover"]
    lines.append(f"crossover: {c['verdict']}")
    w = c["auto_worst_cost"]
    lines.append(f"auto picks the faster median at {c['auto_agrees_with_measurement']} points; its worst "
                 f"case costs {w['picked_variant_over_best_variant'] - 1:+.1%} (at {w['miss_rate']:.1%} miss)")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    plt = pyplot()
    cfg, rows = report["config"], report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    x = [r["miss_rate"] * 100 for r in rows]
    for variant, color, marker in (("pass-kv", "#4477aa", "o"), ("pass-q", "#ee6677", "s")):
        left.plot(x, [r["variants"][variant]["ttft_s"]["median"] for r in rows], marker=marker,
                  color=color, label=f"{variant} (forced)")
    for r, xi in zip(rows, x):
        picked = r["variants"]["auto"]["ttft_s"]["median"]
        left.scatter([xi], [picked], marker="x", color="black", zorder=3,
                     label="auto" if xi == x[0] else None)
    ticks = [f"{r['miss_rate_target'] * 100:g}" for r in rows]
    left.set_xscale("log")
    left.set_xticks(x, ticks)
    left.minorticks_off()
    left.set_yscale("log")
    left.set_xlabel("miss rate T / (T + P), %")
    left.set_ylabel("TTFT of the round (s, median)")
    left.set_title(f"partial prefill, T + P = {cfg['context_tokens']}, CP{cfg['cp']}", fontsize=9)
    left.legend(fontsize=8)
    ratio = [r["pass_q_over_pass_kv"] for r in rows]
    right.plot(x, ratio, "o-", color="#228833")
    right.axhline(1.0, color="grey", ls=":", lw=1)
    for r, xi, yi in zip(rows, x, ratio):
        right.annotate({"pass-kv": "KV", "pass-q": "Q", "all-gather-q": "AG"}[r["auto_picked"]], (xi, yi), textcoords="offset points",
                       xytext=(0, 7), ha="center", fontsize=8)
    right.set_xscale("log")
    right.set_xticks(x, ticks)
    right.minorticks_off()
    right.set_xlabel("miss rate, %")
    right.set_ylabel("pass-Q TTFT / pass-KV TTFT")
    right.set_title("> 1: pass-KV faster; < 1: pass-Q faster (label: auto's pick)", fontsize=9)
    right.margins(y=0.25)
    fig.suptitle(f"{cfg['preset']} (dummy weights), {cfg['threads_per_rank']} thread/rank, "
                 f"{report['machine']['cpu_count']} cores", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def run(opts: BenchOptions) -> dict:
    """Run the suite, write ``miss_rate.json`` / ``miss_rate.png``; return the report."""
    from cp_megatron.launcher import spawn

    log, cfg, load_before = start_suite(opts, "miss-rate", FULL, QUICK)
    log(f"{cfg['preset']}, T + P = {cfg['context_tokens']} at CP{cfg['cp']}, miss rates "
        f"{cfg['miss_rates']}, variants {VARIANTS}, {cfg['repeats']} repeats")
    per_rank = spawn(_job, cfg["cp"], (cfg,), timeout_s=opts.timeout_s, threads_per_rank=opts.threads)
    rows = summarise(cfg, per_rank)
    return finish_report(
        opts, log, suite="miss-rate", stem="miss_rate", cfg=cfg, load_before=load_before, results=rows,
        plot=plot, crossover=crossover(rows), notes=[
            "ttft_s: RoundMetrics.time_s of the partial-prefill round with the T new tokens (max over "
            "ranks); the P cached tokens were prefilled beforehand (untimed).",
            "pass-kv / pass-q: forced; auto: the engine's choice (Alg. 1 / Alg. 5 with the cpu-gloo "
            "profile's C and BW), auto_picked / heuristic come from its RoundMetrics.",
            "The cache is rolled back to P tokens after every timed round (each rank truncates its "
            "cache to the entries it held before: a round only appends).",
            "faster_measured compares the medians of the two forced variants; separated: every "
            "sample of the faster one beat every sample of the slower one (else the difference is "
            "within the run-to-run spread).",
        ])
