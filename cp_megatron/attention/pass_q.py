"""Ring pass-Q: query blocks rotate, KV stays (Alg. 3); batched decode (Alg. 4).

Each rank keeps its KV and, over N steps, attends every rank's query block to it.  After
the loop rank r holds partial (O, LSE) for every rank's queries: one all_to_all returns
them to their owners (the LSE rides as one extra float32 column next to each row's O),
which merge them (Eq. 4).  The all_to_all is on the critical path; pass-Q wins when few
new tokens meet a large cache, and it is how decode runs: one token per sequence, the
sequence ids known to the round plan (Alg. 4).

Source: arXiv 2411.01783 §3.5.2, Alg. 3, Alg. 4.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_megatron.attention.blocks import attend_blocks
from cp_megatron.attention.merge import merge_partials
from cp_megatron.attention.plan import AttentionPlan
from cp_megatron.attention.ring import RingStats, ring_loop


def ring_pass_q(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *,
                group, scale: float, stats: RingStats | None = None, need_lse: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Context-parallel attention by rotating Q.

    Args:
        q: ``[plan.q_len, NH, DH]`` this rank's queries, padded to the same length on every
            rank (padding rows are in no block).
        k, v: ``[Tkv, NKV, DH]`` this rank's KV slots (any Tkv).
        plan: the round's plan (strategy pass-Q).
        group: CP process group (size N >= 2).
        scale, stats: as in :func:`ring_pass_kv`.
        need_lse: False returns lse None (one op fewer in the merge).

    Returns:
        (out ``[plan.q_len, NH, DH]`` float32, lse ``[plan.q_len, NH]`` float32) for this
        rank's (padded) queries.
    """
    size = dist.get_world_size(group)
    dh = q.shape[2]
    # Partials stay float32 until merged (docs/design.md §6), whatever q's dtype.  Column
    # dh of each row holds its LSE, so one all_to_all carries both.
    partials = torch.zeros((size, *q.shape[:2], dh + 1), dtype=torch.float32, device=q.device)
    partials[..., dh] = float("-inf")

    def step(s: int, blocks) -> None:
        src = (plan.cp_rank - s) % size
        attend_blocks(partials[src, ..., :dh], partials[src, ..., dh], blocks[0], k, v,
                      plan.steps[s], scale)

    ring_loop(group, (q.contiguous(),), step, stats)     # P2P sends packed tensors
    # Return partials to their owners: slot s goes to rank s.
    start = stats.mark(q.device) if stats is not None else None
    owned = torch.empty_like(partials)                                 # [N, Tq, NH, DH + 1]
    dist.all_to_all_single(owned, partials, group=group)
    if stats is not None:
        end = stats.mark(q.device)
        stats.add("all_to_all_s", start, end)
        stats.add("ring_s", start, end)
        stats.sent_bytes += partials.numel() * 4 * (size - 1) // size
    return merge_partials(owned[..., :dh], owned[..., dh], need_lse)
