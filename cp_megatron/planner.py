"""Analytic planner: predicted TTFT, TTIT and memory of TP x CP Llama 3 inference.

A pure cost model (imports neither torch nor megatron): FLOPs and bytes of one round per
transformer block, turned into seconds with a hardware profile's achieved rates
(:mod:`cp_megatron.hardware`).  The ring variant is the one the runtime picks
(:func:`cp_megatron.attention.heuristic.choose_strategy`).  Per block, for a batch of B
sequences with T new tokens on P cached, TP degree t, CP degree N, D = NH*DH, e bytes per
activation element:

    attention FLOPs  4*D*(T*P + T^2/2)*B          causal: the masked half of new x new is dropped
    linear FLOPs     2*W*T*B                      W = matmul weights of one block
    TP               2 all-reduces of (T*B/N)*hidden*e bytes per GPU, ring cost 2(t-1)/t
                     (NVLink; across nodes capped at gpus_per_node x the NIC bandwidth)
    CP pass-KV       N-1 messages of 2*((T+P)*B/N)*(NKV/t)*DH*e bytes per GPU
    CP pass-Q        N-1 messages of (T*B/N)*(NH/t)*DH*e, then an all_to_all of O and LSE

Every ring step costs max(compute, message), the last one has no message; the all_to_all
and the TP all-reduces are on the critical path.  Linear and attention time is a roofline:
max(FLOPs / achieved FLOP/s, bytes read / achieved HBM bandwidth).  Every block pays a fixed
cost: its kernel launches (the code model's count x ``launch_s``; on CPU the runtime's measured
host work) plus one per extra ring step.

TTIT is the decode step as the runtime runs it (:mod:`cp_megatron.decode_cost`): the code
model's launches x a per-launch cost (eager or from a CUDA graph), the step's collectives
through NCCL's latency model and the link bandwidths, and the HBM bytes of the weights and
the KV shard over the achieved bandwidth.
Equations, constants and the comparison with the paper: docs/planner.md.

Source: Yang et al., arXiv 2411.01783, §3.3-3.6 (sharding, ring variants, Alg. 1-5), §4
(§4.3: decode); NVIDIA/nccl src/graph/tuning.cc (collective latencies).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from cp_megatron.attention.heuristic import PASS_KV, choose_strategy
from cp_megatron.decode_cost import (DecodeStepCode, allreduce_latency, allreduce_time,
                                     decode_step_cost, group_bandwidth, kv_heads_per_rank, layer_launch_floor)
from cp_megatron.dtypes import BY_SHORT
from cp_megatron.hardware import HardwareProfile, load_profile
from cp_megatron.model.config import ModelConfig, get_preset
from cp_megatron.model.tp_rule import tp_problem

WEIGHT_DTYPES = ("bf16", "fp8", "fp32")
DTYPE_BYTES = {name: BY_SHORT[name].bytes for name in WEIGHT_DTYPES}  # the one dtype table
LSE_BYTES = 4  # LSE travels in float32 (docs/design.md §6)
ID_BYTES = 4  # a rotating query row carries its batch (sequence) id as int32 (Alg. 4)
# Presets the paper serves with FP8 row-wise weights (§4); others default to bf16.
DEFAULT_DTYPE = {"llama3.1-405b": "fp8"}
# KV reservation defaults of a run (runtime.kv_cache_margin_tokens / kv_cache_growth_tokens).
DEFAULT_KV_MARGIN_TOKENS = 8192
DEFAULT_KV_GROWTH_TOKENS = 16384



class PlanInputError(ValueError):
    """A planner input out of range; ``flag`` names the CLI flag that carries it."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


# --------------------------------------------------------------------------- formulas

def attention_flops(num_heads: int, head_dim: int, new_tokens: float, cached_tokens: float) -> float:
    """Causal attention FLOPs of one block for one sequence: 4*D*(T*P + T^2/2), D = NH*DH.

    QK^T and PV cost 2*D FLOPs each per (query, key) pair; every new token sees all P cached
    keys and, causally, half of the T new ones (the paper's convention: 502 TF/s at 1M).

    Source: arXiv 2411.01783 §4 (FLOPS utilization); docs/design.md §13.
    """
    d = num_heads * head_dim
    return 4.0 * d * (new_tokens * cached_tokens + new_tokens * new_tokens / 2.0)


def block_matmul_params(cfg: ModelConfig) -> int:
    """W: matmul weights of one transformer block (q, k, v, o projections and SwiGLU)."""
    h, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return h * cfg.num_heads * dh * 2 + 2 * h * cfg.num_kv_heads * dh + 3 * h * f


def linear_flops(cfg: ModelConfig, new_tokens: float) -> float:
    """Linear FLOPs of one block for ``new_tokens`` tokens: 2*W*T."""
    return 2.0 * block_matmul_params(cfg) * new_tokens


def weight_bytes(cfg: ModelConfig, dtype: str) -> float:
    """Bytes of all weights (whole model, TP 1) as cp_megatron loads them: :func:`loaded_weight_bytes`.

    ``fp8`` is ``model.weights: fp8-rowwise``: every block's q, k, v, o, gate, up and down
    weights FP8 with one float32 scale per row; embedding, norms and LM head bf16.
    ``bf16`` / ``fp32``: every weight that size.

    Source: cp_megatron.model.fp8; arXiv 2411.01783 §4 (FP8 row-wise weights).
    """
    return loaded_weight_bytes(cfg, 1, dtype)


def block_weight_bytes(cfg: ModelConfig, tp: int, dtype: str) -> float:
    """Bytes of one transformer block's weights on one TP rank (what a decode step reads per block)."""
    h, e = cfg.hidden_size, 4 if dtype == "fp32" else 2
    vocab = cfg.vocab_size / tp * h * e * (1 if cfg.tie_word_embeddings else 2)
    return (loaded_weight_bytes(cfg, tp, dtype) - vocab - h * e) / cfg.num_layers


def kv_cache_bytes_per_gpu(cfg: ModelConfig, tp: int, cp: int, context_tokens: int, batch: int,
                           bytes_per_element: int) -> float:
    """KV cache on the most loaded GPU: 2*layers*(NKV/tp)*DH*e*ceil(context/cp)*batch (bytes)."""
    return float(2 * cfg.num_layers * kv_heads_per_rank(cfg, tp) * cfg.head_dim * bytes_per_element
                 * math.ceil(context_tokens / cp) * batch)


def elementwise_bytes(cfg: ModelConfig, tp: int, tokens: float, e: int, ring_steps: int,
                      fp8_ffn_fraction: float) -> float:
    """HBM bytes one GPU moves in one block's memory-bound (element-wise) kernels.

    Counted unfused, one read of every input and one write of every output, for ``tokens``
    tokens on the GPU; H hidden size (norms and residuals are replicated over TP), F/tp FFN
    width, q = NH/tp*DH and k = NKV/tp*DH widths, e bytes per activation element:

        2 RMSNorms                    2 * 2*tokens*H*e
        2 residual adds               2 * 3*tokens*H*e
        RoPE on q and k               2*tokens*(q + k)*e
        SwiGLU silu(gate) * up        3*tokens*(F/tp)*e
        FP8 activation quantisation   tokens*(H + F/tp)*(e + 1)   (row-wise, FFN inputs;
                                      times the fraction of blocks with FP8 FFN weights)
        ring merges (Eq. 4)           (ring_steps - 1)*tokens*q*(4 + e + 4)
                                      (read the float32 accumulator and a partial, write back)

    Args:
        ring_steps: partial results merged per query (CP size; 1 = no merge).
        fp8_ffn_fraction: share of blocks whose FFN runs in FP8 (0 for bf16 / fp32 weights).

    Returns:
        bytes (float).

    Source: the Llama block (arXiv 2407.21783 §2: RMSNorm, RoPE, SwiGLU; §6.2: FP8 row-wise
    recipe); merge of arXiv 2411.01783 Eq. 4 (docs/design.md §6).
    """
    h, ffn = cfg.hidden_size, cfg.intermediate_size / tp
    q, k = cfg.num_heads // tp * cfg.head_dim, kv_heads_per_rank(cfg, tp) * cfg.head_dim
    per_token = (4 * h * e + 6 * h * e + 2 * (q + k) * e + 3 * ffn * e
                 + fp8_ffn_fraction * (h + ffn) * (e + 1) + (ring_steps - 1) * q * (8 + e))
    return float(tokens * per_token)


def ring_time(steps: int, compute_step_s: float, message_s: float) -> float:
    """One ring loop: N steps of compute, N-1 messages each overlapped with one step (s)."""
    return (steps - 1) * max(compute_step_s, message_s) + compute_step_s


def decode_batch_padded(batch: int, cp: int) -> int:
    """Alg. 4 pads the decode batch to a multiple of the CP size: ceil(B / N) * N queries."""
    return math.ceil(batch / cp) * cp


# --------------------------------------------------------------------------- one round

@dataclass(frozen=True)
class RoundCost:
    """Per-GPU seconds and bytes of one round (a prefill, or one decode step).

    Attributes:
        strategy: ring variant of the round ("pass-kv" / "pass-q").
        attention_s / linear_s: compute time over all layers (roofline, s).
        elementwise_s: memory-bound norms, residuals, RoPE, SwiGLU, FP8 activation
            quantisation and ring merges over all layers (HBM bytes / bandwidth, s).
        cp_comm_exposed_s: ring and all_to_all time not hidden under attention (s).
        all_to_all_s: pass-Q's all_to_all of O and LSE, part of ``cp_comm_exposed_s`` (s).
        tp_comm_s: TP all-reduce time (s), never overlapped.
        fixed_s: per-block fixed cost no byte or FLOP term covers: layers *
            (``layer_overhead_s`` + L * ``launch_s`` + (N - 1) * ``ring_step_overhead_s``), L the
            decode layer's launches (:func:`~cp_megatron.decode_cost.layer_launch_floor`, a floor
            for a prefill layer) (s).
        lm_head_s: LM head for the last token of each sequence (s).
        total_s: the round's latency (s).
        tokens_per_rank: new tokens on the most loaded CP rank (decode: the padded batch / N).
        cp_comm_bytes_per_layer / tp_comm_bytes_per_layer: bytes one GPU sends per block.
        cp_message_bytes: one ring message (bytes).
    """

    strategy: str
    attention_s: float
    linear_s: float
    elementwise_s: float
    cp_comm_exposed_s: float
    all_to_all_s: float
    tp_comm_s: float
    fixed_s: float
    lm_head_s: float
    total_s: float
    tokens_per_rank: int
    cp_comm_bytes_per_layer: float
    cp_message_bytes: float
    tp_comm_bytes_per_layer: float


def round_cost(cfg: ModelConfig, hw: HardwareProfile, tp: int, cp: int, new_tokens: int,
               cached_tokens: int, batch: int, dtype: str, strategy: str) -> RoundCost:
    """Latency of one round of T new tokens on P cached per sequence, on the slowest GPU.

    A decode step (T = 1) places the batch as Alg. 4 does: padded to a multiple of N, B'/N
    query rows per rank, each ring message carrying the rows' batch ids.

    Args:
        cfg / hw: model dimensions and hardware profile.
        tp / cp: TP and CP degrees (TP inside a node, CP rings across nodes).
        new_tokens / cached_tokens: T and P per sequence; batch: B sequences.
        dtype: weight dtype ("fp8", "bf16", "fp32"); activations are fp32 for "fp32", else bf16.
        strategy: "pass-kv" or "pass-q" (the heuristic's choice).

    Returns:
        RoundCost.

    Source: arXiv 2411.01783 §3.5 (Alg. 2, 3, 4), §3.6; docs/design.md §13.
    """
    e = 4 if dtype == "fp32" else 2
    layers, dh = cfg.num_layers, cfg.head_dim
    heads, kv_heads = cfg.num_heads // tp, kv_heads_per_rank(cfg, tp)
    hbm = hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency  # achieved, streaming kernels
    if new_tokens == 1:  # decode (Alg. 4): the batch padded to a multiple of N, B'/N per rank
        tokens_rank = decode_batch_padded(batch, cp) // cp
    else:  # load-balanced sharding of the new tokens (§3.3)
        tokens_rank = math.ceil(batch * new_tokens / cp)
    kv_tokens_rank = batch * (new_tokens + cached_tokens) / cp

    head_params = cfg.vocab_size * cfg.hidden_size
    head_bytes = head_params * e  # embedding and LM head stay in the activation dtype
    block_bytes_gpu = block_weight_bytes(cfg, tp, dtype)
    t_linear = max(linear_flops(cfg, tokens_rank) / tp / hw.linear_flops_per_s, block_bytes_gpu / hbm)

    # Attention: load-balanced sharding gives every ring step the same share (§3.3).
    attn_step = batch * attention_flops(cfg.num_heads, dh, new_tokens, cached_tokens) / (tp * cp * cp)
    local_kv_bytes = 2 * kv_tokens_rank * kv_heads * dh * e
    if strategy == PASS_KV:  # the KV block in hand is read once per step
        message, a2a_bytes, kv_read = local_kv_bytes, 0.0, local_kv_bytes
    else:  # pass-Q: a visiting Q block reads the local KV of its own sequences only
        message = float(tokens_rank * (heads * dh * e + ID_BYTES))
        a2a_bytes = (cp - 1) * tokens_rank * heads * (dh * e + LSE_BYTES)  # padded rows travel too
        kv_read = local_kv_bytes / cp
    step_s = max(attn_step / hw.attn_flops_per_s, kv_read / hbm)
    if cp == 1:
        ring_s, a2a_s, message, a2a_bytes = step_s, 0.0, 0.0, 0.0
    else:
        bw, lat = hw.cp_bandwidth_bytes_per_s, hw.cp_latency_s
        ring_s = ring_time(cp, step_s, message / bw + lat)
        a2a_s = a2a_bytes / bw + hw.a2a_latency_s if a2a_bytes else 0.0

    # TP: two all-reduces of the hidden states.  Across nodes NCCL runs one ring per NIC, so
    # each GPU's NIC carries 1/gpus_per_node of the traffic: bus bandwidth is capped by
    # gpus_per_node * NIC bandwidth (400 GB/s on h100-rdma, 100 GB/s on h100-tcp).
    tp_bw = group_bandwidth(hw, "tp", tp)
    payload = tokens_rank * cfg.hidden_size * e
    t_tp = 2 * allreduce_time(payload, tp, tp_bw, allreduce_latency(hw, tp))

    fp8_fraction = max(layers - 2, 0) / layers if dtype == "fp8" else 0.0
    elementwise_s = layers * elementwise_bytes(cfg, tp, tokens_rank, e, cp, fp8_fraction) / hbm

    lm_head_s = max(2.0 * batch * head_params / tp / hw.linear_flops_per_s, head_bytes / tp / hbm)
    attention_s = layers * cp * step_s
    exposed = layers * (ring_s - cp * step_s + a2a_s)
    linear_s, tp_s = layers * t_linear, layers * t_tp
    launches = layer_launch_floor(dtype == "fp8")   # the layer's launches, a floor for a prefill layer
    fixed_s = layers * (hw.layer_overhead_s + launches * hw.launch_s + (cp - 1) * hw.ring_step_overhead_s)
    return RoundCost(
        strategy=strategy, attention_s=attention_s, linear_s=linear_s, elementwise_s=elementwise_s,
        cp_comm_exposed_s=exposed, all_to_all_s=layers * a2a_s, tp_comm_s=tp_s, fixed_s=fixed_s,
        lm_head_s=lm_head_s,
        total_s=attention_s + exposed + linear_s + elementwise_s + tp_s + fixed_s + lm_head_s,
        tokens_per_rank=tokens_rank,
        cp_comm_bytes_per_layer=(cp - 1) * message + a2a_bytes, cp_message_bytes=message,
        tp_comm_bytes_per_layer=2 * 2.0 * (tp - 1) / tp * payload)


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """Everything the planner predicts for one configuration (JSON via :meth:`to_dict`).

    Token counts are per sequence; FLOPs are whole-model totals over all GPUs (``_per_layer``:
    one block); ``*_bytes_per_layer`` are bytes one GPU sends per block; other bytes are per
    GPU; times are seconds on the slowest GPU.  The round's times (``attention_s`` ...
    ``ttft_s``) are the prefill of ``new_tokens`` on ``cached_tokens``; ``decode`` is the
    breakdown of one decode step after it (:class:`~cp_megatron.decode_cost.DecodeCost`:
    launches, collectives, HBM bytes), whose total is ``ttit_s`` -- eager, or replayed from a
    CUDA graph when ``cuda_graphs``; ``ttit_eager_s`` and ``ttit_cuda_graphs_s`` are both.
    ``heuristic`` and ``decode["heuristic"]`` are Alg. 1 / Alg. 5's values.
    Memory: ``memory`` is the :class:`MemoryReport`; ``weight_bytes_per_gpu`` is its
    ``weight_bytes`` (one figure, the weights as loaded), ``kv_cache_bytes_per_gpu`` its
    ``kv_cache_bytes`` (the context's K/V, what a decode step reads), and ``fits_in_memory``
    compares its ``total_with_allowances_bytes`` with the profile's ``memory_bytes_per_gpu``.
    """

    model: str
    hardware: str
    tp: int
    cp: int
    gpus: int
    nodes: int
    context_tokens: int
    cached_tokens: int
    new_tokens: int
    batch: int
    dtype: str
    kv_dtype: str
    strategy: str
    miss_rate: float
    kv_hidden_threshold_tokens: float
    miss_rate_threshold: float
    attention_flops_per_layer: float
    linear_flops_per_layer: float
    attention_flops: float
    linear_flops: float
    cp_comm_bytes_per_layer: float
    cp_message_bytes: float
    tp_comm_bytes_per_layer: float
    attention_s: float
    linear_s: float
    elementwise_s: float
    cp_comm_exposed_s: float
    tp_comm_s: float
    fixed_s: float
    lm_head_s: float
    ttft_s: float
    achieved_flops_per_gpu: float
    decode_strategy: str
    ttit_s: float
    ttit_eager_s: float
    ttit_cuda_graphs_s: float
    weight_bytes_per_gpu: float
    kv_cache_bytes_per_gpu: float
    memory_bytes_per_gpu: float
    fits_in_memory: bool
    heuristic: dict
    decode: dict
    hardware_profile: dict
    warnings: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)   # MemoryReport.to_dict(): as cp_megatron loads it
    max_new_tokens: int = 0
    kv_margin_tokens: int = DEFAULT_KV_MARGIN_TOKENS
    cuda_graphs: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = {k: d[k] for k in ("model", "hardware", "tp", "cp", "context_tokens",
                                         "cached_tokens", "batch", "dtype", "max_new_tokens",
                                         "kv_margin_tokens", "cuda_graphs")}
        return d


def _check_positive(flag: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanInputError(flag, f"expected an integer >= {minimum}, got {value!r}")


def plan(model: Union[str, ModelConfig], hardware: Union[str, HardwareProfile], tp: int, cp: int,
         context_tokens: int, cached_tokens: int = 0, batch: int = 1,
         dtype: Optional[str] = None, max_new_tokens: int = 0,
         kv_margin_tokens: int = DEFAULT_KV_MARGIN_TOKENS, dryrun_config: Optional[str] = None,
         cuda_graphs: bool = False, code: DecodeStepCode = DecodeStepCode()) -> Plan:
    """Predict TTFT of one prefill round, TTIT of the decode steps after it, and memory.

    Args:
        model: preset name or ModelConfig.
        hardware: profile name, path to a profile .json (``cp-megatron bench hardware``),
            or HardwareProfile.
        tp / cp: TP and CP degrees (GPUs = tp * cp).
        context_tokens: T + P per sequence after the round (tokens).
        cached_tokens: P, already in the KV cache (0 = full prefill; context - 1 = decode).
        batch: sequences in the round.
        dtype: weight dtype; None = "fp8" for presets the paper serves in FP8, else "bf16".
        max_new_tokens / kv_margin_tokens: the run's generation budget and KV margin for later
            turns (``generation.max_new_tokens``, ``runtime.kv_cache_margin_tokens``): what the KV
            cache reserves beyond the context.
        dryrun_config: run config named by the memory report's dry-run command.
        cuda_graphs: the decode step replays a CUDA graph (``runtime.cuda_graphs``): ``ttit_s``
            is ``ttit_cuda_graphs_s``, else ``ttit_eager_s``.
        code: the decode step's launch model.

    Returns:
        Plan.

    Raises:
        PlanInputError (a ValueError naming the CLI flag): unknown preset or profile, an
        invalid profile file, a non-positive count, tp not dividing the heads, cached >=
        context, unknown dtype, a profile whose rates give non-finite times.

    Source: arXiv 2411.01783 §3-4; docs/design.md §8, §13.
    """
    try:
        cfg = model if isinstance(model, ModelConfig) else get_preset(model)
    except ValueError as err:
        raise PlanInputError("--model", str(err)) from None
    try:
        hw = hardware if isinstance(hardware, HardwareProfile) else load_profile(hardware)
    except ValueError as err:
        raise PlanInputError("--hardware", str(err)) from None
    for flag, value in (("--tp", tp), ("--cp", cp), ("--context", context_tokens), ("--batch", batch)):
        _check_positive(flag, value)
    _check_positive("--cached", cached_tokens, minimum=0)
    _check_positive("--max-new-tokens", max_new_tokens, minimum=0)
    _check_positive("--kv-margin", kv_margin_tokens, minimum=0)
    if cached_tokens >= context_tokens:
        raise PlanInputError("--cached", f"must be < --context ({context_tokens}), got {cached_tokens}")
    problem = tp_problem(cfg, tp, replicate_kv_heads=True)  # the runtime's rule + the paper's multi-node TP
    if problem:
        raise PlanInputError("--tp", problem)
    dtype = dtype or DEFAULT_DTYPE.get(cfg.name, "bf16")
    if dtype not in WEIGHT_DTYPES:
        raise PlanInputError("--dtype", f"expected one of {WEIGHT_DTYPES}, got {dtype!r}")
    e = 4 if dtype == "fp32" else 2
    t, p = context_tokens - cached_tokens, cached_tokens

    def decide(new: int, cached: int):
        return choose_strategy(new_tokens=new, cached_tokens=cached, cp_size=cp,
                               num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                               bytes_per_element=e, attn_flops_per_s=hw.attn_flops_per_s,
                               bandwidth_bytes_per_s=hw.cp_bandwidth_bytes_per_s)

    prefill_decision = decide(batch * t, batch * p)
    decode_decision = decide(batch, batch * context_tokens)
    prefill = round_cost(cfg, hw, tp, cp, t, p, batch, dtype, prefill_decision.strategy)
    decode = decode_step_cost(cfg, hw, tp, cp, context_tokens, batch, dtype, decode_decision.strategy,
                              block_weight_bytes(cfg, tp, dtype), cuda_graphs=bool(cuda_graphs), code=code)

    if not (prefill.total_s > 0 and decode.total_s > 0):
        raise PlanInputError("--hardware", f"profile {hw.name!r} gives TTFT {prefill.total_s} s and TTIT "
                                           f"{decode.total_s} s: its rates or latencies are too small "
                                           "or too large")
    attn_layer = batch * attention_flops(cfg.num_heads, cfg.head_dim, t, p)
    lin_layer = batch * linear_flops(cfg, t)
    gpus = tp * cp
    memory = memory_report(cfg, tp, cp, context_tokens, t, batch, dtype, strategy=prefill_decision.strategy,
                           max_new_tokens=max_new_tokens, kv_margin_tokens=kv_margin_tokens,
                           dryrun_config=dryrun_config)
    w_gpu = memory.weight_bytes
    kv_gpu = kv_cache_bytes_per_gpu(cfg, tp, cp, context_tokens, batch, e)
    need = memory.total_with_allowances_bytes
    warnings = []
    if context_tokens > cfg.max_position_embeddings:
        warnings.append(f"context {context_tokens} exceeds {cfg.name}'s max_position_embeddings "
                        f"({cfg.max_position_embeddings}): runs with model.max_context, quality past the "
                        f"trained length is not guaranteed")
    if need > hw.memory_bytes:
        warnings.append("weights + KV cache + activations + buffers + allowances exceed the GPU memory")
    if cp > 1 and gpus <= hw.gpus_per_node:
        warnings.append("the CP ring fits in one node; costed at the inter-node bandwidth (pessimistic)")
    total_flops = cfg.num_layers * (attn_layer + lin_layer)
    result = Plan(
        model=cfg.name, hardware=hw.name, tp=tp, cp=cp, gpus=gpus,
        nodes=math.ceil(gpus / hw.gpus_per_node), context_tokens=context_tokens,
        cached_tokens=p, new_tokens=t, batch=batch, dtype=dtype, kv_dtype="fp32" if e == 4 else "bf16",
        strategy=prefill_decision.strategy, miss_rate=prefill_decision.miss_rate,
        kv_hidden_threshold_tokens=prefill_decision.kv_hidden_threshold_tokens,
        miss_rate_threshold=prefill_decision.miss_rate_threshold,
        attention_flops_per_layer=attn_layer, linear_flops_per_layer=lin_layer,
        attention_flops=cfg.num_layers * attn_layer, linear_flops=cfg.num_layers * lin_layer,
        cp_comm_bytes_per_layer=prefill.cp_comm_bytes_per_layer,
        cp_message_bytes=prefill.cp_message_bytes,
        tp_comm_bytes_per_layer=prefill.tp_comm_bytes_per_layer,
        attention_s=prefill.attention_s, linear_s=prefill.linear_s,
        elementwise_s=prefill.elementwise_s,
        cp_comm_exposed_s=prefill.cp_comm_exposed_s, tp_comm_s=prefill.tp_comm_s,
        fixed_s=prefill.fixed_s, lm_head_s=prefill.lm_head_s, ttft_s=prefill.total_s,
        achieved_flops_per_gpu=total_flops / gpus / prefill.total_s,
        decode_strategy=decode_decision.strategy, ttit_s=decode.total_s,
        ttit_eager_s=decode.modes["eager"]["total_s"], ttit_cuda_graphs_s=decode.modes["cuda_graphs"]["total_s"],
        weight_bytes_per_gpu=w_gpu, kv_cache_bytes_per_gpu=kv_gpu, memory_bytes_per_gpu=hw.memory_bytes,
        fits_in_memory=need <= hw.memory_bytes,
        heuristic=prefill_decision.to_dict(),
        decode={**decode.to_dict(), "heuristic": decode_decision.to_dict()},
        hardware_profile=hw.to_dict(), warnings=warnings,
        memory=memory.to_dict(), max_new_tokens=max_new_tokens, kv_margin_tokens=kv_margin_tokens,
        cuda_graphs=bool(cuda_graphs))
    bad = _non_finite(result.to_dict())
    if bad:
        raise PlanInputError("--hardware", f"profile {hw.name!r} gives non-finite {', '.join(bad[:3])}: "
                                           "its rates or latencies are too small or too large")
    return result


def _non_finite(value, key: str = "") -> list[str]:
    """Keys of the float values in a (nested) plan dict that are inf or NaN."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [key]
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _non_finite(v, f"{key}.{name}".lstrip("."))]
    return []


def sweep_batch(batch_sizes: list[int], **kwargs) -> list[dict]:
    """Plans for each batch size with the other inputs fixed (the decode step's view).

    Each point adds ``tokens_per_s`` = batch / TTIT: the fixed and latency-bound decode terms
    (weights read, collectives, launches) are paid once per step whatever the batch, so
    batching amortises them until attention (KV reads) or compute grows.
    Raises PlanInputError as :func:`plan`.
    """
    points = [plan(batch=b, **kwargs).to_dict() for b in batch_sizes]
    for point in points:
        point["tokens_per_s"] = point["batch"] / point["ttit_s"]
    return points


def sweep_cp(cp_sizes: list[int], **kwargs) -> list[dict]:
    """Plans for each CP size with the other inputs fixed, plus speedup and efficiency.

    ``speedup`` = TTFT(first) / TTFT; ``efficiency`` = speedup / (cp / first cp).
    Raises PlanInputError as :func:`plan`.
    """
    points = [plan(cp=c, **kwargs).to_dict() for c in cp_sizes]
    base = points[0]
    for point in points:
        point["speedup"] = base["ttft_s"] / point["ttft_s"]
        point["efficiency"] = point["speedup"] / (point["cp"] / base["cp"])
    return points


# --------------------------------------------------------------------------- the paper's decode

# arXiv 2411.01783v3 §4.3: Llama3 405B, batch 1, decode from CUDA graphs, GTT hosts (App. A:
# 96 GB HBM2e at 2.4 TB/s, 800 TF/s), FP8 row-wise weights in the feed-forward layers (§4.1).
# Table 6: TP8 on one node vs CP2 + TP8 on two, 8K / 32K / 128K; Table 7: 128K, TP8 / CP2 /
# TP16 / CP4 / TP32 (its CP2 row, 60.23 ms, differs from Table 6's 66.63 ms for the same
# setup); Table 8: the pass-Q attention of one layer at 128K (us).  TTFT in s, TTIT in ms.
PAPER_DECODE = (
    # (source, TP, CP, context, TTFT s, TTIT ms)
    ("Table 6", 8, 1, 8_000, 1.740, 44.51), ("Table 6", 8, 1, 32_000, 7.658, 44.64),
    ("Table 6", 8, 1, 128_000, 42.010, 46.26), ("Table 6", 8, 2, 8_000, 0.999, 65.61),
    ("Table 6", 8, 2, 32_000, 4.015, 65.66), ("Table 6", 8, 2, 128_000, 21.042, 66.63),
    ("Table 7", 8, 1, 128_000, 42.010, 46.26), ("Table 7", 8, 2, 128_000, 21.042, 60.23),
    ("Table 7", 16, 1, 128_000, 29.917, 39.52), ("Table 7", 8, 4, 128_000, 10.950, 71.31),
    ("Table 7", 32, 1, 128_000, 19.841, 47.3),
)
# Table 8, 128K, batch 1: (CP, individual attention op, attention over the ring loop, SendRecv,
# All2All, whole pass-Q), us per layer.
PAPER_ATTENTION_US = {1: (38.9, 38.9, 0.0, 0.0, 38.9), 2: (22.0, 43.2, 32.3, 81.1, 157.7),
                      4: (14.7, 60.8, 105.7, 79.9, 238.6)}


def llama3_fp8_recipe_weight_bytes(cfg: ModelConfig, tp: int) -> float:
    """Bytes of one TP rank's weights in the paper's FP8 recipe: feed-forward weights FP8 with
    float32 row scales, attention projections, norms, embedding and LM head bf16, the first and
    last blocks wholly bf16 (what the paper serves; cp_megatron's fp8-rowwise quantises every
    linear layer, :func:`loaded_weight_bytes`).

    Source: arXiv 2411.01783 §4.1 ("row-wise quantized FP8 weights for feed forward layers
    after GQA"); Llama 3 herd, arXiv 2407.21783 §6.2 (FFN only; first and last layers kept bf16).
    """
    bf16 = loaded_weight_bytes(cfg, tp, "bf16")
    h, f = cfg.hidden_size, cfg.intermediate_size / tp
    ffn = 3 * h * f
    fp8_blocks = max(cfg.num_layers - 2, 0)
    return bf16 - fp8_blocks * (ffn * 1 - 4 * (2 * f + h))    # 1 byte saved per FFN weight, + row scales


def paper_decode_comparison(hardware: str = "h100-rdma") -> list[dict]:
    """The planner's TTIT (eager and CUDA graph) and TTFT beside the paper's Tables 6 and 7.

    Each row: the table's inputs and figures, the plan's decode breakdown (``decode``), the
    deviation of the CUDA-graph TTIT (the paper runs decode from graphs) and of the TTFT, the
    weights term in the paper's FP8 recipe instead of fp8-rowwise
    (``recipe_weights_delta_s``), and at 128K the planner's attention block of one layer
    (KV read + CP exchange + its launches) beside Table 8's ``whole pass-Q``.

    Raises:
        PlanInputError: as :func:`plan`.
    """
    cfg = get_preset("llama3.1-405b")
    try:
        hw = load_profile(hardware)
    except ValueError as err:
        raise PlanInputError("--hardware", str(err)) from None
    rows = []
    for source, tp, cp, context, ttft_paper, ttit_paper_ms in PAPER_DECODE:
        p = plan(cfg, hw, tp=tp, cp=cp, context_tokens=context, cuda_graphs=True)
        d = p.decode
        hbm = hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency
        recipe = (llama3_fp8_recipe_weight_bytes(cfg, tp) - loaded_weight_bytes(cfg, tp, "fp8")) / hbm
        exchange_launches = d["launches_per_layer"] - layer_launch_floor(True)
        block_us = (d["kv_s"] + d["cp_comm_s"]) / cfg.num_layers * 1e6 + exchange_launches * hw.graph_node_s * 1e6
        rows.append({
            "source": source, "tp": tp, "cp": cp, "context_tokens": context,
            "paper_ttft_s": ttft_paper, "paper_ttit_s": ttit_paper_ms * 1e-3,
            "ttft_s": p.ttft_s, "ttit_eager_s": p.ttit_eager_s, "ttit_cuda_graphs_s": p.ttit_cuda_graphs_s,
            "ttit_deviation": p.ttit_cuda_graphs_s / (ttit_paper_ms * 1e-3) - 1,
            "ttft_deviation": p.ttft_s / ttft_paper - 1,
            "recipe_weights_delta_s": recipe,
            "attention_block_us": block_us if context == 128_000 else None,
            "paper_attention_block_us": PAPER_ATTENTION_US[cp][4] if context == 128_000 and tp == 8 else None,
            "decode": d,
        })
    return rows


# --------------------------------------------------------------------------- memory as loaded

# Activation quantisation works in row chunks of at most this many float32 bytes
# (cp_megatron.model.fp8.QUANT_CHUNK_BYTES; the planner imports no torch).
ACT_QUANT_CHUNK_BYTES = 1 << 30
# GPU capacities the report checks against (the h100-rdma and h200 profiles).
MEMORY_TARGETS = ("h100-rdma", "h200")
# What neither the planner nor the dry run sees, per GPU: stated allowances, with their source.
ALLOWANCES = {
    "cuda_context": (0.5e9, "CUDA context with lazy module loading, cuBLAS/flash kernels loaded on use: "
                            "287 MB measured in pytorch/pytorch#86509, ~300-400 MB per pytorch/pytorch#107667 "
                            "and #109888 (ptrblck); 0.5 GB leaves room for the kernels this run loads"),
    "nccl_per_communicator": (0.69e9, "NCCL buffers of one communicator after its first collective: 544 MB "
                                      "(2 GPUs) / 688 MB (more than 2) measured in NVIDIA/nccl#964; the "
                                      "runtime has a TP, a CP and a world communicator"),
    "nccl_all_to_all": (3.3e9, "an all_to_all connects every peer of the CP group: +3.28 GB per GPU after "
                               "the first all_to_all_single on 8 x H100 in NVIDIA/nccl#1685 (pass-Q decode "
                               "runs one whenever cp > 1)"),
    "fragmentation_fraction": (0.10, "the caching allocator rounds and splits blocks, so transient "
                                     "tensors (activations, communication buffers) may need more than "
                                     "their sum (PyTorch CUDA memory-management notes: "
                                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces it); a "
                                     "stated 10% of the transient peak, not a measured figure"),
}


@dataclass(frozen=True)
class LayerCode:
    """What the layer's code keeps alive, as far as the activation peak is concerned.

    The defaults describe the code after #21 and #22: RMSNorm is
    ``torch.nn.functional.rms_norm`` run as one fused kernel (the stage's layers run under
    ``torch.inference_mode``, where it is not decomposed; see ``rms_norm_composite``), q/k/v and gate/up are one fused projection each, q/k/v's output
    is dropped once K and V are cached, gate/up's before the down projection (``silu(gate)
    * up`` in one new tensor), both residual adds are in place on the sublayer's output, and
    the layer's input is held by the caller while the layer runs (``x = layer(x, ctx)``).

    Attributes:
        rms_norm_fp32: RMSNorm computes in float32 copies of x (``x.float()``, ``pow(2)``,
            ``x32 * rsqrt``; the code before #21).
        rms_norm_composite: ``F.rms_norm`` runs torch's CompositeImplicitAutograd
            decomposition (``_fused_rms_norm`` has no kernel on the device, as in the CPU-build
            dry run): the float32 upcast of x, ``x32 * rsqrt`` and ``* weight`` in float32 live
            together, then the cast; False: a fused kernel that writes only its output.
        fused_qkv / fused_gate_up: one projection for q, k, v / for gate and up.
        gate_up_held: the gate/up output lives through the down projection.
        input_held: the layer's input lives until the layer returns (the caller's
            ``x = layer(x, ctx)`` holds it).
        qkv_held: the fused q/k/v output lives through the ring (False: dropped once K and V
            are cached; v's rows were its last use, q is a view of the rotated q/k).
        residual_in_place: the residual adds write into the sublayer's fresh output
            (``attn.add_(x)``), so an add makes no new hidden state.
    """

    rms_norm_fp32: bool = False
    rms_norm_composite: bool = False
    fused_qkv: bool = True
    fused_gate_up: bool = True
    gate_up_held: bool = False
    input_held: bool = True
    qkv_held: bool = False
    residual_in_place: bool = True


# The code of this repository before #21 (float32 RMSNorm, separate projections): what the
# CPU measurement in tests/test_memory_model.py runs.
LAYER_CODE_BEFORE = LayerCode(rms_norm_fp32=True, rms_norm_composite=False, fused_qkv=False, fused_gate_up=False,
                              gate_up_held=False, qkv_held=True, residual_in_place=False)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes one GPU holds during a prefill, laid out as cp_megatron loads the model.

    Attributes:
        weights: "fp8-rowwise" (model.weights for dtype "fp8": every block's q, k, v, o, gate,
            up and down weights float8_e4m3fn with a float32 scale per row; embedding, norms
            and LM head in bf16), "bf16" or "fp32".
        weight_bytes: this GPU's TP shard of every weight (norms and row-parallel scales
            replicated): the sum of a stage's parameter and buffer bytes.
        kv_cache_bytes: K and V of the context's ceil(B * context / cp) tokens (used slots).
        kv_cache_capacity_bytes: the cache's reserved storage: prompt + max_new_tokens +
            the margin for later turns (:func:`kv_capacity_slots`), what the device holds.
        activation_bytes: the prefill's transient peak (:func:`activation_phases`, the largest
            phase), without the ring's buffers.
        comm_buffer_bytes: receive buffers the runtime allocates for the CP ring (pass-KV:
            two K/V blocks; pass-Q: two Q blocks, the partials and their all_to_all output).
        total_bytes: weights + KV capacity + activations + communication buffers (what the
            dry run measures).
        allowances: bytes neither the planner nor the dry run sees ("cuda_context", "nccl",
            "fragmentation"), each with its source (:data:`ALLOWANCES`).
        total_with_allowances_bytes: total_bytes + the allowances.
        activation_phases: the live bytes of each phase of one layer (the reconciliation table
            of docs/planner.md).
        capacity_bytes / fits: per target profile ("h100-rdma": 80 GB H100, "h200": 141 GB),
            judged on total_with_allowances_bytes.
        dryrun_command: the command that measures the same figures.
    """

    weights: str
    weight_bytes: float
    kv_cache_bytes: float
    kv_cache_capacity_bytes: float
    activation_bytes: float
    comm_buffer_bytes: float
    total_bytes: float
    allowances: dict
    total_with_allowances_bytes: float
    activation_phases: dict
    capacity_bytes: dict
    fits: dict
    dryrun_command: str

    def to_dict(self) -> dict:
        return asdict(self)


def loaded_weight_bytes(cfg: ModelConfig, tp: int, dtype: str) -> float:
    """Bytes of one TP rank's weights as the runtime holds them (no PP).

    Per block: column-parallel q (NH/tp*DH rows), k, v (NKV/tp*DH rows each), gate and up
    (F/tp rows) and row-parallel o and down (H rows, 1/tp of the columns); two norms of H.
    ``fp8``: linear weights 1 byte, plus float32 row scales (column-parallel: the rank's rows;
    row-parallel: all H rows, replicated); everything else bf16.  Embedding and LM head are
    vocab-parallel (V/tp rows), the final norm replicated.

    Source: cp_megatron.model.fp8 (what fp8-rowwise quantises); megatron-core TP partitioning.
    """
    if dtype not in DTYPE_BYTES:
        raise PlanInputError("--dtype", f"expected one of {WEIGHT_DTYPES}, got {dtype!r}")
    h, f, dh = cfg.hidden_size, cfg.intermediate_size / tp, cfg.head_dim
    e = 4 if dtype == "fp32" else 2
    q, kv = cfg.num_heads / tp * dh, kv_heads_per_rank(cfg, tp) * dh
    linear = 2 * h * q + 2 * h * kv + 3 * h * f
    block = linear * DTYPE_BYTES[dtype] + 2 * h * e
    if dtype == "fp8":
        block += 4 * (q + 2 * kv + 2 * f + 2 * h)
    vocab = cfg.vocab_size / tp * h * e
    return float(cfg.num_layers * block + vocab * (1 if cfg.tie_word_embeddings else 2) + h * e)


def kv_capacity_slots(prompt_tokens: int, new_tokens: int, cp: int, margin_tokens: int) -> int:
    """Slots one CP rank reserves: ceil(T/N) + 1 + ceil(G/N) + 1 (+ ceil(M/N) + 1 for a margin).

    The same count as :func:`cp_megatron.sharding.kv_slots_per_rank` (tested equal); repeated
    here because the planner imports no torch.
    """
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    return ceil(prompt_tokens, cp) + 1 + ceil(new_tokens, cp) + 1 + (ceil(margin_tokens, cp) + 1 if margin_tokens else 0)


def _quant(t: float, width: float, out_width: float, e: int, blocks: int = 1) -> float:
    """Peak of an FP8 linear on t rows of ``width`` (output ``out_width``), per model/fp8.py.

    Quantising (``quantize_activations`` / ``quantize_activation_rows``): in one piece when
    t*width*4 <= 1 GiB, the float32 quotient ``x / scale`` and its 1-byte cast
    (t*width*4 + t*width); in chunks, the 1-byte result t*width plus one chunk's quotient and
    cast (1.25 GiB).  Then the
    matmul: the 1-byte input and its float32 scales beside the output t*out_width*e, or, with
    activation scales over ``blocks`` > 1 blocks of K, three float32 partial sums
    (accumulator, the next block's product and their sum) 3*t*out_width*4.
    """
    whole = t * width * 4
    tmp = whole + t * width if whole <= ACT_QUANT_CHUNK_BYTES else t * width + 1.25 * ACT_QUANT_CHUNK_BYTES
    out = 3 * t * out_width * 4 if blocks > 1 else t * out_width * e
    return t * 4 * blocks + max(tmp, t * width + out)


def _act_blocks(cfg: ModelConfig, tp: int, in_features: int) -> int:
    """Activation-scale blocks of a row-parallel FP8 linear (model.fp8_layers.linear_classes' rule)."""
    nkv = cfg.num_kv_heads
    return nkv // tp if nkv % tp == 0 and in_features % nkv == 0 else 1


def activation_phases(cfg: ModelConfig, tp: int, cp: int, new_tokens: int, context_tokens: int, batch: int,
                      dtype: str, code: LayerCode = LayerCode()) -> dict:
    """Live bytes of one GPU at each phase of one layer of a prefill (the peak is the max).

    t = ceil(B*T/cp) tokens on the GPU, H hidden, e activation bytes, q = NH/tp*DH,
    k = NKV/tp*DH, f = F/tp, nh = NH/tp; X = t*H*e is one copy of the hidden state.  Every
    phase holds the residual x (X), plus X more when the caller still holds the layer's input
    (``code.input_held``, after the first residual add).  A linear's term is its output, or
    with FP8 weights :func:`_quant` (row-parallel o / down with their activation-scale blocks).  RoPE, the ring and the projections run on
    the normed input h (X), which the attention / MLP call holds until it returns.

        norm          F.rms_norm decomposed (code.rms_norm_composite): the float32 upcast
                      t*H*4 (none for fp32), x32*rsqrt and its product with the weight
                      (2*t*H*4); a fused kernel: h (X); code.rms_norm_fp32: the larger of
                      x.float() + pow(2) (2*t*H*4) and x32*rsqrt + its cast + the output
                      (t*H*4 + 2*X)
        qkv           h + linear(H -> q + 2k)  (separate q, k, v: the largest of the three,
                      with the ones before it held)
        rope          h + qkv + 4*t*q*e (x*cos, rotate_half, *sin, their sum) + cos/sin cast 2*t*DH*e
        ring          h + [qkv if code.qkv_held] + q' + k' + float32 O and LSE accumulators t*q*4 + t*nh*4, one
                      block's kernel output and LSE tb*q*e + tb*nh*4, and at CP > 1 a merge's
                      float32 partial and weighted partial 2*tb*q*4 (one of them for fp32);
                      tb = t: at CP 1, and on CP rank N-1 (its two chunks are adjacent, so a
                      fully visible KV chunk meets all its queries as one block); the other
                      ranks' blocks have t/2 rows (the most loaded rank is costed)
        o_proj        h + [qkv if code.qkv_held] + q' + k' + LSE + O in e (t*q*e) + linear(q -> H)
        residual      X (attention output) + X (sum; none with code.residual_in_place)
        gate_up       h2 + linear(H -> 2f)  (separate: gate, then up with silu(gate) held)
        act           h2 + gate_up (2*t*f*e) + silu(gate) (t*f*e; ``.mul_(up)`` in place);
                      separate: silu(gate), up, product (3*t*f*e)
        down          h2 + [gate_up if code.gate_up_held] + product + linear(f -> H)
        logits        B*V*4*3 (the TP shards, their gather, the engine's all-reduce buffer)

    cos/sin of the round (2*t*DH*4) are added to every phase.  The ring's receive buffers are
    :func:`comm_buffer_bytes`, not here.

    Returns:
        {phase: bytes}.

    Source: the layer order of cp_megatron.model.llama, attention/{blocks,merge,pass_kv}.py,
    model/fp8.py (quantize_activations), model/rope.py; arXiv 2411.01783 Alg. 2.
    """
    e = 4 if dtype == "fp32" else 2
    h, f, dh = cfg.hidden_size, cfg.intermediate_size / tp, cfg.head_dim
    t = math.ceil(batch * new_tokens / cp)
    q, k, nh = cfg.num_heads / tp * dh, kv_heads_per_rank(cfg, tp) * dh, cfg.num_heads / tp
    x = t * h * e
    fp8 = dtype == "fp8"

    def linear(width: float, out_width: float, blocks: int = 1) -> float:
        return _quant(t, width, out_width, e, blocks) if fp8 else t * out_width * e

    base = x + 2 * t * dh * 4                     # residual + cos/sin
    held = x if code.input_held else 0.0          # the layer's input, after the first add
    if code.rms_norm_fp32:  # x.float() (no copy for fp32), pow(2); then x32 * rsqrt, its cast, * weight
        copy = t * h * 4 if e != 4 else 0.0
        norm = max(copy + t * h * 4, t * h * 4 + (x if e != 4 else 0.0) + x)
    elif code.rms_norm_composite:   # F.rms_norm decomposed: upcast (none for fp32), x32*rsqrt, *weight
        norm = max((t * h * 4 if e != 4 else 0.0) + 2 * t * h * 4, t * h * 4 + x)
    else:                   # a fused F.rms_norm kernel: its output
        norm = x
    qkv_out = t * (q + 2 * k) * e
    if code.fused_qkv:
        qkv = linear(h, q + 2 * k)
    else:  # q, k, v in turn, each with the earlier outputs alive
        qkv = max(linear(h, q), t * q * e + linear(h, k), t * (q + k) * e + linear(h, k))
    rope_q = t * q * e
    # h, the projection outputs still referenced (fused: all of qkv through v's view; separate:
    # v, as rotated q and k replaced q and k), rotated q and k
    attn_live = x + ((qkv_out if code.fused_qkv else t * k * e) if code.qkv_held else 0.0) + rope_q + t * k * e
    # Rows of one block of a ring step: t at CP 1 (one causal square) and on CP rank N-1, whose
    # two load-balanced chunks are adjacent, so its queries meet a fully visible KV chunk as one
    # block; t/2 on the other ranks.  The most loaded rank is costed.  At CP > 1 a later block's
    # Eq. 4 merge makes the partial float32 and a weighted copy of it.
    tb = t
    merge = (tb * q * 4 * (2 if e != 4 else 1)) if cp > 1 else 0.0
    phases = {
        "norm": base + norm,
        "qkv": base + x + qkv,
        "rope": base + x + qkv_out + 4 * t * q * e + (2 * t * dh * e if e != 4 else 0.0),
        "ring": base + attn_live + t * q * 4 + t * nh * 4 + tb * q * e + tb * nh * 4 + merge,
        "o_proj": base + attn_live + t * nh * 4 + t * q * e
                  + linear(q, h, _act_blocks(cfg, tp, cfg.num_heads * dh)),
        "residual": base + (x if code.residual_in_place else 2 * x),
        "norm2": base + held + norm,
    }
    if code.fused_gate_up:
        gate_up = linear(h, 2 * f)
    else:  # gate, silu(gate), then up
        gate_up = max(linear(h, f), 2 * t * f * e, t * f * e + linear(h, f))
    mlp_held = held + x                           # input + h2
    phases["gate_up"] = base + mlp_held + gate_up
    # fused: gate_up and silu(gate) (``.mul_(up)`` in place); separate: silu(gate), up, product
    phases["act"] = base + mlp_held + 3 * t * f * e
    gu_live = 2 * t * f * e if (code.fused_gate_up and code.gate_up_held) else 0.0
    phases["down"] = base + mlp_held + gu_live + t * f * e + linear(f, h, _act_blocks(cfg, tp, cfg.intermediate_size))
    phases["residual2"] = base + held + (x if code.residual_in_place else 2 * x)
    phases["logits"] = x + batch * cfg.vocab_size * 4 * 3
    return {name: float(v) for name, v in phases.items()}


def prefill_activation_bytes(cfg: ModelConfig, tp: int, cp: int, new_tokens: int, context_tokens: int,
                             batch: int, dtype: str, code: LayerCode = LayerCode()) -> float:
    """Peak bytes of one GPU's prefill working set: the largest of :func:`activation_phases`."""
    return max(activation_phases(cfg, tp, cp, new_tokens, context_tokens, batch, dtype, code).values())


def comm_buffer_bytes(cfg: ModelConfig, tp: int, cp: int, new_tokens: int, context_tokens: int, batch: int,
                      dtype: str, strategy: str) -> float:
    """Receive buffers the runtime allocates for one layer's CP ring (bytes per GPU; 0 at CP 1).

    pass-KV (Alg. 2): two K and two V blocks of c = ceil(B*context/cp) + 1 slots (double-buffered
    receive), 4*c*k*e.  pass-Q (Alg. 3): two Q blocks 2*t*q*e, the float32 partials
    ``[N, t, nh, DH + 1]`` and the all_to_all's output of the same shape.

    Source: cp_megatron.attention.ring.ring_loop (double buffers), attention/pass_q.py.
    """
    if cp == 1:
        return 0.0
    e = 4 if dtype == "fp32" else 2
    dh, nh = cfg.head_dim, cfg.num_heads / tp
    t, c = math.ceil(batch * new_tokens / cp), math.ceil(batch * context_tokens / cp) + 1
    if strategy == PASS_KV:
        return float(4 * c * kv_heads_per_rank(cfg, tp) * dh * e)
    return float(2 * t * nh * dh * e + 2 * cp * t * nh * (dh + 1) * 4)


def allowance_bytes(tp: int, cp: int, transient_bytes: float) -> dict:
    """The allowances for what neither the planner nor the dry run sees (bytes per GPU):
    CUDA context, NCCL (one allowance per communicator of more than one rank -- TP, CP and the
    world group that shares sampled tokens -- plus the all_to_all's connections when cp > 1)
    and allocator fragmentation (a fraction of ``transient_bytes``).  Sources: :data:`ALLOWANCES`."""
    communicators = (tp > 1) + (cp > 1) + (tp * cp > 1)
    nccl = (communicators * ALLOWANCES["nccl_per_communicator"][0]
            + (ALLOWANCES["nccl_all_to_all"][0] if cp > 1 else 0.0))
    return {"cuda_context": ALLOWANCES["cuda_context"][0], "nccl": nccl,
            "fragmentation": ALLOWANCES["fragmentation_fraction"][0] * transient_bytes}


def memory_report(cfg: ModelConfig, tp: int, cp: int, context_tokens: int, new_tokens: int, batch: int,
                  dtype: str, *, strategy: str = PASS_KV, max_new_tokens: int = 0,
                  kv_margin_tokens: int = DEFAULT_KV_MARGIN_TOKENS, code: LayerCode = LayerCode(),
                  dryrun_config: Optional[str] = None, reserved_tokens: Optional[int] = None) -> MemoryReport:
    """Weights, KV cache capacity, prefill activations and ring buffers of one GPU, the
    allowances beside them, and whether they fit an 80 GB H100 and a 141 GB H200.

    Args:
        cfg: model dimensions; tp / cp: degrees; context_tokens: T + P per sequence;
        new_tokens: T per sequence; batch: sequences; dtype: "fp8" (fp8-rowwise), "bf16", "fp32".
        strategy: the prefill's ring variant (its buffers differ).
        max_new_tokens / kv_margin_tokens: the run's generation budget and KV margin (the cache
            reserves B*context + B*max_new_tokens + margin, :func:`kv_capacity_slots`).
        code: what the layer code keeps alive (:class:`LayerCode`).
        dryrun_config: the run config to name in ``dryrun_command`` (None: ``CONFIG``).
        reserved_tokens: the first turn's prompt the KV cache was reserved for, per sequence
            (None: ``context_tokens``); a later turn's round (a partial prefill) runs in the
            cache its first turn reserved.

    Raises:
        PlanInputError: unknown dtype.
    """
    e = 4 if dtype == "fp32" else 2
    w = loaded_weight_bytes(cfg, tp, dtype)
    kv = kv_cache_bytes_per_gpu(cfg, tp, cp, context_tokens, batch, e)
    slot = 2 * cfg.num_layers * kv_heads_per_rank(cfg, tp) * cfg.head_dim * e
    reserved = context_tokens if reserved_tokens is None else reserved_tokens
    kv_cap = float(slot * kv_capacity_slots(batch * reserved, batch * max_new_tokens, cp, kv_margin_tokens))
    phases = activation_phases(cfg, tp, cp, new_tokens, context_tokens, batch, dtype, code)
    act = max(phases.values())
    comm = comm_buffer_bytes(cfg, tp, cp, new_tokens, context_tokens, batch, dtype, strategy)
    total = w + kv_cap + act + comm
    allow = allowance_bytes(tp, cp, act + comm)
    total_allow = total + sum(allow.values())
    capacity = {name: load_profile(name).memory_bytes for name in MEMORY_TARGETS}
    command = f"cp-megatron dryrun {dryrun_config or 'CONFIG'} --layers 2"
    return MemoryReport(weights="fp8-rowwise" if dtype == "fp8" else dtype, weight_bytes=w,
                        kv_cache_bytes=kv, kv_cache_capacity_bytes=kv_cap, activation_bytes=act,
                        comm_buffer_bytes=comm, total_bytes=total, allowances=allow,
                        total_with_allowances_bytes=total_allow, activation_phases=phases,
                        capacity_bytes=capacity, fits={n: total_allow <= c for n, c in capacity.items()},
                        dryrun_command=command)
