"""The analytic planner: FLOP and byte formulas, the heuristic it reports, the paper's
headline figures, and the ``cp-megatron plan`` command line.  Pure, runs in milliseconds
(except one subprocess that checks imports and one matplotlib plot)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cp_megatron import cli, planner
from cp_megatron.attention.heuristic import PASS_KV, PASS_Q, choose_strategy
from cp_megatron.hardware import HardwareProfile, get_profile
from cp_megatron.model.config import get_preset

# Formulas are sums of exact integers below 2**53: compare floats exactly, except
# where a division makes the last bit differ (then 1e-12 relative).
REL_EXACT = 1e-12
# Paper headline figures (arXiv 2411.01783, abstract and §4) and the acceptance bands.
PAPER_1M_TTFT_S, BAND_1M = 77.0, 0.15
PAPER_128K_TTFT_S = 3.8  # open gap, see docs/planner.md
ARGS_405B = ["plan", "--model", "llama3.1-405b", "--hardware", "h100-rdma", "--tp", "8"]


def run_cli(argv: list[str]) -> int:
    """Exit code of ``cp-megatron ...`` whether it returns or raises SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


# --------------------------------------------------------------------------- formulas

@pytest.mark.unit
def test_attention_flops_hand_counted_tiny():
    # tiny: NH=4, DH=16 -> D=64.  Full prefill T=8: 4*64*(8*8/2) = 8192.
    tiny = get_preset("tiny")
    assert planner.attention_flops(tiny.num_heads, tiny.head_dim, 8, 0) == 8192.0
    # Partial prefill T=4 on P=6: 4*64*(4*6 + 16/2) = 8192; decode T=1 on P=9: 4*64*9.5.
    assert planner.attention_flops(4, 16, 4, 6) == 8192.0
    assert planner.attention_flops(4, 16, 1, 9) == 4 * 64 * 9.5


@pytest.mark.unit
def test_attention_flops_counts_visible_pairs_minus_half_diagonal():
    # Oracle: count the (query, key) pairs the causal rule keeps, 2 matmuls x 2 FLOPs x D each.
    # The paper's convention (T^2/2) drops half of the diagonal, T/2 pairs.
    d, t, p = 64, 7, 5
    pairs = sum(p + i + 1 for i in range(t))
    assert planner.attention_flops(4, 16, t, p) == 4 * d * (pairs - t / 2)


@pytest.mark.unit
def test_linear_flops_and_block_params_hand_counted_tiny():
    tiny = get_preset("tiny")  # hidden 64, FFN 128, NH 4, NKV 2, DH 16
    w = 64 * 64 + 2 * 64 * 2 * 16 + 64 * 64 + 3 * 64 * 128  # q, k+v, o, gate/up/down
    assert w == 36864
    assert planner.block_matmul_params(tiny) == w
    assert planner.linear_flops(tiny, 10) == 2 * w * 10
    # The blocks' matmuls plus norms, embedding, final norm and LM head are the whole model.
    h, layers = tiny.hidden_size, tiny.num_layers
    assert layers * (w + 2 * h) + h + 2 * tiny.vocab_size * h == tiny.num_parameters()


@pytest.mark.unit
def test_elementwise_bytes_hand_counted_tiny():
    # tiny on TP2: H 64, FFN 128/2 = 64, q 2*16 = 32, k 1*16 = 16; bf16 (e = 2), CP 3 ring.
    # Per token: norms 4*64*2 = 512, residual adds 6*64*2 = 768, RoPE 2*48*2 = 192,
    # SwiGLU 3*64*2 = 384, merges (3-1)*32*(8+2) = 640; FP8 quantisation (64+64)*(2+1) = 384.
    tiny = get_preset("tiny")
    assert planner.elementwise_bytes(tiny, 2, 10, 2, 3, 0.0) == 10 * (512 + 768 + 192 + 384 + 640)
    assert planner.elementwise_bytes(tiny, 2, 10, 2, 3, 1.0) == 10 * (2496 + 384)
    assert planner.elementwise_bytes(tiny, 2, 10, 2, 1, 0.0) == 10 * (2496 - 640)  # CP1: no merge


@pytest.mark.unit
def test_round_total_is_the_sum_of_its_parts():
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=128_000)
    parts = (p.attention_s + p.linear_s + p.elementwise_s + p.cp_comm_exposed_s + p.tp_comm_s
             + p.fixed_s + p.lm_head_s)
    assert p.ttft_s == pytest.approx(parts, rel=REL_EXACT)
    assert p.elementwise_s > 0
    d = p.decode
    assert p.ttit_s == pytest.approx(sum(d[k] for k in ("attention_s", "linear_s", "elementwise_s",
                                                        "cp_comm_exposed_s", "tp_comm_s", "fixed_s",
                                                        "lm_head_s")), rel=REL_EXACT)
    assert 0 < d["all_to_all_s"] < d["cp_comm_exposed_s"]


# A profile with round numbers so that every decode term can be counted by hand.
HAND = HardwareProfile(
    name="hand", peak_flops_per_s=1e15, attn_flops_per_s=1e15, linear_flops_per_s=1e15,
    cp_bandwidth_bytes_per_s=1e9, tp_bandwidth_bytes_per_s=2e9, memory_bandwidth_bytes_per_s=1e9,
    memory_bytes=1e12, gpus_per_node=2, cp_latency_s=10e-6, tp_latency_s=20e-6, a2a_latency_s=30e-6,
    net_hop_latency_s=40e-6, memory_efficiency=0.5, layer_overhead_s=10e-6, ring_step_overhead_s=3e-6)
US = 1e-6


@pytest.mark.unit
def test_decode_batch_padded_to_a_multiple_of_cp():
    # Alg. 4: the decode batch is padded to a multiple of N (paper §4.3 names it as a cost).
    assert [planner.decode_batch_padded(b, 2) for b in (1, 2, 3, 4)] == [2, 2, 4, 4]
    assert planner.decode_batch_padded(5, 4) == 8 and planner.decode_batch_padded(3, 1) == 3


@pytest.mark.unit
def test_allreduce_latency_intra_node_and_tree_across_nodes():
    assert planner.allreduce_latency(HAND, 1) == 0.0
    assert planner.allreduce_latency(HAND, 2) == 20e-6                    # one node of 2
    assert planner.allreduce_latency(HAND, 4) == 20e-6 + 2 * 1 * 40e-6    # 2 nodes: 1 tree level
    assert planner.allreduce_latency(HAND, 8) == 20e-6 + 2 * 2 * 40e-6    # 4 nodes: 2 levels
    assert planner.allreduce_latency(HAND, 6) == 20e-6 + 2 * 2 * 40e-6    # 3 nodes round up to 2 levels
    gloo = get_profile("cpu-gloo")                                        # one rank per node
    assert planner.allreduce_latency(gloo, 2) == gloo.tp_latency_s
    assert planner.allreduce_latency(gloo, 4) == 2 * gloo.tp_latency_s
    # h100-rdma: NCCL's model, 6.8 + 2*7*0.6 = 15.2 us in a node, + 2 * 5 us per tree level.
    h100 = get_profile("h100-rdma")
    assert planner.allreduce_latency(h100, 8) == pytest.approx(15.2e-6, rel=REL_EXACT)
    assert planner.allreduce_latency(h100, 16) == pytest.approx(25.2e-6, rel=REL_EXACT)
    assert planner.allreduce_latency(h100, 32) == pytest.approx(35.2e-6, rel=REL_EXACT)


@pytest.mark.unit
def test_decode_terms_hand_counted_tiny_cp2():
    # tiny (2 layers, H 64, NH 4, NKV 2, DH 16, W 36864), fp32, TP1 x CP2, batch 3, P = 8.
    tiny = get_preset("tiny")
    r = planner.round_cost(tiny, HAND, tp=1, cp=2, new_tokens=1, cached_tokens=8, batch=3,
                           dtype="fp32", strategy=PASS_Q)
    assert r.tokens_per_rank == 2                                   # 3 padded to 4, over 2 ranks
    # Weights read: (W + 2 norms) * 4 bytes per block at 0.5 * 1 GB/s, 2 blocks.
    assert r.linear_s == pytest.approx(2 * (36864 + 128) * 4 / 0.5e9, rel=REL_EXACT)
    # KV read per step: (3 * 9 / 2 tokens) * 2 (K, V) * 2 heads * 16 * 4 B / 2 (own sequences' share).
    step = 13.5 * 2 * 2 * 16 * 4 / 2 / 0.5e9
    assert r.attention_s == pytest.approx(2 * 2 * step, rel=REL_EXACT)
    # Ring message: 2 query rows of 4 heads * 16 * 4 B plus a 4-byte batch id each.
    assert r.cp_message_bytes == 2 * (4 * 16 * 4 + 4) == 520
    a2a = 1 * 2 * 4 * (16 * 4 + 4) / 1e9 + 30e-6                     # O and float32 LSE, + latency
    ring = max(step, 520 / 1e9 + 10e-6) + step
    assert r.all_to_all_s == pytest.approx(2 * a2a, rel=REL_EXACT)
    assert r.cp_comm_exposed_s == pytest.approx(2 * (ring - 2 * step + a2a), rel=REL_EXACT)
    assert r.fixed_s == pytest.approx(2 * (10e-6 + 1 * 3e-6), rel=REL_EXACT)
    assert r.tp_comm_s == 0.0


@pytest.mark.unit
def test_tp_decode_collectives_hand_counted_across_nodes():
    # TP4 on 2 GPUs per node: 2 nodes, one tree level; payload 1 token * H 64 * 4 B.
    tiny = get_preset("tiny")
    r = planner.round_cost(tiny, HAND, tp=4, cp=1, new_tokens=1, cached_tokens=8, batch=1,
                           dtype="fp32", strategy=PASS_Q)
    per_allreduce = 2 * 3 / 4 * 256 / 2e9 + (20e-6 + 2 * 40e-6)     # bus BW min(2e9, 2 * 1e9)
    assert r.tp_comm_s == pytest.approx(2 * 2 * per_allreduce, rel=REL_EXACT)
    assert r.fixed_s == pytest.approx(2 * 10e-6, rel=REL_EXACT)     # CP1: no ring steps
    assert r.cp_comm_exposed_s == 0.0 and r.all_to_all_s == 0.0


@pytest.mark.unit
def test_405b_attention_flops_per_layer_at_1m():
    cfg = get_preset("llama3.1-405b")
    assert planner.attention_flops(cfg.num_heads, cfg.head_dim, 10**6, 0) == 4 * 16384 * 10**12 / 2


@pytest.mark.unit
def test_kv_cache_bytes_formula():
    cfg = get_preset("llama3.1-405b")
    # 2 * 126 layers * (8/8) KV heads * 128 * 2 bytes * 1M/16 tokens * batch 1
    assert planner.kv_cache_bytes_per_gpu(cfg, 8, 16, 10**6, 1, 2) == 2 * 126 * 1 * 128 * 2 * 62500
    tiny = get_preset("tiny")  # 2 layers, NKV 2, DH 16; TP 2 -> 1 KV head; ceil(10/3) = 4 tokens
    assert planner.kv_cache_bytes_per_gpu(tiny, 2, 3, 10, 2, 4) == 2 * 2 * 1 * 16 * 4 * 4 * 2
    # TP beyond NKV replicates KV heads: one per GPU.
    assert planner.kv_heads_per_rank(cfg, 16) == 1


@pytest.mark.unit
def test_fp8_weights_are_why_405b_fits_one_node():
    # Paper §4: 405B served with FP8 weights on 8 x 80 GB.  bf16 weights alone overflow.
    cfg, hbm = get_preset("llama3.1-405b"), get_profile("h100-rdma").memory_bytes
    assert planner.weight_bytes(cfg, "bf16") == 2 * cfg.num_parameters()
    assert planner.weight_bytes(cfg, "bf16") / 8 > hbm
    assert planner.weight_bytes(cfg, "fp8") / 8 < hbm
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=10**6)
    assert p.dtype == "fp8" and p.fits_in_memory


@pytest.mark.unit
def test_ring_and_allreduce_times():
    assert planner.ring_time(1, 2.0, 9.0) == 2.0           # one rank: no message
    assert planner.ring_time(4, 2.0, 1.0) == 8.0           # messages hidden
    assert planner.ring_time(4, 1.0, 3.0) == 10.0          # 3 exposed messages + last step
    assert planner.allreduce_time(100.0, 1, 10.0, 5.0) == 0.0
    assert planner.allreduce_time(100.0, 8, 10.0, 5.0) == pytest.approx(2 * 7 / 8 * 10 + 5, rel=REL_EXACT)


# --------------------------------------------------------------------------- model behaviour

@pytest.mark.unit
@pytest.mark.parametrize("context", [128_000, 1_000_000])
def test_more_cp_lowers_ttft_for_long_context(context):
    ttft = [planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=c, context_tokens=context).ttft_s
            for c in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(ttft, ttft[1:])), ttft


@pytest.mark.unit
def test_ttft_grows_with_context_and_miss_rate():
    ttft = [planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=4, context_tokens=c).ttft_s
            for c in (8_000, 32_000, 128_000)]
    assert ttft[0] < ttft[1] < ttft[2]
    # Paper §4.2: TTFT of a partial prefill grows with the miss rate at fixed context.
    partial = [planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=4, context_tokens=128_000,
                            cached_tokens=128_000 - t).ttft_s for t in (1_280, 12_800, 64_000)]
    assert partial[0] < partial[1] < partial[2]


@pytest.mark.unit
def test_decode_is_memory_bound():
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=1, context_tokens=128_000)
    hw = get_profile("h100-rdma")
    floor = (p.weight_bytes_per_gpu + p.kv_cache_bytes_per_gpu) / hw.memory_bandwidth_bytes_per_s
    achieved = floor / hw.memory_efficiency
    assert achieved <= p.ttit_s < 1.5 * achieved
    assert p.decode["linear_s"] > 0.5 * p.ttit_s                   # reading the weights dominates


@pytest.mark.unit
def test_decode_does_not_scale_like_prefill():
    # Paper §4.3: CP adds ring and all_to_all latency to every block of a decode step, so
    # TTIT grows with N while TTFT falls; multi-node TP saves weight reads but pays
    # cross-node all-reduce latency.
    ttit = {cp: planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=cp, context_tokens=128_000).ttit_s
            for cp in (1, 2, 4, 8)}
    assert ttit[1] < ttit[2] < ttit[4] < ttit[8], ttit
    tp8 = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=1, context_tokens=128_000)
    for tp in (16, 32):
        multi = planner.plan("llama3.1-405b", "h100-rdma", tp=tp, cp=1, context_tokens=128_000)
        assert multi.decode["tp_comm_s"] > 1.5 * tp8.decode["tp_comm_s"]
        assert multi.decode["linear_s"] < tp8.decode["linear_s"]


@pytest.mark.unit
def test_batched_decode_amortises_the_fixed_terms():
    points = planner.sweep_batch([1, 2, 8, 32], model="llama3.1-405b", hardware="h100-rdma", tp=8, cp=2,
                                 context_tokens=32_768)
    ttit = [p["ttit_s"] for p in points]
    assert ttit == sorted(ttit)
    assert [p["tokens_per_s"] for p in points] == sorted(p["tokens_per_s"] for p in points)
    # Weights and fixed costs are paid once per step whatever the batch.
    assert len({p["decode"]["linear_s"] for p in points}) == 1
    assert len({p["decode"]["fixed_s"] for p in points}) == 1
    assert points[0]["decode"]["tokens_per_rank"] == 1 and points[1]["decode"]["tokens_per_rank"] == 1


# Paper §4.1 (Fig. 1b): CP over N nodes beats TP over the same N nodes by ~15% at 2 nodes
# and ~100% at 8.  Bands are loose: the figure is read from the text, not from data.
TP_GAP_2_NODES_MAX, TP_GAP_8_NODES_MIN = 0.30, 0.60


@pytest.mark.unit
def test_cp_beats_multi_node_tp_by_a_growing_margin():
    gaps = []
    for nodes in (2, 4, 8):
        tp = planner.plan("llama3.1-405b", "h100-rdma", tp=8 * nodes, cp=1, context_tokens=128_000)
        cp = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=nodes, context_tokens=128_000)
        assert tp.gpus == cp.gpus == 8 * nodes
        assert cp.tp_comm_s < tp.tp_comm_s
        gaps.append(tp.ttft_s / cp.ttft_s - 1)
    assert 0 < gaps[0] < gaps[1] < gaps[2], gaps
    assert gaps[0] < TP_GAP_2_NODES_MAX and gaps[2] > TP_GAP_8_NODES_MIN, gaps


@pytest.mark.unit
def test_pass_kv_hidden_on_rdma_but_exposed_on_slow_links():
    long_rdma = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=128_000)
    assert long_rdma.strategy == PASS_KV and long_rdma.cp_comm_exposed_s == 0.0
    short_tcp = planner.plan("llama3.1-405b", "h100-tcp", tp=8, cp=16, context_tokens=8_000)
    assert short_tcp.cp_comm_exposed_s > 0.0


# --------------------------------------------------------------------------- heuristic

def _expected(p: planner.Plan, new: int, cached: int) -> str:
    cfg, hw = get_preset(p.model), get_profile(p.hardware)
    return choose_strategy(new, cached, p.cp, cfg.num_heads, cfg.num_kv_heads, 2,
                           hw.attn_flops_per_s, hw.cp_bandwidth_bytes_per_s).strategy


@pytest.mark.unit
def test_strategy_is_heuristics_choice_full_prefill_gqa():
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=128_000)
    assert p.strategy == _expected(p, 128_000, 0) == PASS_KV  # NH 128 > 2 * NKV 8
    assert p.heuristic["kv_hidden_threshold_tokens"] == p.kv_hidden_threshold_tokens


@pytest.mark.unit
@pytest.mark.parametrize("cached", [127_999, 127_000])  # decode; miss rate 0.8%
def test_strategy_is_heuristics_choice_decode_and_low_miss_rate(cached):
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=128_000, cached_tokens=cached)
    assert p.strategy == _expected(p, 128_000 - cached, cached) == PASS_Q
    assert p.decode_strategy == PASS_Q


# --------------------------------------------------------------------------- paper figures

@pytest.mark.unit
def test_paper_1m_context_16_nodes():
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=1_000_000)
    assert abs(p.ttft_s - PAPER_1M_TTFT_S) / PAPER_1M_TTFT_S < BAND_1M, p.ttft_s


@pytest.mark.unit
def test_predictions_pinned():
    # Regression guard for docs/planner.md's tables (change both together).
    one_m = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=1_000_000)
    k128 = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=128_000)
    assert one_m.ttft_s == pytest.approx(74.26, rel=1e-3)
    assert k128.ttft_s == pytest.approx(2.85, rel=5e-3)
    ttit = {(tp, cp, c): planner.plan("llama3.1-405b", "h100-rdma", tp=tp, cp=cp, context_tokens=c).ttit_s
            for tp, cp, c in ((8, 1, 8192), (8, 1, 128_000), (8, 2, 8192), (8, 2, 128_000),
                              (8, 4, 128_000), (16, 1, 128_000), (32, 1, 128_000))}
    # Decode reads the weights as loaded (fp8-rowwise: 51.3 GB per GPU at TP8), the one weight
    # figure since #21; the Llama 3 recipe's 60.9 GB gave 29.5, 32.2, 32.4, 33.1, 36.3, 24.3, 21.6.
    assert [round(v * 1e3, 1) for v in ttit.values()] == [26.2, 28.9, 29.1, 29.8, 33.0, 22.8, 21.0]


# --------------------------------------------------------------------------- CLI

@pytest.mark.unit
def test_cli_json_keys(capsys):
    assert run_cli(ARGS_405B + ["--cp", "16", "--context", "1000000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("ttft_s", "ttit_s", "strategy", "kv_cache_bytes_per_gpu", "attention_flops",
                "linear_flops", "attention_flops_per_layer", "linear_flops_per_layer",
                "cp_comm_bytes_per_layer", "tp_comm_bytes_per_layer", "heuristic",
                "kv_hidden_threshold_tokens", "miss_rate_threshold", "inputs"):
        assert key in out, key
    assert out["inputs"] == {"model": "llama3.1-405b", "hardware": "h100-rdma", "tp": 8, "cp": 16,
                             "context_tokens": 1_000_000, "cached_tokens": 0, "batch": 1, "dtype": "fp8",
                             "max_new_tokens": 0, "kv_margin_tokens": 8192}
    assert out["strategy"] == PASS_KV


@pytest.mark.unit
def test_cli_table(capsys):
    assert run_cli(ARGS_405B + ["--cp", "16", "--context", "128000"]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "pass-kv" in out and "TTIT" in out
    for row in ("weights read", "TP all-reduce", "CP ring + all_to_all", "fixed", "decode step"):
        assert row in out, row


@pytest.mark.unit
def test_cli_batch_sweep(capsys):
    argv = ARGS_405B + ["--cp", "2", "--context", "32768", "--sweep", "batch=1,4,16"]
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and len(out.strip().splitlines()) == 2 + 3
    assert run_cli(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sweep"] == "batch" and [p["batch"] for p in data["points"]] == [1, 4, 16]
    assert all(p["decode"]["fixed_s"] > 0 for p in data["points"])


@pytest.mark.unit
def test_cli_sweep_json_and_plot(capsys, tmp_path):
    png = tmp_path / "sweep.png"
    argv = ARGS_405B + ["--context", "1000000", "--sweep", "cp=1,2,4,8,16", "--plot", str(png), "--json"]
    assert run_cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["cp"] for p in out["points"]] == [1, 2, 4, 8, 16]
    assert out["points"][0]["speedup"] == 1.0
    assert all(0.0 < p["efficiency"] <= 1.0 + REL_EXACT for p in out["points"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.unit
@pytest.mark.parametrize("extra, flag", [
    (["--cp", "16", "--context", "1000", "--model", "nope"], "--model"),
    (["--cp", "16", "--context", "1000", "--hardware", "tpu"], "--hardware"),
    (["--cp", "16", "--context", "1000", "--tp", "3"], "--tp"),          # 128 heads % 3
    (["--cp", "16", "--context", "1000", "--tp", "0"], "--tp"),
    (["--cp", "0", "--context", "1000"], "--cp"),
    (["--cp", "2", "--context", "0"], "--context"),
    (["--cp", "2", "--context", "-5"], "--context"),
    (["--cp", "2", "--context", "1000", "--cached", "1000"], "--cached"),
    (["--cp", "2", "--context", "1000", "--cached", "-1"], "--cached"),
    (["--cp", "2", "--context", "1000", "--batch", "0"], "--batch"),
    (["--cp", "2", "--context", "1000", "--dtype", "int4"], "--dtype"),
    (["--cp", "two", "--context", "1000"], "--cp"),
    (["--context", "1000"], "--cp"),
    (["--context", "1000", "--sweep", "tp=1,2"], "--sweep"),
    (["--context", "1000", "--sweep", "cp=1,0"], "--sweep"),
    (["--context", "1000", "--sweep", "batch=0"], "--sweep"),
    (["--context", "1000", "--sweep", "batch=1,2"], "--cp"),
    (["--cp", "2", "--context", "1000", "--sweep", "batch=1,2", "--plot", "x.png"], "--plot"),
    (["--cp", "2", "--context", "1000", "--plot", "x.png"], "--plot"),
])
def test_cli_bad_input_exits_2_with_one_line_naming_the_flag(extra, flag, capsys):
    # Later flags win in argparse, so ``extra`` may override the defaults in ARGS_405B.
    assert run_cli(ARGS_405B + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


def _profile_file(tmp_path, **changes) -> str:
    fields = {**get_profile("cpu-gloo").to_dict(), **changes}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"suite": "hardware", "profile": {k: v for k, v in fields.items()
                                                                 if v is not None}}))
    return str(path)


@pytest.mark.unit
def test_profile_json_file_is_a_hardware_profile(tmp_path, capsys):
    # What `cp-megatron bench hardware` writes: {"profile": {...}}; C doubled halves attention.
    path = _profile_file(tmp_path, name="mine", attn_flops_per_s=2 * get_profile("cpu-gloo").attn_flops_per_s)
    mine = planner.plan("tiny-long", path, tp=1, cp=2, context_tokens=32768, dtype="fp32")
    base = planner.plan("tiny-long", "cpu-gloo", tp=1, cp=2, context_tokens=32768, dtype="fp32")
    assert mine.hardware == "mine"
    assert mine.attention_s == pytest.approx(base.attention_s / 2, rel=REL_EXACT)
    assert run_cli(["plan", "--model", "tiny-long", "--hardware", path, "--tp", "1", "--cp", "2",
                    "--context", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hardware_profile"]["name"] == "mine"


@pytest.mark.unit
@pytest.mark.parametrize("changes, field", [
    ({"attn_flops_per_s": -1.0}, "attn_flops_per_s"),
    ({"gpus_per_node": 1.5}, "gpus_per_node"),
    ({"memory_bytes": "lots"}, "memory_bytes"),
    ({"warp_speed": 9.0}, "warp_speed"),
    ({"cp_bandwidth_bytes_per_s": None}, "cp_bandwidth_bytes_per_s"),   # missing
    ({"gpus_per_node": float("inf")}, "gpus_per_node"),                 # JSON Infinity
    ({"cp_latency_s": float("nan")}, "cp_latency_s"),                   # JSON NaN
    ({"memory_bytes": 10**400}, "memory_bytes"),                        # too large for a float
    ({"name": "two\nlines"}, "name"),
    ({"memory_efficiency": 1.5}, "memory_efficiency"),                  # above the data sheet
    ({"layer_overhead_s": -1e-6}, "layer_overhead_s"),
    ({"a2a_latency_s": 0}, "a2a_latency_s"),                             # latencies stay > 0
])
def test_bad_profile_file_names_the_file_and_field(tmp_path, changes, field, capsys):
    path = _profile_file(tmp_path, **changes)
    with pytest.raises(ValueError, match=field) as err:
        planner.plan("tiny", path, tp=1, cp=2, context_tokens=100)
    assert path in str(err.value)
    assert run_cli(["plan", "--model", "tiny", "--hardware", path, "--tp", "1", "--cp", "2",
                    "--context", "100"]) == 2
    out = capsys.readouterr().err.strip()
    assert len(out.splitlines()) == 1 and "--hardware" in out and field in out, out


@pytest.mark.unit
def test_profile_file_without_the_decode_fields_loads_with_defaults(tmp_path):
    # A profile written before the decode terms existed still loads (fields with defaults).
    old = {k: v for k, v in get_profile("cpu-gloo").to_dict().items()
           if k not in ("a2a_latency_s", "net_hop_latency_s", "memory_efficiency", "layer_overhead_s",
                        "ring_step_overhead_s")}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    p = planner.plan("tiny", str(path), tp=1, cp=2, context_tokens=100)
    assert p.fixed_s == 0.0 and p.hardware_profile["memory_efficiency"] == 1.0
    zero = _profile_file(tmp_path, layer_overhead_s=0, ring_step_overhead_s=0.0)
    assert planner.plan("tiny", zero, tp=1, cp=2, context_tokens=100).fixed_s == 0.0


@pytest.mark.unit
def test_unreadable_profile_file_is_a_one_line_error(tmp_path, capsys):
    bad, deep = tmp_path / "broken.json", tmp_path / "deep.json"
    bad.write_text("{not json")
    deep.write_text("[" * 100_000)
    subnormal = _profile_file(tmp_path, attn_flops_per_s=1e-320)  # finite, but 1/C is not
    for path in (str(bad), str(deep), str(tmp_path / "missing.json"), subnormal):
        assert run_cli(["plan", "--model", "tiny", "--hardware", path, "--tp", "1", "--cp", "2",
                        "--context", "100"]) == 2
        out = capsys.readouterr().err.strip()
        assert len(out.splitlines()) == 1 and "--hardware" in out, out
        assert path in out or "too small or too large" in out, out


@pytest.mark.unit
def test_cli_missing_required_flag_exits_2(capsys):
    assert run_cli(["plan", "--hardware", "h100-rdma", "--tp", "8", "--cp", "2", "--context", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model" in err, err


@pytest.mark.integration
def test_planner_imports_neither_torch_nor_megatron():
    code = ("import sys, cp_megatron.planner, cp_megatron.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out[:300]


# --------------------------------------------------------------------------- memory report (#21)

@pytest.mark.unit
def test_cli_memory_rows_name_every_category_and_the_dry_run(capsys):
    assert run_cli(ARGS_405B + ["--cp", "16", "--context", "1000000", "--max-new-tokens", "64"]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "KV cache capacity", "activations (prefill peak)", "communication buffers",
                "total, as the dry run counts", "+ allowances", "= needed",
                "cp-megatron dryrun CONFIG --layers 2"):
        assert row in out, row


@pytest.mark.unit
def test_cli_config_fills_the_inputs_and_names_its_dry_run(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {format: dummy, preset: llama3.1-70b, dtype: bfloat16}\nparallel: {tp: 8, cp: 4}\n"
                   "attention: {hardware: h100-rdma}\nprompt: {random_tokens: 131072}\n"
                   "generation: {max_new_tokens: 256}\nruntime: {kv_cache_margin_tokens: 1000}\n")
    assert run_cli(["plan", "--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model"], out["tp"], out["cp"], out["dtype"], out["context_tokens"]) == (
        "llama3.1-70b", 8, 4, "bf16", 131072)
    assert (out["max_new_tokens"], out["kv_margin_tokens"]) == (256, 1000)
    assert out["memory"]["dryrun_command"] == f"cp-megatron dryrun {cfg} --layers 2"
    same = planner.plan("llama3.1-70b", "h100-rdma", tp=8, cp=4, context_tokens=131072, dtype="bf16",
                        max_new_tokens=256, kv_margin_tokens=1000).memory
    assert out["memory"]["total_bytes"] == same["total_bytes"]
    assert run_cli(["plan", "--config", str(cfg), "--cp", "2", "--json"]) == 0   # a flag wins
    assert json.loads(capsys.readouterr().out)["cp"] == 2


@pytest.mark.unit
def test_cli_config_without_the_model_or_context_is_refused(tmp_path, capsys):
    assert run_cli(["plan", "--config", "configs/llama3.1-405b-h100-1m.yaml"]) == 2
    assert "--model: required" in capsys.readouterr().err
    assert run_cli(["plan", "--config", "configs/llama3.1-405b-h100-1m.yaml", "--model", "llama3.1-405b"]) == 2
    assert "--context: required" in capsys.readouterr().err
    assert run_cli(["plan", "--config", str(tmp_path / "missing.yaml"), "--model", "x"]) == 2
    assert "--config" in capsys.readouterr().err
    assert run_cli(ARGS_405B + ["--cp", "2", "--context", "1000", "--kv-margin", "-1"]) == 2
    assert "--kv-margin" in capsys.readouterr().err


@pytest.mark.unit
def test_memory_total_is_the_sum_of_its_categories_and_fits_counts_the_allowances():
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=10**6, max_new_tokens=64)
    m = p.memory
    assert m["total_bytes"] == pytest.approx(m["weight_bytes"] + m["kv_cache_capacity_bytes"]
                                             + m["activation_bytes"] + m["comm_buffer_bytes"], rel=REL_EXACT)
    assert m["total_with_allowances_bytes"] == pytest.approx(m["total_bytes"] + sum(m["allowances"].values()),
                                                             rel=REL_EXACT)
    assert set(m["allowances"]) == {"cuda_context", "nccl", "fragmentation"}
    assert m["activation_bytes"] == max(m["activation_phases"].values())
    assert p.fits_in_memory == (m["total_with_allowances_bytes"] <= get_profile("h100-rdma").memory_bytes)
    # the CP ring's receive buffers: two K and two V blocks of ceil(1M / 16) + 1 slots, one KV head
    assert m["comm_buffer_bytes"] == 4 * 62501 * 128 * 2
    assert planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=1, context_tokens=1000).memory[
        "comm_buffer_bytes"] == 0


@pytest.mark.unit
def test_nccl_allowance_counts_only_communicators_that_exist():
    per, a2a = planner.ALLOWANCES["nccl_per_communicator"][0], planner.ALLOWANCES["nccl_all_to_all"][0]
    assert planner.allowance_bytes(1, 1, 0.0)["nccl"] == 0.0                    # one GPU: no NCCL
    assert planner.allowance_bytes(8, 1, 0.0)["nccl"] == 2 * per                # TP and world
    assert planner.allowance_bytes(8, 16, 1e9) == {"cuda_context": 0.5e9, "nccl": 3 * per + a2a,
                                                   "fragmentation": 0.1 * 1e9}
