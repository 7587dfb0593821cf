"""Filling a megatron-core GPTModel (:class:`~cp_megatron.mcore.stage.McoreLlamaStage`) from any
checkpoint reader (Hugging Face tensor names), one TP slice at a time: q/k/v fused into
``linear_qkv`` per query group, gate/up into ``linear_fc1`` per TP shard
(:mod:`cp_megatron.checkpoint.mcore_keys`).

Source: megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` partitioning.
"""

from __future__ import annotations

import torch

from cp_megatron.checkpoint.mcore_keys import FC1, QKV, fuse_fc1, fuse_qkv, global_layer_name, hf_sources


def load_weights(stage, reader, progress: bool = False) -> None:
    """Copy this TP rank's slice of every parameter of ``stage.model`` from ``reader``
    (:func:`load_gpt_model` with the stage's TP rank and first layer).

    Args:
        stage: a :class:`~cp_megatron.mcore.stage.McoreLlamaStage`.
        reader: a checkpoint reader (HF tensor names) or :class:`~cp_megatron.model.weights.DummyReader`.
        progress: a tqdm bar on stderr.

    Raises:
        ValueError: a tensor missing in the checkpoint or whose slice has the wrong shape.
    """
    load_gpt_model(stage.model, reader, tp_rank=stage.layout.tp_rank, tp_size=stage.layout.tp_size,
                   first_layer=stage.first_layer, config=stage.config, progress=progress)


@torch.no_grad()
def load_gpt_model(model, reader, *, tp_rank: int = 0, tp_size: int = 1, first_layer: int = 0,
                   config=None, progress: bool = False) -> None:
    """Copy this TP rank's slice of every parameter of a megatron-core Llama ``GPTModel``
    (e.g. one built from :func:`~cp_megatron.mcore.spec.llama_layer_spec` and
    :func:`~cp_megatron.mcore.spec.transformer_config`, whose parameters are uninitialised)
    from ``reader`` (any format: :func:`cp_megatron.checkpoint.open_checkpoint`).

    Args:
        model: the ``GPTModel`` (or one PP stage of it), megatron-core parameter names.
        reader: a checkpoint reader (HF tensor names) or :class:`~cp_megatron.model.weights.DummyReader`.
        tp_rank, tp_size: this rank's TP coordinates (``parallel_state.topology()``).
        first_layer: global index of the model's first decoder layer (PP stages after the first).
        config: the model's ModelConfig (default ``reader.config``).
        progress: a tqdm bar on stderr.

    Raises:
        ValueError: a tensor missing in the checkpoint or whose slice has the wrong shape.
    """
    from tqdm import tqdm

    cfg = config if config is not None else reader.config
    params = [(n, p) for n, p in model.named_parameters()]
    for name, param in tqdm(params, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        sources, dim = hf_sources(global_layer_name(name, first_layer), cfg)
        parts = [reader.read(s, dtype=param.dtype) if dim is None else
                 reader.read(s, shard_dim=dim, tp_rank=tp_rank, tp_size=tp_size, dtype=param.dtype)
                 for s in sources]
        if name.endswith(QKV):
            tensor = fuse_qkv(*parts, num_groups=cfg.num_kv_heads // tp_size)
        elif name.endswith(FC1):
            tensor = fuse_fc1(*parts)
        else:
            tensor = parts[0]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor(s) {', '.join(sources)}: expected shape {tuple(param.shape)} for "
                             f"{name} on TP rank {tp_rank}/{tp_size}, checkpoint gives {tuple(tensor.shape)}")
        param.copy_(tensor)
