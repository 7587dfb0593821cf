"""A Llama-style megatron-core layer spec with ring attention, and its TransformerConfig.

``llama_layer_spec()`` is megatron-core's local GPT layer spec (``get_gpt_layer_local_spec``:
torch RMSNorm, column / row parallel linears, SwiGLU MLP, GQA ``SelfAttention``) with one
part swapped: ``core_attention`` is :class:`RingCoreAttention`.  A megatron-core user puts
ring attention into their own ``GPTModel`` the same way::

    spec = llama_layer_spec()
    model = GPTModel(config=transformer_config(...), transformer_layer_spec=spec, ...)

The local spec, not Transformer Engine's: TE's fused ``TELayerNormColumnParallelLinear``
and ``TEDotProductAttention`` need CUDA and transformer_engine; the local spec runs on CPU
and GPU alike, and core attention is ours either way.

Source: megatron-core 0.16 ``models/gpt/gpt_layer_specs.py`` (``get_gpt_layer_local_spec``),
``transformer/transformer_config.py``; Llama 3 architecture (RMSNorm, SwiGLU, GQA, no bias).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from cp_megatron.mcore.core_attention import RingCoreAttention
from cp_megatron.model.config import ModelConfig

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig


def llama_layer_spec() -> ModuleSpec:
    """megatron-core's local GPT layer spec (RMSNorm) with ``core_attention=RingCoreAttention``."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention
    attn_sub = dataclasses.replace(attention.submodules, core_attention=RingCoreAttention)
    layer_sub = dataclasses.replace(spec.submodules,
                                    self_attention=dataclasses.replace(attention, submodules=attn_sub))
    return dataclasses.replace(spec, submodules=layer_sub)


def pipeline_layout(stage_sizes: list[int]) -> list[list[str]]:
    """megatron-core's ``pipeline_model_parallel_layout`` for stages of ``stage_sizes`` decoder
    layers: the embedding on the first stage, the output layer ("loss") on the last."""
    layout = [["decoder"] * n for n in stage_sizes]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def transformer_config(config: ModelConfig, *, tp_size: int = 1, cp_size: int = 1, pp_size: int = 1,
                       stage_sizes: list[int] | None = None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> TransformerConfig:
    """The megatron-core TransformerConfig of a Llama ``config`` for inference.

    No bias, RMSNorm (``rms_norm_eps``), SwiGLU (``gated_linear_unit`` + SiLU), GQA
    (``num_query_groups`` = NKV), no dropout, no fusions (they need CUDA kernels; the ring's
    kernels are ours), parameters in ``dtype`` allocated on the CPU when ``device`` is the CPU.
    With PP > 1, ``stage_sizes`` (decoder layers per stage) becomes megatron-core's
    ``pipeline_model_parallel_layout`` (:func:`pipeline_layout`), so any split works.

    ``perform_initialization=False``: a ``GPTModel`` built with this config holds
    uninitialised memory (``torch.empty``) until weights are loaded, e.g. with
    :func:`cp_megatron.mcore.weights.load_gpt_model` (any checkpoint reader) or
    ``model.load_state_dict`` (a megatron-core state dict of the same TP / PP layout).
    """
    layout = pipeline_layout(stage_sizes) if pp_size > 1 else None
    with warnings.catch_warnings():   # 0.16 warns about its own default cuda_graph_scope
        warnings.simplefilter("ignore", UserWarning)
        return TransformerConfig(
            num_layers=config.num_layers, hidden_size=config.hidden_size,
            num_attention_heads=config.num_heads, num_query_groups=config.num_kv_heads,
            kv_channels=config.head_dim, ffn_hidden_size=config.intermediate_size,
            normalization="RMSNorm", layernorm_epsilon=config.rms_norm_eps,
            gated_linear_unit=True, activation_func=torch.nn.functional.silu,
            add_bias_linear=False, add_qkv_bias=False,
            hidden_dropout=0.0, attention_dropout=0.0,
            bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
            apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
            tensor_model_parallel_size=tp_size, context_parallel_size=cp_size,
            pipeline_model_parallel_size=pp_size, pipeline_model_parallel_layout=layout,
            sequence_parallel=False,
            params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            use_cpu_initialization=torch.device(device).type == "cpu", perform_initialization=False)
