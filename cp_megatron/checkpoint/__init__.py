"""Checkpoint readers: Hugging Face safetensors, Meta consolidated .pth, llama.cpp GGUF, and
our own TP-sharded safetensors (written by ``cp-megatron convert``, see docs/convert.md), and a
megatron-core GPTModel state dict (TP 1 PP 1, see docs/megatron.md).

    reader = open_checkpoint("hf" | "meta" | "gguf" | "sharded" | "megatron", path)
    reader.config                       # ModelConfig from the checkpoint's own metadata
    reader.names()                      # canonical HF Llama tensor names
    reader.read(name, shard_dim=0, tp_rank=r, tp_size=n, dtype=torch.bfloat16)
    reader.tokenizer()                  # cp_megatron.tokenizer.Tokenizer
    open_checkpoint(fmt, path, index=reader.index)   # in another process: no second parse (GGUF)

Every reader is lazy (memory-mapped): one tensor or one TP slice is read at a time, so no
process ever holds a whole large checkpoint.
"""

from __future__ import annotations

from cp_megatron.checkpoint.base import CheckpointError, CheckpointReader, check_tp

FORMATS = ("hf", "meta", "gguf", "sharded", "megatron")


def open_checkpoint(fmt: str, path, index=None) -> CheckpointReader:
    """Open a checkpoint of format ``fmt`` at ``path``.

    Args:
        fmt: "hf" (folder: config.json + model.safetensors or model.safetensors.index.json
            and shards), "meta" (folder: params.json + consolidated.NN.pth [+ tokenizer.model])
            "gguf" (the .gguf file) or "sharded" (folder: cp_megatron_checkpoint.json +
            model-tpRR-of-NN.safetensors, from ``cp-megatron convert --to sharded``) or "megatron"
            (a megatron-core GPTModel state dict at TP 1 PP 1: .pt file or Megatron-LM save folder,
            :mod:`cp_megatron.checkpoint.megatron`).
        path: folder or file (str or PathLike).
        index: ``reader.index`` of a reader of the same checkpoint opened in another process
            (pre-flight), so that this one does not parse it again; None: open from scratch.

    Raises:
        CheckpointError: unknown format, or the checkpoint cannot be opened (the message names
            the file and, where one is involved, the tensor), or ``index`` given for a format
            that has none, or from a file that changed since.
    """
    if index is not None and fmt != "gguf":
        raise CheckpointError(f"{path}: format {fmt!r} takes no index (only gguf has one)")
    if fmt == "hf":
        from cp_megatron.checkpoint.hf import HFReader

        return HFReader(path)
    if fmt == "meta":
        from cp_megatron.checkpoint.meta import MetaReader

        return MetaReader(path)
    if fmt == "gguf":
        from cp_megatron.checkpoint.gguf_reader import GGUFCheckpoint

        return GGUFCheckpoint(path, index)
    if fmt == "sharded":
        from cp_megatron.checkpoint.sharded import ShardedReader

        return ShardedReader(path)
    if fmt == "megatron":
        from cp_megatron.checkpoint.megatron import MegatronReader

        return MegatronReader(path)
    raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")


__all__ = ["CheckpointError", "CheckpointReader", "FORMATS", "check_tp", "open_checkpoint"]
