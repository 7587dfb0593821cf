"""Ring pass-Q: query blocks rotate, KV stays (Alg. 3).

Each rank keeps its KV and, over N steps, attends every rank's query block to it.  After
the loop rank r holds partial (O, LSE) for every rank's queries: one all_to_all returns
them to their owners (the LSE rides as one extra float32 column next to each row's O),
which merge them (Eq. 4).  The all_to_all is on the critical path; pass-Q wins when few
new tokens meet a large cache.

Source: arXiv 2411.01783 §3.5.2, Alg. 3.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from cp_megatron.attention.blocks import LocalAttention
from cp_megatron.attention.merge import merge_partials
from cp_megatron.attention.ring import RingStats, ring_loop


def ring_pass_q(q: torch.Tensor, q_pos: torch.Tensor, q_seq: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, kv_pos: torch.Tensor, kv_seq: torch.Tensor,
                *, group, scale: float, causal: bool, stats: RingStats | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel attention by rotating Q.

    Args:
        q: ``[Tq, NH, DH]`` this rank's queries, padded to the same Tq on every rank;
            q_pos / q_seq int64 ``[Tq]``, seq -1 on padding.
        k, v: ``[Tkv, NKV, DH]`` this rank's keys/values (any Tkv); kv_pos / kv_seq ``[Tkv]``.
        group: CP process group (size N >= 2).
        scale, causal, stats: as in :func:`ring_pass_kv`.

    Returns:
        (out ``[Tq, NH, DH]`` float32, lse ``[Tq, NH]`` float32) for this rank's queries.
    """
    size = dist.get_world_size(group)
    dh = q.shape[2]
    # Partials stay float32 until merged (docs/design.md §6), whatever q's dtype.  Column dh of
    # each row holds its LSE, so one all_to_all carries both.
    partials = torch.empty((size, *q.shape[:2], dh + 1), dtype=torch.float32, device=q.device)
    meta = torch.stack([q_pos, q_seq]).to(device=q.device, dtype=torch.long)       # [2, Tq]

    def step(src: int, blocks) -> None:
        q_block, meta_block = blocks
        attn = LocalAttention(q_block, meta_block[0], meta_block[1], scale=scale, causal=causal)
        attn.add(k, v, kv_pos, kv_seq)
        partials[src, ..., :dh] = attn.out
        partials[src, ..., dh] = attn.lse

    ring_loop(group, (q, meta), step, stats)
    # Return partials to their owners: slot s goes to rank s.
    start = time.perf_counter()
    owned = torch.empty_like(partials)                                 # [N, Tq, NH, DH + 1]
    dist.all_to_all_single(owned, partials, group=group)
    if stats is not None:
        stats.all_to_all_s += time.perf_counter() - start
        stats.ring_s += time.perf_counter() - start
        stats.sent_bytes += partials.numel() * 4 * (size - 1) // size
    return merge_partials(owned[..., :dh], owned[..., dh])
