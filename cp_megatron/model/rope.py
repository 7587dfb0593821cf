"""Rotary position embedding at global positions, with Llama 3.1 frequency scaling.

Pure tensor maths (no torch.distributed).  Every rank rotates its tokens by their
*global* positions, so sharded and unsharded runs agree.  Layout is Hugging Face's
"rotate half" (the first DH/2 features pair with the last DH/2); Meta and GGUF
checkpoints are permuted into it on load.

Source: Su et al. (RoFormer) Eq. 34; Llama 3.1 reference ``apply_scaling``; HF
``_compute_llama3_parameters`` and ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from cp_megatron.model.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """Inverse frequencies ``[DH/2]`` float32 (Llama 3.1 smooth scaling when ``scaling``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[T, DH]`` float32 for int64 global ``positions`` ``[T]``."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]   # [T, DH/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


# Rounds of at most this many tokens on a rank (decode) rotate q and k by one batched matmul
# with a [DH, DH] matrix per token (one launch instead of three); the matrices of 64 tokens
# take 2 MB in bf16 at DH 128, a prefill's would take T * DH * DH (2 GB for 62.5K tokens).
ROPE_MATRIX_MAX_TOKENS = 64


@dataclass(frozen=True)
class RopeTables:
    """The round's RoPE tables (:func:`rope_tables`), in the activations' dtype: either the
    elementwise tables ``cos`` and ``signed_sin`` ``[T, 1, DH]`` (``signed_sin`` is ``[-sin, sin]``
    over the two halves, so ``rotate_half(x) * sin == roll(x, DH/2) * signed_sin``), or the
    rotation matrices ``rotation`` ``[T, DH, DH]`` (``x[t] @ rotation[t]`` rotates token t's rows;
    two non-zeros per column: cos on the diagonal, the signed sin DH/2 rows off it)."""

    cos: Optional[torch.Tensor] = None
    signed_sin: Optional[torch.Tensor] = None
    rotation: Optional[torch.Tensor] = None


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> RopeTables:
    """The round's RoPE tables, built once and read by every layer.

    Args:
        positions: int64 ``[T]`` global positions.
        inv_freq: ``[DH/2]`` float32 (:func:`inv_frequencies`).
        dtype: the activations' dtype (the tables are cast once here, not per layer).

    Returns:
        :class:`RopeTables`: the rotation matrices for T <= ``ROPE_MATRIX_MAX_TOKENS``, else
        cos and signed sin.  Both hold the same ``dtype`` values of cos and sin.
    """
    cos, sin = rope_cos_sin(positions, inv_freq)                                        # [T, DH]
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    if positions.shape[0] <= ROPE_MATRIX_MAX_TOKENS:
        # column i of token t's matrix: cos_i at row i, signed_sin_i at row (i + DH/2) % DH
        rotation = torch.diag_embed(cos) + torch.roll(torch.diag_embed(signed), half, dims=-2)
        return RopeTables(rotation=rotation.to(dtype))                                  # [T, DH, DH]
    return RopeTables(cos=cos[:, None, :].to(dtype), signed_sin=signed[:, None, :].to(dtype))


def apply_rope_tables(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate ``x`` ``[T, H, DH]`` (any number of heads: q and k together; a view with any row
    stride) by the round's :class:`RopeTables`.  Returns a new ``[T, H, DH]`` in x's dtype.

    With rotation matrices, one ``bmm`` (each output element is the float32 sum of its two
    products, rounded once); with cos / signed sin, three ops (roll, mul, addcmul), which round
    ``x * cos`` to x's dtype first: the two differ by rounding.
    """
    if tables.rotation is not None:
        return torch.bmm(x, tables.rotation)
    return torch.addcmul(x * tables.cos, torch.roll(x, x.shape[-1] // 2, dims=-1), tables.signed_sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, H, DH]`` by cos/sin ``[T, DH]``; returns x's dtype."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
