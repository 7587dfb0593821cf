"""Merging partial attention results by their log-sum-exp (Eq. 4).

Pure maths on tensors: no torch.distributed, no megatron.

For partials (O_s, LSE_s) of one query row, with m = max_s LSE_s:

    O   = sum_s O_s * exp(LSE_s - m) / sum_s exp(LSE_s - m)
    LSE = m + log sum_s exp(LSE_s - m)

Computed in float32 whatever the input dtype.  A partial with no visible key is
(O = 0, LSE = -inf) and weighs nothing; merging only such partials gives (0, -inf),
never NaN.  No large positive difference is ever exponentiated (all exponents <= 0).

Source: Yang et al., arXiv 2411.01783, §3.4, Eq. 4 (xFormers ``merge_attentions``).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, need_lse: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge S partial results of the same query rows, all at once (S >= 1).

    Four ops whatever S (logsumexp; the weights exp(LSE_s - LSE) as one softmax over S, with
    the all -inf rows' NaN zeroed; one batched matmul): no temporary per partial.

    Args:
        outs: ``[S, *rows, DH]`` partial outputs, any float dtype.
        lses: ``[S, *rows]`` partial LSEs (natural log), -inf for "no visible key".
        need_lse: False skips the merged LSE (a layer's forward reads only O): three ops.

    Returns:
        (out ``[*rows, DH]`` float32, lse ``[*rows]`` float32 or None without ``need_lse``).
    """
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0) if need_lse else None     # [*rows], -inf: no key anywhere
    weights = torch.softmax(lses, dim=0).nan_to_num_(nan=0.0)     # [S, *rows]; no key anywhere: 0
    s, dh = outs.shape[0], outs.shape[-1]
    out = torch.bmm(weights.reshape(s, -1).t().unsqueeze(1),     # [rows, 1, S] @ [rows, S, DH]
                    outs.float().reshape(s, -1, dh).transpose(0, 1))
    return out.view(outs.shape[1:]), lse


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor) -> None:
    """Merge one partial into a running accumulator, in place (online form of Eq. 4).

    Any LSE may be -inf (a partial, or the accumulator, that saw no key).

    Args:
        acc_out: ``[*rows, DH]`` float32 accumulator, updated in place.
        acc_lse: ``[*rows]`` float32 accumulator, updated in place.
        out: ``[*rows, DH]`` partial output (any float dtype).
        lse: ``[*rows]`` partial LSE (-inf where the partial saw no key).
    """
    lse = lse.float()
    # No host sync: no "is the accumulator empty" test; exp(-inf - m) = 0 does the work.
    m = torch.logaddexp(acc_lse, lse)                            # -inf only where both are
    m_safe = m.nan_to_num(neginf=0.0)
    acc_out.mul_(torch.exp(acc_lse - m_safe).unsqueeze(-1))      # exponents <= 0
    acc_out.addcmul_(out, torch.exp(lse - m_safe).unsqueeze(-1))
    acc_lse.copy_(m)


def merge_into_seen(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor) -> None:
    """:func:`merge_into` where both sides saw keys (every LSE finite): four ops.

    The round plan guarantees it for the blocks it merges (every row of a block sees a key,
    and an accumulator row is first written by a copy), so the ring's merges use this form:
    with d = LSE_new - LSE_acc, the new partial's weight is sigmoid(d) (Eq. 4 for two
    partials), O = lerp(O_acc, O_new, sigmoid(d)) and LSE = logaddexp(LSE_acc, LSE_new).

    Args: as :func:`merge_into`; ``out`` float32 (the accumulator's dtype, for ``lerp``).
    """
    weight = torch.sigmoid(lse - acc_lse).unsqueeze(-1)
    acc_out.lerp_(out, weight)
    torch.logaddexp(acc_lse, lse, out=acc_lse)
