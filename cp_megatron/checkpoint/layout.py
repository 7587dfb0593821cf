"""Tensor layout rules shared by the readers: expected shapes, TP slices, q/k row order.

Pure integer arithmetic (no torch, no I/O), so it is tested in milliseconds and used by
every reader the same way.

Source: transformers ``convert_llama_weights_to_hf.py`` (``permute``: Meta's interleaved
q/k rows -> HF rotate-half rows); llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``
(the inverse, so GGUF rows are Meta-interleaved too).
"""

from __future__ import annotations

from cp_megatron.checkpoint.keys import EMBED, FINAL_NORM, LM_HEAD, split_layer_name


def expected_shape(config, name: str) -> tuple[int, ...]:
    """Shape of canonical tensor ``name`` in HF layout ``[out_features, in_features]``.

    Args:
        config: a :class:`cp_megatron.model.config.ModelConfig`.
        name: canonical tensor name.

    Raises:
        KeyError: ``name`` is not a Llama tensor.
    """
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    if name in (EMBED, LM_HEAD):
        return (v, d)
    if name == FINAL_NORM:
        return (d,)
    layer, suffix = split_layer_name(name)
    table = {
        "self_attn.q_proj.weight": (q_rows, d),
        "self_attn.k_proj.weight": (kv_rows, d),
        "self_attn.v_proj.weight": (kv_rows, d),
        "self_attn.o_proj.weight": (d, q_rows),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
    if layer is None or layer >= config.num_layers or suffix not in table:
        raise KeyError(name)
    return table[suffix]


def rotary_heads(config, name: str) -> int:
    """Heads whose rows make up q_proj (NH) or k_proj (NKV) -- the unit of the q/k permutation."""
    return config.num_heads if split_layer_name(name)[1].startswith("self_attn.q_proj") else config.num_kv_heads


def interleaved_rows(num_heads: int, head_dim: int) -> list[int]:
    """Source row for every HF (rotate-half) row of a q/k projection stored interleaved.

    Meta and llama.cpp store the two RoPE halves of a head interleaved (row pairs
    ``(2i, 2i+1)``); HF stores them as halves (``i`` and ``i + DH/2``).  HF row
    ``h*DH + half*DH/2 + i`` is stored row ``h*DH + 2*i + half``.

    Args:
        num_heads: heads in this projection (NH for q, NKV for k).
        head_dim: DH, even.

    Returns:
        ``src`` with ``hf[r] = stored[src[r]]``, length ``num_heads * head_dim``.
    """
    half = head_dim // 2
    return [h * head_dim + 2 * i + j for h in range(num_heads) for j in range(2) for i in range(half)]


def slice_bounds(size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """``[start, stop)`` of contiguous slice ``tp_rank`` of ``tp_size`` equal slices of ``size``.

    Raises:
        ValueError: ``tp_size`` does not divide ``size`` or ``tp_rank`` is out of range.
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    if size % tp_size:
        raise ValueError(f"tp_size {tp_size} does not divide dimension of size {size}")
    part = size // tp_size
    return tp_rank * part, (tp_rank + 1) * part


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden width from Meta ``params.json`` (``FeedForward.__init__`` of llama3/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
