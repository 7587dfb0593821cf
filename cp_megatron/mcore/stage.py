"""A megatron-core ``GPTModel`` with ring attention behind the engine's stage interface.

:class:`McoreLlamaStage` has the interface :class:`~cp_megatron.engine.InferenceEngine`
uses for :class:`~cp_megatron.model.llama.LlamaStage` (``forward(inputs, positions,
kv_cache, plan, *, cp_group, stats, logits_index)``, ``new_kv_cache``,
``num_local_layers``, ``config`` / ``layout`` / ``dtype`` / ``device``), so the engine runs
prefill, partial prefill and decode on a megatron-core model unchanged.

A round runs the GPTModel's own parts: ``embedding`` -> ``decoder`` (the TransformerBlock
of :func:`~cp_megatron.mcore.spec.llama_layer_spec` layers, final RMSNorm) ->
``output_layer``.  ``GPTModel.forward`` itself is not called: its RoPE embedding is
``rotary_pos_emb(seq_len)`` for positions ``0..s-1`` (sliced by CP rank in megatron's
2N-chunk order), while our tokens sit at arbitrary global positions (load-balanced
prefill chunks, round-robin decode, partial prefill after a cache).  The stage builds the
per-token embedding ``[T, 1, 1, DH]`` from the model's ``rotary_pos_emb.inv_freq`` at each
token's global position and passes it to the decoder with the round's
:class:`~cp_megatron.mcore.core_attention.RingRoundParams`.

Pipeline parallelism: each stage is a ``GPTModel(pre_process=first, post_process=last)``
whose layers are the engine's layer range (:func:`~cp_megatron.sharding.chunk_bounds`, given to
megatron-core as ``pipeline_model_parallel_layout``); the engine sends activations between
stages.  FP8 rowwise weights are refused (use ``model.implementation: native``); see
docs/megatron.md.

Source: megatron-core 0.16 ``models/gpt/gpt_model.py`` (``_preprocess``, ``_postprocess``),
``models/common/embeddings/rotary_pos_embedding.py``; arXiv 2411.01783 §3.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from cp_megatron import parallel_state
from cp_megatron.attention.plan import AttentionPlan
from cp_megatron.attention.ring import RingStats
from cp_megatron.mcore.core_attention import RingRoundParams
from cp_megatron.mcore.spec import llama_layer_spec, transformer_config
from cp_megatron.model.config import ModelConfig
from cp_megatron.model.kv_cache import KVCache
from cp_megatron.model.llama import StageLayout, _gather_last_dim, check_tp
from cp_megatron.model.rope import inv_frequencies
from cp_megatron.sharding import chunk_bounds

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.models.gpt.gpt_model import GPTModel

# megatron-core's ``rope_scaling=True`` is Llama 3.1's scaling with only the factor as an argument:
# (low_freq_factor, high_freq_factor, original_max_position_embeddings) are fixed at these.
_MCORE_ROPE_FIXED = (1.0, 4.0, 8192)


def megatron_rope_args(config: ModelConfig) -> dict:
    """GPTModel's RoPE keywords for ``config``: ``rope_scaling`` / ``rope_scaling_factor`` when
    megatron-core's Llama 3.1 scaling expresses ``config.rope_scaling``, else none (the stage
    then installs :func:`~cp_megatron.model.rope.inv_frequencies` itself)."""
    s = config.rope_scaling
    if s is not None and (s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == _MCORE_ROPE_FIXED:
        return {"rope_scaling": True, "rope_scaling_factor": s.factor}
    return {"rope_scaling": False}


class McoreLlamaStage(nn.Module):
    """One TP rank of a megatron-core Llama ``GPTModel`` whose core attention is the ring.

    Args:
        config: model dimensions.
        layout: TP / PP coordinates of this rank (as parallel state's).
        dtype: parameter and activation dtype.
        device: "cpu" or a CUDA device.
        weights: only "dtype" (no FP8 rowwise layers in the megatron-core path).

    Parallel state (:func:`cp_megatron.parallel_state.initialize`) must be up: the model's
    ``pg_collection`` is :func:`cp_megatron.parallel_state.process_groups`.

    Parameter names are megatron-core's (``embedding.word_embeddings.weight``,
    ``decoder.layers.{i}.self_attention.linear_qkv.weight``, ...); see
    :mod:`cp_megatron.mcore.weights`.

    Raises:
        ValueError: FP8 weights, or a TP size that does not split the model.
    """

    def __init__(self, config: ModelConfig, layout: StageLayout, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", weights: str = "dtype") -> None:
        super().__init__()
        if weights != "dtype":
            raise ValueError(f"model.implementation megatron-core: model.weights must be 'dtype', got {weights!r} "
                             "(FP8 rowwise weights need model.implementation: native)")
        check_tp(config, layout.tp_size)
        self.config, self.layout, self.dtype, self.weights = config, layout, dtype, weights
        self.device = torch.device(device)
        topo = parallel_state.topology()
        if (topo.tp_size, topo.pp_size, topo.pp_rank) != (layout.tp_size, layout.pp_size, layout.pp_rank):
            raise ValueError(f"layout {layout} differs from parallel state's {topo}")
        self.first_layer, self.last_layer = layout.layer_range(config.num_layers)
        stage_sizes = [b - a for a, b in chunk_bounds(config.num_layers, layout.pp_size)]
        tc = transformer_config(config, tp_size=layout.tp_size, cp_size=topo.cp_size, pp_size=layout.pp_size,
                                stage_sizes=stage_sizes, dtype=dtype, device=self.device)
        self.model = GPTModel(
            config=tc, transformer_layer_spec=llama_layer_spec(), vocab_size=config.vocab_size,
            max_sequence_length=config.max_position_embeddings, pre_process=layout.is_first,
            post_process=layout.is_last,
            parallel_output=True, share_embeddings_and_output_weights=config.tie_word_embeddings,
            position_embedding_type="rope", rotary_percent=1.0, rotary_base=config.rope_theta,
            pg_collection=parallel_state.process_groups(), **megatron_rope_args(config))
        built = [layer.layer_number - 1 for layer in self.model.decoder.layers]
        assert built == list(range(self.first_layer, self.last_layer)), (built, self.first_layer, self.last_layer)
        rotary = self.model.rotary_pos_emb
        if config.rope_scaling is not None and not megatron_rope_args(config)["rope_scaling"]:
            rotary.inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        rotary.inv_freq = rotary.inv_freq.to(self.device)
        if self.device.type != "cpu":
            self.model.to(self.device)
        self.model.eval()
        self.requires_grad_(False)

    @property
    def num_local_layers(self) -> int:
        return self.last_layer - self.first_layer

    @property
    def layers(self) -> dict:
        """Global layer index (str) -> megatron-core TransformerLayer, as LlamaStage.layers."""
        return {str(layer.layer_number - 1): layer for layer in self.model.decoder.layers}

    @property
    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies ``[DH/2]`` float32 (the model's ``rotary_pos_emb``)."""
        return self.model.rotary_pos_emb.inv_freq

    def new_kv_cache(self, capacity: int = 0) -> KVCache:
        """An empty cache for this stage's layers and this TP rank's KV heads."""
        return KVCache(self.num_local_layers, self.config.num_kv_heads // self.layout.tp_size,
                       self.config.head_dim, dtype=self.dtype, device=self.device, capacity=capacity)

    def rotary_pos_emb(self, positions: torch.Tensor) -> torch.Tensor:
        """megatron-core's RoPE embedding (``RotaryEmbedding.get_emb`` layout, not interleaved)
        at int64 global ``positions`` ``[T]``: float32 ``[T, 1, 1, DH]``."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]        # [T, DH/2]
        return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                plan: AttentionPlan, *, cp_group=None, stats: Optional[RingStats] = None,
                logits_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run this stage on this rank's tokens of one round.

        Args:
            inputs: int64 ``[T]`` token ids on the first stage, else hidden ``[T, D]``.
            positions: int64 ``[T]`` global positions (on the stage's device).
            kv_cache: this rank's cache, this round's slots added (``KVCache.begin_round``).
            plan: the round's AttentionPlan (index tensors on the device).
            cp_group: the CP group (None for CP 1).
            stats: opt-in ring timings.
            logits_index: int64 ``[n]`` rows whose logits the last stage returns (default all).

        Returns:
            last stage: logits ``[n, vocab]`` float32, gathered over TP; other stages: hidden
            ``[T, D]`` for the next stage.
        """
        m = self.model
        t = inputs.shape[0]
        if t == 0:  # megatron-core's SelfAttention cannot run 0 tokens: one padding row
            inputs = inputs.new_zeros((1, *inputs.shape[1:]))
            positions = positions.new_zeros(1)
        params = RingRoundParams(plan=plan, kv_cache=kv_cache, first_layer=self.first_layer,
                                 ring_group=cp_group, stats=stats, num_tokens=t)
        if self.layout.is_first:
            x = m.embedding(input_ids=inputs[None, :], position_ids=None)               # [T, 1, D]
        else:
            x = inputs[:, None, :]                                                      # [T, 1, D]
            m.decoder.set_input_tensor(x)  # what a non-first TransformerBlock reads
        x = m.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=self.rotary_pos_emb(positions),
                      packed_seq_params=params)                          # [T, 1, D] (normed on the last stage)
        x = x[:t, 0]
        if not self.layout.is_last:
            return x
        if logits_index is not None:
            x = x.index_select(0, logits_index)
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        local, _ = m.output_layer(x, weight=weight)                                     # [n, V/tp]
        return _gather_last_dim(local.float(), self.layout.tp_size)
