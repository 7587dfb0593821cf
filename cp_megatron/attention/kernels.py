"""The single adapter over local attention kernels that return the LSE.

Every ring step attends a query block to a KV block and needs the log-sum-exp of each
query row to merge partials (Eq. 4).  The round plan (plan.py) only ever asks for two
kinds of block, so no kernel here is handed a mask:

* a *plain* block: every query sees every key (Tq and Tkv arbitrary, decode: Tq = 1);
* a *square causal* block: Tq == Tkv, the same positions on both sides (top-left).

Which kernel runs:

| device | dtype, shape | kernel |
|---|---|---|
| CPU | plain block of at most 16 queries (decode) | :func:`math_attention` (2x faster than the flash kernel for one query against 4K keys) |
| CPU | any other block | ``aten._scaled_dot_product_flash_attention_for_cpu`` (GQA native, LSE float32) |
| CUDA | fp16 / bf16, flash-attn installed | ``flash_attn_func(..., return_attn_probs=True)`` (GQA native) |
| CUDA | fp16 / bf16, DH % 8 == 0, DH <= 256 | ``aten._scaled_dot_product_flash_attention`` (GQA native) |
| CUDA | float32, DH % 4 == 0 | ``aten._scaled_dot_product_efficient_attention``, no bias, KV heads expanded locally |
| any | anything else (float64, odd DH) | :func:`math_attention` (matmul + logsumexp, GQA by reshape) |

The static decode step (issue #22; :mod:`cp_megatron.decode_step`) has two kernels of its own,
with shapes fixed by its buckets: :func:`varlen_decode_attention` (CUDA fp16 / bf16, the cache
holding one sequence: aten's varlen flash kernel with per-row ``seqused_k``, no mask) and
:func:`masked_decode_attention` (every other case: matmuls with a boolean mask of the step's few
query rows, computed once per step on the device); :func:`decode_kernel_name` picks.

Kernel constraints honoured: causal is only requested for square blocks (flash-attn
aligns causal masks bottom-right, aten's kernels top-left: identical when Tq == Tkv, and
asserted); inputs are made contiguous in the last dimension; the efficient kernel's LSE
is padded to a multiple of 32 rows and is sliced back.  On CUDA the aten kernels have
not yet been run by this project on a GPU (see docs/performance.md, "GPU status").

Source: docs/design.md §5; flash-attn ``flash_attn_interface.py``; PyTorch
``aten/src/ATen/native/transformers/attention.cpp`` and ``sdp_utils.cpp``.
"""

from __future__ import annotations

import torch

try:  # optional CUDA kernel; never required
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build of flash-attn
    _flash_attn_func = None

_HALF = (torch.float16, torch.bfloat16)
# On CPU, plain blocks with at most this many queries (decode tokens) use math_attention.
CPU_MATH_MAX_QUERIES = 16


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                       is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query block against one KV block, with the LSE of each row.

    Args:
        q: ``[Tq, NH, DH]``; k, v: ``[Tkv, NKV, DH]``, NH a multiple of NKV, same dtype.
        scale: softmax scale (usually 1/sqrt(DH)).
        is_causal: square causal block (Tq == Tkv, same positions): query i sees keys <= i.

    Returns:
        (out ``[Tq, NH, DH]`` in q's dtype, lse ``[Tq, NH]`` float32, natural log).

    Raises:
        ValueError: ``is_causal`` with Tq != Tkv (no kernel here agrees on that alignment).
    """
    if is_causal and q.shape[0] != k.shape[0]:
        raise ValueError(f"attention_with_lse: a causal block must be square, got Tq={q.shape[0]}, "
                         f"Tkv={k.shape[0]}")
    if not q.is_cuda:
        if not is_causal and q.shape[0] <= CPU_MATH_MAX_QUERIES:
            return math_attention(q, k, v, scale=scale)
        return _cpu_attention(q, k, v, scale, is_causal)
    dh = q.shape[2]
    if q.dtype in _HALF and _flash_attn_func is not None:
        return _flash_attn(q, k, v, scale, is_causal)
    if q.dtype in _HALF and dh % 8 == 0 and dh <= 256:
        return _aten_flash(q, k, v, scale, is_causal)
    if q.dtype == torch.float32 and dh % 4 == 0:
        return _aten_efficient(q, k, v, scale, is_causal)
    return math_attention(q, k, v, scale=scale, is_causal=is_causal)


def kernel_name(device_type: str, dtype: torch.dtype, head_dim: int, num_queries: int = 1024,
                is_causal: bool = False) -> str:
    """The kernel :func:`attention_with_lse` uses for a device type, dtype, head dim and block."""
    if device_type != "cuda":
        if not is_causal and num_queries <= CPU_MATH_MAX_QUERIES:
            return "math_attention"
        return "aten._scaled_dot_product_flash_attention_for_cpu"
    if dtype in _HALF and _flash_attn_func is not None:
        return "flash_attn.flash_attn_func"
    if dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256:
        return "aten._scaled_dot_product_flash_attention"
    if dtype == torch.float32 and head_dim % 4 == 0:
        return "aten._scaled_dot_product_efficient_attention"
    return "math_attention"


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    """``[T, H, D]`` -> ``[1, H, T, D]`` (a view)."""
    return t.transpose(0, 1).unsqueeze(0)


def _cpu_attention(q, k, v, scale, is_causal):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, is_causal, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()


def _flash_attn(q, k, v, scale, is_causal):
    # flash-attn: [B, S, H, D], GQA native.  Causal is bottom-right aligned (flash-attn
    # >= 2.1), which equals top-left for the square blocks checked above.
    out, lse, _ = _flash_attn_func(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                   softmax_scale=scale, causal=is_causal, return_attn_probs=True)
    return out[0], lse[0].transpose(0, 1).float()


def _aten_flash(q, k, v, scale, is_causal):
    # aten flash (FlashAttention-2 inside PyTorch): [B, H, S, D], fp16/bf16, DH <= 256 and
    # a multiple of 8, KV heads may divide the query heads (GQA native, as SDPA's enable_gqa).
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhsd(q.contiguous()), _bhsd(k.contiguous()), _bhsd(v.contiguous()), 0.0, is_causal,
        False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()


def _aten_efficient(q, k, v, scale, is_causal):
    group = q.shape[1] // k.shape[1]
    if group > 1:  # this kernel has no GQA: expand locally (never before sending)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhsd(q.contiguous()), _bhsd(k.contiguous()), _bhsd(v.contiguous()), None, True, 0.0,
        is_causal, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0, :, : q.shape[0]].transpose(0, 1).float()


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch attention with LSE, valid on every device and dtype (float32 math;
    float64 for float64 inputs).

    GQA by reshaping the query heads into ``[NKV, group * Tq]`` (K/V never expanded).
    Memory is ``NH * Tq * Tkv`` float32 scores: for small blocks only.

    Args, Returns: as :func:`attention_with_lse`.
    """
    tq, nh, dh = q.shape
    tkv, nkv = k.shape[0], k.shape[1]
    group = nh // nkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).reshape(tq, nkv, group, dh).permute(1, 2, 0, 3).reshape(nkv, group * tq, dh)
    scores = torch.bmm(qg, k.to(acc).permute(1, 2, 0)) * scale        # [NKV, group*Tq, Tkv]
    if is_causal:
        rows = torch.arange(tq, device=q.device).repeat(group)          # query index per row
        cols = torch.arange(tkv, device=q.device)
        scores = scores.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                # [NKV, group*Tq]
    out = torch.bmm(torch.exp(scores - lse.unsqueeze(-1)), v.to(acc).transpose(0, 1))
    out = out.reshape(nkv, group, tq, dh).permute(2, 0, 1, 3).reshape(tq, nh, dh)
    lse = lse.reshape(nkv, group, tq).permute(2, 0, 1).reshape(tq, nh)
    return out.to(q.dtype), lse.float()


def batched_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                             head_bias: torch.Tensor, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query row against its own KV slots, in one batched call (decode).

    Args:
        q: ``[R, NH, DH]`` one query row per sequence (padding rows allowed).
        k, v: ``[S, NKV, DH]`` this rank's KV slots (the cache's storage, a view).
        kv_index: int64 ``[R, L]`` the slots of each row (padded with any valid slot).
        head_bias: float32 ``[NKV * R, 1, L]``, 0 for a real slot and -inf for padding,
            KV-head-major (:meth:`~cp_megatron.attention.plan.DecodeBatch.head_bias`).
        scale: softmax scale.

    Returns:
        (out ``[R, NH, DH]`` float32, lse ``[R, NH]`` float32); a row without keys gets
        (0, -inf).

    Ten ops whatever R: two gathers (K and V, KV-head-major, so the batched matmuls read them
    packed), the scores with their bias in one ``baddbmm``, logsumexp, exp, one ``bmm`` and
    the layout copies of q and the output.  GQA by grouping the query heads of each KV head
    (K/V never expanded).  On CUDA the fused alternative is flash-attn's
    ``flash_attn_with_kvcache`` / varlen with ``cache_seqlens`` (``DecodeBatch.lengths``).
    """
    r, nh, dh = q.shape
    l = kv_index.shape[1]
    nkv = k.shape[1]
    group = nh // nkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    flat = kv_index.view(-1)
    kg = k.transpose(0, 1).index_select(1, flat).view(nkv * r, l, dh)       # [NKV*R, L, DH]
    vg = v.transpose(0, 1).index_select(1, flat).view(nkv * r, l, dh)
    qg = q.reshape(r, nkv, group, dh).transpose(0, 1).reshape(nkv * r, group, dh)   # [NKV*R, g, DH]
    if acc != q.dtype:
        qg, kg, vg = qg.to(acc), kg.to(acc), vg.to(acc)
    scores = torch.baddbmm(head_bias.to(acc), qg, kg.transpose(1, 2), alpha=scale)   # [NKV*R, g, L]
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)                     # -inf: no key
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0))                  # no key: all 0
    out = torch.bmm(probs, vg)                                              # [NKV*R, g, DH]
    out = out.view(nkv, r, group, dh).transpose(0, 1).reshape(r, nh, dh)
    return out, lse.view(nkv, r, group).transpose(0, 1).reshape(r, nh)


# -- the static decode step's kernels (issue #22: a decode step a CUDA graph can replay) ------------
def decode_kernel_name(device_type: str, dtype: torch.dtype, head_dim: int, mode: str) -> str:
    """The kernel of the static decode step (:class:`~cp_megatron.attention.plan.DecodeBatch`
    modes "lengths" and "masked") for a device type, dtype, head dim and mode:

    * "aten._flash_attention_forward": CUDA, fp16 / bf16, DH % 8 == 0, DH <= 256, mode
      "lengths" (each row's keys are a prefix of the KV view): the varlen flash kernel with
      per-row ``seqused_k``, split-KV chosen by the kernel (:func:`varlen_decode_attention`);
    * "math": anything else (CPU, float32, several sequences in the cache): matmuls with a
      boolean mask computed once per step (:func:`masked_decode_attention`).
    """
    if device_type == "cuda" and mode == "lengths" and dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256:
        return "aten._flash_attention_forward"
    return "math"


def varlen_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, seqused_k: torch.Tensor, *, scale: float,
                            empty_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row against the first ``seqused_k[row]`` slots of ``k``, ``v``: one call of
    aten's varlen flash kernel, static shapes whatever the lengths (CUDA graphs).

    Args:
        q: ``[R, NH, DH]`` fp16 / bf16, last dim contiguous (the all-gathered queries).
        k, v: ``[L, NKV, DH]`` a view of the cache (L the step's static KV length).
        cu_seqlens_q: int32 ``[R + 1]`` = 0, 1, ..., R (one query per row).
        cu_seqlens_k: int32 ``[R + 1]`` zeros: every row's keys start at slot 0.
        seqused_k: int32 ``[R]`` keys per row, each in [0, L] (device).
        scale: softmax scale.
        empty_rows: bool ``[R]``, rows with ``seqused_k == 0`` whose LSE must be -inf (the kernel
            writes +inf there); None when no such row matters (the step knows on the host).

    Returns:
        (out ``[R, NH, DH]`` q's dtype, lse ``[R, NH]`` float32 -- a transposed view).

    Source: PyTorch ``flash_api.cpp`` ``mha_varlen_fwd`` (``seqused_k``: only that many keys of
    each batch element are used; offsets from ``cu_seqlens_k``; split-KV for one-query GQA
    decode; an empty row gets out 0 and LSE +inf) and ``torch.nn.attention.varlen``
    (``seqused_k`` "for KV-cache decoding where the cache slot is larger than the sequence").
    """
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, 1, k.shape[0], 0.0, False, False, scale=scale,
        seqused_k=seqused_k)[:2]
    lse = lse.t()                                                          # [NH, R] -> [R, NH]
    if empty_rows is not None:
        lse = lse.masked_fill(empty_rows[:, None], float("-inf"))
    return out, lse


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, *,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row against the slots of ``k``, ``v`` it may see, static shapes (CUDA
    graphs): ``hidden`` says, per row, which slots it must not see.

    Args:
        q: ``[R, NH, DH]``; k, v: ``[L, NKV, DH]`` (a view of the cache).
        hidden: bool ``[R, L]``, True where a row must not see a slot (another sequence, a later
            position, a free slot); computed on the device once per step.
        scale: softmax scale.

    Returns:
        (out ``[R, NH, DH]``, lse ``[R, NH]``), float32 (float64 for float64 inputs); a row that
        sees nothing gets (0, -inf).

    Nine ops whatever R: the layout copy of q, the scores ``bmm``, the scale, one
    ``masked_fill_``, logsumexp, exp, the values ``bmm`` and the output's layout copy.  GQA by
    grouping the query heads of each KV head (K/V never expanded).  Memory: R x NH x L float32
    scores.
    """
    r, nh, dh = q.shape
    l, nkv = k.shape[0], k.shape[1]
    group = nh // nkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.reshape(r, nkv, group, dh).transpose(0, 1).reshape(nkv, r * group, dh)   # [NKV, R*g, DH]
    kt, vt = k.permute(1, 2, 0), v.transpose(0, 1)                                 # [NKV, DH, L], [NKV, L, DH]
    if acc != q.dtype:
        qg, kt, vt = qg.to(acc), kt.to(acc), vt.to(acc)
    scores = torch.bmm(qg, kt).mul_(scale)                                         # [NKV, R*g, L]
    scores.view(nkv, r, group, l).masked_fill_(hidden[None, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)                            # -inf: no key
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0))                         # no key: all 0
    out = torch.bmm(probs, vt).view(nkv, r, group, dh).transpose(0, 1).reshape(r, nh, dh)
    return out, lse.view(nkv, r, group).transpose(0, 1).reshape(r, nh)
