"""Hugging Face Llama tensor names and layout <-> megatron-core GPTModel's (pure maps).

megatron-core's layout (local spec, no bias):

* ``decoder.layers.{i}.self_attention.linear_qkv.weight`` ``[NKV * (NH/NKV + 2) * DH, D]``:
  per query group g (a KV head), the group's NH/NKV query heads, then its key head, then its
  value head.  Column-parallel: TP rank r holds groups ``r*NKV/tp .. (r+1)*NKV/tp - 1``.
* ``mlp.linear_fc1.weight`` ``[2F, D]``: per TP shard ``[gate_r; up_r]`` (megatron's SwiGLU
  chunks the local output in two); ``linear_fc2`` (down) and ``linear_proj`` (o) are
  row-parallel (split on dim 1).
* ``input_layernorm`` / ``pre_mlp_layernorm`` = HF ``input_layernorm`` /
  ``post_attention_layernorm`` (Transformer Engine specs store them as
  ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``);
  ``decoder.final_layernorm`` = ``model.norm``; ``embedding.word_embeddings``
  (vocab-parallel) and ``output_layer`` (column-parallel) = ``embed_tokens`` / ``lm_head``.

Used by :mod:`cp_megatron.mcore.weights` (HF reader -> GPTModel) and
:mod:`cp_megatron.checkpoint.megatron` (megatron-core state dict -> HF names).

Source: megatron-core 0.16 ``transformer/attention.py`` (``SelfAttention.get_query_key_value_tensors``:
the ``[ng, (np/ng + 2) * hn]`` split), ``transformer/mlp.py`` (``glu``: ``torch.chunk(x, 2, -1)``),
``models/gpt/gpt_layer_specs.py`` (``sharded_state_dict_keys_map``).
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


def global_layer_name(param_name: str, first_layer: int) -> str:
    """A PP stage's parameter name with its global layer index: megatron-core numbers a stage's
    ``decoder.layers.{i}`` from 0 (``first_layer`` = the stage's first global layer)."""
    match = _LAYER.fullmatch(param_name)
    if match is None or first_layer == 0:
        return param_name
    return f"decoder.layers.{int(match.group(1)) + first_layer}.{match.group(2)}"


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


# megatron-core local-spec norm name -> the Transformer Engine spec's (fused into the linear)
TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_HF_GLOBAL = {hf: name for name, (hf, _dim) in _GLOBAL_MAP.items()}
_HF_LAYER = {hf: suffix for suffix, (hf, _dim) in _LAYER_MAP.items()}
_HF_FUSED = {"self_attn.q_proj.weight": (QKV, 0), "self_attn.k_proj.weight": (QKV, 1),
             "self_attn.v_proj.weight": (QKV, 2), "mlp.gate_proj.weight": (FC1, 0),
             "mlp.up_proj.weight": (FC1, 1)}


def mcore_source(hf_name: str) -> tuple[str, int | None]:
    """(megatron-core parameter name, part) holding HF tensor ``hf_name``: part None = the
    whole tensor; 0/1/2 = q/k/v of ``linear_qkv`` (:func:`split_qkv`); 0/1 = gate/up of
    ``linear_fc1`` (:func:`split_fc1`).

    Raises:
        KeyError: not a Llama tensor name.
    """
    if hf_name in _HF_GLOBAL:
        return _HF_GLOBAL[hf_name], None
    layer, suffix = keys.split_layer_name(hf_name)
    if layer is None:
        raise KeyError(f"no megatron-core mapping for tensor {hf_name!r}")
    prefix = f"decoder.layers.{layer}."
    if suffix in _HF_FUSED:
        fused, part = _HF_FUSED[suffix]
        return prefix + fused, part
    if suffix in _HF_LAYER:
        return prefix + _HF_LAYER[suffix], None
    raise KeyError(f"no megatron-core mapping for tensor {hf_name!r}")
