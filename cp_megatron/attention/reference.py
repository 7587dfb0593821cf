"""Float64 reference attention on unsharded inputs, for tests only.

Applies the visibility rule of docs/design.md §2 directly: kv token j is visible to query
token i iff seq(j) == seq(i) and (not causal or pos(j) <= pos(i)).  Loops over heads
so a [T, T] float64 score matrix is the largest temporary.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        q_pos: torch.Tensor, kv_pos: torch.Tensor,
                        q_seq: Optional[torch.Tensor] = None, kv_seq: Optional[torch.Tensor] = None,
                        causal: bool = True, softmax_scale: Optional[float] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in float64.

    Args:
        q: ``[Tq, NH, DH]``; k, v: ``[Tkv, NKV, DH]`` (NH a multiple of NKV).
        q_pos, kv_pos: int64 ``[Tq]`` / ``[Tkv]`` global positions.
        q_seq, kv_seq: int ``[Tq]`` / ``[Tkv]`` sequence ids (None: one sequence).
        causal: apply pos(j) <= pos(i).
        softmax_scale: default 1/sqrt(DH).

    Returns:
        (out ``[Tq, NH, DH]`` float64, lse ``[Tq, NH]`` float64); rows with no visible key
        get out 0 and lse -inf.
    """
    tq, nh, dh = q.shape
    nkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dh)
    if q_seq is None:
        q_seq = torch.zeros(tq, dtype=torch.long)
    if kv_seq is None:
        kv_seq = torch.zeros(k.shape[0], dtype=torch.long)
    visible = q_seq[:, None] == kv_seq[None, :]                   # [Tq, Tkv]
    if causal:
        visible &= kv_pos[None, :] <= q_pos[:, None]
    out = torch.zeros(tq, nh, dh, dtype=torch.float64)
    lse = torch.full((tq, nh), float("-inf"), dtype=torch.float64)
    any_visible = visible.any(dim=1)                              # [Tq]
    for h in range(nh):
        kh = k[:, h // (nh // nkv)].double()
        vh = v[:, h // (nh // nkv)].double()
        scores = (q[:, h].double() @ kh.T) * scale                # [Tq, Tkv]
        scores = scores.masked_fill(~visible, float("-inf"))
        lse_h = torch.logsumexp(scores, dim=1)                    # [Tq]
        probs = torch.exp(scores - torch.where(any_visible, lse_h, 0.0)[:, None])
        out[:, h] = torch.where(any_visible[:, None], probs @ vh, 0.0)
        lse[:, h] = torch.where(any_visible, lse_h, float("-inf"))
    return out, lse
