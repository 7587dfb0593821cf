"""Row-wise FP8 linear layers: float8_e4m3fn weights with one float32 scale per output row.

Weights are quantised once (at load or by ``cp-megatron convert --weights fp8-rowwise``);
activations are quantised per row (per token) at run time; the product is

    y[t, n] = (sum_k xq[t, k] * wq[n, k]) * sx[t] * sw[n]        xq, wq float8_e4m3fn
    sx[t] = amax_k |x[t, k]| / 448,  sw[n] = amax_k |W[n, k]| / 448     (each rounded to float32)

accumulated in float32.  Row-parallel layers (o_proj, down_proj) take activation scales per
token and per *block* of K / NKV input features: the slice one rank holds at TP = NKV (the
paper's TP8 on 405B: one block, i.e. plain per-token scales of the shard).  At a smaller TP a
rank runs one scaled matmul per block and adds them, so every TP size that divides NKV
quantises exactly the same numbers and TP 1, 2, 4, 8 agree up to float32 summation order.
(Per-shard scales would make the result depend on TP.)  One matmul routine, three backends:

* ``scaled_mm`` on CUDA with compute capability >= 8.9: ``torch._scaled_mm`` with row-wise
  scales (cuBLASLt / CUTLASS).  Its constraints, honoured here: output bf16 (the row-wise
  kernels write bf16 only), ``scale_a`` float32 ``[M, 1]``, ``scale_b`` float32 ``[1, N]``,
  K and N multiples of 16 (zero padding otherwise; Llama dims never need it), the second
  operand column-major (``wq.t()`` of the row-major ``[N, K]`` weight is) and packed (a
  block of a multi-block shard is copied packed first: the row-wise kernel assumes packed
  strides).
* ``scaled_mm`` on CPU: torch 2.13's CPU ``_scaled_mm`` takes the same row-wise scales with
  any shape and a float32 or bf16 output (it dequantises inside the op), so CPU runs use it.
* ``emulated`` (CUDA below 8.9): dequantise this layer's weight in float32, multiply, scale;
  the same float32 accumulation of exact fp8 products as the kernels.

Whatever the backend, the 1-byte weights are what the model holds.  TP sharding and the
all-reduce stay megatron-core's: :class:`FP8ColumnParallelLinear` and
:class:`FP8RowParallelLinear` subclass its layers and replace only the local matmul
(``_forward_impl``).  Scales are computed on whole rows, so the quantised model is the same
for every TP size: a column-parallel rank holds its rows' scales, a row-parallel rank all of
them (``weight_scale [out]``) beside its column slice.

Source: Llama 3 paper (arXiv 2407.21783) §6.2 (row-wise FP8: dynamic per-token activation
scales, per-row weight scales); arXiv 2411.01783 §4 (FP8 row-wise weights for 405B);
PyTorch ``aten/src/ATen/native/cuda/ScaledBlas.cpp`` (``_scaled_mm`` checks).
"""

from __future__ import annotations

import torch

from cp_megatron import device as devices

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0            # largest finite float8_e4m3fn
SCALE_EPS = 1e-12          # weights' amax floor: an all-zero row quantises to zeros, never NaN
ACT_SCALE_FLOOR = torch.finfo(torch.float32).tiny   # 2^-126, added to activation scales (same reason)
_ALIGN = 16                # _scaled_mm: K and N multiples of 16
QUANT_CHUNK_BYTES = 1 << 30   # activations are quantised in row chunks of <= this much float32
# (1 GiB: a 64K-token 405B prefill takes 4 chunks for the hidden, 2 for the FFN, not 16 and 7)
# Linear layers quantised by weights "fp8-rowwise" (suffix of the canonical tensor name).
QUANTIZED_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                      "gate_proj.weight", "up_proj.weight", "down_proj.weight")
SCALE_SUFFIX = "_scale"    # "model.layers.0.mlp.up_proj.weight" -> "..._scale" in checkpoints


def is_quantized(name: str) -> bool:
    """True for the tensors that fp8-rowwise stores as FP8 (attention projections, MLP)."""
    return name.endswith(QUANTIZED_SUFFIXES)


def scale_name(name: str) -> str:
    """Checkpoint name of the row scales of FP8 weight ``name``."""
    return name + SCALE_SUFFIX


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of ``x`` ``[R, C]`` (any float dtype) to float8_e4m3fn: the weights'
    quantiser (at load and in ``convert``), whose scale is amax / 448 rounded once.

    Four launches (an inf-norm, the scale's floor and division, the division of x written
    straight into the float8 output: TensorIterator casts on store, so no float32 quotient is
    kept and no separate cast runs): the division promotes a bf16 ``x`` to float32, and needs no clamp,
    since ``|x| / (amax / 448) <= 448 * (1 + 2^-23)`` rounds to 448 in e4m3fn (non-saturating
    casts give NaN only from 480 up).  Activations use :func:`quantize_activation_rows` (three
    launches).

    Returns:
        (q ``[R, C]`` float8_e4m3fn, scale ``[R]`` float32) with ``q * scale[:, None] ~= x``;
        scale = max(amax of the row, 1e-12) / 448, values rounded to nearest.
    """
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, dtype=torch.float32)
    scale = scale.clamp_min_(SCALE_EPS).div_(FP8_MAX)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    torch.div(x, scale.unsqueeze(-1), out=q)
    return q, scale


def quantize_activation_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of ``x`` ``[R, C]`` (any float dtype) to float8_e4m3fn in three launches:
    the activations' quantiser (run four times per layer).

    The inf-norm (amax, float32); the scale ``amax * (1/448) + 2^-126`` in one op
    (``torch.rsub(amax, f, alpha=-c)`` is ``f + c * amax``); the division of x written straight
    into the float8 output (cast on store, as in :func:`quantize_rowwise`).  The floor
    ``ACT_SCALE_FLOOR`` (the smallest normal float32) keeps an all-zero row finite (0 / floor = 0,
    never 0 / 0) and is below half an ulp of the product for any amax above 1e-27, where the scale
    is ``fl(amax * fl(1/448))``: within one float32 ulp of the exact amax / 448 (0.86 ulp measured),
    as :func:`quantize_rowwise`'s ``fl(amax / 448)`` is within half of one.  One op fewer: the
    floor and the division by 448 are one op.  The values are rounded to nearest the same way; an
    element whose ``x / scale`` is within an ulp of a float8 rounding midpoint may round to the
    neighbouring float8 value instead (measured against :func:`quantize_rowwise`: 0.055% of the
    elements of a bf16 activation, whose ratios to the row's amax are often exact midpoints, and
    2.4e-7 of float32 ones; never more than one float8 step).  No clamp is needed: ``fl(1/448)``
    exceeds 1/448, so ``|x| / scale <= 448 * (1 + 2^-23)``, which rounds to 448.

    Returns:
        (q ``[R, C]`` float8_e4m3fn, scale ``[R]`` float32) with ``q * scale[:, None] ~= x``.
    """
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, dtype=torch.float32)
    scale = torch.rsub(amax, ACT_SCALE_FLOOR, alpha=-1.0 / FP8_MAX)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    torch.div(x, scale.unsqueeze(-1), out=q)
    return q, scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_activation_rows` over the leading dim in chunks, so the float32 temporary
    stays under ``QUANT_CHUNK_BYTES`` (a 64K-token prefill of 405B's 16384-wide hidden would take
    4 GB).  Same result as one call; decode (a few rows) is always one call.  Each activation is
    quantised once per fused projection (``qkv_proj``, ``gate_up_proj``), not once per
    output tensor."""
    rows = max(1, QUANT_CHUNK_BYTES // (4 * max(1, x[0].numel()))) if x.shape[0] else 1
    if x.shape[0] <= rows:
        return quantize_activation_rows(x)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], rows):
        q[start:start + rows], scale[start:start + rows] = quantize_activation_rows(x[start:start + rows])
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q [R, C]`` float8 times ``scale [R]`` float32, in ``dtype``."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def backend_for(device: torch.device) -> str:
    """"scaled_mm" (CPU; CUDA capability >= 8.9) or "emulated" (older CUDA GPUs)."""
    if device.type == "cuda" and devices.capability(device) < (8, 9):
        return "emulated"
    return "scaled_mm"


def check_supported(device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise ValueError (naming the config keys) where no FP8 path exists for this dtype/device.

    CUDA runs the row-wise kernels, which write bf16: ``model.dtype`` must be bfloat16 there.
    CPU supports float32 and bfloat16.
    """
    device = torch.device(device)
    if device.type == "cuda" and dtype != torch.bfloat16:
        raise ValueError(f"model.weights fp8-rowwise on cuda needs model.dtype bfloat16 (the row-wise "
                         f"torch._scaled_mm kernels write bf16), got {str(dtype).removeprefix('torch.')}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"model.weights fp8-rowwise: no FP8 matmul for device {device.type}")


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]
    return torch.nn.functional.pad(t.view(torch.uint8), pad).view(t.dtype) if t.dtype == FP8_DTYPE \
        else torch.nn.functional.pad(t, pad)


def _scaled_matmul(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   backend: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq @ weight.T) * sx[:, None] * weight_scale[None, :]``: xq ``[M, K]``, weight ``[N, K]``
    (both float8_e4m3fn), sx ``[M]``, weight_scale ``[N]`` float32 -> ``[M, N]`` out_dtype."""
    n = weight.shape[0]
    if backend == "emulated":
        return ((xq.float() @ weight.float().t()) * sx[:, None] * weight_scale[None, :]).to(out_dtype)
    if xq.device.type == "cuda":  # row-wise kernels: bf16 out, K and N multiples of 16, packed operands
        xq = _pad_to(xq, 1, _ALIGN).contiguous()
        weight = _pad_to(_pad_to(weight, 1, _ALIGN), 0, _ALIGN).contiguous()
        sw = _pad_to(weight_scale, 0, _ALIGN)
        return torch._scaled_mm(xq, weight.t(), scale_a=sx[:, None].contiguous(), scale_b=sw[None, :].contiguous(),
                                out_dtype=torch.bfloat16)[:, :n].to(out_dtype)
    return torch._scaled_mm(xq, weight.t(), scale_a=sx[:, None].contiguous(),
                            scale_b=weight_scale[None, :].contiguous(), out_dtype=out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               backend: str = "scaled_mm", act_blocks: int = 1) -> torch.Tensor:
    """``x @ W.T`` with W held in FP8 and x quantised per token (per block of K) on the fly.

    Args:
        x: activations ``[..., K]`` float32 or bfloat16.
        weight: ``[N, K]`` float8_e4m3fn, row-major (a TP shard).
        weight_scale: ``[N]`` float32 row scales.
        backend: "scaled_mm" (``torch._scaled_mm``) or "emulated" (float32 dequantise + mm).
        act_blocks: activation scales per token, over equal blocks of K (1: per token).  Each
            block is one scaled matmul; the blocks' products are summed in float32.  On CUDA a
            block of a multi-block shard is copied packed first (the row-wise kernel reads
            packed operands); at ``act_blocks`` 1 nothing is copied.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, n)
    if act_blocks == 1:
        xq, sx = quantize_activations(x2)                                   # [M, K] fp8, [M]
        return _scaled_matmul(xq, sx, weight, weight_scale, backend, x.dtype).reshape(*lead, n)
    kb = k // act_blocks
    assert kb * act_blocks == k, f"K={k} is not a multiple of act_blocks={act_blocks}"
    xq, sx = quantize_activations(x2.view(-1, act_blocks, kb))              # [M, B, K/B], [M, B]
    out = None
    for b in range(act_blocks):
        part = _scaled_matmul(xq[:, b], sx[:, b], weight[:, b * kb:(b + 1) * kb], weight_scale, backend,
                              torch.float32)
        out = part if out is None else out + part
    return out.to(x.dtype).reshape(*lead, n)


# -- loading ---------------------------------------------------------------------------------
def read_quantized(reader, name: str, shard_dim: int | None, tp_rank: int, tp_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """This TP rank's FP8 slice of weight ``name`` and its row scales.

    A reader that stores FP8 (``read_fp8``, the sharded format) hands its values back as
    they are; any other is read in float32 and quantised here, on whole rows: a
    column-parallel slice (``shard_dim`` 0) holds whole rows, a row-parallel one
    (``shard_dim`` 1) is cut from the quantised full tensor.

    Returns:
        (q float8_e4m3fn ``[rows, cols]`` of the slice, scale float32 ``[rows]``).
    """
    stored = getattr(reader, "read_fp8", None)
    if stored is not None:
        got = stored(name, shard_dim=shard_dim, tp_rank=tp_rank, tp_size=tp_size)
        if got is not None:
            return got
    if shard_dim == 1:
        return _quantized_columns(reader, name, tp_rank, tp_size)
    kwargs = {} if shard_dim is None else dict(shard_dim=shard_dim, tp_rank=tp_rank, tp_size=tp_size)
    return quantize_rowwise(reader.read(name, dtype=torch.float32, **kwargs))


def _quantized_columns(reader, name: str, tp_rank: int, tp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column slice ``tp_rank`` of ``tp_size`` of FP8 weight ``name`` with whole-row scales,
    quantised from blocks of whole rows (``reader.read_block``; a reader without it is read
    whole).  Returns (q float8_e4m3fn ``[rows, cols / tp]``, scale float32 ``[rows]``)."""
    read_block = getattr(reader, "read_block", None)
    if read_block is None:
        q, scale = quantize_rowwise(reader.read(name, dtype=torch.float32))
        return q.chunk(tp_size, dim=1)[tp_rank].contiguous(), scale
    rows, cols = reader.shape(name)
    if tp_size < 1 or not 0 <= tp_rank < tp_size or cols % tp_size:
        raise ValueError(f"tensor {name}: cannot take column slice {tp_rank} of {tp_size} of {cols} columns")
    lo, hi = tp_rank * cols // tp_size, (tp_rank + 1) * cols // tp_size
    step = max(1, QUANT_CHUNK_BYTES // (4 * cols))
    q = torch.empty(rows, hi - lo, dtype=FP8_DTYPE)
    scale = torch.empty(rows, dtype=torch.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part_q, scale[r0:r1] = quantize_rowwise(read_block(name, (r0, r1), dtype=torch.float32))
        q[r0:r1] = part_q[:, lo:hi]
    return q, scale
