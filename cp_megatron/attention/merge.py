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


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial results of the same query rows.

    Args:
        outs: ``[S, *rows, DH]`` partial outputs, any float dtype.
        lses: ``[S, *rows]`` partial LSEs (natural log), -inf for "no visible key".

    Returns:
        (out ``[*rows, DH]`` float32, lse ``[*rows]`` float32).
    """
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)                            # [*rows], -inf: no key anywhere
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lses - lse_safe)                          # [S, *rows], exponents <= 0
    out = (outs.float() * weights.unsqueeze(-1)).sum(dim=0)       # rows with no key: 0
    return out, lse


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor) -> None:
    """Merge one partial into a running accumulator, in place (online form of Eq. 4).

    Args:
        acc_out: ``[*rows, DH]`` float32 accumulator, updated in place.
        acc_lse: ``[*rows]`` float32 accumulator, updated in place.
        out: ``[*rows, DH]`` partial output (any float dtype).
        lse: ``[*rows]`` partial LSE (-inf where the partial saw no key).
    """
    lse = lse.float()
    # No host sync: no "is the accumulator empty" test; exp(-inf - m) = 0 does the work.
    m = torch.maximum(acc_lse, lse)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_acc, w_new = torch.exp(acc_lse - m_safe), torch.exp(lse - m_safe)   # exponents <= 0
    denom = w_acc + w_new
    has_keys = denom > 0
    inv = torch.where(has_keys, 1.0 / denom.clamp_min(1e-30), torch.zeros_like(denom))
    acc_out.mul_((w_acc * inv).unsqueeze(-1)).add_(out.float() * (w_new * inv).unsqueeze(-1))
    acc_lse.copy_(torch.where(has_keys, m_safe + torch.log(denom.clamp_min(1e-30)),
                              torch.full_like(m, NEG_INF)))
