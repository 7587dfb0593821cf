"""The one table of number formats: short names (flags), torch names (configs), safetensors
codes (files) and bytes per element (the planner's e).

The planner, the runtime config, the converter and the sharded checkpoint format all read
this table, so a dtype is spelled and sized the same everywhere.  Imports no torch at
module level (the planner stays pure); :func:`torch_dtype` resolves lazily.

Source: safetensors format (dtype codes); PyTorch dtype names; FP8 E4M3 (Micikevicius et
al. 2022) for the 1-byte weights of the paper's 405B deployment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One number format.  ``short``: flag spelling ("bf16"); ``name``: torch attribute
    ("bfloat16"); ``safetensors``: header code ("BF16"); ``bytes``: size of one element."""

    short: str
    name: str
    safetensors: str
    bytes: int


TABLE: tuple[DType, ...] = (
    DType("fp32", "float32", "F32", 4),
    DType("bf16", "bfloat16", "BF16", 2),
    DType("fp16", "float16", "F16", 2),
    DType("fp8", "float8_e4m3fn", "F8_E4M3", 1),
)
BY_SHORT = {d.short: d for d in TABLE}
BY_NAME = {d.name: d for d in TABLE}


def torch_dtype(key: str):
    """``torch.dtype`` for a short ("bf16") or torch ("bfloat16") name.

    Raises:
        KeyError: not in :data:`TABLE`.
    """
    import torch

    entry = BY_SHORT.get(key) or BY_NAME[key]
    return getattr(torch, entry.name)


def entry_of(dtype) -> DType:
    """The :class:`DType` of a ``torch.dtype``.

    Raises:
        KeyError: a dtype not in :data:`TABLE`.
    """
    return BY_NAME[str(dtype).removeprefix("torch.")]
