"""Ring attention as a megatron-core module: core attention, layer spec, and a GPTModel stage.

    from cp_megatron.mcore import RingCoreAttention, RingRoundParams, llama_layer_spec

See docs/megatron.md.
"""

from cp_megatron.mcore.core_attention import RingCoreAttention, RingRoundParams
from cp_megatron.mcore.spec import llama_layer_spec, transformer_config
from cp_megatron.mcore.weights import load_gpt_model

__all__ = ["RingCoreAttention", "RingRoundParams", "llama_layer_spec", "load_gpt_model", "transformer_config"]
