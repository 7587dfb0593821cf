"""Running the planned blocks of one ring step: kernels, then the online LSE merge.

The plan (plan.py) names, for each ring step, which rows of the query block in hand
meet which slots of the KV block in hand, and whether the block is square causal.  Here
each block is one kernel call (kernels.py) and one in-place merge (Eq. 4) into float32
accumulators -- or a copy, for the first block to write its rows (the plan knows which).  Only device work: slices are views, index tensors are already on the
device, nothing is read back to the host.

Source: arXiv 2411.01783 §3.4 (Eq. 4); docs/design.md §4–§6.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cp_megatron.attention.kernels import attention_with_lse
from cp_megatron.attention.merge import merge_into_seen
from cp_megatron.attention.plan import Block


def _select(t: torch.Tensor, kv) -> torch.Tensor:
    return t[kv] if isinstance(kv, slice) else t.index_select(0, kv)


def attend_blocks(acc_out: torch.Tensor, acc_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, blocks: Sequence[Block], scale: float) -> None:
    """Attend query rows to KV slots block by block and merge into the accumulators.

    Args:
        acc_out: ``[Tq, NH, DH]`` float32 accumulator (a view is fine), updated in place.
        acc_lse: ``[Tq, NH]`` float32 accumulator, -inf where nothing was seen yet.
        q: ``[Tq, NH, DH]`` the query block in hand; k, v: ``[Tkv, NKV, DH]`` the KV block.
        blocks: the plan's blocks for this pair of blocks.
        scale: softmax scale.
    """
    for b in blocks:
        out, lse = attention_with_lse(q[b.q0:b.q1], _select(k, b.kv), _select(v, b.kv),
                                      scale=scale, is_causal=b.causal)
        if b.first:     # nothing to merge with yet: every row of a block sees a key
            acc_out[b.q0:b.q1].copy_(out)
            acc_lse[b.q0:b.q1].copy_(lse)
        else:
            # every row of a block sees a key and was written before: both LSEs finite
            merge_into_seen(acc_out[b.q0:b.q1], acc_lse[b.q0:b.q1], out.float(), lse)
