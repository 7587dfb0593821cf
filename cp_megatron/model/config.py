"""Llama 3 model configuration and named presets.

A :class:`ModelConfig` is built from a preset name, a Hugging Face ``config.json``,
a Meta ``params.json`` or GGUF metadata (the readers live in
:mod:`cp_megatron.checkpoint`).  Config is never guessed from a file name.

Source: Meta's published Llama 3.1 model cards / ``params.json`` (8B, 70B, 405B), Llama 3.2 1B
``config.json``;
HuggingFaceTB/SmolLM2-135M-Instruct ``config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Optional


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling ("rope_type": "llama3").

    Source: Llama 3.1 reference code ``apply_scaling`` / HF ``_compute_llama3_parameters``.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of a Llama 3 style decoder.

    Attributes:
        name: a label for logs (preset name or checkpoint path).
        vocab_size: number of token ids (rows of the embedding).
        hidden_size: model width D.
        intermediate_size: SwiGLU hidden width (FFN).
        num_layers: transformer blocks.
        num_heads: query heads NH.
        num_kv_heads: key/value heads NKV (GQA when NKV < NH, MQA when 1).
        head_dim: DH; usually hidden_size // num_heads.
        rope_theta: RoPE base.
        rope_scaling: Llama 3.1 frequency scaling, or None.
        rms_norm_eps: RMSNorm epsilon.
        max_position_embeddings: the longest context the model supports (tokens).
        tie_word_embeddings: LM head shares the embedding matrix.
        bos_token_id / eos_token_ids: special ids when known (else None / ()).
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config '{self.name}': {key} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config '{self.name}': num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")

    def num_parameters(self) -> int:
        """Total parameter count (embedding, layers, final norm, LM head unless tied)."""
        d, f = self.hidden_size, self.intermediate_size
        q = d * self.num_heads * self.head_dim
        kv = 2 * d * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * d
        per_layer = q + kv + o + 3 * d * f + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_layers * per_layer + d + head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        if data.get("rope_scaling") is not None and not isinstance(data["rope_scaling"], RopeScaling):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
        return cls(**data)

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
_LLAMA3_EOS = (128001, 128008, 128009)

PRESETS: dict[str, ModelConfig] = {
    "llama3.1-8b": ModelConfig(
        name="llama3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    "llama3.1-70b": ModelConfig(
        name="llama3.1-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    "llama3.1-405b": ModelConfig(
        name="llama3.1-405b", vocab_size=128256, hidden_size=16384, intermediate_size=53248,
        num_layers=126, num_heads=128, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        rope_scaling=None, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    "llama3.2-1b": ModelConfig(
        name="llama3.2-1b", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=_LLAMA3_EOS),
    # Small random models (weights: seeded "dummy" init) for tests and benchmarks.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=131072),
    "tiny-long": ModelConfig(
        name="tiny-long", vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=4,
        num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, max_position_embeddings=131072),
    # A "64K-trained" long-context model small enough to prefill 128K+ tokens on CPU
    # (model.max_context runs it past its trained length).
    "tiny-64k": ModelConfig(
        name="tiny-64k", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
        num_heads=2, num_kv_heads=1, head_dim=64, rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE, max_position_embeddings=65536),
}


def get_preset(name: str) -> ModelConfig:
    """Return the preset called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
