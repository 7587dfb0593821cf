"""The FP8 row-wise linear layers: megatron-core's column / row parallel linears with
float8_e4m3fn weights and row scales, whose matmul is :func:`cp_megatron.model.fp8.fp8_linear`.

Kept apart from :mod:`cp_megatron.model.fp8` (the quantisation maths and the checkpoint
reading) so that the processes that only read or check checkpoints (the pre-flight of
``cp-megatron run``, ``convert``) do not import megatron-core (~3 s).

Source: megatron-core ``tensor_parallel.layers``; see :mod:`cp_megatron.model.fp8`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

from cp_megatron.model.fp8 import FP8_DTYPE, backend_for, fp8_linear

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import tensor_parallel


class _FP8Rowwise:
    """Mixin over a megatron-core parallel linear: FP8 ``weight`` + ``weight_scale``, own matmul."""

    def _fp8_setup(self, scale_rows: int, device, act_blocks: int = 1) -> None:
        self.register_buffer("weight_scale", torch.ones(scale_rows, dtype=torch.float32, device=device))
        self.fp8_backend = backend_for(torch.device(device))
        self.act_blocks = act_blocks

    def _forward_impl(self, input, weight, bias=None, **_unused):
        assert bias is None, "FP8 linear layers carry no bias (Llama has none)"
        return fp8_linear(input, weight, self.weight_scale, self.fp8_backend, self.act_blocks)


def _fp8_config(config):
    """The layer's ModelParallelConfig with float8 parameters (megatron allocates them 1-byte)."""
    return dataclasses.replace(config, params_dtype=FP8_DTYPE)


class FP8ColumnParallelLinear(_FP8Rowwise, tensor_parallel.ColumnParallelLinear):
    """megatron-core ColumnParallelLinear whose weight ``[out/tp, in]`` is float8_e4m3fn, with
    ``weight_scale [out/tp]`` float32 (this rank's rows).  Same arguments as the parent."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        super().__init__(input_size, output_size, config=_fp8_config(config), **kwargs)
        self._fp8_setup(self.output_size_per_partition, self.weight.device)


class FP8RowParallelLinear(_FP8Rowwise, tensor_parallel.RowParallelLinear):
    """megatron-core RowParallelLinear whose weight ``[out, in/tp]`` is float8_e4m3fn, with
    ``weight_scale [out]`` float32 (scales of whole rows, the same on every TP rank); the
    all-reduce of the partial outputs stays megatron-core's.  ``act_blocks``: activation
    scales per token over this many equal blocks of the local input (see the module doc).
    Other arguments as the parent's."""

    def __init__(self, input_size: int, output_size: int, *, config, act_blocks: int = 1, **kwargs) -> None:
        super().__init__(input_size, output_size, config=_fp8_config(config), **kwargs)
        self._fp8_setup(self.output_size, self.weight.device, act_blocks)


def linear_classes(weights: str, num_kv_heads: int = 1, tp_size: int = 1, in_features: int = 0):
    """(column, row) parallel linear constructors for ``model.weights`` ("dtype" or "fp8-rowwise").

    For FP8 the row-parallel layer (whole input ``in_features``, split over ``tp_size``) takes
    activation scales per block of ``in_features / num_kv_heads`` when that divides evenly and
    ``tp_size`` divides ``num_kv_heads`` (TP-invariant quantisation), else per token of its shard.
    """
    if weights != "fp8-rowwise":
        return tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear
    even = num_kv_heads % tp_size == 0 and in_features % num_kv_heads == 0
    return FP8ColumnParallelLinear, functools.partial(
        FP8RowParallelLinear, act_blocks=num_kv_heads // tp_size if even else 1)
