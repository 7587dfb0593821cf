"""Smoke tests of ``cp-megatron bench``: tiny sizes, the JSON's keys and sane values.

Speed itself is never asserted (the machine is shared); only that every suite runs end to
end, writes its JSON and PNG, and that the figures are consistent with each other.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import threading
from pathlib import Path

import pytest

from cp_megatron.cli import bench
from cp_megatron.bench.common import BenchOptions, Turns

MACHINE_KEYS = {"cpu_count", "torch", "load_average_before", "load_average_after"}


def _load(opts: BenchOptions, stem: str) -> dict:
    json_path, png_path = opts.path(stem, "json"), opts.path(stem, "png")
    assert json_path.name == f"{stem}-quick.json", "a quick run must not overwrite measured results"
    assert png_path.is_file() and png_path.stat().st_size > 1000
    report = json.loads(json_path.read_text())
    assert MACHINE_KEYS <= set(report["machine"]), report["machine"]
    assert report["machine"]["cpu_count"] >= 1
    assert len(report["machine"]["load_average_before"]) == 3
    assert report["quick"] is True
    assert not list(json_path.parent.glob(".*.tmp")), "atomic write left a temporary file"
    umask = os.umask(0)
    os.umask(umask)
    assert json_path.stat().st_mode & 0o777 == 0o666 & ~umask, "results must be readable like any file"
    return report


def _positive_summary(s: dict, n: int) -> None:
    assert s["n"] == n
    assert 0 < s["min"] <= s["median"] <= s["max"]


@pytest.mark.unit
def test_bench_is_registered_as_a_cli_subcommand():
    from cp_megatron.cli import SUBCOMMANDS

    assert SUBCOMMANDS["bench"] == "cp_megatron.cli.bench"
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "miss-rate", "--quick", "--output-dir", "x"])
    assert (args.suite, args.quick, args.output_dir, args.func) == ("miss-rate", True, "x", bench.run_bench)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "no-such-suite"])


@pytest.mark.unit
@pytest.mark.parametrize("flags", [["--output-dir", "A_FILE"], ["--timeout", "-1"], ["--timeout", "nan"]])
def test_bad_output_dir_or_timeout_is_exit_2_before_measuring(tmp_path, capsys, flags):
    from cp_megatron import cli

    (tmp_path / "A_FILE").write_text("")
    flags = [str(tmp_path / f) if f == "A_FILE" else f for f in flags]
    try:
        code = cli.main(["bench", "hardware", "--quick"] + flags)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flags[0] in err, err


@pytest.mark.unit
def test_turns_run_concurrent_jobs_in_schedule_order(tmp_path):
    schedule = ["a/0", "b/0", "a/1", "b/1", "a/2", "b/2"]
    turns, seen = Turns(str(tmp_path), tuple(schedule), poll_s=0.001), []

    def job(name: str) -> None:
        for r in range(3):
            turns.wait(f"{name}/{r}")
            seen.append(f"{name}/{r}")
            turns.done(f"{name}/{r}")

    threads = [threading.Thread(target=job, args=(n,)) for n in ("b", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == schedule


@pytest.mark.unit
def test_peers_with_a_missing_config_is_exit_code_2(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "peers", "--quick", "--output-dir", str(tmp_path),
                              "--config", str(tmp_path / "missing.yaml")])
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers missing: the extras check answers first")
    assert args.func(args) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_scaling_quick_writes_medians_speedup_and_efficiency(tmp_path):
    from cp_megatron.bench import scaling

    opts = BenchOptions(tmp_path, quick=True)
    scaling.run(opts)
    report = _load(opts, "scaling")
    cfg = report["config"]
    assert cfg["cp_sizes"] == [1, 2] and cfg["threads_per_rank"] == 1
    assert [r["tokens"] for r in report["results"]] == cfg["lengths"]
    for row in report["results"]:
        for n in ("1", "2"):
            _positive_summary(row["cp"][n]["ttft_s"], cfg["repeats"])
            assert row["cp"][n]["kind"] == "prefill"
        cp2 = row["cp"]["2"]
        assert cp2["speedup"] == pytest.approx(row["cp"]["1"]["ttft_s"]["median"] / cp2["ttft_s"]["median"])
        assert cp2["efficiency"] == pytest.approx(cp2["speedup"] / 2)
        assert cp2["strategy"] == "pass-kv"  # full prefill with NH > 2 NKV (docs/design.md §8)
        assert row["same_next_token"]
        # float32 rounding of a 4-layer random model; a wrong shard would differ by O(1)
        assert row["logits_max_abs_diff_vs_cp1"]["2"] < 1e-3
    assert "speedup" in scaling.table(report)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_miss_rate_quick_times_both_variants_and_records_auto(tmp_path):
    from cp_megatron.bench import miss_rate

    opts = BenchOptions(tmp_path, quick=True)
    miss_rate.run(opts)
    report = _load(opts, "miss_rate")
    cfg = report["config"]
    rates = [r["miss_rate"] for r in report["results"]]
    assert rates == sorted(rates) and len(rates) == len(cfg["miss_rates"])
    for row in report["results"]:
        assert row["new_tokens"] + row["cached_tokens"] == cfg["context_tokens"]
        assert row["kind"] == ("prefill" if row["cached_tokens"] == 0 else "partial-prefill")
        for variant in ("pass-kv", "pass-q"):
            _positive_summary(row["variants"][variant]["ttft_s"], cfg["repeats"])
            assert row["variants"][variant]["strategy"] == variant  # forced
        assert row["auto_picked"] in ("pass-kv", "pass-q", "all-gather-q")   # all-gather-Q: the pass-Q family
        assert row["variants"]["auto"]["strategy"] == row["auto_picked"]
        assert row["heuristic"]["forced"] is False
        assert row["faster_measured"] in ("pass-kv", "pass-q")
        # the rollback restores the same cache for every repeat and variant
        held = {tuple(s["kv_tokens_held"]) for v in row["variants"].values() for s in v["samples"]}
        assert len(held) == 1 and sum(next(iter(held))) == row["cached_tokens"]
    crossover = report["crossover"]
    assert {"verdict", "resolved_points", "resolved_switches", "measured_switches", "auto_switches",
            "auto_agrees_with_measurement", "auto_worst_cost"} <= set(crossover)
    assert set(crossover["resolved_points"]) <= set(rates)
    assert crossover["auto_worst_cost"]["picked_variant_over_best_variant"] >= 1.0
    assert "crossover" in miss_rate.table(report)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_overlap_quick_runs_ring_overlap_benchmark(tmp_path):
    from cp_megatron.bench import overlap

    opts = BenchOptions(tmp_path, quick=True)
    overlap.run(opts)
    report = _load(opts, "ring_overlap")
    assert report["suite"] == "overlap"
    got = {(r["cp_size"], r["strategy"]) for r in report["results"]}
    assert got == {(1, "local"), (2, "pass-kv"), (2, "pass-q")}
    for r in report["results"]:
        assert r["ring_s"] > 0 and r["compute_s"] > 0
        for rank in r["per_rank"]:
            assert rank["exposed_comm_s"] == pytest.approx(rank["ring_s"] - rank["compute_s"])
    assert "pass-kv" in overlap.table(report)


@pytest.mark.integration
@pytest.mark.timeout(400)
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers (test extra) missing")
def test_peers_quick_compares_with_transformers(tmp_path):
    from cp_megatron.bench import peers

    repo = Path(__file__).resolve().parents[1]
    opts = BenchOptions(tmp_path, quick=True, config=str(repo / "configs/default.yaml"))
    peers.run(opts)
    report = _load(opts, "peers")
    r = report["results"]
    assert r["prompt_tokens"] == len(report["config"]["token_ids"]) == 128
    for side in ("ours", "transformers"):
        _positive_summary(r[side]["ttft_s"], report["config"]["repeats"])
        assert r[side]["threads"] == 1
    assert r["ratio_ours_over_transformers"] == pytest.approx(
        r["ours"]["ttft_s"]["median"] / r["transformers"]["ttft_s"]["median"])
    # same weights, same tokens: the same next token (float32 rounding apart)
    assert r["same_next_token"] and r["logits_max_abs_diff"] < 1e-2


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_hardware_quick_measures_a_profile_the_planner_loads(tmp_path):
    import statistics

    from cp_megatron import planner
    from cp_megatron.bench import hardware
    from cp_megatron.hardware import load_profile

    opts = BenchOptions(tmp_path, quick=True)
    hardware.run(opts)
    report = _load(opts, "hardware")
    cfg, results, samples = report["config"], report["results"], report["samples"]
    assert len(samples) == cfg["ranks"] == 2
    # Every figure is the median over repeats of the slowest rank, recomputed from the raw samples.
    largest = str(max(cfg["attention_tokens"]))
    per_repeat = [max(times) for times in zip(*(rank["attention"][largest] for rank in samples))]
    row = results["attention"][largest]
    assert row["seconds"] == statistics.median(per_repeat) > 0
    assert row["flops"] == 4 * cfg["num_heads"] * cfg["head_dim"] * int(largest) ** 2 / 2
    m, k, n = cfg["linear_mkn"]
    assert results["linear"]["flops_per_s"] == pytest.approx(2 * m * k * n / results["linear"]["seconds"])
    # The profile is those measurements, and it loads where a profile name is accepted.
    profile = load_profile(str(opts.path("hardware", "json")))
    assert profile.attn_flops_per_s == pytest.approx(row["flops"] / row["seconds"])
    assert profile.cp_bandwidth_bytes_per_s == pytest.approx(
        cfg["message_mib"] * 2**20 / results["ring_step"]["seconds"])
    assert profile.memory_bandwidth_bytes_per_s == pytest.approx(
        2 * cfg["copy_mib"] * 2**20 / results["copy"]["seconds"])
    assert 0 < profile.cp_latency_s < results["ring_step"]["seconds"] * 100
    assert profile.a2a_latency_s == results["all_to_all"]["latency_s"] > 0
    # Decode fixed costs: the step's growth per block at CP1, and CP2's above it less the
    # two latencies the planner costs separately, recomputed from the raw step times.
    over = results["decode_overhead"]
    small, big = (str(n) for n in cfg["overhead_layers"])
    assert len(report["decode_samples"]["cp1"]) == 1 and len(report["decode_samples"]["cp2"]) == 2
    blocks = cfg["overhead_layers"][1] - cfg["overhead_layers"][0]
    per_block = {}
    for cp, ranks in report["decode_samples"].items():   # median CPU time of the busiest rank
        busy = {n: [max(t) for t in zip(*(rank["cpu_s"][n] for rank in ranks))] for n in (small, big)}
        assert len(busy[small]) == len(busy[big]) == max(cfg["overhead_steps"], cfg["repeats"])
        assert all(len(rank["wall_s"][n]) == len(busy[n]) for rank in ranks for n in (small, big))
        per_block[cp] = (statistics.median(busy[big]) - statistics.median(busy[small])) / blocks
    assert profile.layer_overhead_s == pytest.approx(max(per_block["cp1"], 0.0))
    assert profile.ring_step_overhead_s == pytest.approx(max(per_block["cp2"] - per_block["cp1"], 0.0))
    assert over["layer_overhead_s"] == profile.layer_overhead_s
    n, k = cfg["gemv_nk"]
    assert results["gemv"]["bytes_per_s"] == pytest.approx(4 * n * k / results["gemv"]["seconds"])
    assert profile.memory_efficiency == pytest.approx(
        min(1.0, results["gemv"]["bytes_per_s"] / results["copy"]["bytes_per_s"]))
    p = planner.plan("tiny-long", str(opts.path("hardware", "json")), tp=1, cp=2, context_tokens=4096,
                     dtype="fp32")
    assert p.hardware == profile.name and p.ttft_s > 0
    assert p.decode["fixed_s"] == pytest.approx(
        4 * (profile.layer_overhead_s + profile.ring_step_overhead_s))   # tiny-long: 4 blocks
    assert "GFLOP/s" in hardware.table(report) and "all_to_all" in hardware.table(report)


@pytest.mark.unit
def test_ttit_comparison_from_run_results():
    # Two runs per CP size as cp_megatron.run reports them: the prefill round, then decode steps.
    from cp_megatron.bench import ttit
    from cp_megatron.model.config import get_preset

    def turn(ttft, steps):
        return {"fed_tokens": 100, "token_ids": [1] * (len(steps) + 1),
                "rounds": [{"time_s": ttft}] + [{"time_s": s} for s in steps]}

    runs = {1: [turn(2.0, [0.1, 0.3]), turn(4.0, [0.2, 0.2])], 2: [turn(1.0, [0.5]), turn(1.0, [0.7])]}
    m = ttit.measured(runs[1])
    assert m["ttit_s"] == [0.1, 0.3, 0.2, 0.2] and m["ttft_s"] == [2.0, 4.0]
    assert (m["prompt_tokens"], m["new_tokens"]) == (100, 3)
    tiny = get_preset("tiny")
    preds = {cp: ttit.predicted(tiny, "cpu-gloo", 1, cp, 100, 3, "float32") for cp in (1, 2)}
    from cp_megatron import planner
    expect = planner.plan(tiny, "cpu-gloo", tp=1, cp=2, context_tokens=101, dtype="fp32")
    assert preds[2]["ttit_s"] == expect.ttit_s and preds[2]["context_tokens"] == 101
    rows = ttit.compare([1, 2], runs, preds)
    assert rows[0]["measured"]["ttit_s"] == 0.2 and rows[1]["measured"]["ttit_s"] == 0.6
    assert rows[1]["ttit_ratio"] == pytest.approx(preds[2]["ttit_s"] / 0.6)
    assert rows[0]["ttft_ratio"] == pytest.approx(preds[1]["ttft_s"] / 3.0)
    report = {"profile": "cpu-gloo", "config": {"run_config": "x.yaml"}, "results": rows}
    assert "TTIT measured" in ttit.table(report)
