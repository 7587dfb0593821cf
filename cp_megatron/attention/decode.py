"""All-gather-Q: the queries reach every rank by one all_gather, not around the ring.

For a round that pass-Q runs (decode above all), each rank

1. all-gathers the query blocks of every rank (``[N * q_len, NH, DH]``: a few KB per layer
   in decode), one collective;
2. attends all of them to its own KV shard: for decode one kernel call for the whole batch
   (:class:`~cp_megatron.attention.plan.DecodeBatch`: a view for batch 1, else one gather
   of each row's slots and one batched kernel), otherwise the plan's blocks;
3. returns the partial (O, LSE) of rank r's queries to rank r with one all_to_all (the
   LSE rides as one extra float32 column, as in pass-Q);
4. merges the N partials of its own queries (Eq. 4) in one call.

Two collectives per layer whatever N, against pass-Q's N-1 ring exchanges and an
all_to_all (Alg. 4): the round plan chooses by
:func:`~cp_megatron.attention.heuristic.choose_query_exchange`.  The partials and their
merge are pass-Q's, so the two give the same tokens.  On one CPU machine both collectives go
through shared memory where :mod:`cp_megatron.shm_collectives` enabled it (gloo otherwise).

:func:`replicated_q` is the variant with one collective: every rank computed the gathered block
itself (the layers run all ranks' rows on every rank), so it attends them, all-gathers the packed
partials and merges all rows locally.

Source: arXiv 2411.01783 §3.5.2 (Alg. 3, Alg. 4: the partials and their all_to_all);
vLLM decode context parallelism (all-gather Q, one all-to-all of O and LSE); TRT-LLM Helix.
"""

from __future__ import annotations

import torch

from cp_megatron import shm_collectives as collectives
from cp_megatron.attention.blocks import attend_blocks
from cp_megatron.attention.kernels import (attention_with_lse, batched_decode_attention, masked_decode_attention,
                                           varlen_decode_attention)
from cp_megatron.attention.merge import merge_partials
from cp_megatron.attention.plan import AttentionPlan, DecodeBatch
from cp_megatron.attention.ring import RingStats


def attend_decode_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: DecodeBatch, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of ``q`` ``[R, NH, DH]`` against its slots of ``k``, ``v`` ``[S, NKV, DH]``, as the
    :class:`DecodeBatch` says; returns (out ``[R, NH, DH]`` float32 or q's dtype, lse ``[R, NH]``
    float32), (0, -inf) for rows without keys here.  Batch 1 ("slice") is one call of the kernel
    adapter on a view of the cache (flash attention on CUDA, the math kernel on CPU).

    The static decode step's modes ("lengths", "masked") attend every row to the view
    ``[0, batch.kv_len)`` of ``k``, ``v``: aten's varlen flash kernel with per-row lengths, or
    the math kernel with the step's mask (:class:`DecodeBatch`); one kernel call either way."""
    if batch.static:
        k, v = k[:batch.kv_len], v[:batch.kv_len]
        if batch.kernel == "aten._flash_attention_forward":
            return varlen_decode_attention(q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.lengths,
                                           scale=scale, empty_rows=batch.empty_rows)
        return masked_decode_attention(q, k, v, batch.hidden, scale=scale)
    if batch.mode == "slice":
        return attention_with_lse(q, k[batch.kv], v[batch.kv], scale=scale)
    if batch.mode == "empty":
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        return out, torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    return batched_decode_attention(q, k, v, batch.kv_index, batch.head_bias(k.shape[1]), scale=scale)


def gathered_partials(gathered: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                      scale: float) -> torch.Tensor:
    """Every rank's query rows against this rank's KV shard, packed for the exchange.

    Args:
        gathered: ``[N * q_len, NH, DH]`` the gathered block (rank-major, padding rows included).
        k, v: ``[Tkv, NKV, DH]`` this rank's KV slots; plan: the round's plan (all-gather-Q or
            replicated-Q); scale: softmax scale.

    Returns:
        float32 ``[N * q_len, NH, DH + 1]``: each row's partial O, its LSE in the last column
        ((0, -inf) for rows without keys here).  A decode round is one kernel call
        (:func:`attend_decode_batch`); a forced prefill round runs the plan's blocks, step by step.
    """
    size, q_len, dh = plan.cp_size, plan.q_len, gathered.shape[2]
    if plan.decode is not None:
        out, lse = attend_decode_batch(gathered, k, v, plan.decode, scale)
        return torch.cat([out, lse.unsqueeze(-1)], dim=-1)                 # float32 (promotes)
    partials = torch.zeros((size * q_len, gathered.shape[1], dh + 1), dtype=torch.float32, device=gathered.device)
    partials[..., dh] = float("-inf")
    for s, blocks in enumerate(plan.steps):
        src = (plan.cp_rank - s) % size
        rows = slice(src * q_len, (src + 1) * q_len)
        attend_blocks(partials[rows, :, :dh], partials[rows, :, dh], gathered[rows], k, v, blocks, scale)
    return partials


def all_gather_q(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, group,
                 scale: float, stats: RingStats | None = None, need_lse: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context-parallel attention by all-gathering the queries (module doc).

    Args:
        q: ``[plan.q_len, NH, DH]`` this rank's queries, padded to the same length on every
            rank (padding rows are in no block).
        k, v: ``[Tkv, NKV, DH]`` this rank's KV slots.
        plan: the round's plan (strategy all-gather-q).
        group: CP process group (size N >= 2).
        scale: softmax scale; stats: optional timing accumulator (the all_gather and the
            all_to_all count as exposed communication); need_lse: False returns lse None.

    Returns:
        (out ``[plan.q_len, NH, DH]`` float32, lse ``[plan.q_len, NH]`` float32).

    Communication: one all_gather (``all_gather_single``) and one ``all_to_all_single``
    (:mod:`cp_megatron.shm_collectives`: torch.distributed, or shared memory on one CPU machine).
    """
    size, dh = plan.cp_size, q.shape[2]
    device = q.device
    t0 = stats.mark(device) if stats is not None else None
    gathered = torch.empty((size * q.shape[0], *q.shape[1:]), dtype=q.dtype, device=device)
    collectives.all_gather_single(gathered, q.contiguous(), group)              # [N * q_len, NH, DH]
    t1 = stats.mark(device) if stats is not None else None
    partials = gathered_partials(gathered, k, v, plan, scale)                  # [N * q_len, NH, DH + 1] float32
    t2 = stats.mark(device) if stats is not None else None
    owned = torch.empty_like(partials)                                          # [N, q_len, NH, DH + 1]
    collectives.all_to_all_single(owned, partials, group)
    if stats is not None:
        t3 = stats.mark(device)
        stats.add("compute_s", t1, t2)
        stats.add("all_to_all_s", t2, t3)
        stats.add("ring_s", t0, t3)
        stats.sent_bytes += (q.numel() * q.element_size() + partials.numel() * 4 // size) * (size - 1)
        stats.calls += 1
    owned = owned.view(size, q.shape[0], q.shape[1], dh + 1)
    return merge_partials(owned[..., :dh], owned[..., dh], need_lse)


def replicated_q(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, group,
                 scale: float, stats: RingStats | None = None, need_lse: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context-parallel attention of the gathered block that every rank computed itself
    (replicated-Q, :mod:`~cp_megatron.attention.heuristic`): no query exchange, one all_gather
    of the packed partials, which every rank merges.

    Args:
        q: ``[plan.rows, NH, DH]`` = ``[N * q_len, NH, DH]`` the queries of every rank's rows
            (rank-major, padding rows included), the same on every rank.
        k, v: ``[Tkv, NKV, DH]`` this rank's KV slots (this round's own rows already stored).
        plan: the round's plan (strategy replicated-q).
        group: CP process group (size N >= 2).
        scale, stats, need_lse: as :func:`all_gather_q`.

    Returns:
        (out ``[N * q_len, NH, DH]`` float32, lse ``[N * q_len, NH]`` float32 or None), the same
        on every rank: the exact attention of every row over all ranks' KV (Eq. 4).

    Communication: one ``all_gather_single`` of ``[N * q_len, NH, DH + 1]`` float32.
    """
    size, dh = plan.cp_size, q.shape[2]
    device = q.device
    t0 = stats.mark(device) if stats is not None else None
    partials = gathered_partials(q, k, v, plan, scale)                         # [N * q_len, NH, DH + 1]
    t1 = stats.mark(device) if stats is not None else None
    every = torch.empty((size * partials.shape[0], *partials.shape[1:]), dtype=partials.dtype, device=device)
    collectives.all_gather_single(every, partials, group)                       # [N * N * q_len, NH, DH + 1]
    every = every.view(size, *partials.shape)
    if stats is not None:
        t2 = stats.mark(device)
        stats.add("compute_s", t0, t1)
        stats.add("all_to_all_s", t1, t2)
        stats.add("ring_s", t0, t2)
        stats.sent_bytes += partials.numel() * 4 * (size - 1)
        stats.calls += 1
    return merge_partials(every[..., :dh], every[..., dh], need_lse)
