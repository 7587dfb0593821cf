"""The planner's memory figures against a model built for real (issue #21, item 3).

Oracles: the bytes of a stage's own parameters and buffers (weights), the cache's own storage
(KV capacity), and the peak of live tensor bytes while the stage runs one prefill on CPU,
measured by a dispatch mode that follows every storage an op allocates until the last tensor
using it dies (activations; what a fake-tensor dry run sees: op outputs, not kernel workspace).
The layer code measured is this repository's (fused q/k/v and gate/up, ``F.rms_norm`` as
torch decomposes it), the planner's default :class:`cp_megatron.planner.LayerCode`; the
dimensions are those of ``benchmarks/activation_phases.py``.
"""

from __future__ import annotations

import pytest
import torch

from cp_megatron import planner
from cp_megatron.dryrun import LiveBytes
from cp_megatron.launcher import spawn
from cp_megatron.model.config import get_preset

# Dimensions large enough that one hidden state (t*H*e = 1 MiB) dwarfs the round's small host
# tensors (positions, plan indices), small enough to run in seconds.
SMALL = get_preset("tiny").with_(hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=2,
                                 head_dim=64, num_layers=2, vocab_size=512)
TOKENS = 1024
# The measured peak must match the planner's phase model within the issue's 5%.
ACTIVATION_REL = 0.05


def _measure_job(dtype_name: str, weights: str, tokens: int):
    from cp_megatron import parallel_state
    from cp_megatron.engine import InferenceEngine
    from cp_megatron.model.llama import LlamaStage, StageLayout
    from cp_megatron.model.weights import DummyReader, load_weights
    from cp_megatron.sharding import kv_slots_per_rank

    topo = parallel_state.initialize(1, 1, 1)
    dtype = getattr(torch, dtype_name)
    stage = LlamaStage(SMALL, StageLayout(), dtype=dtype, weights=weights)
    load_weights(stage, DummyReader(SMALL, seed=1))
    engine = InferenceEngine(stage, topo, kv_capacity=kv_slots_per_rank(tokens, 16, 1, 256))
    mode = LiveBytes()
    forward = stage.forward

    def measured(*args, **kwargs):
        with mode:
            return forward(*args, **kwargs)

    stage.forward = measured
    ids = torch.randint(0, SMALL.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.forward({0: ids})
    weight_bytes = sum(t.numel() * t.element_size() for t in list(stage.parameters()) + list(stage.buffers())
                       if t is not stage.inv_freq)
    return {"weights": weight_bytes, "kv_capacity": engine.kv_cache.capacity_bytes(),
            "activations": mode.peak}


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype, weights, plan_dtype", [("bfloat16", "fp8-rowwise", "fp8"),
                                                        ("bfloat16", "dtype", "bf16"),
                                                        ("float32", "dtype", "fp32")])
def test_planner_memory_by_category_matches_a_cpu_run(dtype, weights, plan_dtype):
    got = spawn(_measure_job, 1, (dtype, weights, TOKENS), timeout_s=240)[0]
    report = planner.memory_report(SMALL, 1, 1, TOKENS, TOKENS, 1, plan_dtype, max_new_tokens=16,
                                   kv_margin_tokens=256)
    assert report.weight_bytes == got["weights"]                       # exact: one weight figure
    assert report.kv_cache_capacity_bytes == got["kv_capacity"]        # exact: the reservation
    assert report.activation_bytes == pytest.approx(got["activations"], rel=ACTIVATION_REL), (
        got["activations"], report.activation_phases)


@pytest.mark.unit
def test_live_bytes_follows_views_and_frees():
    mode = LiveBytes()
    with mode:
        a = torch.ones(1000)                  # 4000 bytes
        b = a.view(10, 100)                   # a view: no new bytes
        del a
        assert mode.live == 4000              # still used by the view
        c = b * 2
        assert mode.live == 8000
        del b
        assert mode.live == 4000
        d = c + 1
        del c, d
    assert mode.peak == 8000 and mode.live == 0


def _stage_bytes(stage) -> int:
    return sum(t.numel() * t.element_size() for t in list(stage.parameters()) + list(stage.buffers())
               if t is not stage.inv_freq)


@pytest.mark.unit
def test_one_weight_figure_equals_the_stage_parameter_bytes_tp1():
    """The planner's weight figure is the sum of a real stage's parameter and buffer bytes for
    every dtype, and the plan's two weight fields are that one figure."""
    from cp_megatron.model.llama import LlamaStage, StageLayout

    for dtype, weights, plan_dtype in ((torch.bfloat16, "fp8-rowwise", "fp8"), (torch.bfloat16, "dtype", "bf16"),
                                       (torch.float32, "dtype", "fp32")):
        stage = LlamaStage(SMALL, StageLayout(), dtype=dtype, weights=weights)
        assert planner.loaded_weight_bytes(SMALL, 1, plan_dtype) == _stage_bytes(stage), plan_dtype
    p = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=10**6).to_dict()
    assert p["weight_bytes_per_gpu"] == p["memory"]["weight_bytes"]


def _tp_weights_job():
    from cp_megatron import parallel_state
    from cp_megatron.model.llama import LlamaStage, StageLayout

    topo = parallel_state.initialize(2, 1, 1)
    stage = LlamaStage(SMALL, StageLayout(2, topo.tp_rank), dtype=torch.bfloat16, weights="fp8-rowwise")
    return _stage_bytes(stage)


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_one_weight_figure_equals_the_stage_parameter_bytes_fp8_tp2():
    held = spawn(_tp_weights_job, 2, (), timeout_s=150)
    assert held[0] == held[1] == planner.loaded_weight_bytes(SMALL, 2, "fp8")


@pytest.mark.unit
def test_planner_kv_capacity_counts_what_the_engine_reserves():
    from cp_megatron.sharding import kv_slots_per_rank

    for args in ((10**6, 64, 16, 8192), (131072, 256, 2, 8192), (7, 1, 3, 0), (1, 0, 1, 5)):
        assert planner.kv_capacity_slots(*args) == kv_slots_per_rank(*args)
    m = planner.plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=10**6, max_new_tokens=64).memory
    slot = 2 * 126 * 1 * 128 * 2
    assert m["kv_cache_capacity_bytes"] == slot * (62500 + 1 + 4 + 1 + 512 + 1)
    assert m["kv_cache_bytes"] == slot * 62500


@pytest.mark.unit
def test_before_code_model_reproduces_the_issue_trace_405b_1m():
    """Issue #21's fake-tensor trace of the code before the fix measured 12.35 GB of activations
    on rank 0 (405B FP8, TP8 x CP16, 1M tokens); the phase model of that code gives the same."""
    report = planner.memory_report(get_preset("llama3.1-405b"), 8, 16, 10**6, 10**6, 1, "fp8",
                                   code=planner.LAYER_CODE_BEFORE)
    assert report.activation_bytes == pytest.approx(12.35e9, rel=0.01)
    assert max(report.activation_phases, key=report.activation_phases.get) == "norm2"


def _ring_job(tokens: int):
    """One CP rank's peak while the pass-KV ring runs (its buffers included) and over the layer."""
    from cp_megatron import parallel_state
    from cp_megatron.attention import pass_kv
    from cp_megatron.engine import InferenceEngine
    from cp_megatron.model.llama import LlamaStage, StageLayout
    from cp_megatron.model.weights import DummyReader, load_weights

    topo = parallel_state.initialize(1, 2, 1)
    stage = LlamaStage(SMALL, StageLayout(), dtype=torch.bfloat16)
    load_weights(stage, DummyReader(SMALL, seed=1))
    engine = InferenceEngine(stage, topo, kv_capacity=tokens, strategy="pass-kv")
    mode, ring_peaks = LiveBytes(), []
    ring_loop, forward = pass_kv.ring_loop, stage.forward

    def measured_ring(*args, **kwargs):
        outer, mode.peak = mode.peak, mode.live
        ring_loop(*args, **kwargs)
        ring_peaks.append(mode.peak)
        mode.peak = max(outer, mode.peak)

    def measured(*args, **kwargs):
        with mode:
            return forward(*args, **kwargs)

    pass_kv.ring_loop, stage.forward = measured_ring, measured
    ids = torch.randint(0, SMALL.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.forward({0: ids})
    return {"ring": max(ring_peaks), "peak": mode.peak}


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.xfail(strict=True, reason="#21/#22 open: since merge_into_seen (one float32 partial, lerp in place) "
                   "the CP2 ring phase measures 5.57 MB against 6.19 MB planned; the planner's merge term "
                   "still counts two float32 copies, and one copy leaves -7.6%: the ring phase model needs rework")
def test_ring_phase_and_its_buffers_match_a_cp2_run():
    """At CP 2 (pass-KV) the phase the ring runs in -- the attention's live tensors, the float32
    accumulators, a block's output, a merge's temporaries and the two receive buffers -- and the
    layer's peak, against the planner (bf16 weights, 512 tokens per rank)."""
    got = spawn(_ring_job, 2, (TOKENS,), timeout_s=240)
    report = planner.memory_report(SMALL, 1, 2, TOKENS, TOKENS, 1, "bf16")
    ring = report.activation_phases["ring"] + report.comm_buffer_bytes
    # Rank 1 (= N-1) holds chunks 1 and 2, adjacent: a fully visible KV chunk meets all its
    # queries as one block, the case the planner costs; rank 0's blocks have half the rows.
    assert max(r["ring"] for r in got) == got[1]["ring"] == pytest.approx(ring, rel=ACTIVATION_REL), (got, ring)
    assert got[0]["ring"] < ring
    for rank, r in enumerate(got):
        assert report.activation_bytes == pytest.approx(r["peak"], rel=ACTIVATION_REL), (rank, r)
