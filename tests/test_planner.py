"""The analytic planner: FLOP and byte formulas, the heuristic it reports, the paper's
headline figures, and the ``cp-megatron plan`` command line.  Pure, runs in milliseconds
(except one subprocess that checks imports and one matplotlib plot)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from cp_megatron import cli, decode_cost, planner
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
    assert d["comm_s"] == pytest.approx(d["tp_comm_s"] + d["cp_comm_s"] + d["step_comm_s"], rel=REL_EXACT)
    assert d["hbm_s"] == pytest.approx(d["weights_s"] + d["kv_s"] + d["lm_head_s"], rel=REL_EXACT)
    assert p.ttit_s == pytest.approx(d["launch_s"] + d["host_s"] + d["comm_s"] + d["hbm_s"], rel=REL_EXACT)
    assert p.ttit_s == p.ttit_eager_s == d["modes"]["eager"]["total_s"] and not d["cuda_graphs"]
    assert d["launches"] == 126 * d["launches_per_layer"] + d["launches_outside_layers"]
    per_layer = sum(c["count"] * c["time_s"] for c in d["collectives"] if c["per"] == "layer" and c["group"] == "cp")
    assert d["cp_comm_s"] == pytest.approx(126 * per_layer, rel=REL_EXACT) and d["cp_comm_s"] > 0


# A profile with round numbers so that every decode term can be counted by hand.
HAND = HardwareProfile(
    name="hand", peak_flops_per_s=1e15, attn_flops_per_s=1e15, linear_flops_per_s=1e15,
    cp_bandwidth_bytes_per_s=1e9, tp_bandwidth_bytes_per_s=2e9, memory_bandwidth_bytes_per_s=1e9,
    memory_bytes=1e12, gpus_per_node=2, cp_latency_s=10e-6, tp_latency_s=20e-6, a2a_latency_s=30e-6,
    net_hop_latency_s=40e-6, memory_efficiency=0.5, layer_overhead_s=10e-6, ring_step_overhead_s=3e-6,
    launch_s=2e-6, graph_node_s=0.5e-6, graph_launch_s=7e-6, ring_base_latency_s=5e-6, nvlink_hop_latency_s=1e-6)
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
def test_allgather_latency_is_nccls_ring():
    # base + one hop per ring step: NVLink inside a node, the network between nodes.
    assert decode_cost.allgather_latency(HAND, 1, 1) == 0.0
    assert decode_cost.allgather_latency(HAND, 4, 2) == pytest.approx(5e-6 + 2 * 1e-6 + 1 * 40e-6, rel=REL_EXACT)
    h100 = get_profile("h100-rdma")    # NCCL LL: ring base 6.6 us, NVLink 0.6 us, network 5.0 us (ppn 1)
    assert decode_cost.allgather_latency(h100, 8, 1) == pytest.approx(6.6e-6 + 7 * 0.6e-6, rel=REL_EXACT)
    assert decode_cost.allgather_latency(h100, 2, 2) == pytest.approx(11.6e-6, rel=REL_EXACT)    # a CP2 group
    assert decode_cost.allgather_latency(h100, 4, 4) == pytest.approx(21.6e-6, rel=REL_EXACT)


def _tiny_decode(tp, cp, batch, cached, **kwargs):
    tiny = get_preset("tiny")
    return decode_cost.decode_step_cost(tiny, HAND, tp, cp, cached, batch, "fp32", PASS_Q,
                                        planner.block_weight_bytes(tiny, tp, "fp32"), **kwargs)


@pytest.mark.unit
def test_decode_terms_hand_counted_tiny_cp2():
    # tiny (2 layers, H 64, NH 4, NKV 2, DH 16, V 512, W 36864), fp32, TP1 x CP2, batch 3, P = 8.
    r = _tiny_decode(1, 2, 3, 8)
    assert r.tokens_per_rank == 2                                   # 3 padded to 4, over 2 ranks
    # The runtime's rule: ring 13 us + 512 B / 1 GB/s (a query block of 2 rows x 4 heads x 16 x
    # 4 B) against the all_gather's 30 us + the same transfer: the ring.
    assert r.exchange == PASS_Q
    # Launches: llama 6 + 4 matmuls, RoPE 1 (one bmm), KV 2, flash 1, ring pass-Q 2 + 2 + merge 3 =
    # 21 per layer; 32 outside (DecodeStepCode.outside_ring_q); 2 us each eager, 0.5 us from a
    # graph + 7 us per replay.
    assert (r.launches_per_layer, r.launches_outside_layers, r.launches) == (21, 32, 74)
    assert r.launch_s == pytest.approx(74 * 2e-6, rel=REL_EXACT)
    assert r.modes["cuda_graphs"]["launch_s"] == pytest.approx(74 * 0.5e-6 + 7e-6, rel=REL_EXACT)
    assert r.host_s == pytest.approx(2 * 10e-6, rel=REL_EXACT)     # layer_overhead_s only: launches are costed
    # Collectives per layer: one ring exchange of 512 B (10 us + 512 / 1e9), the all_to_all of
    # [2, 2, 4, 16 + 1] float32 = 1088 B (30 us + 1/2 of it / 1e9); per step the tokens'
    # all-reduce over the 2 ranks (3 x 8 B: 20 us + 2 * 1/2 * 24 / 2e9).
    ring, a2a = 10e-6 + 512 / 1e9, 30e-6 + 0.5 * 1088 / 1e9
    assert r.cp_comm_s == pytest.approx(2 * (ring + a2a), rel=REL_EXACT)
    assert r.step_comm_s == pytest.approx(20e-6 + 24 / 2e9, rel=REL_EXACT) and r.tp_comm_s == 0.0
    # HBM at 0.5 * 1 GB/s: (W + 2 norms) * 4 B per block; K and V of ceil(3 * 8 / 2) = 12 slots x
    # 2 heads x 16 x 4 B per block; the LM head 512 x 64 x 4 B.
    assert r.weights_s == pytest.approx(2 * (36864 + 128) * 4 / 0.5e9, rel=REL_EXACT)
    assert r.kv_s == pytest.approx(2 * 12 * 2 * 2 * 16 * 4 / 0.5e9, rel=REL_EXACT)
    assert r.lm_head_s == pytest.approx(512 * 64 * 4 / 0.5e9, rel=REL_EXACT)
    assert r.total_s == pytest.approx(r.launch_s + r.host_s + r.comm_s + r.weights_s + r.kv_s + r.lm_head_s,
                                      rel=REL_EXACT)
    graphs = _tiny_decode(1, 2, 3, 8, cuda_graphs=True)
    assert graphs.cuda_graphs and graphs.total_s == pytest.approx(
        r.total_s - 74 * 1.5e-6 + 7e-6, rel=REL_EXACT)
    assert graphs.modes == r.modes


@pytest.mark.unit
def test_tp_decode_collectives_hand_counted_across_nodes():
    # TP4 on 2 GPUs per node: 2 nodes; payload 1 token * H 64 * 4 B; bus BW min(2e9, 2 * 1e9).
    r = _tiny_decode(4, 1, 1, 8)
    per_allreduce = 2 * 3 / 4 * 256 / 2e9 + (20e-6 + 2 * 40e-6)     # NCCL's tree over 2 nodes
    assert r.tp_comm_s == pytest.approx(2 * 2 * per_allreduce, rel=REL_EXACT)
    # per step: the embedding's all-reduce, the logits' all_gather (V/4 x 4 B in, 4x that out:
    # 5 + 2 NVLink hops + 1 network hop), the tokens' all-reduce (8 B) over the 4 ranks.
    gather = 5e-6 + 2 * 1e-6 + 40e-6 + 3 / 4 * 4 * 128 * 4 / 2e9
    tokens = 2 * 3 / 4 * 8 / 2e9 + (20e-6 + 2 * 40e-6)
    assert r.step_comm_s == pytest.approx(per_allreduce + gather + tokens, rel=REL_EXACT)
    assert r.exchange == decode_cost.NO_EXCHANGE and r.cp_comm_s == 0.0
    assert r.launches_per_layer == 14                               # no exchange, no merge
    kinds = [(c["kind"], c["group"], c["per"], c["count"]) for c in r.collectives]
    assert kinds == [("all_reduce", "tp", "layer", 2), ("all_reduce", "tp", "step", 1),
                     ("all_gather", "tp", "step", 1), ("all_reduce", "world", "step", 1)]


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
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=1, context_tokens=128_000, cuda_graphs=True)
    hw = get_profile("h100-rdma")
    d = p.decode
    # the blocks' weights and the LM head (not the embedding, of which one row is read), the KV
    embedding = 128256 / 8 * 16384 * 2
    assert d["weight_bytes"] == pytest.approx(p.weight_bytes_per_gpu - embedding - 16384 * 2, rel=REL_EXACT)
    assert d["kv_bytes"] == p.kv_cache_bytes_per_gpu
    achieved = (d["weight_bytes"] + d["kv_bytes"]) / (hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency)
    assert d["hbm_s"] == pytest.approx(achieved, rel=REL_EXACT)
    assert achieved < p.ttit_s < 1.5 * achieved
    assert d["weights_s"] > 0.5 * p.ttit_s                         # reading the weights dominates


@pytest.mark.unit
def test_decode_does_not_scale_like_prefill():
    # Paper §4.3: CP adds ring and all_to_all latency to every block of a decode step, so
    # TTIT grows with N while TTFT falls; multi-node TP saves weight reads but pays
    # cross-node all-reduce latency.
    for graphs in (False, True):
        ttit = {cp: planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=cp, context_tokens=128_000,
                                 cuda_graphs=graphs).ttit_s for cp in (1, 2, 4, 8)}
        assert ttit[1] < ttit[2] < ttit[4] < ttit[8], ttit
    tp8 = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=1, context_tokens=128_000)
    for tp in (16, 32):
        multi = planner.plan("llama3.1-405b", "h100-rdma", tp=tp, cp=1, context_tokens=128_000)
        assert multi.decode["tp_comm_s"] > 1.5 * tp8.decode["tp_comm_s"]
        assert multi.decode["weights_s"] < tp8.decode["weights_s"]


@pytest.mark.unit
def test_batched_decode_amortises_the_fixed_terms():
    points = planner.sweep_batch([1, 2, 8, 32], model="llama3.1-405b", hardware="h100-rdma", tp=8, cp=2,
                                 context_tokens=32_768)
    ttit = [p["ttit_s"] for p in points]
    assert ttit == sorted(ttit)
    assert [p["tokens_per_s"] for p in points] == sorted(p["tokens_per_s"] for p in points)
    # Weights and launches are paid once per step whatever the batch.
    assert len({p["decode"]["weights_s"] for p in points}) == 1
    assert len({p["decode"]["launch_s"] for p in points}) == 1
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
    assert one_m.ttft_s == pytest.approx(75.08, rel=1e-3)
    assert k128.ttft_s == pytest.approx(2.969, rel=1e-3)
    rows = planner.paper_decode_comparison()
    got = [(r["tp"], r["cp"], r["context_tokens"], round(r["ttit_cuda_graphs_s"] * 1e3, 2),
            round(r["ttit_eager_s"] * 1e3, 2)) for r in rows if r["source"] == "Table 7"]
    assert got == [(8, 1, 128_000, 34.28, 48.81), (8, 2, 128_000, 35.27, 52.02), (16, 1, 128_000, 24.77, 39.29),
                   (8, 4, 128_000, 35.61, 52.36), (32, 1, 128_000, 21.29, 35.82)]


@pytest.mark.unit
def test_paper_figures_are_tables_6_to_8():
    # arXiv 2411.01783v3 §4.3: Table 6 (TP8 vs CP2, 8K-128K), Table 7 (128K), Table 8 (us).
    t7 = {(tp, cp): ttit for src, tp, cp, _c, _f, ttit in planner.PAPER_DECODE if src == "Table 7"}
    assert t7 == {(8, 1): 46.26, (8, 2): 60.23, (16, 1): 39.52, (8, 4): 71.31, (32, 1): 47.3}
    t6 = [ttit for src, _tp, _cp, _c, _f, ttit in planner.PAPER_DECODE if src == "Table 6"]
    assert t6 == [44.51, 44.64, 46.26, 65.61, 65.66, 66.63]
    # Table 8 (128K, batch 1): whole pass-Q of one layer, us
    assert {cp: v[4] for cp, v in planner.PAPER_ATTENTION_US.items()} == {1: 38.9, 2: 157.7, 4: 238.6}
    # the paper's recipe (FFN FP8, first and last block bf16): the 60.9 GB per GPU of TP8
    assert planner.llama3_fp8_recipe_weight_bytes(get_preset("llama3.1-405b"), 8) == pytest.approx(60.918e9, rel=1e-4)


@pytest.mark.unit
def test_paper_decode_command_prints_every_row(capsys):
    assert run_cli(["plan", "--paper-decode"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + len(planner.PAPER_DECODE) and "TTIT paper" in lines[0]
    assert run_cli(["plan", "--paper-decode", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["tp"], r["cp"]) for r in rows] == [(tp, cp) for _s, tp, cp, *_ in planner.PAPER_DECODE]
    assert all(r["ttit_deviation"] == pytest.approx(r["ttit_cuda_graphs_s"] / r["paper_ttit_s"] - 1) for r in rows)
    assert run_cli(["plan", "--paper-decode", "--hardware", "tpu"]) == 2
    assert "--hardware" in capsys.readouterr().err


# --------------------------------------------------------------------------- the code model vs the dry run

# (config, CP, attention.strategy, the decode exchange the runtime runs): 405B FP8 TP8 at
# CP 1 / 2 / 4 and ring pass-Q forced, 70B bf16 TP8 x CP4.  A 4,096-token prompt: decode
# launches and collectives do not depend on the cache length (checked at 128K by hand, see
# docs/planner.md).  TP16 / TP32 cannot be traced: the runtime refuses TP > NKV.
DRYRUN_CASES = [("llama3.1-405b-h100.yaml", 1, "auto", decode_cost.NO_EXCHANGE),
                ("llama3.1-405b-h100.yaml", 2, "auto", "all-gather-q"),
                ("llama3.1-405b-h100.yaml", 4, "auto", "all-gather-q"),
                ("llama3.1-405b-h100.yaml", 2, "pass-q", PASS_Q),
                ("llama3.1-70b-h100.yaml", 4, "auto", "all-gather-q")]
_TRACE_KIND = {"all_reduce": "allreduce_", "all_to_all": "alltoall_base_"}


def _as_traced(c: dict) -> list:
    """(trace kind, file, group size, bytes) records the dry run makes for one model collective."""
    if c["kind"] == "send_recv":
        return [(k, c["where"], c["ranks"], c["in_bytes"]) for _ in range(c["count"]) for k in ("send", "recv_")]
    if c["kind"] == "all_gather":   # the trace counts the input and the output
        kind = "_allgather_base_" if c["per"] == "layer" else "allgather_"
        return [(kind, c["where"], c["ranks"], c["in_bytes"] + c["out_bytes"])] * c["count"]
    return [(_TRACE_KIND[c["kind"]], c["where"], c["ranks"], c["in_bytes"])] * c["count"]


@pytest.mark.integration
@pytest.mark.parametrize("config, cp, strategy, exchange", DRYRUN_CASES)
def test_decode_code_matches_the_dry_run(config, cp, strategy, exchange):
    """DecodeStepCode and decode_collectives are what `cp-megatron dryrun CONFIG --layers 2`
    traces on the rank that holds the new token: launches per layer and outside by source
    file, every collective with its group and bytes, and the runtime's choice of exchange.
    When the layer code changes, the source whose count moved is named here: update
    DecodeStepCode (cp_megatron/decode_cost.py), then `cp-megatron plan --paper-decode`."""
    from pathlib import Path

    from cp_megatron.cli.dryrun import build_spec
    from cp_megatron.config import load_config
    from cp_megatron.dryrun import trace_rank

    path = str(Path(__file__).resolve().parents[1] / "configs" / config)
    spec = build_spec(load_config(path, [f"parallel.cp={cp}", f"attention.strategy={strategy}"]), 2,
                      "prefill,decode:2", 4096, "9.0")
    rep = trace_rank(spec, 0)
    owner = [r for r in rep["rounds"] if r["round"].startswith("decode")
             and any(c["kind"] == "allreduce_" and c["bytes"] > 0 for c in r["collectives_by_layer"]["0"])]
    assert owner, "no decode round in which rank 0 holds the new token"
    r = owner[0]
    assert r["metrics"]["strategy"] == (PASS_Q if exchange == decode_cost.NO_EXCHANGE else exchange)
    cfg, tp = spec.model_config, spec.tp
    fp8 = spec.weights == "fp8-rowwise"
    dtype = "fp8" if fp8 else "bf16"
    hw = get_profile("h100-rdma")
    if strategy == "auto":   # the planner picks what the engine picked
        assert decode_cost.query_exchange(cfg, hw, tp, cp, 1, 4096, dtype, PASS_Q) == exchange
    code = decode_cost.DecodeStepCode()
    for layer in ("0", "1"):
        assert r["launches_by_layer_and_source"][layer] == code.layer_launches(fp8, exchange), layer
    assert r["launches_by_layer_and_source"]["outside"] == code.outside_launches(exchange)
    model = [asdict(c) for c in decode_cost.decode_collectives(cfg, hw, tp, cp, 1, 4096, dtype, exchange)]

    def traced(scope):
        keys = ["0"] if scope == "layer" else ["outside"]
        return sorted((c["kind"], c["where"].split(":")[0], len(c["group"]), c["bytes"])
                      for k in keys for c in r["collectives_by_layer"].get(k, []))

    for scope in ("layer", "step"):
        assert traced(scope) == sorted(x for c in model if c["per"] == scope for x in _as_traced(c)), scope


@pytest.mark.unit
@pytest.mark.parametrize("batch", [1, 32])
def test_405b_decode_collectives_per_layer_do_not_grow_with_cp(batch):
    """#22 acceptance: the decode exchange the plan picks for 405B FP8 TP8 at 1M tokens, batch 1
    and batch 32, makes the same collectives per layer at CP 2, 4, 8 and 16 (all-gather-Q: two TP
    all-reduces, one all_gather, one all_to_all of N partials).  At batch 32 and CP 2 / 4 the
    ring's transfers hide behind its steps; it loses on reading the KV shard N times
    (choose_query_exchange's r).  The collective list is the one tied to the dry run by
    test_decode_code_matches_the_dry_run (its CP16 trace: docs/dryrun.md)."""
    per_layer = {}
    for cp in (2, 4, 8, 16):
        p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=cp, context_tokens=1_000_000, batch=batch,
                         dtype="fp8")
        assert p.decode["exchange"] == "all-gather-q", cp
        per_layer[cp] = sorted((c["kind"], c["count"]) for c in p.decode["collectives"] if c["per"] == "layer")
        a2a = [c for c in p.decode["collectives"] if c["per"] == "layer" and c["kind"] == "all_to_all"][0]
        rows = -(-batch // cp)
        assert a2a["in_bytes"] == cp * rows * (16 * 128 + 16) * 4       # N partials of (O, LSE), float32
    assert all(v == per_layer[2] for v in per_layer.values()), per_layer
    assert per_layer[2] == [("all_gather", 1), ("all_reduce", 2), ("all_to_all", 1)]


@pytest.mark.unit
def test_query_exchange_costs_the_ring_s_repeated_kv_reads():
    """choose_query_exchange: with r = 0 the exposed ring against the all_gather (hidden ring ->
    pass-Q); a ring step slower to read the KV shard than to compute makes the ring pay N - 1
    extra reads, and all-gather-Q wins.  Values by hand: N = 4, t = 10 us, a + q/BW = 5 us.
    Replicated-Q, when offered: (N - 1)^2 o/BW + D against all-gather-Q's 6 us."""
    from cp_megatron.attention.heuristic import choose_query_exchange

    args = (4, 1e3, 4 * 10e-6 * 1e12, 1e12, 1e9, 4e-6, 3e-6)    # q/BW = 1 us, A/(N C) = 10 us
    strategy, ring, gather, replicated = choose_query_exchange(*args)
    assert strategy == PASS_Q and ring == 0.0 and gather == pytest.approx(3e-6 + 3 * 1e-6)
    assert replicated == float("inf")                          # not offered
    strategy, ring, gather, _ = choose_query_exchange(*args, kv_read_s=30e-6)   # t' = 30 us
    assert strategy == "all-gather-q"
    assert ring == pytest.approx(4 * 20e-6) and gather == pytest.approx(6e-6)
    # o = 1 KB: 9 x 1 us = 9 us > 6 us; o = 100 B: 0.9 us wins; with D = 10 us it loses again
    strategy, _, _, replicated = choose_query_exchange(*args, kv_read_s=30e-6, partial_block_bytes=1e3)
    assert strategy == "all-gather-q" and replicated == pytest.approx(9e-6)
    strategy, _, _, replicated = choose_query_exchange(*args, kv_read_s=30e-6, partial_block_bytes=100)
    assert strategy == "replicated-q" and replicated == pytest.approx(0.9e-6)
    strategy, _, _, replicated = choose_query_exchange(*args, kv_read_s=30e-6, partial_block_bytes=100,
                                                       replicated_dense_s=10e-6)
    assert strategy == "all-gather-q" and replicated == pytest.approx(10.9e-6)
    # a KV read above the FLOPs counts for it as for all-gather-Q: r = 50 us -> 10 us more
    _, _, gather, replicated = choose_query_exchange(*args, kv_read_s=50e-6, partial_block_bytes=100)
    assert gather == pytest.approx(16e-6) and replicated == pytest.approx(10.9e-6)


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
                             "max_new_tokens": 0, "kv_margin_tokens": 8192, "cuda_graphs": False}
    assert out["strategy"] == PASS_KV


@pytest.mark.unit
def test_cli_table(capsys):
    assert run_cli(ARGS_405B + ["--cp", "16", "--context", "128000"]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "pass-kv" in out and "TTIT" in out
    for row in ("weights read", "TP all-reduce", "CP ring + all_to_all", "fixed", "decode step",
                "kernel launches", "CP all_gather", "CP all_to_all", "KV cache read", "CUDA graph"):
        assert row in out, row


@pytest.mark.unit
def test_cli_cuda_graphs_flag_picks_the_graph_ttit(capsys):
    base = ARGS_405B + ["--cp", "2", "--context", "128000", "--json"]
    assert run_cli(base) == 0
    eager = json.loads(capsys.readouterr().out)
    assert run_cli(base + ["--cuda-graphs"]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert eager["ttit_s"] == eager["ttit_eager_s"] and graph["ttit_s"] == graph["ttit_cuda_graphs_s"]
    assert graph["inputs"]["cuda_graphs"] and not eager["inputs"]["cuda_graphs"]
    assert graph["ttit_cuda_graphs_s"] == eager["ttit_cuda_graphs_s"] < eager["ttit_eager_s"]
    hw, launches = get_profile("h100-rdma"), eager["decode"]["launches"]
    assert eager["ttit_eager_s"] - eager["ttit_cuda_graphs_s"] == pytest.approx(
        launches * (hw.launch_s - hw.graph_node_s) - hw.graph_launch_s, rel=1e-9)


@pytest.mark.unit
def test_cli_batch_sweep(capsys):
    argv = ARGS_405B + ["--cp", "2", "--context", "32768", "--sweep", "batch=1,4,16"]
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and len(out.strip().splitlines()) == 2 + 3
    assert run_cli(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sweep"] == "batch" and [p["batch"] for p in data["points"]] == [1, 4, 16]
    assert all(p["decode"]["launch_s"] > 0 for p in data["points"])


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
    ({"launch_s": -5e-6}, "launch_s"),                                  # may be 0, never negative
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
