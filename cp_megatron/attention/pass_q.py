"""Ring pass-Q: query blocks rotate, KV stays (Alg. 3).

Each rank keeps its KV and, over N steps, attends every rank's query block to it.  After
the loop rank r holds partial (O, LSE) for every rank's queries: one all_to_all of O
and one of LSE returns them to their owners, which merge them (Eq. 4).  The all_to_all
is on the critical path; pass-Q wins when few new tokens meet a large cache.

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
    # Partials stay float32 until merged (DESIGN §5), whatever q's dtype.
    partial_out = torch.empty((size, *q.shape), dtype=torch.float32, device=q.device)  # [N, Tq, NH, DH]
    partial_lse = torch.empty((size, *q.shape[:2]), dtype=torch.float32, device=q.device)
    meta = torch.stack([q_pos, q_seq]).to(device=q.device, dtype=torch.long)       # [2, Tq]

    def step(src: int, blocks) -> None:
        q_block, meta_block = blocks
        attn = LocalAttention(q_block, meta_block[0], meta_block[1], scale=scale, causal=causal)
        attn.add(k, v, kv_pos, kv_seq)
        partial_out[src] = attn.out
        partial_lse[src] = attn.lse

    ring_loop(group, (q, meta), step, stats)
    # Return partials to their owners: slot s of partial_* goes to rank s.
    start = time.perf_counter()
    owned_out, owned_lse = torch.empty_like(partial_out), torch.empty_like(partial_lse)
    dist.all_to_all_single(owned_out, partial_out, group=group)
    dist.all_to_all_single(owned_lse, partial_lse, group=group)
    if stats is not None:
        stats.all_to_all_s += time.perf_counter() - start
        stats.ring_s += time.perf_counter() - start
        stats.sent_bytes += (partial_out.numel() * partial_out.element_size()
                             + partial_lse.numel() * 4) * (size - 1) // size
    return merge_partials(owned_out, owned_lse)
