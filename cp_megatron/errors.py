"""Errors shared across layers (a leaf module: imports nothing of the package).

:class:`CheckpointError` is raised by the checkpoint readers *and* by the tokenizer they
build, so it lives below both (``cp_megatron.checkpoint`` re-exports it).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the tensor."""
