"""The dry run (cp_megatron.dryrun, `cp-megatron dryrun`): the real engine on fake tensors.

Oracles: figures derived here from the model's dimensions and the paper's algorithms
(ring steps, message and all-reduce bytes, attention calls of rank 0's load-balanced chunks,
KV bytes), the planner's memory report, and deliberately broken traces / layers.
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cp_megatron.config import load_config
from cp_megatron.dryrun import PatternError, check_pattern, keep_collectives, parse_rounds, trace_rank

REPO = Path(__file__).resolve().parents[1]
CONFIG_1M = str(REPO / "configs" / "llama3.1-405b-h100-1m.yaml")
MEMORY_RTOL = 0.05    # #21: the planner within 5% of the dry run, per category


def _spec(config=CONFIG_1M, overrides=(), layers=2, rounds="prefill,partial:2000,decode:2", prompt=None):
    from cp_megatron.cli.dryrun import build_spec

    return build_spec(load_config(config, list(overrides)), layers, rounds, prompt, "9.0")


def _tiny_spec(cp: int, tokens: int, rounds: str):
    """A tiny dummy model on fake CUDA, bf16, TP 1 x CP ``cp``."""
    from cp_megatron.cli.dryrun import build_spec

    text = (f"model: {{format: dummy, preset: tiny, dtype: bfloat16}}\nparallel: {{tp: 1, cp: {cp}}}\n"
            f"runtime: {{device: cuda}}\nprompt: {{random_tokens: {tokens}}}\ngeneration: {{max_new_tokens: 4}}\n")
    return build_spec(load_config(None, [], text=text), 1, rounds, None, "9.0")


@pytest.fixture(scope="module")
def report_1m():
    """Rank 0 of the 405B / 1M config (TP8 x CP16, FP8 row-wise), two layers, the issue's rounds."""
    from cp_megatron.cli.dryrun import attach_planner

    spec = _spec()
    rep = trace_rank(spec, 0)
    attach_planner(spec, rep)
    return spec, rep


# -- the device module and the fake backend ---------------------------------------------------------
@pytest.mark.unit
def test_torch_cuda_is_called_only_by_the_device_module():
    hits = []
    for path in (REPO / "cp_megatron").rglob("*.py"):
        if path.name == "device.py" and path.parent.name == "cp_megatron":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.cuda." in line:
                hits.append(f"{path.relative_to(REPO)}:{no}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.unit
def test_cuda_graphs_are_refused_without_cuda_in_one_line():
    """runtime.cuda_graphs: a one-line config error on cpu and with the megatron-core stage; the
    fake device (the dry run) refuses to make a graph."""
    from cp_megatron import device as devices
    from cp_megatron.config import ConfigError

    base = "model: {format: dummy, preset: tiny}\n"
    for text, where in ((base + "runtime: {cuda_graphs: true}\n", "device: cuda"),
                        (base.replace("tiny}", "tiny, implementation: megatron-core}")
                         + "runtime: {device: cuda, cuda_graphs: true}\n", "implementation: native")):
        with pytest.raises(ConfigError, match=f"cuda_graphs.*{where}") as err:
            load_config(None, [], text=text)
        assert "\n" not in str(err.value)
    assert load_config(None, [], text=base + "runtime: {device: cuda, cuda_graphs: true}\n").runtime.cuda_graphs
    assert load_config(None, [], text=base).runtime.cuda_graphs is False
    with devices.use_fake_cuda(), pytest.raises(RuntimeError, match="real GPU"):
        devices.cuda_graph()


@pytest.mark.unit
def test_fake_backend_needs_rank_and_world_size():
    from cp_megatron import parallel_state

    with pytest.raises(ValueError, match="backend 'fake' needs"):
        parallel_state.init_distributed("fake")
    with pytest.raises(ValueError, match="expected gloo, nccl or fake"):
        parallel_state.init_distributed("mpi")


@pytest.mark.unit
def test_parse_rounds_refuses_bad_input():
    assert parse_rounds("prefill,partial:2000,decode:2") == [("prefill", 0), ("partial", 2000), ("decode", 2)]
    for bad, msg in (("decode:2", "first round must be prefill"), ("prefill,partial", "partial:N"),
                     ("prefill,warmup:3", "unknown round")):
        with pytest.raises(ValueError, match=msg):
            parse_rounds(bad)


# -- 405B / 1M at two layers: memory, counts, syncs, kernels ----------------------------------------------
@pytest.mark.integration
def test_1m_weights_and_kv_match_the_planner_and_the_dimensions(report_1m):
    spec, rep = report_1m
    cfg = spec.model_config
    prefill = rep["rounds"][0]
    got, plan = prefill["memory_full_depth"]["peak_by_category"], prefill["planner"]
    for cat in ("weights", "kv_cache"):
        assert got[cat] == pytest.approx(plan[cat], rel=MEMORY_RTOL), cat
    # the reservation: ceil(1M/16) + 1 + ceil(G/16) + 1 + ceil(margin/16) + 1 slots, as `run` makes it
    from cp_megatron.factory import kv_reservation

    slots_run = kv_reservation(spec.prompt_tokens, spec.max_new_tokens, 16, spec.kv_margin_tokens,
                               spec.kv_growth_tokens)["kv_capacity"]
    # KV: ceil(1M / 16) + generation slots per rank, NKV/tp = 1 head, DH 128, bf16, K and V, 126 layers
    slots = prefill["kv_cache"]["capacity_bytes_traced"] // (2 * 2 * 128 * 2)
    assert slots == slots_run >= math.ceil(1_000_000 / 16) + math.ceil(spec.kv_margin_tokens / 16)
    assert prefill["kv_cache"]["used_bytes_full_depth"] == 2 * 126 * 1 * 128 * 2 * 62_500


@pytest.mark.integration
def test_1m_every_category_matches_the_planner_and_the_peak_is_below_it(report_1m):
    """#21: the planner within 5% of the dry run in every category of the prefill (each
    category's maximum over the round, full depth), and rank 0's peak at or below the
    planner's total (weights + KV capacity + activations + ring buffers)."""
    _, rep = report_1m
    prefill = rep["rounds"][0]
    got, plan = prefill["memory_full_depth"]["max_by_category"], prefill["planner"]
    for cat in ("weights", "kv_cache", "activations", "comm_buffers"):
        assert got[cat] == pytest.approx(plan[cat], rel=MEMORY_RTOL), (cat, got, plan)
    assert prefill["memory_full_depth"]["peak_bytes"] <= plan["total"]


@pytest.mark.integration
def test_1m_partial_prefill_adds_at_most_5_percent_kv_capacity(report_1m):
    """The engine reserves runtime.kv_cache_margin_tokens up front, as `run` does
    (factory.kv_reservation): a 2,000-token turn after the 1M prompt fits without regrowing."""
    _, rep = report_1m
    before = rep["rounds"][0]["kv_cache"]["capacity_bytes_full_depth"]
    after = rep["rounds"][1]["kv_cache"]["capacity_bytes_full_depth"]
    assert after <= before * 1.05
    assert rep["rounds"][1]["kv_cache"]["allocations"] == 1
    assert rep["rounds"][1]["memory_full_depth"]["max_by_category"]["kv_cache"] <= before * 1.05


@pytest.mark.integration
def test_1m_collectives_per_layer_match_the_ring_algorithms(report_1m):
    """pass-KV prefill (Alg. 2): N-1 steps of K and V to the next CP rank, each c x NKV/tp x DH
    bf16; two TP all-reduces of t x H bf16.  pass-Q (Alg. 3) for the partial prefill: N-1 Q
    messages and one all_to_all of N x q x NH/tp x (DH + 1) float32 (O with its LSE); decode
    by all-gather-Q: one all_gather of the queries and the same all_to_all."""
    spec, rep = report_1m
    n, h, dh, nh = 16, spec.model_config.hidden_size, 128, 128 // 8
    t = 1_000_000 // n
    cp_group = list(range(0, 128, 8))
    tp_group = list(range(8))
    by_round = {r["round"]: r for r in rep["rounds"]}

    def layer0(r):
        return by_round[r]["collectives_by_layer"]["0"]

    pre = layer0("prefill")
    sends = [c for c in pre if c["kind"] == "send"]
    assert len(sends) == 2 * (n - 1) and all(c["bytes"] == t * 1 * dh * 2 for c in sends)
    assert all(c["group"] == cp_group and c["peer"] == 8 for c in sends)     # rank 0 -> CP rank 1
    assert all(c["peer"] == 120 for c in pre if c["kind"] == "recv_")          # from CP rank 15
    reduces = [c for c in pre if c["kind"] == "allreduce_"]
    assert len(reduces) == 2 and all(c["bytes"] == t * h * 2 and c["group"] == tp_group for c in reduces)
    for name, q_len in (("partial:2000", math.ceil(2000 / n)), ("decode#1", 1), ("decode#2", 1)):
        cs = layer0(name)
        q_sends = [c for c in cs if c["kind"] == "send"]
        gathers = [c for c in cs if c["kind"] == "_allgather_base_"]
        if name.startswith("decode"):
            # all-gather-Q (docs/performance.md §7): no ring, one all_gather of every rank's
            # [q_len, NH/tp, DH] bf16 queries (the trace counts its input and its output)
            assert not q_sends and len(gathers) == 1, name
            assert gathers[0]["group"] == cp_group and gathers[0]["bytes"] == (n + 1) * q_len * nh * dh * 2, name
        else:
            assert len(q_sends) == n - 1 and all(c["bytes"] == q_len * nh * dh * 2 for c in q_sends), name
            assert not gathers, name
        (a2a,) = [c for c in cs if c["kind"] == "alltoall_base_"]
        assert a2a["bytes"] == n * q_len * nh * (dh + 1) * 4, name
    # the same count in every layer of a round
    for r in rep["rounds"]:
        assert len(set(r["launches_per_layer"].values())) == 1, r["round"]
        assert len({len(v) for k, v in r["collectives_by_layer"].items() if k != "outside"}) == 1, r["round"]


@pytest.mark.integration
def test_1m_launches_per_layer_within_the_issue_22_budgets(report_1m):
    """#22: at most 30 launches per decode layer on every rank (rank 0 owns decode#1's token and
    not decode#2's, so both kinds of rank are traced here) and at most 200 per prefill layer."""
    _, rep = report_1m
    budgets = {"prefill": 200, "decode#1": 30, "decode#2": 30}
    for r in rep["rounds"]:
        if r["round"] in budgets:
            assert max(r["launches_per_layer"].values()) <= budgets[r["round"]], (r["round"], r["launches_per_layer"])
    assert set(budgets) <= {r["round"] for r in rep["rounds"]}


@pytest.mark.integration
def test_1m_attention_calls_and_kernel_constraints(report_1m):
    """Rank 0 holds chunks 0 and 31 of 32 (§3.3).  Step 0: chunk 0 causal on itself, chunk 31
    causal on itself and plain on chunk 0; steps 1..15: chunk 31 sees both chunks of the
    rank in hand (one plain call), chunk 0 sees nothing.  18 flash calls per layer, 16 query
    heads on 1 KV head, bf16, DH 128."""
    _, rep = report_1m
    prefill = rep["rounds"][0]
    calls = sum(a["calls"] for a in prefill["attention_kernels"])
    assert calls == 18 * rep["layers_traced"]
    assert sum(a["calls"] for a in prefill["attention_kernels"] if a["is_causal"]) == 2 * rep["layers_traced"]
    for r in rep["rounds"]:
        for a in r["attention_kernels"]:
            if r["round"].startswith("decode"):
                # the static decode step (#22): one varlen call for the 16 gathered rows against the
                # capacity-long view [T, H, D], per-row lengths on the device
                assert a["kernel"] == "aten._flash_attention_forward" and a["calls"] == rep["layers_traced"]
                assert a["q"]["shape"] == [16, 16, 128] and a["k"]["shape"][1:] == [1, 128]
                assert a["k"]["shape"][0] == r["kv_cache"]["capacity_bytes_traced"] // (2 * 2 * 128 * 2)
            else:
                assert a["kernel"] == "aten._scaled_dot_product_flash_attention"
                assert a["q"]["shape"][1] == 16 and a["k"]["shape"][1] == 1
            assert a["q"]["dtype"] == "bfloat16"
            assert a["constraints"]["ok"], a
        for mm in r["scaled_mm"]:
            assert mm["constraints"]["ok"], mm


@pytest.mark.integration
def test_1m_one_host_sync_per_round_and_none_in_layers(report_1m):
    _, rep = report_1m
    for r in rep["rounds"]:
        assert r["host_syncs_inside_layers"] == [], r["round"]
        assert len(r["host_syncs"]) == 1, (r["round"], r["host_syncs"])   # the sampled tokens' copy
        assert r["host_syncs"][0]["where"].startswith("engine.py:")
    replay = rep["decode_graph_replayable"]
    assert replay["replayable"] is True, replay        # #22: the static decode step
    assert "same" in replay["reason"] and "static decode step" in replay["reason"]
    d1, d2 = (r for r in rep["rounds"] if r["round"].startswith("decode"))
    assert d1["launches_per_layer"] == d2["launches_per_layer"]
    assert d1["static_step"] == d2["static_step"] and d1["static_step"]["rows_per_rank"] == 1


# -- #22: a decode step a CUDA graph can replay ---------------------------------------------------------------
@pytest.mark.unit
def test_two_consecutive_decode_steps_trace_identically_at_fake_cp4():
    """Rank 0 of CP 4 owns the new token at decode#1 and not at decode#2 (round robin), yet both
    steps run the same ops with the same shapes (the static step: one row per rank, KV writes
    through slots, a bucketed KV view); forced ring pass-Q (Alg. 4, not static) does not, and the
    check says where they part."""
    rep = trace_rank(_tiny_spec(4, 50, "prefill,decode:2"), 0)
    replay = rep["decode_graph_replayable"]
    assert replay["replayable"] is True, replay
    d1, d2 = rep["rounds"][1:]
    assert d1["metrics"]["strategy"] == d2["metrics"]["strategy"] == "all-gather-q"
    assert d1["static_step"] == d2["static_step"] and d1["static_step"]["num_rows"] == 4
    assert d1["launches_per_layer"] == d2["launches_per_layer"]
    ring = trace_rank(replace(_tiny_spec(4, 50, "prefill,decode:2"), strategy="pass-q"), 0)
    assert ring["decode_graph_replayable"]["replayable"] is False
    assert "differ at op" in ring["decode_graph_replayable"]["reason"]


# -- host syncs inside a layer are caught ----------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("sync", ["item", "tolist", "cpu"])
def test_a_host_sync_inside_a_layer_is_reported(sync):
    spec = replace(_tiny_spec(2, 40, "prefill,decode:1"), layers=2)

    def add_sync(engine):
        def hook(_module, _inputs, out):
            getattr(out.sum(), sync)()   # .item(), .tolist() or .cpu() of a fake CUDA tensor
        engine.stage.layers["1"].mlp.register_forward_hook(hook)

    rep = trace_rank(spec, 0, on_engine=add_sync)
    for r in rep["rounds"]:
        inside = r["host_syncs_inside_layers"]
        assert inside and all(s["layer"] == 1 for s in inside), (sync, r["round"], r["host_syncs"])
        assert all(re.match(r"model/llama\.py:\d+$", s["where"]) for s in inside)


# -- the all-ranks pattern check ----------------------------------------------------------------------------
def _tiny_all_ranks():
    spec = _tiny_spec(4, 50, "prefill,decode:1")
    return {r: keep_collectives(trace_rank(spec, r)) for r in range(4)}


@pytest.mark.integration
def test_pattern_check_fails_on_a_mismatched_send_naming_both_ranks():
    reports = _tiny_all_ranks()
    assert check_pattern(reports)["sends_matched"] > 0
    broken = copy.deepcopy(reports)
    send = next(c for c in broken[2]["rounds"][0]["_collectives"] if c["kind"] == "send")
    send["bytes"] += 2
    with pytest.raises(PatternError, match=rf"rank 2 sends .* to rank {send['peer']}.*rank {send['peer']} receives"):
        check_pattern(broken)
    unequal = copy.deepcopy(reports)
    reduce = next(c for c in unequal[1]["rounds"][0]["_collectives"] if c["kind"] == "allreduce_")
    unequal[1]["rounds"][0]["_collectives"].remove(reduce)
    with pytest.raises(PatternError, match=r"rank 0 (calls|issues) allreduce_.*rank 1 (never does|issues)"):
        check_pattern(unequal)


@pytest.mark.integration
def test_all_ranks_pattern_check_passes_at_128_ranks(tmp_path):
    """Every rank of the 405B / 1M grid (TP8 x CP16), one layer, prefill and one decode round;
    a short prompt keeps the host planning fast (the pattern does not depend on the length).
    5 min 45 s wall (2 min 52 s CPU) with 2 worker processes on the loaded 2-core box."""
    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, "-m", "cp_megatron.cli", "dryrun", CONFIG_1M, "--all-ranks",
                           "--layers", "1", "--prompt-tokens", "4096", "--rounds", "prefill,decode:1",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    data = json.loads(out.read_text())
    assert data["pattern_check"]["ok"] and data["pattern_check"]["ranks"] == 128
    # pass-KV prefill: 2 x 15 K/V messages per rank per layer; the decode round is all-gather-Q
    # (choose_query_exchange for h100-rdma: one all_gather and one all_to_all, no P2P)
    assert data["pattern_check"]["sends_matched"] == 128 * 2 * 15
    assert data["host_syncs_inside_layers"] == []
