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
from cp_megatron.hardware import get_profile
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
             + p.lm_head_s)
    assert p.ttft_s == pytest.approx(parts, rel=REL_EXACT)
    assert p.elementwise_s > 0


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
    hbm = get_profile("h100-rdma").memory_bandwidth_bytes_per_s
    floor = (p.weight_bytes_per_gpu + p.kv_cache_bytes_per_gpu) / hbm
    assert floor <= p.ttit_s < 1.5 * floor


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
    # Regression guard for docs/planner.md's table (change both together).
    one_m = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=1_000_000)
    k128 = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=128_000)
    assert one_m.ttft_s == pytest.approx(73.97, rel=1e-3)
    assert k128.ttft_s == pytest.approx(2.80, rel=5e-3)


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
                             "context_tokens": 1_000_000, "cached_tokens": 0, "batch": 1, "dtype": "fp8"}
    assert out["strategy"] == PASS_KV


@pytest.mark.unit
def test_cli_table(capsys):
    assert run_cli(ARGS_405B + ["--cp", "16", "--context", "128000"]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "pass-kv" in out and "TTIT" in out


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
