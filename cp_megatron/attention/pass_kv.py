"""Ring pass-KV: KV blocks rotate, queries stay (Alg. 2).

Each rank keeps its queries and, over N steps, attends them to every rank's KV block
as it passes by, merging partials online by LSE.  N-1 transfers of
``[2, Tkv, NKV, DH]`` (K and V with their NKV heads: GQA is never expanded before
sending) plus positions; no collective at the end.

Source: arXiv 2411.01783 §3.5.1, Alg. 2.
"""

from __future__ import annotations

import torch

from cp_megatron.attention.blocks import LocalAttention
from cp_megatron.attention.ring import RingStats, ring_loop


def ring_pass_kv(q: torch.Tensor, q_pos: torch.Tensor, q_seq: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, kv_pos: torch.Tensor, kv_seq: torch.Tensor,
                 *, group, scale: float, causal: bool, stats: RingStats | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel attention by rotating KV.

    Args:
        q: ``[Tq, NH, DH]`` this rank's queries (any Tq); q_pos / q_seq int64 ``[Tq]``.
        k, v: ``[Tkv, NKV, DH]`` this rank's keys/values, padded to the same Tkv on
            every rank; kv_pos / kv_seq int64 ``[Tkv]``, seq -1 on padding.
        group: CP process group (size >= 2).
        scale: softmax scale; causal: pos(j) <= pos(i) rule.
        stats: optional timing accumulator.

    Returns:
        (out ``[Tq, NH, DH]`` float32, lse ``[Tq, NH]`` float32).
    """
    attn = LocalAttention(q, q_pos, q_seq, scale=scale, causal=causal)
    kv = torch.stack([k, v])                                      # [2, Tkv, NKV, DH]
    meta = torch.stack([kv_pos, kv_seq]).to(device=k.device, dtype=torch.long)  # [2, Tkv]

    def step(_src: int, blocks) -> None:
        kv_block, meta_block = blocks
        attn.add(kv_block[0], kv_block[1], meta_block[0], meta_block[1])

    ring_loop(group, (kv, meta), step, stats)
    return attn.out, attn.lse
