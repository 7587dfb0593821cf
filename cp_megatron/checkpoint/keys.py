"""Tensor names: the canonical (Hugging Face Llama) names and the Meta / GGUF equivalents.

Pure tables and string functions; no torch, no I/O.  Every reader exposes tensors under
the canonical names, so the model code knows one naming only.

Source: transformers ``LlamaForCausalLM`` state-dict keys; Meta ``llama3/model.py``
(``Transformer``) parameter names; llama.cpp ``gguf-py/gguf/tensor_mapping.py`` (LLM_ARCH_LLAMA).
"""

from __future__ import annotations

import re

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Per-layer suffixes after "model.layers.{i}." in canonical order.
LAYER_SUFFIXES = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)

# canonical layer suffix -> Meta consolidated.NN.pth suffix after "layers.{i}."
META_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
META_GLOBAL = {EMBED: "tok_embeddings.weight", FINAL_NORM: "norm.weight", LM_HEAD: "output.weight"}

# canonical layer suffix -> GGUF suffix after "blk.{i}."
GGUF_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
GGUF_GLOBAL = {EMBED: "token_embd.weight", FINAL_NORM: "output_norm.weight", LM_HEAD: "output.weight"}

# Tensors stored with q/k rows interleaved per head (Meta, llama.cpp) instead of HF's
# rotate-half order; readers of those formats permute rows back.
ROTARY_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def canonical_names(num_layers: int, tie_word_embeddings: bool) -> list[str]:
    """All canonical tensor names of a Llama model, embedding first, LM head last.

    Args:
        num_layers: transformer blocks.
        tie_word_embeddings: when True the LM head is the embedding and ``lm_head.weight``
            is not listed.
    """
    names = [EMBED]
    for i in range(num_layers):
        names += [f"model.layers.{i}.{suffix}" for suffix in LAYER_SUFFIXES]
    names.append(FINAL_NORM)
    if not tie_word_embeddings:
        names.append(LM_HEAD)
    return names


def split_layer_name(name: str) -> tuple[int | None, str]:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``(3, "mlp.up_proj.weight")``; globals -> ``(None, name)``."""
    match = _LAYER_RE.match(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2)


def is_rotary(name: str) -> bool:
    """True for q_proj / k_proj weights (the rows RoPE rotates)."""
    return split_layer_name(name)[1] in ROTARY_SUFFIXES


def is_attention_projection(name: str) -> bool:
    """True for q/k/v/o projection weights (their TP split must follow heads)."""
    return split_layer_name(name)[1].startswith("self_attn.")


def meta_name(name: str) -> str:
    """Canonical name -> key in Meta ``consolidated.NN.pth`` (``KeyError`` if none)."""
    layer, suffix = split_layer_name(name)
    if layer is None:
        return META_GLOBAL[name]
    return f"layers.{layer}.{META_LAYER[suffix]}"


def gguf_name(name: str) -> str:
    """Canonical name -> GGUF tensor name (``KeyError`` if none)."""
    layer, suffix = split_layer_name(name)
    if layer is None:
        return GGUF_GLOBAL[name]
    return f"blk.{layer}.{GGUF_LAYER[suffix]}"
