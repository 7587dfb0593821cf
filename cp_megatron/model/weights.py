"""Filling a :class:`LlamaStage` from a checkpoint reader, one TP slice at a time.

Every parameter is named like Hugging Face's (``model.layers.{i}.self_attn.q_proj.weight``)
and split over TP like megatron-core's layers: column-parallel weights (q, k, v, gate, up,
LM head, vocab-parallel embedding) along dim 0, row-parallel (o, down) along dim 1,
norms replicated.  A reader returns only the slice asked for, so no rank ever holds
the whole checkpoint.

``DummyReader`` is the "dummy" load format (as in vLLM): seeded random weights that are
the same for every TP layout, for tests and benchmarks.

Source: megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` partitioning;
HF Llama parameter names.
"""

from __future__ import annotations

import zlib

import torch

from cp_megatron.model.config import ModelConfig

# suffix -> TP shard dim (None = replicated)
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


def _init_std(name: str) -> float | None:
    return None if name.endswith("norm.weight") else 0.02


class DummyReader:
    """Seeded random weights with the reader interface (``config``, ``names()``, ``read()``).

    Each tensor is drawn from N(0, 0.02^2) (norms: 1) by a generator seeded with the seed
    and the tensor's name, then sliced, so every TP layout sees the same model.
    """

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        self.config, self.seed = config, seed

    def names(self) -> list[str]:
        c = self.config
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            names += [p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                      "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                      "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                      "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
        if not c.tie_word_embeddings:
            names.append("lm_head.weight")
        return names

    def shape(self, name: str) -> tuple[int, ...]:
        c = self.config
        d, f, dh = c.hidden_size, c.intermediate_size, c.head_dim
        table = {"embed_tokens.weight": (c.vocab_size, d), "lm_head.weight": (c.vocab_size, d),
                 "q_proj.weight": (c.num_heads * dh, d), "k_proj.weight": (c.num_kv_heads * dh, d),
                 "v_proj.weight": (c.num_kv_heads * dh, d), "o_proj.weight": (d, c.num_heads * dh),
                 "gate_proj.weight": (f, d), "up_proj.weight": (f, d), "down_proj.weight": (d, f),
                 "norm.weight": (d,), "layernorm.weight": (d,)}
        return next(s for k, s in table.items() if name.endswith(k))

    def read(self, name: str, shard_dim: int | None = None, tp_rank: int = 0, tp_size: int = 1,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = self.shape(name)
        std = _init_std(name)
        if std is None:
            full = torch.ones(shape)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.randn(shape, generator=g) * std
        if shard_dim is not None:
            full = full.chunk(tp_size, dim=shard_dim)[tp_rank]
        return full.to(dtype).contiguous()


@torch.no_grad()
def load_weights(stage, reader, progress: bool = False) -> None:
    """Copy this rank's slice of every parameter of ``stage`` from ``reader``.

    Args:
        stage: a :class:`LlamaStage`; reader: a checkpoint reader or :class:`DummyReader`.
        progress: show a tqdm bar (tensors, bytes) on stderr.

    Raises:
        ValueError (CheckpointError from the readers): a missing tensor, or a slice whose
            shape differs from the parameter's, naming the tensor.
    """
    from tqdm import tqdm

    layout = stage.layout
    params = list(stage.named_parameters())
    bar = tqdm(params, desc="loading weights", unit="tensor", disable=not progress, leave=False)
    for param_name, param in bar:
        hf_name, dim = checkpoint_name(param_name, stage.config)
        if dim is None:
            tensor = reader.read(hf_name, dtype=param.dtype)
        else:
            tensor = reader.read(hf_name, shard_dim=dim, tp_rank=layout.tp_rank,
                                 tp_size=layout.tp_size, dtype=param.dtype)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor {hf_name}: expected shape {tuple(param.shape)} for TP rank "
                             f"{layout.tp_rank}/{layout.tp_size}, checkpoint gives {tuple(tensor.shape)}")
        param.copy_(tensor)
