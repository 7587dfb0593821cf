"""Suite ``scaling``: full-prefill TTFT of a dummy long-context model, CP1 against CP2.

The model is the ``tiny-long`` preset (4 layers, NH 8, NKV 2, DH 64, hidden 512, seeded
random weights); the prompt is seeded random token ids of 8K, 16K and 32K tokens.  One
job per CP size is started once (one thread per rank) and the jobs take turns: a warm-up
prefill each, then for each length CP1, CP2, CP1, CP2, ... (``repeats`` each).  TTFT is
the prefill round's ``RoundMetrics.time_s`` from the engine (the slowest rank), so
process start-up and weight init are never timed; ``engine.reset()`` empties the cache
between rounds.  Speedup = median TTFT at CP1 / median TTFT at CP N; parallel efficiency
= speedup / N.

Source: arXiv 2411.01783 §4.2 (CP scaling of full prefill, Fig. 6 / Table 3).
"""

from __future__ import annotations

import time

from cp_megatron.bench.common import (BenchOptions, Job, dummy_engine, finish_report, pyplot, start_suite,
                                      random_prompt, run_interleaved, save_figure, summary, turn)

FULL = {"preset": "tiny-long", "lengths": [8192, 16384, 32768], "cp_sizes": [1, 2], "repeats": 3,
        "warmup_tokens": 2048, "strategy": "auto", "seed": 0}
QUICK = {**FULL, "lengths": [256, 512], "repeats": 2, "warmup_tokens": 64}
TARGET_SPEEDUP = 1.8  # at 32K on 2 cores (the brief's target; reported, never asserted)


def schedule(cfg: dict) -> list[str]:
    """Turn order: set-ups, warm-ups, then CP1, CP2, CP1, CP2, ... for each length."""
    keys = [f"cp{n}/setup" for n in cfg["cp_sizes"]] + [f"cp{n}/warmup" for n in cfg["cp_sizes"]]
    for length in cfg["lengths"]:
        for r in range(cfg["repeats"]):
            keys += [f"cp{n}/{length}/{r}" for n in cfg["cp_sizes"]]
    return keys


def _job(turns, cfg: dict, cp_size: int) -> dict:
    """One CP size: build the engine, warm up, then one timed prefill per turn."""
    from cp_megatron import parallel_state

    topo = parallel_state.initialize(tp=1, cp=cp_size, pp=1)
    tag = f"cp{cp_size}"
    with turn(turns, f"{tag}/setup"):
        engine = dummy_engine(cfg["preset"], cfg["seed"], topo, strategy=cfg["strategy"],
                              kv_capacity=max(cfg["lengths"]) // cp_size + 2 * cp_size)
    vocab = engine.stage.config.vocab_size
    prompts = {n: random_prompt(n, vocab, cfg["seed"]) for n in cfg["lengths"]}
    with turn(turns, f"{tag}/warmup"):
        engine.forward({0: prompts[max(cfg["lengths"])][: cfg["warmup_tokens"]]})
        engine.reset()
    rounds, last_logits = [], {}
    for length in cfg["lengths"]:
        for r in range(cfg["repeats"]):
            with turn(turns, f"{tag}/{length}/{r}"):
                cpu_start = time.process_time()
                logits, metrics = engine.forward({0: prompts[length]})
                cpu_s = time.process_time() - cpu_start
                engine.reset()
            rounds.append({"tokens": length, "repeat": r, "cpu_s": cpu_s, **metrics.to_dict()})
            if r == 0:
                last_logits[length] = logits[0]
    return {"cp_rank": topo.cp_rank, "rounds": rounds,
            "logits": {n: t.tolist() for n, t in last_logits.items()} if topo.cp_rank == 0 else None}


def summarise(cfg: dict, per_cp: dict[int, list[dict]]) -> list[dict]:
    """One row per length: per-CP samples (slowest rank per round), medians, speedup."""
    import torch

    rows = []
    base = min(cfg["cp_sizes"])
    for length in cfg["lengths"]:
        row: dict = {"tokens": length, "cp": {}}
        for n, ranks in per_cp.items():
            per_round = []
            for r in range(cfg["repeats"]):
                mine = [next(x for x in rank["rounds"] if x["tokens"] == length and x["repeat"] == r)
                        for rank in ranks]
                per_round.append({"ttft_s": max(x["time_s"] for x in mine),
                                  "attention_s": max(x["attention_s"] for x in mine),
                                  "comm_s": max(x["comm_s"] for x in mine),
                                  "cpu_s": max(x["cpu_s"] for x in mine),
                                  "strategy": mine[0]["strategy"], "kind": mine[0]["kind"]})
            ttft = [x["ttft_s"] for x in per_round]
            row["cp"][str(n)] = {"ttft_s": summary(ttft), "samples": per_round,
                                 "attention_s_median": summary([x["attention_s"] for x in per_round])["median"],
                                 "comm_s_median": summary([x["comm_s"] for x in per_round])["median"],
                                 "cpu_s_median": summary([x["cpu_s"] for x in per_round])["median"],
                                 "strategy": per_round[0]["strategy"], "kind": per_round[0]["kind"],
                                 "heuristic": next(x for x in ranks[0]["rounds"]
                                                   if x["tokens"] == length)["heuristic"]}
        ref = row["cp"][str(base)]["ttft_s"]
        for n in cfg["cp_sizes"]:
            if n == base:
                continue
            cur = row["cp"][str(n)]["ttft_s"]
            speedup = ref["median"] / cur["median"]
            row["cp"][str(n)].update(speedup=speedup, efficiency=speedup * base / n,
                                     speedup_of_minima=ref["min"] / cur["min"])
        ref_logits = torch.tensor(per_cp[base][0]["logits"][length])
        diffs = {str(n): (torch.tensor(ranks[0]["logits"][length]) - ref_logits).abs().max().item()
                 for n, ranks in per_cp.items() if n != base}
        same = all(int(torch.tensor(ranks[0]["logits"][length]).argmax()) == int(ref_logits.argmax())
                   for ranks in per_cp.values())
        row["logits_max_abs_diff_vs_cp1"], row["same_next_token"] = diffs, same
        rows.append(row)
    return rows


def table(report: dict) -> str:
    cps = report["config"]["cp_sizes"]
    other = [n for n in cps if n != min(cps)]
    head = f"{'tokens':>7} " + " ".join(f"{f'CP{n} TTFT s':>12}" for n in cps) + " " + " ".join(
        f"{f'speedup CP{n}':>13} {'efficiency':>10} {'(of minima)':>11}" for n in other) + f" {'variant':>8}"
    lines = [head, "-" * len(head)]
    for row in report["results"]:
        cells = " ".join(f"{row['cp'][str(n)]['ttft_s']['median']:>12.3f}" for n in cps)
        gains = " ".join(f"{row['cp'][str(n)]['speedup']:>12.2f}x {row['cp'][str(n)]['efficiency']:>9.0%} "
                         f"{row['cp'][str(n)]['speedup_of_minima']:>10.2f}x" for n in other)
        lines.append(f"{row['tokens']:>7} {cells} {gains} {row['cp'][str(other[0])]['strategy']:>8}")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    plt = pyplot()
    cfg, rows = report["config"], report["results"]
    cps = cfg["cp_sizes"]
    other = [n for n in cps if n != min(cps)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    x = [r["tokens"] for r in rows]
    for n, color in zip(cps, ("#4477aa", "#ee6677", "#228833", "#ccbb44")):
        med = [r["cp"][str(n)]["ttft_s"]["median"] for r in rows]
        left.plot(x, med, "o-", color=color, label=f"CP{n} (median)")
        for r in rows:
            s = [p["ttft_s"] for p in r["cp"][str(n)]["samples"]]
            left.scatter([r["tokens"]] * len(s), s, color=color, s=10, alpha=0.5)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(x, [f"{t // 1024}K" if t >= 1024 else str(t) for t in x])
    left.set_xlabel("prompt tokens (full prefill)")
    left.set_ylabel("TTFT (s)")
    left.set_title("TTFT (dots: every repeat)", fontsize=9)
    left.legend(fontsize=8)
    width = 0.8 / len(other)
    for i, n in enumerate(other):
        sp = [r["cp"][str(n)]["speedup"] for r in rows]
        pos = [j + (i - (len(other) - 1) / 2) * width for j in range(len(rows))]
        bars = right.bar(pos, sp, width, color="#ee6677", label=f"CP{n} / CP1")
        for b, r in zip(bars, rows):
            right.text(b.get_x() + b.get_width() / 2, b.get_height(),
                       f"{b.get_height():.2f}x\n{r['cp'][str(n)]['efficiency']:.0%}",
                       ha="center", va="bottom", fontsize=8)
        right.axhline(n, color="grey", ls=":", lw=1, label=f"ideal {n}x")
    right.axhline(TARGET_SPEEDUP, color="#228833", ls="--", lw=1, label=f"target {TARGET_SPEEDUP}x")
    right.set_xticks(range(len(rows)), [f"{t // 1024}K" if t >= 1024 else str(t) for t in x])
    right.set_ylabel("speedup (median TTFT ratio)")
    right.set_title("speedup and parallel efficiency", fontsize=9)
    right.legend(fontsize=8, loc="lower right")
    right.margins(y=0.2)
    fig.suptitle(f"Full prefill, {cfg['preset']} (dummy weights), {cfg['threads_per_rank']} thread/rank, "
                 f"{report['machine']['cpu_count']} cores", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def run(opts: BenchOptions) -> dict:
    """Run the suite, write ``scaling.json`` / ``scaling.png``; return the report."""
    log, cfg, load_before = start_suite(opts, "scaling", FULL, QUICK)
    log(f"{cfg['preset']}, lengths {cfg['lengths']}, CP {cfg['cp_sizes']} interleaved, "
        f"{cfg['repeats']} repeats each")
    jobs = [Job(_job, n, (cfg, n), threads_per_rank=opts.threads, name=f"cp{n}") for n in cfg["cp_sizes"]]
    results = run_interleaved(jobs, schedule(cfg), opts.timeout_s)
    per_cp = dict(zip(cfg["cp_sizes"], results))
    return finish_report(
        opts, log, suite="scaling", stem="scaling", cfg=cfg, load_before=load_before,
        results=summarise(cfg, per_cp), plot=plot, notes=[
            "ttft_s: RoundMetrics.time_s of the prefill round (engine.forward), max over the CP ranks; "
            "process start-up and weight init are outside it.",
            "Jobs take turns (CP1, CP2, CP1, CP2, ...); a job waiting for its turn sleeps.",
            "speedup = median CP1 TTFT / median CP N TTFT; efficiency = speedup / N; "
            "speedup_of_minima uses the fastest repeat of each (least disturbed by other work).",
            "attention_s / comm_s: local attention and exposed ring communication inside the round "
            "(RoundMetrics.attention_s / comm_s); cpu_s: process CPU time of the round.",
        ])
