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
max(FLOPs / achieved FLOP/s, bytes read / HBM bandwidth), which makes decode memory-bound.
Equations, constants and the comparison with the paper: docs/planner.md.

Source: Yang et al., arXiv 2411.01783, §3.3-3.6 (sharding, ring variants, Alg. 1-5), §4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from cp_megatron.attention.heuristic import PASS_KV, choose_strategy
from cp_megatron.dtypes import BY_SHORT
from cp_megatron.hardware import HardwareProfile, load_profile
from cp_megatron.model.config import ModelConfig, get_preset
from cp_megatron.model.tp_rule import tp_problem

WEIGHT_DTYPES = ("bf16", "fp8", "fp32")
DTYPE_BYTES = {name: BY_SHORT[name].bytes for name in WEIGHT_DTYPES}  # the one dtype table
LSE_BYTES = 4  # LSE travels in float32 (docs/design.md §6)
# Presets the paper serves with FP8 row-wise weights (§4); others default to bf16.
DEFAULT_DTYPE = {"llama3.1-405b": "fp8"}



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
    """Bytes of all weights (whole model, before TP sharding).

    ``fp8`` follows the Llama 3 FP8 recipe the paper uses: FFN weights of every block but
    the first and the last are FP8 with one float32 scale per row; attention projections,
    norms, embedding and LM head stay bf16.  ``bf16`` / ``fp32``: every weight that size.

    Source: arXiv 2411.01783 §4 (FP8 row-wise weights); Llama 3 paper, arXiv 2407.21783 §6.2.
    """
    if dtype not in DTYPE_BYTES:
        raise PlanInputError("--dtype", f"expected one of {WEIGHT_DTYPES}, got {dtype!r}")
    if dtype != "fp8":
        return float(cfg.num_parameters() * DTYPE_BYTES[dtype])
    h, f = cfg.hidden_size, cfg.intermediate_size
    quantized_layers = max(cfg.num_layers - 2, 0)
    fp8_params = quantized_layers * 3 * h * f
    scales = quantized_layers * (2 * f + h) * 4
    return float(fp8_params + scales + (cfg.num_parameters() - fp8_params) * 2)


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads a TP rank holds: NKV/tp, or 1 (replicated) when tp > NKV."""
    return max(1, cfg.num_kv_heads // tp)


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


def allreduce_time(payload_bytes: float, ranks: int, bandwidth: float, latency_s: float) -> float:
    """Ring all-reduce: 2(n-1)/n * payload / bandwidth + latency; 0 for one rank (s)."""
    if ranks == 1:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * payload_bytes / bandwidth + latency_s


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
        tp_comm_s: TP all-reduce time (s), never overlapped.
        lm_head_s: LM head for the last token of each sequence (s).
        total_s: the round's latency (s).
        cp_comm_bytes_per_layer / tp_comm_bytes_per_layer: bytes one GPU sends per block.
        cp_message_bytes: one ring message (bytes).
    """

    strategy: str
    attention_s: float
    linear_s: float
    elementwise_s: float
    cp_comm_exposed_s: float
    tp_comm_s: float
    lm_head_s: float
    total_s: float
    cp_comm_bytes_per_layer: float
    cp_message_bytes: float
    tp_comm_bytes_per_layer: float


def round_cost(cfg: ModelConfig, hw: HardwareProfile, tp: int, cp: int, new_tokens: int,
               cached_tokens: int, batch: int, dtype: str, strategy: str) -> RoundCost:
    """Latency of one round of T new tokens on P cached per sequence, on the slowest GPU.

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
    hbm = hw.memory_bandwidth_bytes_per_s
    tokens_rank = math.ceil(batch * new_tokens / cp)  # new tokens on the most loaded rank
    kv_tokens_rank = batch * (new_tokens + cached_tokens) / cp

    head_params = cfg.vocab_size * cfg.hidden_size
    head_bytes = head_params * e  # embedding and LM head stay in the activation dtype
    non_block = head_bytes * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size * e
    block_bytes_gpu = (weight_bytes(cfg, dtype) - non_block) / layers / tp
    t_linear = max(linear_flops(cfg, tokens_rank) / tp / hw.linear_flops_per_s, block_bytes_gpu / hbm)

    # Attention: load-balanced sharding gives every ring step the same share (§3.3).
    attn_step = batch * attention_flops(cfg.num_heads, dh, new_tokens, cached_tokens) / (tp * cp * cp)
    local_kv_bytes = 2 * kv_tokens_rank * kv_heads * dh * e
    if strategy == PASS_KV:  # the KV block in hand is read once per step
        message, a2a_bytes, kv_read = local_kv_bytes, 0.0, local_kv_bytes
    else:  # pass-Q: a visiting Q block reads the local KV of its own sequences only
        message = float(tokens_rank * heads * dh * e)
        a2a_bytes = (cp - 1) / cp * batch * new_tokens * heads * (dh * e + LSE_BYTES)
        kv_read = local_kv_bytes / cp
    step_s = max(attn_step / hw.attn_flops_per_s, kv_read / hbm)
    if cp == 1:
        ring_s, a2a_s, message, a2a_bytes = step_s, 0.0, 0.0, 0.0
    else:
        bw, lat = hw.cp_bandwidth_bytes_per_s, hw.cp_latency_s
        ring_s = ring_time(cp, step_s, message / bw + lat)
        a2a_s = a2a_bytes / bw + lat if a2a_bytes else 0.0

    # TP: two all-reduces of the hidden states.  Across nodes NCCL runs one ring per NIC, so
    # each GPU's NIC carries 1/gpus_per_node of the traffic: bus bandwidth is capped by
    # gpus_per_node * NIC bandwidth (400 GB/s on h100-rdma, 100 GB/s on h100-tcp).
    if tp <= hw.gpus_per_node:
        tp_bw, tp_lat = hw.tp_bandwidth_bytes_per_s, hw.tp_latency_s
    else:
        tp_bw = min(hw.tp_bandwidth_bytes_per_s, hw.gpus_per_node * hw.cp_bandwidth_bytes_per_s)
        tp_lat = max(hw.tp_latency_s, hw.cp_latency_s)
    payload = tokens_rank * cfg.hidden_size * e
    t_tp = 2 * allreduce_time(payload, tp, tp_bw, tp_lat)

    fp8_fraction = max(layers - 2, 0) / layers if dtype == "fp8" else 0.0
    elementwise_s = layers * elementwise_bytes(cfg, tp, tokens_rank, e, cp, fp8_fraction) / hbm

    lm_head_s = max(2.0 * batch * head_params / tp / hw.linear_flops_per_s, head_bytes / tp / hbm)
    attention_s = layers * cp * step_s
    exposed = layers * (ring_s - cp * step_s + a2a_s)
    linear_s, tp_s = layers * t_linear, layers * t_tp
    return RoundCost(
        strategy=strategy, attention_s=attention_s, linear_s=linear_s, elementwise_s=elementwise_s,
        cp_comm_exposed_s=exposed, tp_comm_s=tp_s, lm_head_s=lm_head_s,
        total_s=attention_s + exposed + linear_s + elementwise_s + tp_s + lm_head_s,
        cp_comm_bytes_per_layer=(cp - 1) * message + a2a_bytes, cp_message_bytes=message,
        tp_comm_bytes_per_layer=2 * 2.0 * (tp - 1) / tp * payload)


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """Everything the planner predicts for one configuration (JSON via :meth:`to_dict`).

    Token counts are per sequence; FLOPs are whole-model totals over all GPUs (``_per_layer``:
    one block); ``*_bytes_per_layer`` are bytes one GPU sends per block; other bytes are per
    GPU; times are seconds on the slowest GPU.  The round's times (``attention_s`` ...
    ``ttft_s``) are the prefill of ``new_tokens`` on ``cached_tokens``; ``decode`` holds the
    same breakdown (:class:`RoundCost`) for one decode step after it, whose total is
    ``ttit_s``.  ``heuristic`` and ``decode["heuristic"]`` are Alg. 1 / Alg. 5's values.
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
    lm_head_s: float
    ttft_s: float
    achieved_flops_per_gpu: float
    decode_strategy: str
    ttit_s: float
    weight_bytes_per_gpu: float
    kv_cache_bytes_per_gpu: float
    memory_bytes_per_gpu: float
    fits_in_memory: bool
    heuristic: dict
    decode: dict
    hardware_profile: dict
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inputs"] = {k: d[k] for k in ("model", "hardware", "tp", "cp", "context_tokens",
                                         "cached_tokens", "batch", "dtype")}
        return d


def _check_positive(flag: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanInputError(flag, f"expected an integer >= {minimum}, got {value!r}")


def plan(model: Union[str, ModelConfig], hardware: Union[str, HardwareProfile], tp: int, cp: int,
         context_tokens: int, cached_tokens: int = 0, batch: int = 1,
         dtype: Optional[str] = None) -> Plan:
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
    decode = round_cost(cfg, hw, tp, cp, 1, context_tokens, batch, dtype, decode_decision.strategy)

    if not (prefill.total_s > 0 and decode.total_s > 0):
        raise PlanInputError("--hardware", f"profile {hw.name!r} gives TTFT {prefill.total_s} s and TTIT "
                                           f"{decode.total_s} s: its rates or latencies are too small "
                                           "or too large")
    attn_layer = batch * attention_flops(cfg.num_heads, cfg.head_dim, t, p)
    lin_layer = batch * linear_flops(cfg, t)
    gpus = tp * cp
    w_gpu = weight_bytes(cfg, dtype) / tp
    kv_gpu = kv_cache_bytes_per_gpu(cfg, tp, cp, context_tokens, batch, e)
    warnings = []
    if context_tokens > cfg.max_position_embeddings:
        warnings.append(f"context {context_tokens} exceeds {cfg.name}'s max_position_embeddings "
                        f"({cfg.max_position_embeddings})")
    if w_gpu + kv_gpu > hw.memory_bytes:
        warnings.append("weights + KV cache exceed the GPU memory")
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
        lm_head_s=prefill.lm_head_s, ttft_s=prefill.total_s,
        achieved_flops_per_gpu=total_flops / gpus / prefill.total_s,
        decode_strategy=decode_decision.strategy, ttit_s=decode.total_s,
        weight_bytes_per_gpu=w_gpu, kv_cache_bytes_per_gpu=kv_gpu, memory_bytes_per_gpu=hw.memory_bytes,
        fits_in_memory=w_gpu + kv_gpu <= hw.memory_bytes,
        heuristic=prefill_decision.to_dict(),
        decode={**asdict(decode), "heuristic": decode_decision.to_dict()},
        hardware_profile=hw.to_dict(), warnings=warnings)
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
