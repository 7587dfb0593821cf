"""Filling a :class:`LlamaStage` from a checkpoint reader, one TP slice at a time.

Every parameter is named like Hugging Face's (``model.layers.{i}.self_attn.o_proj.weight``)
and split over TP like megatron-core's layers: column-parallel weights (q, k, v, gate, up,
LM head, vocab-parallel embedding) along dim 0, row-parallel (o, down) along dim 1,
norms replicated.  The two fused projections are filled from their parts, each read as
its own TP slice and concatenated, so the TP split stays by heads:
``self_attn.qkv_proj.weight`` = ``[q_r; k_r; v_r]`` and ``mlp.gate_up_proj.weight`` =
``[gate_r; up_r]`` on TP rank r (FP8: the row scales are concatenated alike, exact since
they are per row).  Checkpoints keep the separate tensors, so conversion never sees the
fusion.  A reader returns only the slice asked for, so no rank ever holds the whole
checkpoint.

``DummyReader`` is the "dummy" load format (as in vLLM): seeded random weights that are
the same for every TP layout, for tests and benchmarks.

Source: megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` partitioning;
HF Llama parameter names.
"""

from __future__ import annotations

import zlib

import torch

from cp_megatron.checkpoint import keys, layout
from cp_megatron.model import fp8
from cp_megatron.model.config import ModelConfig

# suffix -> TP shard dim (None = replicated)
# fused stage parameter suffix -> the checkpoint tensors it concatenates (dim 0, per TP slice)
FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                       "self_attn.v_proj.weight"),
         "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
_SHARD_DIM = {
    "embed_tokens.weight": 0, "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0,
    "o_proj.weight": 1, "gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1,
    "lm_head.weight": 0, "layernorm.weight": None, "norm.weight": None,
}


def checkpoint_name(param_name: str, config: ModelConfig) -> tuple[str, int | None]:
    """(HF tensor name, TP shard dim) for a :class:`LlamaStage` parameter name."""
    if param_name == "lm_head.weight":
        hf = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    else:
        hf = "model." + param_name
    for suffix, dim in _SHARD_DIM.items():
        if param_name.endswith(suffix):
            return hf, dim
    raise KeyError(f"no checkpoint mapping for parameter {param_name!r}")


def checkpoint_sources(param_name: str, config: ModelConfig) -> tuple[list[str], int | None]:
    """(HF tensor names whose TP slices, concatenated on dim 0, make the parameter; TP shard
    dim) for a :class:`LlamaStage` parameter name (one name unless the parameter is fused)."""
    for suffix, parts in FUSED.items():
        if param_name.endswith(suffix):
            prefix = "model." + param_name[: -len(suffix)]
            return [prefix + p for p in parts], 0
    hf, dim = checkpoint_name(param_name, config)
    return [hf], dim


def _init_std(name: str) -> float | None:
    return None if name.endswith("norm.weight") else 0.02


# DummyReader draws every 2-D tensor tile by tile: a tile is TILE_ROWS x TILE_COLS elements of
# the full tensor (smaller at its far edges), drawn by its own seeded generator, so a slice is
# made from the tiles it overlaps only and its values do not depend on how it was cut.
TILE_ROWS, TILE_COLS = 128, 1024


def tile_spans(shape: tuple[int, int], bounds: list[tuple[int, int]]):
    """The tiles of a ``shape`` tensor that block ``bounds`` ([rows, cols] (start, stop)) overlaps:
    (tile row, tile column, (row start, stop), (column start, stop)) in full-tensor indices."""
    (r0, r1), (c0, c1) = bounds
    for tr in range(r0 // TILE_ROWS, -(-r1 // TILE_ROWS)):
        for tc in range(c0 // TILE_COLS, -(-c1 // TILE_COLS)):
            a, c = tr * TILE_ROWS, tc * TILE_COLS
            yield tr, tc, (a, min(a + TILE_ROWS, shape[0])), (c, min(c + TILE_COLS, shape[1]))


class DummyReader:
    """Seeded random weights with the reader interface (``config``, ``names()``, ``read()``).

    Every value is N(0, 0.02^2) (norms: 1).  A 2-D tensor is drawn in fixed tiles of
    ``TILE_ROWS x TILE_COLS`` of the full tensor, each by a generator seeded with the seed,
    the tensor's name and the tile's index, so a read materialises only the tiles its slice
    overlaps (at most one partial tile per edge, 512 KiB of float32 each): a TP rank of a
    405B stage draws its own slice, never the full tensor, and every TP layout sees the same
    model (slice ``r`` of ``n`` equals rows / columns of the full tensor).

    Source: the "dummy" load format of vLLM (random weights for benchmarks); megatron-core TP
    partitioning for the slices.
    """

    index = None  # nothing to hand to another process (CheckpointReader.index): it opens for free

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def names(self) -> list[str]:
        return keys.canonical_names(self.config.num_layers, self.config.tie_word_embeddings)

    def shape(self, name: str) -> tuple[int, ...]:
        if name == keys.LM_HEAD:  # drawn even when tied (PP stages without the embedding)
            name = keys.EMBED if self.config.tie_word_embeddings else name
        return layout.expected_shape(self.config, name)

    def read(self, name: str, shard_dim: int | None = None, tp_rank: int = 0, tp_size: int = 1,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` or its TP slice ``tp_rank`` of ``tp_size`` along ``shard_dim``.

        Raises:
            ValueError: ``shard_dim`` out of range, ``tp_size`` does not divide that dim, or
                ``tp_rank`` out of range.
        """
        shape = self.shape(name)
        bounds = [(0, n) for n in shape]
        if shard_dim is not None:
            if shard_dim not in range(len(shape)):
                raise ValueError(f"dummy tensor {name}: shard_dim={shard_dim} invalid for shape {shape}")
            try:
                bounds[shard_dim] = layout.slice_bounds(shape[shard_dim], tp_rank, tp_size)
            except ValueError as err:
                raise ValueError(f"dummy tensor {name}: {err}") from None
        return self._block(name, shape, bounds).to(dtype)

    def read_block(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``[rows[0], rows[1])`` (and columns ``cols`` of a 2-D tensor; None: all) of the
        full tensor ``name``, as :meth:`read` would cut them.

        Raises:
            ValueError: bounds outside the tensor.
        """
        shape = self.shape(name)
        bounds = [rows] + ([cols or (0, shape[1])] if len(shape) == 2 else [])
        for (a, b), n in zip(bounds, shape):
            if not 0 <= a <= b <= n:
                raise ValueError(f"dummy tensor {name}: block {bounds} outside shape {shape}")
        return self._block(name, shape, bounds).to(dtype)

    def _block(self, name: str, shape: tuple[int, ...], bounds: list[tuple[int, int]]) -> torch.Tensor:
        """float32 values of ``bounds`` of tensor ``name`` (full shape ``shape``), from its tiles."""
        want = tuple(b - a for a, b in bounds)
        std = _init_std(name)
        if std is None:
            return torch.ones(want)
        if len(shape) == 1:                     # a vector: one row of tiles
            return self._block(name, (1, shape[0]), [(0, 1), bounds[0]]).reshape(want)
        (r0, r1), (c0, c1) = bounds
        out = torch.empty(want)
        for tr, tc, (a, b), (c, d) in tile_spans(shape, bounds):
            tile_key = zlib.crc32(f"{name}#{tr},{tc}".encode())
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + tile_key) % (1 << 63))
            tile = torch.randn((b - a, d - c), generator=g)
            ra, rb, ca, cb = max(a, r0), min(b, r1), max(c, c0), min(d, c1)
            out[ra - r0:rb - r0, ca - c0:cb - c0] = tile[ra - a:rb - a, ca - c:cb - c]
        return out.mul_(std)


@torch.no_grad()
def load_weights(stage, reader, progress: bool = False) -> None:
    """Copy this rank's slice of every parameter of ``stage`` from ``reader``.

    Args:
        stage: a :class:`LlamaStage`; reader: a checkpoint reader or :class:`DummyReader`.
        progress: show a tqdm bar (tensors, bytes) on stderr.

    FP8 parameters (``weights="fp8-rowwise"``) are filled with :func:`fp8.read_quantized`:
    stored FP8 values and scales as they are, or whole rows quantised here.

    Raises:
        ValueError (CheckpointError from the readers): a missing tensor, or a slice whose
            shape differs from the parameter's, naming the tensor.
    """
    from tqdm import tqdm

    layout = stage.layout
    params = list(stage.named_parameters())
    bar = tqdm(params, desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for param_name, param in bar:
        sources, dim = checkpoint_sources(param_name, stage.config)
        what = ", ".join(sources)
        if param.dtype == fp8.FP8_DTYPE:  # fp8-rowwise: the weight and its row scales
            module = stage.get_submodule(param_name.rpartition(".")[0])
            parts = [fp8.read_quantized(reader, s, dim, layout.tp_rank, layout.tp_size) for s in sources]
            q = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
            scale = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
            for got, want, name in ((q, param, what), (scale, module.weight_scale,
                                                       ", ".join(fp8.scale_name(s) for s in sources))):
                if tuple(got.shape) != tuple(want.shape):
                    raise ValueError(f"tensor {name}: expected shape {tuple(want.shape)} for TP rank "
                                     f"{layout.tp_rank}/{layout.tp_size}, checkpoint gives {tuple(got.shape)}")
                want.copy_(got)
            continue
        if dim is None:
            parts = [reader.read(s, dtype=param.dtype) for s in sources]
        else:
            parts = [reader.read(s, shard_dim=dim, tp_rank=layout.tp_rank, tp_size=layout.tp_size,
                                 dtype=param.dtype) for s in sources]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor {what}: expected shape {tuple(param.shape)} for TP rank "
                             f"{layout.tp_rank}/{layout.tp_size}, checkpoint gives {tuple(tensor.shape)}")
        param.copy_(tensor)
