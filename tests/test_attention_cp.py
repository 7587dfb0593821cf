"""Context-parallel attention against the float64 reference on unsharded inputs.

For each CP size in {1, 2, 3, 4} one job of CP gloo ranks runs every case of
``attention_cases.all_cases`` (full prefill of lengths 1..4099, GQA 1/4 and MQA,
several sequences, non-causal, partial prefill with uneven or strided caches, 8 decode
steps with round-robin placement, float32 and bfloat16, pass-KV / pass-Q / auto);
the outputs are gathered and compared here.
"""

from __future__ import annotations

import functools

import pytest
import torch

from attention_cases import all_cases
from cp_megatron import parallel_state
from cp_megatron.attention import context_parallel_attention
from cp_megatron.attention.reference import reference_attention
from cp_megatron.launcher import spawn

CP_SIZES = (1, 2, 3, 4)
CASE_NAMES = [c.name for c in all_cases(1)]
# float32: unit-variance inputs, DH <= 64: the acceptance bound of the issue.
FP32_MAX_ABS = 1e-5
# bfloat16 has an 8-bit mantissa (~4e-3 relative rounding): the acceptance bound.
BF16_MAX_REL = 1e-2
JOB_TIMEOUT_S = 600


def _run_all_cases(cp_size: int) -> dict:
    parallel_state.initialize(tp=1, cp=cp_size, pp=1)
    rank = parallel_state.topology().cp_rank
    results = {}
    for case in all_cases(cp_size):
        q, k, v, pos, seq = case.tensors()
        outs = []
        for call in case.calls:
            qi, ki = call.q_idx[rank], call.kv_idx[rank]
            out, lse = context_parallel_attention(
                q[qi], k[ki], v[ki], pos[qi], pos[ki], q_seq=seq[qi], kv_seq=seq[ki],
                strategy=case.strategy, causal=case.causal, return_lse=True)
            assert out.dtype == q.dtype and lse.dtype == torch.float32
            outs.append((out, lse))
        results[case.name] = outs
    return results


@functools.lru_cache(maxsize=None)
def _cp_job(cp_size: int) -> list[dict]:
    return spawn(_run_all_cases, cp_size, (cp_size,), timeout_s=JOB_TIMEOUT_S)


@functools.lru_cache(maxsize=None)
def _reference(name: str, call_index: int):
    case = next(c for c in all_cases(1) if c.name == name)
    q, k, v, pos, seq = case.tensors()
    call = case.calls[call_index]
    qi, ki = call.q_idx[0], call.kv_idx[0]
    return reference_attention(q[qi], k[ki], v[ki], pos[qi], pos[ki], seq[qi], seq[ki], case.causal)


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_cp_attention_matches_float64_reference(cp_size, name):
    case = next(c for c in all_cases(cp_size) if c.name == name)
    per_rank = _cp_job(cp_size)
    ref_case = next(c for c in all_cases(1) if c.name == name)
    for i, call in enumerate(case.calls):
        # Reassemble the global output in the order the CP=1 placement uses.
        order = ref_case.calls[i].q_idx[0]
        out = torch.zeros((len(order), case.num_heads, case.head_dim), dtype=torch.float64)
        lse = torch.zeros((len(order), case.num_heads), dtype=torch.float64)
        where = {int(t): j for j, t in enumerate(order)}
        seen = 0
        for rank in range(cp_size):
            o, l = per_rank[rank][name][i]
            rows = torch.tensor([where[int(t)] for t in call.q_idx[rank]], dtype=torch.long)
            assert len(rows) == o.shape[0], f"rank {rank} returned {o.shape[0]} rows for {len(rows)} queries"
            out[rows], lse[rows] = o.double(), l.double()
            seen += len(rows)
        assert seen == len(order)
        ref_out, ref_lse = _reference(name, i)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without visible keys differ"
        finite = torch.isfinite(ref_lse)
        if case.dtype == torch.float32:
            assert (out - ref_out).abs().max().item() <= FP32_MAX_ABS, f"call {i}"
            torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=0, atol=FP32_MAX_ABS)
        else:
            rel = (out - ref_out).norm() / ref_out.norm().clamp_min(1e-30)
            assert rel.item() <= BF16_MAX_REL, f"call {i}: relative error {rel.item():.3g}"
            torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=BF16_MAX_REL, atol=BF16_MAX_REL)


def _bad_arguments(cp_size: int) -> list[str]:
    """Rank 1 passes a bad argument in each call; every rank must raise ValueError."""
    parallel_state.initialize(tp=1, cp=cp_size)
    rank = parallel_state.topology().cp_rank
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    pos = torch.arange(5)
    bad = {
        "q": dict(q=torch.randn(5, 4)),
        "NH": dict(q=torch.randn(5, 3, 8)),
        "strategy": dict(strategy="ring"),
        "kv_pos": dict(kv_pos=torch.arange(4)),
        "k, v": dict(k=k.double(), v=v.double()),
        "q_seq": dict(q_seq=torch.zeros(5)),
    }
    messages = []
    for _, change in bad.items():
        args = dict(q=q, k=k, v=v, q_pos=pos, kv_pos=pos, strategy="auto", q_seq=None)
        if rank == 1:
            args.update(change)
        try:
            context_parallel_attention(args["q"], args["k"], args["v"], args["q_pos"], args["kv_pos"],
                                       q_seq=args["q_seq"], strategy=args["strategy"])
        except ValueError as exc:
            messages.append(str(exc))
        else:
            messages.append("no error")
    # The group still works after the errors.
    out = context_parallel_attention(q, k, v, pos + 5 * rank, pos + 5 * rank)
    assert torch.isfinite(out).all()
    return messages


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bad_arguments_raise_value_error_on_every_rank():
    results = spawn(_bad_arguments, 3, (3,), timeout_s=100)
    keys = ["q", "NH", "strategy", "kv_pos", "k, v", "q_seq"]
    for rank, messages in enumerate(results):
        assert len(messages) == len(keys)
        for key, message in zip(keys, messages):
            assert message.startswith("context_parallel_attention (CP rank 1):"), (rank, message)
            assert key in message, (rank, key, message)


@pytest.mark.unit
def test_bad_arguments_raise_value_error_single_process():
    q, k = torch.randn(5, 4, 8), torch.randn(5, 3, 8)
    with pytest.raises(ValueError, match="NH=4 must be a multiple of NKV=3"):
        context_parallel_attention(q, k, k, torch.arange(5), torch.arange(5))
