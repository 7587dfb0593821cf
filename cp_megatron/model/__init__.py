"""Llama 3 model: config and presets, RoPE, the layers, the sharded KV cache."""

from cp_megatron.model.config import PRESETS, ModelConfig, get_preset

__all__ = ["ModelConfig", "PRESETS", "get_preset"]
