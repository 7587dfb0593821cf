"""The checkpoint reader interface shared by the HF, Meta and GGUF readers.

A reader owns a :class:`~cp_megatron.model.config.ModelConfig` built from the checkpoint's
own metadata and hands out single tensors, whole or as one tensor-parallel slice, under
canonical (Hugging Face Llama) names and in HF layout.  Subclasses implement only
``_read_stored``: read a row/column block in the format's stored row order.  This class does
argument checks, TP slicing, the q/k row permutation for interleaved formats, shape checks
and the dtype cast, once for all formats.

Source: transformers ``LlamaForCausalLM`` layout; Megatron-style TP (column-parallel
weights split along dim 0, row-parallel along dim 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cp_megatron.checkpoint import keys, layout
from cp_megatron.errors import CheckpointError
from cp_megatron.model.tp_rule import tp_problem

if TYPE_CHECKING:  # torch is imported where a tensor is read: the command line imports this module
    import torch


def check_tp(config, tp_size: int) -> None:
    """Check that ``tp_size`` splits the attention heads evenly.

    Args:
        config: a ModelConfig.
        tp_size: tensor-parallel degree.

    Raises:
        CheckpointError: the one TP rule (:func:`cp_megatron.model.tp_rule.tp_problem`)
            refuses ``tp_size``, e.g. it does not divide num_kv_heads.
    """
    problem = tp_problem(config, tp_size)
    if problem:
        raise CheckpointError(problem)


class CheckpointReader:
    """Lazy, per-tensor access to one checkpoint.

    Attributes:
        path: the checkpoint folder or file (str).
        config: ModelConfig from the checkpoint's metadata.
        interleaved_qk: True when q/k rows are stored Meta-interleaved (Meta, GGUF).
        index: what another process needs to open the same checkpoint without parsing it
            again (picklable; ``open_checkpoint(fmt, path, index=reader.index)``), or None
            for formats whose opening costs nothing worth handing over.  GGUF:
            :class:`~cp_megatron.checkpoint.gguf_reader.GGUFIndex`.
    """

    fmt = "?"
    interleaved_qk = False
    index = None

    def __init__(self, path: str, config) -> None:
        self.path = str(path)
        self.config = config
        self._name_set = frozenset(self.names())

    # -- public API -------------------------------------------------------------------
    def names(self) -> list[str]:
        """Canonical tensor names; ``lm_head.weight`` is absent when embeddings are tied."""
        return keys.canonical_names(self.config.num_layers, self.config.tie_word_embeddings)

    def shape(self, name: str) -> tuple[int, ...]:
        """Full HF-layout shape of ``name`` (from the config).

        Raises:
            CheckpointError: ``name`` is not a tensor of this checkpoint.
        """
        if name not in self._name_set:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this checkpoint "
                                  f"(tie_word_embeddings={self.config.tie_word_embeddings})")
        return layout.expected_shape(self.config, name)

    def read(self, name: str, shard_dim: int | None = None, tp_rank: int = 0, tp_size: int = 1,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor, or its TP slice, in HF layout.

        Args:
            name: canonical tensor name (see :meth:`names`).
            shard_dim: None for the whole tensor; 0 or 1 for the contiguous slice
                ``tp_rank`` of ``tp_size`` equal slices along that dim (only that slice is read).
            tp_rank, tp_size: which slice.  For q/k/v/o projections ``tp_size`` must divide
                num_kv_heads (:func:`check_tp`), so a slice holds whole heads.
            dtype: dtype of the returned tensor (None: torch.float32; values are cast after
                reading; quantized GGUF tensors are dequantized to float32 first).

        Returns:
            A new contiguous tensor (never a view of the file): ``shape(name)``, or that shape
            with ``shape[shard_dim] // tp_size`` along ``shard_dim``.  q/k rows are in HF
            rotate-half order.

        Raises:
            CheckpointError: unknown tensor, bad shard_dim / tp arguments, TP size that splits
                heads, or a file that cannot be read.
        """
        full = self.shape(name)
        bounds = [(0, n) for n in full]
        if shard_dim is not None:
            if shard_dim not in range(len(full)):
                raise CheckpointError(f"{self.path}: tensor {name}: shard_dim={shard_dim} invalid for "
                                      f"shape {tuple(full)}")
            if tp_size > 1 and keys.is_attention_projection(name):
                check_tp(self.config, tp_size)
            try:
                bounds[shard_dim] = layout.slice_bounds(full[shard_dim], tp_rank, tp_size)
            except ValueError as err:
                raise CheckpointError(f"{self.path}: tensor {name}: {err}") from None
        elif tp_size != 1 or tp_rank != 0:
            raise CheckpointError(f"{self.path}: tensor {name}: tp_rank/tp_size given without shard_dim")
        return self._read_bounds(name, bounds, dtype)

    def read_block(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[rows[0], rows[1])`` (and columns ``cols`` of a 2-D tensor; None: all) of
        tensor ``name`` in HF layout, as ``dtype`` (None: float32); only that block is read.  Used to quantise a
        row-parallel weight a few whole rows at a time (:func:`cp_megatron.model.fp8.read_quantized`).

        Raises:
            CheckpointError: unknown tensor, bounds outside it, or a file that cannot be read.
        """
        full = self.shape(name)
        bounds = [tuple(rows)] + ([tuple(cols) if cols is not None else (0, full[1])] if len(full) == 2 else [])
        for (a, b), n in zip(bounds, full):
            if not 0 <= a <= b <= n:
                raise CheckpointError(f"{self.path}: tensor {name}: block {bounds} outside shape {tuple(full)}")
        return self._read_bounds(name, bounds, dtype)

    def _read_bounds(self, name: str, bounds: list, dtype: torch.dtype | None) -> torch.Tensor:
        """The block ``bounds`` ([(start, stop)] per dim) of ``name``, HF row order, ``dtype``
        (None: float32)."""
        import torch

        full = self.shape(name)
        rows, cols = bounds[0], (bounds[1] if len(full) == 2 else None)
        if self.interleaved_qk and keys.is_rotary(name):
            src = layout.interleaved_rows(layout.rotary_heads(self.config, name), self.config.head_dim)
            src = src[rows[0]:rows[1]]
            lo = min(src)
            block = self._read_stored(name, (lo, max(src) + 1), cols)
            out = block[torch.tensor(src) - lo]
        else:
            out = self._read_stored(name, rows, cols)

        want = tuple(stop - start for start, stop in bounds)
        if tuple(out.shape) != want:
            raise CheckpointError(f"{self.path}: tensor {name}: read shape {tuple(out.shape)}, expected {want}")
        return out.to(dtype or torch.float32).contiguous()  # _read_stored returns memory it owns: no second copy

    def tokenizer(self):
        """The checkpoint's tokenizer (:class:`cp_megatron.tokenizer.Tokenizer`).

        Raises:
            CheckpointError: the checkpoint carries no tokenizer.
        """
        raise NotImplementedError

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` is stored in (reads one element; float32 for formats
        that dequantize, e.g. quantized GGUF)."""
        return self._read_stored(name, (0, 1), (0, 1) if len(self.shape(name)) == 2 else None).dtype

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, layers={self.config.num_layers})"

    # -- for subclasses ----------------------------------------------------------------
    def _read_stored(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None) -> torch.Tensor:
        """Rows ``[rows[0], rows[1])`` (and columns ``cols`` of a 2-D tensor) in stored row order.

        Returns a tensor of any float dtype that owns its memory (never a view of a mapped
        file: the caller may return it as is).
        """
        raise NotImplementedError

    def _check_shape(self, name: str, got, where: str) -> None:
        """Raise CheckpointError unless stored tensor ``name`` has the config's shape."""
        want = layout.expected_shape(self.config, name)
        if tuple(got) != tuple(want):
            raise CheckpointError(f"{where}: tensor {name}: shape {tuple(got)} does not match the config, "
                                  f"expected {tuple(want)}")
