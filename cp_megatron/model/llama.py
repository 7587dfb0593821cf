"""Llama 3 for inference over TP x CP x PP: one pipeline stage of one TP rank.

Tokens are packed without a batch dimension: ``hidden [T, D]`` holds this rank's T
tokens of any number of sequences, each with its global position and sequence id.
TP uses megatron-core's column / row parallel linear layers and vocab-parallel
embedding; attention stores this round's K/V in the sharded :class:`KVCache`, then runs
:func:`planned_attention` over the CP group with the round's plan, which the engine built
once: a layer does device work and the ring's communication only.  PP stages
hold a contiguous range of layers; the engine passes activations between stages.

    embed -> [RMSNorm -> GQA attention (RoPE at global positions) -> +res
              -> RMSNorm -> SwiGLU MLP -> +res] x L -> RMSNorm -> LM head

Source: Llama 3 (Grattafiori et al., 2024) architecture; HF ``modeling_llama.py``;
megatron-core ``tensor_parallel.layers``; arXiv 2411.01783 §3 (CP attention).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from cp_megatron.attention.api import planned_attention
from cp_megatron.attention.plan import AttentionPlan
from cp_megatron.attention.ring import RingStats
from cp_megatron.model.config import ModelConfig
from cp_megatron.model.fp8_layers import linear_classes
from cp_megatron.model.kv_cache import KVCache
from cp_megatron.model.rope import RopeTables, apply_rope_tables, inv_frequencies, rope_tables
from cp_megatron.model.tp_rule import tp_problem
from cp_megatron.sharding import chunk_bounds

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig


@dataclass(frozen=True)
class StageLayout:
    """Which part of the model this rank builds.

    Attributes:
        tp_size, tp_rank: tensor-parallel degree and rank (heads, FFN and vocab split).
        pp_size, pp_rank: pipeline degree and stage (contiguous layer ranges).
        num_layers: total layers of the model (to place this stage's range).
    """

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """Global layer indices ``[first, last)`` of this stage (sizes differ by <= 1)."""
        return chunk_bounds(num_layers, self.pp_size)[self.pp_rank]

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def check_tp(config: ModelConfig, tp_size: int) -> None:
    """Raise ValueError unless ``tp_size`` gives every TP rank whole heads and an equal
    share of the vocabulary and of the FFN (the one rule, :mod:`cp_megatron.model.tp_rule`)."""
    problem = tp_problem(config, tp_size)
    if problem:
        raise ValueError(problem)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in float32 inside, returned in x's dtype:
    ``torch.nn.functional.rms_norm``.  Under inference mode (:meth:`LlamaStage.forward`) that
    is one ``aten.rms_norm`` (the fused kernel on CUDA); with autograd keys active (plain
    ``no_grad``) torch 2.13 decomposes it into eight ops (casts, pow, mean, add, rsqrt, muls)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.eps, self.shape = eps, (dim,)
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, self.shape, self.weight, self.eps)


class RoundContext:
    """What every layer of one forward round shares: the RoPE tables of the tokens' global
    positions (:class:`~cp_megatron.model.rope.RopeTables`, in the activations' dtype), the
    cache, the round's attention plan, the CP group and the (opt-in) timing accumulator."""

    def __init__(self, rope: RopeTables, kv_cache: KVCache, plan: AttentionPlan,
                 cp_group, stats: Optional[RingStats]) -> None:
        self.rope, self.kv_cache, self.plan = rope, kv_cache, plan
        self.cp_group, self.stats = cp_group, stats


class Attention(nn.Module):
    """GQA self-attention with this TP rank's heads; K/V go to the sharded cache, then
    context-parallel attention over everything cached for the sequence.

    ``qkv_proj`` is one column-parallel GEMM (megatron-core's ``linear_qkv``, vLLM's
    ``QKVParallelLinear``): TP rank r's weight rows are ``[q heads of r; k heads of r;
    v heads of r]`` (:func:`cp_megatron.model.weights.load_weights` maps every checkpoint
    format onto it), so q and k are adjacent in the output and RoPE rotates both at once.
    """

    def __init__(self, config: ModelConfig, layer: int, mp: ModelParallelConfig, tp_size: int,
                 weights: str = "dtype") -> None:
        super().__init__()
        column, row = linear_classes(weights, config.num_kv_heads, tp_size, config.num_heads * config.head_dim)
        self.layer, self.head_dim = layer, config.head_dim
        self.num_heads = config.num_heads // tp_size          # NH local
        self.num_kv_heads = config.num_kv_heads // tp_size    # NKV local
        d, dh = config.hidden_size, config.head_dim
        col = dict(config=mp, init_method=nn.init.zeros_, bias=False, gather_output=False)
        self.qkv_proj = column(d, (config.num_heads + 2 * config.num_kv_heads) * dh, **col)
        self.o_proj = row(config.num_heads * dh, d, config=mp, init_method=nn.init.zeros_, bias=False,
                          input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        t = x.shape[0]
        nh, nkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)[0].view(t, nh + 2 * nkv, self.head_dim)      # [T, NH + 2 NKV, DH]
        qk = apply_rope_tables(qkv[:, :nh + nkv], ctx.rope)                  # [T, NH + NKV, DH]
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]
        ctx.kv_cache.store(self.layer, k, v)         # replicated-Q: keeps this rank's rows only
        del qkv, k, v                                # cached now: only q's rows stay alive
        k_all, v_all = ctx.kv_cache.layer(self.layer, ctx.plan.sent_kv_len)     # views
        out, _ = planned_attention(q, k_all, v_all, ctx.plan, group=ctx.cp_group, stats=ctx.stats,
                                   need_lse=False)
        return self.o_proj(out.reshape(t, nh * self.head_dim))[0]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), FFN split over TP ranks; gate and up are one
    column-parallel GEMM ``gate_up_proj`` (megatron-core's ``linear_fc1``: TP rank r's rows
    are ``[gate_r; up_r]``)."""

    def __init__(self, config: ModelConfig, mp: ModelParallelConfig, weights: str = "dtype") -> None:
        super().__init__()
        column, row = linear_classes(weights, config.num_kv_heads, mp.tensor_model_parallel_size,
                                     config.intermediate_size)
        d, f = config.hidden_size, config.intermediate_size
        col = dict(config=mp, init_method=nn.init.zeros_, bias=False, gather_output=False)
        self.gate_up_proj = column(d, 2 * f, **col)
        self.down_proj = row(f, d, config=mp, init_method=nn.init.zeros_, bias=False,
                             input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the [T, 2F/tp] gate_up output is dropped inside _swiglu: only [T, F/tp] reaches down_proj
        return self.down_proj(_swiglu(self.gate_up_proj(x)[0]))[0]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, mp: ModelParallelConfig, tp_size: int,
                 dtype: torch.dtype, device, weights: str = "dtype") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, layer, mp, tp_size, weights)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, mp, weights)

    def forward(self, x: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        """``x`` ``[T, D]`` -> ``[T, D]``; ``x`` itself is never written.  Both residual adds
        are in place on fresh tensors (the attention output, then that sum), so at most two
        ``[T, D]`` activations live at once (``x + attn`` would hold a third)."""
        h = self.self_attn(self.input_layernorm(x), ctx).add_(x)   # o_proj's fresh output
        return h.add_(self.mlp(self.post_attention_layernorm(h)))


class LlamaStage(nn.Module):
    """The layers of one pipeline stage on one TP rank (embedding on the first stage,
    final norm and LM head on the last).

    Args:
        config: model dimensions.
        layout: TP / PP coordinates of this rank.
        dtype: parameter and activation dtype (float32 or bfloat16).
        device: "cpu" or a CUDA device.
        weights: "dtype" (linear weights in ``dtype``) or "fp8-rowwise" (attention and MLP
            weights float8_e4m3fn with row scales, :mod:`cp_megatron.model.fp8`).

    Parameter names follow Hugging Face's (``model.layers.{i}...``) with global layer
    indices, except the fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj``, which
    :func:`~cp_megatron.model.weights.load_weights` fills from the q/k/v and gate/up tensors of
    any checkpoint format.
    """

    def __init__(self, config: ModelConfig, layout: StageLayout, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", weights: str = "dtype") -> None:
        super().__init__()
        check_tp(config, layout.tp_size)
        self.config, self.layout, self.dtype, self.weights = config, layout, dtype, weights
        self.device = torch.device(device)
        mp = ModelParallelConfig(tensor_model_parallel_size=layout.tp_size, params_dtype=dtype,
                                 use_cpu_initialization=self.device.type == "cpu",
                                 perform_initialization=False)
        self.first_layer, self.last_layer = layout.layer_range(config.num_layers)
        self.embed_tokens = (tensor_parallel.VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, init_method=nn.init.zeros_, config=mp)
            if layout.is_first else None)
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(config, i - self.first_layer, mp, layout.tp_size, dtype, self.device, weights)
            for i in range(self.first_layer, self.last_layer)})
        if layout.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, self.device)
            self.lm_head = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, config.vocab_size, config=mp, init_method=nn.init.zeros_,
                bias=False, gather_output=False,
                skip_weight_param_allocation=config.tie_word_embeddings and layout.is_first)
        self.inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)   # host
        self._inv_freq_on: Optional[torch.Tensor] = None   # its copy on the device, made once
        self.requires_grad_(False)

    @property
    def num_local_layers(self) -> int:
        return self.last_layer - self.first_layer

    def new_kv_cache(self, capacity: int = 0) -> KVCache:
        """An empty cache sized for this stage's layers and this TP rank's KV heads."""
        return KVCache(self.num_local_layers, self.config.num_kv_heads // self.layout.tp_size,
                       self.config.head_dim, dtype=self.dtype, device=self.device, capacity=capacity)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                plan: AttentionPlan, *, cp_group=None, stats: Optional[RingStats] = None,
                logits_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run this stage on this rank's tokens of one round.

        Args:
            inputs: token ids int64 ``[T]`` on the first stage, else hidden ``[T, D]``.
            positions: int64 ``[T]`` global positions (on the stage's device).
            kv_cache: this rank's cache, with this round's slots already added
                (:meth:`KVCache.begin_round`); each layer stores its K/V there.
            plan: the round's :class:`AttentionPlan` (index tensors on the device).
            cp_group: the CP group (None for CP 1).
            stats: opt-in ring timings.
            logits_index: int64 ``[n]`` token rows whose logits the last stage returns
                (default all).

        Returns:
            last stage: logits ``[n, vocab]`` float32, gathered over TP; other stages:
            hidden ``[T, D]`` for the next stage.  Runs under ``torch.inference_mode`` (no
            autograd dispatch: composite ops such as ``rms_norm`` stay one kernel); the results
            are inference tensors (read them freely; write into them only inside inference mode).
        """
        if self._inv_freq_on is None or self._inv_freq_on.device != positions.device:
            self._inv_freq_on = self.inv_freq.to(positions.device)   # once, not per round: a CUDA graph
        rope = rope_tables(positions, self._inv_freq_on, self.dtype)                     # once a round
        ctx = RoundContext(rope, kv_cache, plan, cp_group, stats)
        with torch.inference_mode():
            return self._layers_and_head(inputs, ctx, logits_index)

    def _layers_and_head(self, inputs: torch.Tensor, ctx: RoundContext,
                         logits_index: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.embed_tokens(inputs) if self.layout.is_first else inputs                  # [T, D]
        for layer in self.layers.values():
            x = layer(x, ctx)
        if not self.layout.is_last:
            return x
        if logits_index is not None:
            x = x.index_select(0, logits_index)
        x = self.norm(x)
        weight = self.embed_tokens.weight if self.lm_head.weight is None else None
        local = self.lm_head(x, weight=weight)[0].float()                                  # [n, V/tp]
        return _gather_last_dim(local, self.layout.tp_size)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused ``[T, 2F]`` output (rows ``[gate; up]``) -> ``[T, F]``, one new
    tensor; the caller's reference to ``gate_up`` is the only one left, so it is freed on return."""
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate).mul_(up)


def _gather_last_dim(t: torch.Tensor, tp_size: int) -> torch.Tensor:
    """All-gather the vocab shards of the logits over the TP group (CPU-safe; megatron's
    ``gather_output`` path assumes a CUDA device)."""
    if tp_size == 1:
        return t
    from cp_megatron.parallel_state import get_tp_group

    parts = [torch.empty_like(t) for _ in range(tp_size)]
    dist.all_gather(parts, t.contiguous(), group=get_tp_group())
    return torch.cat(parts, dim=-1)
