"""Ring pass-KV: KV blocks rotate, queries stay (Alg. 2).

Each rank keeps its queries and, over N steps, attends them to every rank's KV block
as it passes by, merging partials online by LSE.  N-1 transfers of K and V
``[Tkv, NKV, DH]`` each (with their NKV heads: GQA is never expanded before sending);
positions do not travel, the round plan already knows them; no collective at the end.

Source: arXiv 2411.01783 §3.5.1, Alg. 2.
"""

from __future__ import annotations

import torch

from cp_megatron.attention.blocks import attend_blocks
from cp_megatron.attention.plan import AttentionPlan
from cp_megatron.attention.ring import RingStats, ring_loop


def ring_pass_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *,
                 group, scale: float, stats: RingStats | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel attention by rotating KV.

    Args:
        q: ``[Tq, NH, DH]`` this rank's queries.
        k, v: ``[plan.kv_len, NKV, DH]`` this rank's KV slots, padded to the same length on
            every rank (slots past this rank's valid ones are in no block; a view of the
            cache's reserved storage, so nothing is copied).
        plan: the round's plan (strategy pass-KV).
        group: CP process group (size >= 2).
        scale: softmax scale; stats: optional timing accumulator.

    Returns:
        (out ``[Tq, NH, DH]`` float32, lse ``[Tq, NH]`` float32).
    """
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)

    def step(s: int, blocks) -> None:
        attend_blocks(out, lse, q, blocks[0], blocks[1], plan.steps[s], scale)

    ring_loop(group, (k, v), step, stats)
    return out, lse
