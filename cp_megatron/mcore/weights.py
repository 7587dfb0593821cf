"""Hugging Face Llama tensors <-> a megatron-core GPTModel's state dict, one TP slice at a time.

megatron-core's layout (local spec, no bias):

* ``decoder.layers.{i}.self_attention.linear_qkv.weight`` ``[NKV * (NH/NKV + 2) * DH, D]``:
  per query group g (a KV head), the group's NH/NKV query heads, then its key head, then its
  value head.  Column-parallel: TP rank r holds groups ``r*NKV/tp .. (r+1)*NKV/tp - 1``.
* ``mlp.linear_fc1.weight`` ``[2F, D]``: per TP shard ``[gate_r; up_r]`` (megatron's SwiGLU
  chunks the local output in two); ``linear_fc2`` (down) and ``linear_proj`` (o) are
  row-parallel (split on dim 1).
* ``input_layernorm`` / ``pre_mlp_layernorm`` = HF ``input_layernorm`` /
  ``post_attention_layernorm``; ``decoder.final_layernorm`` = ``model.norm``;
  ``embedding.word_embeddings`` (vocab-parallel) and ``output_layer`` (column-parallel) =
  ``embed_tokens`` / ``lm_head``.

:func:`fuse_qkv` / :func:`split_qkv` and :func:`fuse_fc1` / :func:`split_fc1` are the pure
maps; :func:`load_weights` fills a :class:`~cp_megatron.mcore.stage.McoreLlamaStage` from
any checkpoint reader (HF names); :class:`~cp_megatron.mcore.reader.MegatronReader` goes
the other way for checkpoints saved by megatron-core.

Source: megatron-core 0.16 ``transformer/attention.py`` (``SelfAttention.get_query_key_value_tensors``:
the ``[ng, (np/ng + 2) * hn]`` split), ``transformer/mlp.py`` (``glu``: ``torch.chunk(x, 2, -1)``).
"""

from __future__ import annotations

import re

import torch

from cp_megatron.checkpoint import keys

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
# megatron-core layer suffix -> (HF layer suffix, TP shard dim); fused ones are handled apart
_LAYER_MAP = {
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", None),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", 1),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", 1),
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": (keys.EMBED, 0),
    "decoder.final_layernorm.weight": (keys.FINAL_NORM, None),
    "output_layer.weight": (keys.LM_HEAD, 0),
}
QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """HF q ``[G*npg*DH, D]``, k, v ``[G*DH, D]`` (G query groups, any TP slice of whole
    groups) -> megatron-core ``linear_qkv`` rows ``[G*(npg+2)*DH, D]``, group-major."""
    d = q.shape[-1]
    q = q.reshape(num_groups, -1, d)
    k, v = k.reshape(num_groups, -1, d), v.reshape(num_groups, -1, d)
    return torch.cat([q, k, v], dim=1).reshape(-1, d)


def split_qkv(qkv: torch.Tensor, num_groups: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: (q ``[G*npg*DH, D]``, k ``[G*DH, D]``, v ``[G*DH, D]``)."""
    d = qkv.shape[-1]
    grouped = qkv.reshape(num_groups, -1, d)
    q_rows = grouped.shape[1] - 2 * head_dim
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One TP shard's HF gate / up ``[F/tp, D]`` -> its ``linear_fc1`` rows ``[2F/tp, D]``."""
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_fc1` for one (TP 1: the whole) shard: (gate, up)."""
    return fc1.chunk(2, dim=0)


def hf_sources(param_name: str, config) -> tuple[list[str], int | None]:
    """(HF tensor names, TP shard dim) that make megatron-core parameter ``param_name``.

    Raises:
        KeyError: a parameter name with no mapping.
    """
    if param_name in _GLOBAL_MAP:
        hf, dim = _GLOBAL_MAP[param_name]
        if hf == keys.LM_HEAD and config.tie_word_embeddings:
            hf = keys.EMBED
        return [hf], dim
    match = _LAYER.fullmatch(param_name)
    if match is None:
        raise KeyError(f"no checkpoint mapping for megatron-core parameter {param_name!r}")
    prefix, suffix = f"model.layers.{match.group(1)}.", match.group(2)
    if suffix == QKV:
        return [prefix + f"self_attn.{p}_proj.weight" for p in "qkv"], 0
    if suffix == FC1:
        return [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"], 0
    if suffix not in _LAYER_MAP:
        raise KeyError(f"no checkpoint mapping for megatron-core parameter {param_name!r}")
    hf, dim = _LAYER_MAP[suffix]
    return [prefix + hf], dim


@torch.no_grad()
def load_weights(stage, reader, progress: bool = False) -> None:
    """Copy this TP rank's slice of every parameter of ``stage.model`` from ``reader``.

    Args:
        stage: a :class:`~cp_megatron.mcore.stage.McoreLlamaStage`.
        reader: a checkpoint reader (HF tensor names) or :class:`~cp_megatron.model.weights.DummyReader`.
        progress: a tqdm bar on stderr.

    Raises:
        ValueError: a tensor missing in the checkpoint or whose slice has the wrong shape.
    """
    from tqdm import tqdm

    cfg, tp_rank, tp_size = stage.config, stage.layout.tp_rank, stage.layout.tp_size
    params = [(n, p) for n, p in stage.model.named_parameters()]
    for name, param in tqdm(params, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        sources, dim = hf_sources(name, cfg)
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
