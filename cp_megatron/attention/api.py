"""Exact attention over a CP group: from a round plan, or for any token placement.

Two entry points:

* :func:`planned_attention` -- what the model's layers call: the engine built the
  round's :class:`AttentionPlan` once (no collective), so a layer does the kernels and
  the ring's P2P only (plus pass-Q's all_to_all).
* :func:`context_parallel_attention` -- the public, self-contained call for arbitrary
  placements: it validates the arguments, exchanges shapes and positions with one
  all_gather each (a bad argument on any rank raises ValueError on every rank before
  any ring traffic), chooses the variant (``strategy="auto"``: Alg. 1 / Alg. 5 on the
  global T and P), builds the plan and runs it.

A CP group of size 1 does no communication.

Source: arXiv 2411.01783 §3 (Alg. 1–3, 5); docs/design.md §2, §4–§9.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from cp_megatron import parallel_state, shm_collectives
from cp_megatron.attention.blocks import attend_blocks
from cp_megatron.attention.decode import all_gather_q, attend_decode_batch, replicated_q
from cp_megatron.attention.heuristic import (ALL_GATHER_Q, AUTO, PASS_KV, PASS_Q, REPLICATED_Q, STRATEGIES,
                                             HeuristicDecision, choose_strategy)
from cp_megatron.attention.pass_kv import ring_pass_kv
from cp_megatron.attention.plan import AttentionPlan, build_plan
from cp_megatron.attention.pass_q import ring_pass_q
from cp_megatron.attention.ring import RingStats
from cp_megatron.hardware import HardwareProfile, default_hardware

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_META_FIELDS = 8  # error, Tq, Tkv, NH, NKV, DH, dtype, causal*4 + strategy


def _validate(q, k, v, q_pos, kv_pos, q_seq, kv_seq, strategy, softmax_scale) -> Optional[str]:
    """Local argument checks; returns an error message naming the argument, or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            return f"{name}: expected a 3-d tensor [T, heads, head_dim], got " \
                   f"{getattr(t, 'shape', type(t).__name__)}"
        if t.dtype not in _DTYPES:
            return f"{name}: expected a float dtype in {_DTYPES}, got {t.dtype}"
    if k.shape != v.shape:
        return f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"k, v: expected q's dtype {q.dtype}, got {k.dtype}, {v.dtype}"
    if q.shape[2] != k.shape[2]:
        return f"k: head_dim {k.shape[2]} differs from q's {q.shape[2]}"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"q/k heads: NH={q.shape[1]} must be a multiple of NKV={k.shape[1]}"
    for name, t, n in (("q_pos", q_pos, q.shape[0]), ("kv_pos", kv_pos, k.shape[0]),
                       ("q_seq", q_seq, q.shape[0]), ("kv_seq", kv_seq, k.shape[0])):
        if t is None and name.endswith("seq"):
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n:
            return f"{name}: expected a 1-d integer tensor of length {n}, got " \
                   f"{getattr(t, 'shape', type(t).__name__)}"
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            return f"{name}: expected an integer dtype, got {t.dtype}"
    if strategy not in STRATEGIES:
        return f"strategy: expected one of {STRATEGIES}, got {strategy!r}"
    if softmax_scale is not None and not softmax_scale > 0:
        return f"softmax_scale: expected a positive float or None, got {softmax_scale!r}"
    return None


def _exchange_meta(group, size, device, error, q, k, causal, strategy) -> torch.Tensor:
    """all_gather of [error, Tq, Tkv, NH, NKV, DH, dtype, causal/strategy] -> [N, 8]."""
    if error is None:
        dims = [0, q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2], _DTYPES.index(q.dtype),
                int(causal) * 8 + STRATEGIES.index(strategy)]
    else:
        dims = [1] + [0] * (_META_FIELDS - 1)
    mine = torch.tensor(dims, dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine, group=group)
    return torch.stack(every)


def _raise_everywhere(group, size, error: Optional[str]) -> None:
    messages: list = [None] * size
    dist.all_gather_object(messages, error, group=group)
    first = next((r, m) for r, m in enumerate(messages) if m)
    raise ValueError(f"context_parallel_attention (CP rank {first[0]}): {first[1]}")


def _pad(t: torch.Tensor, length: int, value) -> torch.Tensor:
    if t.shape[0] == length:
        return t
    pad = t.new_full((length - t.shape[0], *t.shape[1:]), value)
    return torch.cat([t, pad])


def decide_strategy(new_tokens: int, cached_tokens: int, cp_size: int, num_heads: int,
                    num_kv_heads: int, dtype: torch.dtype, hardware: HardwareProfile,
                    strategy: str = AUTO) -> HeuristicDecision:
    """Alg. 1 / Alg. 5 with C and BW from a hardware profile and e from ``dtype``."""
    return choose_strategy(new_tokens, cached_tokens, cp_size, num_heads, num_kv_heads,
                           torch.finfo(dtype).bits // 8, hardware.attn_flops_per_s,
                           hardware.cp_bandwidth_bytes_per_s, force=strategy)


def context_parallel_attention(q, k, v, q_pos, kv_pos, *, q_seq=None, kv_seq=None,
                               strategy: str = AUTO, causal: bool = True,
                               softmax_scale: Optional[float] = None, group=None,
                               return_lse: bool = False, hardware: Optional[HardwareProfile] = None,
                               stats: Optional[RingStats] = None):
    """Exact attention of this rank's queries over the keys/values of the whole CP group.

    Args:
        q: ``[Tq, NH, DH]`` this rank's queries (Tq may differ per rank, may be 0).
        k, v: ``[Tkv, NKV, DH]`` this rank's keys/values, cached and new (Tkv may be 0).
        q_pos, kv_pos: int64 ``[Tq]`` / ``[Tkv]`` global positions.
        q_seq, kv_seq: int ``[Tq]`` / ``[Tkv]`` sequence ids; None = one sequence (id 0).
            Negative ids mark padding and match nothing.
        strategy: "auto" (Alg. 1 / 5 on the global T and P), "pass-kv", "pass-q" (ring),
            "all-gather-q" or "replicated-q" (whose layers compute every rank's rows on each rank:
            this call, holding only its own queries, all-gathers them first, then runs it).
        causal: kv j visible to query i iff seq(j) == seq(i) and pos(j) <= pos(i);
            without causal, iff the sequences match.
        softmax_scale: default 1/sqrt(DH).
        group: the CP process group; default: parallel state's CP group (or a single
            process when torch.distributed is not running).
        return_lse: also return the LSE.
        hardware: C and BW for ``strategy="auto"``; default :func:`cp_megatron.hardware.default_hardware`.
        stats: optional :class:`RingStats` accumulator (timings, bytes).

    Returns:
        out ``[Tq, NH, DH]`` in q's dtype; with return_lse also lse ``[Tq, NH]`` float32
        (natural log).  A query with no visible key gets out 0 and lse -inf.

    Raises:
        ValueError: a bad argument on any rank (shape, dtype, NH not a multiple of NKV,
            unknown strategy, position length) or mismatched head/dtype/strategy across ranks,
            raised on every rank before any ring communication.

    Source: arXiv 2411.01783 §3, Alg. 1–3 and 5.
    """
    if group is None:
        group = parallel_state.get_cp_group()
    cp_rank, cp_size = parallel_state.group_rank_and_size(group)
    error = _validate(q, k, v, q_pos, kv_pos, q_seq, kv_seq, strategy, softmax_scale)
    if cp_size == 1 and error:
        raise ValueError(f"context_parallel_attention: {error}")
    if error is None:
        q_pos, kv_pos = q_pos.long(), kv_pos.long()
        q_seq = torch.zeros_like(q_pos) if q_seq is None else q_seq.long()
        kv_seq = torch.zeros_like(kv_pos) if kv_seq is None else kv_seq.long()
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])

    if cp_size == 1:
        layouts_q, layouts_kv = [(q_pos.cpu(), q_seq.cpu())], [(kv_pos.cpu(), kv_seq.cpu())]
        plan = build_plan(PASS_KV if strategy == AUTO else strategy, 0, layouts_q, layouts_kv,
                          causal=causal, scale=scale)
    else:
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
        meta = _exchange_meta(group, cp_size, device, error, q, k, causal, strategy)
        if error is not None or bool(meta[:, 0].any()):
            _raise_everywhere(group, cp_size, error)
        odd = _odd_ranks(meta[:, 3:].tolist())
        if odd:
            # Every rank holds the same meta, so every rank raises the same message.
            raise ValueError("context_parallel_attention: NH, NKV, DH, dtype, causal and strategy "
                             f"must be the same on every CP rank; CP rank(s) {odd} differ from the "
                             f"others: [NH, NKV, DH, dtype, flags] per rank = {meta[:, 3:].tolist()}")
        if strategy == AUTO:
            total_q, total_kv = int(meta[:, 1].sum()), int(meta[:, 2].sum())
            strategy = decide_strategy(total_q, max(total_kv - total_q, 0), cp_size, q.shape[1],
                                       k.shape[1], q.dtype, hardware or default_hardware(q.device)).strategy
        layouts_q = _gather_layout(group, cp_size, q_pos, q_seq, meta[:, 1].tolist())
        layouts_kv = _gather_layout(group, cp_size, kv_pos, kv_seq, meta[:, 2].tolist())
        plan = build_plan(strategy, cp_rank, layouts_q, layouts_kv, causal=causal, scale=scale)
        if plan.strategy == PASS_KV and not plan.empty:
            k, v = _pad(k, plan.kv_len, 0), _pad(v, plan.kv_len, 0)
    plan = plan.to(q.device)
    if plan.strategy == REPLICATED_Q and cp_size > 1 and not plan.empty:
        # The layers compute every rank's rows on each rank; this call holds only its own
        # queries, so it gathers them first, then runs replicated-Q and keeps its rows.
        gathered = torch.empty((cp_size * plan.q_len, *q.shape[1:]), dtype=q.dtype, device=q.device)
        shm_collectives.all_gather_single(gathered, _pad(q, plan.q_len, 0).contiguous(), group)
        out, lse = planned_attention(gathered, k, v, plan, group=group, stats=stats)
        return (out[plan.store_rows], lse[plan.store_rows]) if return_lse else out[plan.store_rows]
    out, lse = planned_attention(q, k, v, plan, group=group, stats=stats)
    return (out, lse) if return_lse else out


def _odd_ranks(rows: list) -> list[int]:
    """Ranks whose row differs from the most common row (rank 0's row on a tie)."""
    counts = [rows.count(r) for r in rows]
    reference = rows[max(range(len(rows)), key=lambda i: (counts[i], -i))]
    return [i for i, r in enumerate(rows) if r != reference]


def _gather_layout(group, size: int, pos: torch.Tensor, seq: torch.Tensor, lengths: list[int]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's (positions, sequence ids), as host tensors, by one all_gather."""
    longest = max(lengths)
    if longest == 0:
        return [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))] * size
    mine = torch.stack([_pad(pos, longest, 0), _pad(seq, longest, -1)])        # [2, longest]
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine, group=group)
    return [(t[0, :n].cpu(), t[1, :n].cpu()) for t, n in zip(every, lengths)]


def planned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *,
                      group=None, stats: Optional[RingStats] = None, need_lse: bool = True
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One layer's attention from the round's plan: kernels and the ring's P2P only.

    Args:
        q: ``[Tq, NH, DH]`` this rank's queries (``plan.rows`` rows: ``plan.num_queries``, or
            for replicated-Q every rank's, the gathered block).
        k, v: ``[Tkv, NKV, DH]`` this rank's KV slots, at least ``plan.sent_kv_len`` of them
            (pass-KV rotates the first ``plan.kv_len``: give it the cache's reserved
            storage, a view, so nothing is padded or copied per layer).
        plan: the round's :class:`AttentionPlan`, index tensors on q's device.
        group: the CP group (size ``plan.cp_size``); None only for CP 1.
        stats: opt-in timing accumulator.
        need_lse: False lets pass-Q and all-gather-Q skip the merged LSE (a layer reads only
            the output); lse is then None for them.

    Returns:
        (out ``[Tq, NH, DH]`` in q's dtype, lse ``[Tq, NH]`` float32, or None without
        ``need_lse`` on pass-Q / all-gather-Q).  A query that sees no key gets out 0 and lse -inf.

    Communication: none for CP 1; N-1 ring exchanges for pass-KV; N-1 ring exchanges and
    one all_to_all for pass-Q; one all_gather and one all_to_all for all-gather-Q; one
    all_gather for replicated-Q (whose ``q`` is the gathered block, ``plan.rows`` rows).  No host
    synchronization.  A decode round of all-gather-Q or of CP 1 attends its whole batch in
    one kernel call (:class:`~cp_megatron.attention.plan.DecodeBatch`).

    Source: arXiv 2411.01783 Alg. 2, Alg. 3, Alg. 4; cp_megatron.attention.decode.
    """
    scale = plan.scale if plan.scale is not None else 1.0 / math.sqrt(q.shape[2])
    tq = q.shape[0]
    if plan.cp_size == 1 and plan.decode is not None and not plan.empty:
        start = stats.mark(q.device) if stats is not None else None
        out, lse = attend_decode_batch(q, k, v, plan.decode, scale)        # the whole batch, one call
        if stats is not None:
            end = stats.mark(q.device)
            stats.add("compute_s", start, end)
            stats.add("ring_s", start, end)
            stats.calls += 1
    elif plan.cp_size == 1 or plan.empty:
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        if plan.cp_size == 1 and not plan.empty:
            start = stats.mark(q.device) if stats is not None else None
            attend_blocks(out, lse, q, k, v, plan.steps[0], scale)
            if stats is not None:       # no ring: all of it is local attention
                end = stats.mark(q.device)
                stats.add("compute_s", start, end)
                stats.add("ring_s", start, end)
                stats.calls += 1
    elif plan.strategy == PASS_KV:   # q packed once (a view of the fused qkv), not per block by the kernels
        out, lse = ring_pass_kv(q.contiguous(), k[:plan.kv_len], v[:plan.kv_len], plan, group=group, scale=scale,
                                stats=stats)
    elif plan.strategy == REPLICATED_Q:   # q: the gathered block, computed on this rank
        out, lse = replicated_q(q, k, v, plan, group=group, scale=scale, stats=stats, need_lse=need_lse)
    elif plan.strategy == ALL_GATHER_Q:
        out, lse = all_gather_q(_pad(q, plan.q_len, 0), k, v, plan, group=group, scale=scale, stats=stats,
                                need_lse=need_lse)
        out, lse = out[:tq], (lse[:tq] if need_lse else None)
    else:
        assert plan.strategy == PASS_Q, plan.strategy
        out, lse = ring_pass_q(_pad(q, plan.q_len, 0), k, v, plan, group=group, scale=scale, stats=stats,
                               need_lse=need_lse)
        out, lse = out[:tq], (lse[:tq] if need_lse else None)
    return out.to(q.dtype), lse
