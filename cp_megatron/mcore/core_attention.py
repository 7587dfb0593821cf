"""Ring attention as megatron-core's ``core_attention``: a drop-in for DotProductAttention.

megatron-core's ``SelfAttention`` projects ``linear_qkv``, applies RoPE, calls its
``core_attention`` submodule on ``[s, b, heads, head_dim]`` and projects ``linear_proj``.
:class:`RingCoreAttention` is such a submodule: it stores this layer's K/V in our sharded
:class:`~cp_megatron.model.kv_cache.KVCache` and runs :func:`planned_attention` (ring
pass-KV / pass-Q over the CP group) with the round's plan.

The contract (what reaches the module, and how)
------------------------------------------------
Tokens are packed: ``s`` = T, this CP rank's new tokens of every sequence of the round,
``b`` = 1.  The round's state travels as ``packed_seq_params`` -- a
:class:`RingRoundParams` (a ``PackedSeqParams`` subclass) that the caller builds once per
round and hands to the decoder; every layer reads it:

* ``plan``: the round's :class:`~cp_megatron.attention.plan.AttentionPlan` (index tensors
  on the device), built by the engine with no collective;
* ``kv_cache``: this rank's cache, with the round's slots already added
  (``KVCache.begin_round``); layer ``layer_number`` (1-based, global) stores into local
  layer ``layer_number - 1 - first_layer``;
* ``cp_group`` (None for CP 1) and opt-in ``stats`` (:class:`RingStats`).

Its ``qkv_format`` is ``"sbhd"``, so ``SelfAttention`` takes none of its THD paths
(``cu_seqlens`` RoPE, squeezing ``b``); the RoPE embedding the caller passes as
``rotary_pos_emb`` is per token, ``[T, 1, 1, DH]`` at each token's *global* position (CP
places tokens out of order), which megatron's ``apply_rotary_pos_emb`` applies row by row.

Why ``packed_seq_params`` and not megatron's ``inference_context``: given an inference
context, ``SelfAttention._adjust_key_value_for_inference`` keeps its own KV cache
(``key_value_memory_dict``, ``[max_seq, batch, ...]`` contiguous per sequence) or, for
dynamic batching, bypasses ``core_attention`` for ``flash_decode_and_prefill``; neither
holds a CP-sharded cache.  ``packed_seq_params`` reaches ``core_attention`` untouched.

``attention_mask`` is ignored (must be None): the mask is the plan's (causal within a
sequence, by global position, docs/design.md §3).  ``attention_bias``, dropout, sliding
windows and ``apply_query_key_layer_scaling`` are refused at construction or call.

Source: arXiv 2411.01783 §3 (Alg. 2, 3, 5); megatron-core 0.16
``transformer/dot_product_attention.py`` (the constructor / forward signature) and
``transformer/attention.py`` (``SelfAttention.forward``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from cp_megatron.attention.api import planned_attention

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule


@dataclass
class RingRoundParams(PackedSeqParams):
    """The round's state for :class:`RingCoreAttention`, passed as ``packed_seq_params``.

    Attributes:
        plan: the round's AttentionPlan (device index tensors).
        kv_cache: this rank's KVCache (this round's slots added).
        first_layer: global index (0-based) of this pipeline stage's first layer.
        ring_group: the CP process group (None for CP 1).  Not the inherited ``cp_group``:
            megatron-core reads that one to slice RoPE / THD sequences in training's CP layout.
        stats: opt-in RingStats.
        num_tokens: this rank's real tokens T; rows past it are padding (megatron-core's
            ``SelfAttention`` cannot reshape an empty ``[0, b, ...]`` batch, so a rank with
            no new token in a round runs one padding row: not stored, not attended, output 0).
            None: every row is real.
        qkv_format: "sbhd" (never "thd": megatron's THD paths must not run).
    """

    plan: Any = None
    kv_cache: Any = None
    first_layer: int = 0
    ring_group: Any = None
    stats: Any = None
    num_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.qkv_format is None:
            self.qkv_format = "sbhd"
        if self.qkv_format != "sbhd":
            raise ValueError(f"RingRoundParams.qkv_format: expected 'sbhd', got {self.qkv_format!r}")


class RingCoreAttention(MegatronModule):
    """Context-parallel exact attention with megatron-core's core-attention interface.

    Args (as megatron-core's ``DotProductAttention``, by keyword):
        config: the ``TransformerConfig`` (heads, query groups, kv_channels).
        layer_number: 1-based global layer number.
        attn_mask_type: must be ``AttnMaskType.causal`` (the plan's causal rule).
        attention_type: "self" (cross attention is refused).
        attention_dropout: must be None or 0 (inference).
        softmax_scale: None or 1/sqrt(kv_channels) (the plan's scale).
        cp_comm_type: accepted for interface compatibility; the variant is the plan's
            (pass-KV / pass-Q chosen per round by Alg. 1 / Alg. 5), not a constructor choice.
        pg_collection: megatron-core ``ProcessGroupCollection``; its ``tp`` size gives the
            local head counts.  The ring's CP group comes with each round (it equals
            ``pg_collection.cp`` when built by :mod:`cp_megatron.mcore.stage`).

    Raises:
        ValueError: a non-causal mask type, cross attention, dropout, another softmax
            scale, query-key layer scaling or windowed attention (not what the ring computes).
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **_unused) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"RingCoreAttention: attn_mask_type must be causal, got {attn_mask_type}")
        if attention_type != "self":
            raise ValueError(f"RingCoreAttention: attention_type must be 'self', got {attention_type!r}")
        if attention_dropout or config.attention_dropout:
            raise ValueError("RingCoreAttention: attention dropout must be 0 (inference only)")
        if config.apply_query_key_layer_scaling or config.window_size is not None:
            raise ValueError("RingCoreAttention: apply_query_key_layer_scaling and window_size are not supported")
        tp_size = pg_collection.tp.size() if pg_collection is not None else config.tensor_model_parallel_size
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads // tp_size            # NH local
        self.num_kv_heads = config.num_query_groups // tp_size            # NKV local
        self.head_dim = config.kv_channels                                 # DH
        if softmax_scale is not None and not math.isclose(softmax_scale, 1.0 / math.sqrt(self.head_dim)):
            raise ValueError(f"RingCoreAttention: softmax_scale must be 1/sqrt(kv_channels), got {softmax_scale}")
        self.cp_comm_type = cp_comm_type

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[RingRoundParams] = None) -> torch.Tensor:
        """Store this layer's K/V in the cache, attend over the CP group's cache.

        Args:
            query: ``[S, 1, NH, DH]`` this rank's queries (RoPE applied); the first T rows
                (``packed_seq_params.num_tokens``) are real.
            key, value: ``[S, 1, NKV, DH]`` this rank's new keys (RoPE applied) and values.
            attention_mask: must be None (the plan masks).
            attn_mask_type: ignored (the constructor checked it is causal).
            attention_bias: must be None.
            packed_seq_params: the round's :class:`RingRoundParams`.

        Returns:
            ``[S, 1, NH * DH]`` in query's dtype (padding rows 0).

        Raises:
            ValueError: no RingRoundParams, a mask or bias given, or a batch dimension != 1.
        """
        if not isinstance(packed_seq_params, RingRoundParams):
            raise ValueError("RingCoreAttention needs packed_seq_params=RingRoundParams(...) for the round "
                             "(plan, kv_cache, CP group); see cp_megatron.mcore.core_attention")
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("RingCoreAttention: attention_mask / attention_bias must be None "
                             "(the round plan's causal rule masks)")
        if query.shape[1] != 1:
            raise ValueError(f"RingCoreAttention: tokens are packed with batch 1, got query {tuple(query.shape)}")
        p = packed_seq_params
        rows = query.shape[0]
        t = rows if p.num_tokens is None else p.num_tokens
        layer = self.layer_number - 1 - p.first_layer
        k_new = key[:t].view(t, self.num_kv_heads, self.head_dim)
        v_new = value[:t].view(t, self.num_kv_heads, self.head_dim)
        p.kv_cache.store(layer, k_new, v_new)          # replicated-Q: keeps this rank's rows only
        k_all, v_all = p.kv_cache.layer(layer, p.plan.sent_kv_len)                    # views
        q = query[:t].view(t, self.num_heads, self.head_dim)                           # [T, NH, DH]
        out, _ = planned_attention(q, k_all, v_all, p.plan, group=p.ring_group, stats=p.stats)
        out = out.reshape(t, 1, self.num_heads * self.head_dim)
        if rows > t:                                                                   # padding rows
            out = torch.cat([out, out.new_zeros(rows - t, 1, out.shape[2])])
        return out
