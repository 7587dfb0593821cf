"""The single adapter over local attention kernels that return the LSE.

Every ring step computes attention of a query block against a KV block and needs the
log-sum-exp of each query row to merge partials (Eq. 4).  This module hides which
kernel does it:

| device | kernel |
|---|---|
| CPU  | ``aten._scaled_dot_product_flash_attention_for_cpu`` (GQA native, LSE float32) |
| CUDA | ``flash_attn.flash_attn_func(return_attn_probs=True)`` when flash-attn is installed and no mask is needed; otherwise ``aten._scaled_dot_product_efficient_attention(compute_log_sumexp=True)`` |

Optional imports (flash-attn) are guarded here and nowhere else.

Source: docs/design.md §5; flash-attn ``flash_attn_interface.py``; PyTorch ``aten/native/transformers``.
"""

from __future__ import annotations

from typing import Optional

import torch

try:  # optional CUDA kernel; never required
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build of flash-attn
    _flash_attn_func = None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                       is_causal: bool = False, mask: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query block against one KV block, with the LSE of each row.

    Args:
        q: ``[Tq, NH, DH]``; k, v: ``[Tkv, NKV, DH]``, NH a multiple of NKV, same dtype.
        scale: softmax scale (usually 1/sqrt(DH)).
        is_causal: square causal block (Tq == Tkv, same positions): top-left aligned.
        mask: optional bool ``[Tq, Tkv]``, True = visible (small/irregular blocks only).

    Returns:
        (out ``[Tq, NH, DH]`` in q's dtype, lse ``[Tq, NH]`` float32, natural log).
        Rows that see no key get out 0 and lse -inf.
    """
    if is_causal and mask is not None:
        raise ValueError("attention_with_lse: pass either is_causal or mask, not both")
    if q.is_cuda:
        return _cuda_attention(q, k, v, scale, is_causal, mask)
    return _cpu_attention(q, k, v, scale, is_causal, mask)


def _fix_empty_rows(out: torch.Tensor, lse: torch.Tensor, mask: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose mask has no True get (0, -inf): kernels report lse 0 or NaN there."""
    if mask is None:
        return out, lse
    empty = ~mask.any(dim=1)                                      # [Tq]
    if not bool(empty.any()):
        return out, lse
    out = out.masked_fill(empty[:, None, None], 0.0)
    lse = lse.masked_fill(empty[:, None], float("-inf"))
    return out, lse


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [Tq, Tkv] -> additive [1, 1, Tq, Tkv] with 0 / -inf in the kernel's dtype."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))[None, None]


def _cpu_attention(q, k, v, scale, is_causal, mask):
    # aten wants [B, H, S, D]; [T, H, D] -> [1, H, T, D] is a view.
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    attn_mask = None if mask is None else _additive_mask(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qb, kb, vb, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[:2]
    out = out[0].transpose(0, 1)                                  # [Tq, NH, DH]
    lse = lse[0].transpose(0, 1).float()                          # [Tq, NH]
    return _fix_empty_rows(out, lse, mask)


def _cuda_attention(q, k, v, scale, is_causal, mask):
    if _flash_attn_func is not None and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn: [B, S, H, D]; GQA native; causal is bottom-right aligned, which equals
        # top-left for the square blocks we pass.
        out, lse, _ = _flash_attn_func(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                       softmax_scale=scale, causal=is_causal,
                                       return_attn_probs=True)
        return out[0], lse[0].transpose(0, 1).float()
    group = q.shape[1] // k.shape[1]
    if group > 1:  # the efficient kernel has no GQA: expand locally (never before sending)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    attn_bias = None if mask is None else _additive_mask(mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        qb, kb, vb, attn_bias, True, 0.0, is_causal, scale=scale)[:2]
    out = out[0].transpose(0, 1)
    lse = lse[0, :, : q.shape[0]].transpose(0, 1).float()          # lse may be padded
    return _fix_empty_rows(out, lse, mask)
