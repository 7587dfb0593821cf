"""TTIT from the step as it is: the launches, collectives and HBM bytes of one decode step.

One decode step of the runtime (T = 1 per sequence, Alg. 4's batch placement), costed on the
CP rank that holds the step's new token: it reads every weight of its GPU, and the other CP
ranks wait for it at each layer's collectives.  Pure (no torch):

    TTIT = launches x per-launch cost              launches: :class:`DecodeStepCode`, the code
                                                   model the dry run checks (tests/test_planner.py)
         + sum of the step's collectives           each alpha + beta: NCCL's latency model
                                                   (src/graph/tuning.cc) + bytes / link bandwidth
         + HBM bytes / achieved HBM bandwidth      the rank's weights and its KV shard (rooflines)
         + measured host time per block            CPU profiles only (``layer_overhead_s`` ...)

Nothing is overlapped: the terms add, as if the host's launches never ran ahead of the
device.  ``launches x per-launch cost`` uses ``launch_s`` (eager) or ``graph_node_s`` plus one
``graph_launch_s`` (replayed from a CUDA graph, ``runtime.cuda_graphs``); both are reported.
``overlapped_s`` is the other bound: the larger of the launch term and the device's work.

Source: arXiv 2411.01783 §3.6 (Alg. 4), §4.3 (decode with CUDA graphs); NVIDIA/nccl
src/graph/tuning.cc (collective latencies); docs/planner.md ("Decode (TTIT) from the step as
it is").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from cp_megatron.attention.heuristic import ALL_GATHER_Q, PASS_KV, PASS_Q, choose_query_exchange
from cp_megatron.hardware import HardwareProfile
from cp_megatron.model.config import ModelConfig

NO_EXCHANGE = "none"          # CP 1: the queries stay where they are
LSE_BYTES = 4                 # (O, LSE) partials travel in float32
LINEARS_PER_LAYER = 4         # qkv_proj, o_proj, gate_up_proj, down_proj (fused projections)
TOKEN_BYTES = 8               # the sampled token of a sequence, int64, shared over the world group


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads a TP rank holds: NKV/tp, or 1 (replicated) when tp > NKV."""
    return max(1, cfg.num_kv_heads // tp)


# --------------------------------------------------------------------------- the code model

@dataclass(frozen=True)
class DecodeStepCode:
    """Kernel launches of one decode step on the CP rank that holds the new token (batch 1),
    by the cp_megatron file that makes them: what ``cp-megatron dryrun`` counts (non-view aten
    ops, ``launches_by_layer_and_source``).  The defaults are the code at this commit;
    ``tests/test_planner.py::test_decode_code_matches_the_dry_run`` ties every field to the dry
    run of 405B FP8 TP8 x CP1 / CP2 / CP4 (all-gather-Q, and ring pass-Q forced) and 70B bf16
    TP8 x CP4, so a change to the layer code shows up there as the source whose count moved.

    Attributes:
        llama: model/llama.py per layer: 2 ``rms_norm``, 2 residual ``add_``, ``silu``, ``mul_``.
        gemm: one GEMM per linear (4 per layer): ``_scaled_mm`` (model/fp8.py) with FP8
            weights, ``matmul`` (model/llama.py) otherwise.
        fp8_quantize: model/fp8.py per FP8 linear: the activation's inf-norm, the scale in one
            ``rsub``, the division written into float8 (``quantize_activation_rows``).
        rope: model/rope.py per layer: q and k rotated by one ``bmm`` with the round's per-token
            rotation matrices (``RopeTables.rotation``, rounds of at most 64 tokens).
        kv_store: model/kv_cache.py per layer: the K and V ``copy_``.
        attention: attention/kernels.py per layer: the flash kernel.
        all_gather_q: CP > 1, all-gather-Q: (source, launches) per layer (pack of (O, LSE),
            the merge of the N partials).
        ring_q: CP > 1, ring pass-Q (Alg. 4): (source, launches) per layer.
        outside: per step, outside the layers (embedding, final norm, LM head, logits gather,
            RoPE tables, sampling), CP 1 and all-gather-Q: the static decode step
            (:mod:`cp_megatron.decode_step`: its two input copies; its plan is made once per key).
        outside_ring_q: the same with ring pass-Q (planned round by round: the round's index
            tensors and RoPE's inputs copied each step).
    """

    llama: int = 6
    gemm: int = 1
    fp8_quantize: int = 3
    rope: int = 1
    kv_store: int = 2
    attention: int = 1
    all_gather_q: tuple = (("attention/decode.py", 1), ("attention/merge.py", 3))
    ring_q: tuple = (("attention/pass_q.py", 2), ("attention/blocks.py", 2), ("attention/merge.py", 3))
    outside: tuple = (("decode_step.py", 2), ("engine.py", 3), ("model/rope.py", 12), ("model/llama.py", 11),
                      ("sampling.py", 1))
    outside_ring_q: tuple = (("engine.py", 7), ("model/rope.py", 12), ("model/llama.py", 12), ("sampling.py", 1))

    def layer_launches(self, fp8: bool, exchange: str) -> dict:
        """{source file: launches} of one decoder layer.

        Args:
            fp8: FP8 row-wise weights (model.weights: fp8-rowwise).
            exchange: :data:`NO_EXCHANGE` (CP 1), ``all-gather-q``, ``pass-q`` (ring), or
                ``pass-kv`` (a decode the heuristic sends to the KV ring: not traced, costed
                with the ring pass-Q launches).
        """
        out = {"model/llama.py": self.llama}
        if fp8:
            out["model/fp8.py"] = LINEARS_PER_LAYER * (self.gemm + self.fp8_quantize)
        else:
            out["model/llama.py"] += LINEARS_PER_LAYER * self.gemm
        out.update({"model/rope.py": self.rope, "model/kv_cache.py": self.kv_store,
                    "attention/kernels.py": self.attention})
        extra = () if exchange == NO_EXCHANGE else self.all_gather_q if exchange == ALL_GATHER_Q else self.ring_q
        for source, n in extra:
            out[source] = out.get(source, 0) + n
        return out

    def outside_launches(self, exchange: str) -> dict:
        """{source file: launches} of one step outside the decoder layers."""
        return dict(self.outside if exchange in (NO_EXCHANGE, ALL_GATHER_Q) else self.outside_ring_q)


# --------------------------------------------------------------------------- collectives

def group_bandwidth(hw: HardwareProfile, group: str, ranks: int) -> float:
    """Bytes/s of one GPU in a collective of ``group`` ("tp", "world": NVLink inside a node;
    across nodes NCCL runs one ring per NIC, so the bus bandwidth is capped at gpus_per_node
    x the NIC's; "cp": one rank per node, the NIC)."""
    if group == "cp":
        return hw.cp_bandwidth_bytes_per_s
    if ranks <= hw.gpus_per_node:
        return hw.tp_bandwidth_bytes_per_s
    return min(hw.tp_bandwidth_bytes_per_s, hw.gpus_per_node * hw.cp_bandwidth_bytes_per_s)


def allreduce_time(payload_bytes: float, ranks: int, bandwidth: float, latency_s: float) -> float:
    """Ring all-reduce: 2(n-1)/n * payload / bandwidth + latency; 0 for one rank (s)."""
    if ranks == 1:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * payload_bytes / bandwidth + latency_s


def allreduce_latency(hw: HardwareProfile, ranks: int) -> float:
    """Fixed cost of one small all-reduce over ``ranks`` GPUs (seconds; 0 for one rank).

    Inside a node it is ``tp_latency_s``.  Across ``nodes`` = ceil(ranks / gpus_per_node)
    nodes NCCL runs a tree whose every level is crossed twice (reduce up, broadcast down):
    ``tp_latency_s + 2 * ceil(log2(nodes)) * net_hop_latency_s``.  A profile with one GPU per
    node (``cpu-gloo``) measured ``tp_latency_s`` over its only link, so each tree level costs
    one ``tp_latency_s`` there.

    Source: NCCL's cost model (src/graph/tuning.cc: tree latency = baseLat +
    2 * ((ppn - 1) * intraHop + log2(nodes) * netHop)).
    """
    if ranks <= 1:
        return 0.0
    nodes = math.ceil(ranks / hw.gpus_per_node)
    levels = math.ceil(math.log2(nodes)) if nodes > 1 else 0
    if hw.gpus_per_node == 1:
        return hw.tp_latency_s * max(1, levels)
    return hw.tp_latency_s + 2 * levels * hw.net_hop_latency_s


def allgather_latency(hw: HardwareProfile, ranks: int, nodes: int) -> float:
    """Fixed cost of one small ring all_gather over ``ranks`` ranks on ``nodes`` nodes (s).

    NCCL's ring: base + (n - 1) steps, of which ``nodes - 1`` cross the network
    (``net_hop_latency_s``: a communicator with one GPU per node, as a CP group, pays the
    tree's network hop) and the others an NVLink hop (``nvlink_hop_latency_s``).  On
    ``cpu-gloo`` (no base) every step is one loopback message.

    Source: NVIDIA/nccl src/graph/tuning.cc (ring latency = baseLat + (nsteps - nInterSteps)
    * intraLat + nInterSteps * interLat; interLat of the tree when ppn = 1).
    """
    if ranks <= 1:
        return 0.0
    inter = nodes - 1 if nodes > 1 else 0
    return hw.ring_base_latency_s + (ranks - 1 - inter) * hw.nvlink_hop_latency_s + inter * hw.net_hop_latency_s


@dataclass(frozen=True)
class Collective:
    """One collective of a decode step, as the runtime issues it, and its alpha-beta time.

    Attributes:
        kind: "all_reduce", "all_gather", "all_to_all" or "send_recv" (one ring exchange: a
            send to the next CP rank and a receive from the previous one).
        group: "tp", "cp" or "world"; ranks / nodes: its size and the nodes it spans.
        per: "layer" (``count`` calls in every decoder layer) or "step" (``count`` per step).
        count: calls.
        in_bytes / out_bytes: this rank's input and output of one call (bytes).
        where: the cp_megatron file that issues it.
        latency_s / time_s: alpha and alpha + beta of one call (s).
    """

    kind: str
    group: str
    ranks: int
    nodes: int
    per: str
    count: int
    in_bytes: float
    out_bytes: float
    where: str
    latency_s: float
    time_s: float


def collective(hw: HardwareProfile, kind: str, group: str, ranks: int, nodes: int, per: str, count: int,
               in_bytes: float, out_bytes: float, where: str) -> Collective:
    """A :class:`Collective` with its time: alpha from NCCL's model, beta = bytes / bandwidth.

        all_reduce   allreduce_latency + 2(n-1)/n * bytes / BW
        all_gather   allgather_latency + (n-1)/n * output bytes / BW
        all_to_all   a2a_latency_s + (n-1)/n * bytes / BW        (n-1 concurrent sends)
        send_recv    cp_latency_s + bytes / BW                    (one message)
    """
    bw = group_bandwidth(hw, group, ranks)
    if kind == "all_reduce":
        lat = allreduce_latency(hw, ranks)
        t = allreduce_time(in_bytes, ranks, bw, lat)
    elif kind == "all_gather":
        lat = allgather_latency(hw, ranks, nodes)
        t = lat + (ranks - 1) / ranks * out_bytes / bw
    elif kind == "all_to_all":
        lat = hw.a2a_latency_s
        t = lat + (ranks - 1) / ranks * in_bytes / bw
    elif kind == "send_recv":
        lat = hw.cp_latency_s
        t = lat + in_bytes / bw
    else:
        raise ValueError(f"collective kind: expected all_reduce, all_gather, all_to_all or send_recv, got {kind!r}")
    return Collective(kind, group, ranks, nodes, per, count, float(in_bytes), float(out_bytes), where, lat, t)


def decode_collectives(cfg: ModelConfig, hw: HardwareProfile, tp: int, cp: int, batch: int, context_tokens: int,
                       dtype: str, exchange: str) -> list[Collective]:
    """The collectives of one decode step on the rank that holds a new token.

    Per layer: two TP all-reduces of the rows' hidden state (model/llama.py); at CP > 1 the
    query exchange -- all-gather-Q: one all_gather of every rank's query rows and one
    all_to_all of the packed float32 (O, LSE) (attention/decode.py); ring pass-Q: N - 1 ring
    exchanges of the query block (attention/ring.py) and the same all_to_all
    (attention/pass_q.py); pass-KV: N - 1 exchanges of the rank's K and V.  Per step: the
    vocab-parallel embedding's all-reduce and the float32 logits' all_gather over TP
    (model/llama.py), the sampled tokens' all-reduce over the world (engine.py).

    Rows per rank: ceil(B / N) (Alg. 4's padding); e = 4 for fp32, else 2 bytes.
    """
    e = 4 if dtype == "fp32" else 2
    heads, dh, h = cfg.num_heads // tp, cfg.head_dim, cfg.hidden_size
    rows = math.ceil(batch / cp)
    tp_nodes = math.ceil(tp / hw.gpus_per_node)
    out = []

    def add(kind, group, ranks, nodes, per, count, in_bytes, out_bytes, where):
        if ranks > 1 and count > 0:
            out.append(collective(hw, kind, group, ranks, nodes, per, count, in_bytes, out_bytes, where))

    hidden = rows * h * e
    add("all_reduce", "tp", tp, tp_nodes, "layer", 2, hidden, hidden, "model/llama.py")
    q_block = rows * heads * dh * e
    partials = cp * rows * heads * dh * 4 + cp * rows * heads * LSE_BYTES   # [N, rows, NH/tp, DH + 1] float32
    if exchange == ALL_GATHER_Q:
        add("all_gather", "cp", cp, cp, "layer", 1, q_block, cp * q_block, "attention/decode.py")
        add("all_to_all", "cp", cp, cp, "layer", 1, partials, partials, "attention/decode.py")
    elif exchange == PASS_Q:
        add("send_recv", "cp", cp, cp, "layer", cp - 1, q_block, q_block, "attention/ring.py")
        add("all_to_all", "cp", cp, cp, "layer", 1, partials, partials, "attention/pass_q.py")
    elif exchange == PASS_KV:
        kv_block = 2 * math.ceil(batch * context_tokens / cp) * kv_heads_per_rank(cfg, tp) * dh * e
        add("send_recv", "cp", cp, cp, "layer", cp - 1, kv_block, kv_block, "attention/ring.py")
    logits = rows * (cfg.vocab_size // tp) * 4
    add("all_reduce", "tp", tp, tp_nodes, "step", 1, hidden, hidden, "model/llama.py")
    add("all_gather", "tp", tp, tp_nodes, "step", 1, logits, tp * logits, "model/llama.py")
    world = tp * cp
    add("all_reduce", "world", world, math.ceil(world / hw.gpus_per_node), "step", 1, TOKEN_BYTES * batch,
        TOKEN_BYTES * batch, "engine.py")
    return out


# --------------------------------------------------------------------------- the step

@dataclass(frozen=True)
class DecodeCost:
    """Seconds and counts of one decode step (see the module doc for the sum).

    Attributes:
        strategy: the heuristic's variant of the step (Alg. 1 / 5): "pass-q" (or "pass-kv").
        exchange: how the queries reach the other CP ranks: "none" (CP 1), "all-gather-q",
            "pass-q" (ring, Alg. 4) -- the runtime's rule (``choose_query_exchange``) -- or
            "pass-kv".
        cuda_graphs: whether ``launch_s`` and ``total_s`` are the CUDA-graph figures.
        tokens_per_rank: query rows per CP rank (the batch padded to a multiple of N, over N).
        launches_per_layer / launches_outside_layers / launches: kernel launches per decoder
            layer, per step outside the layers, and per step in all.
        launches_by_source / outside_by_source: the same by cp_megatron file.
        launch_cost_s: one launch (``launch_s`` or ``graph_node_s`` of the profile), seconds.
        launch_s: launches x launch_cost_s (+ one ``graph_launch_s`` with graphs), seconds.
        host_s: measured host time per block that no launch covers (CPU profiles), seconds.
        fixed_s: launch_s + host_s, what the step costs beyond its bytes and collectives (s).
        collectives: each :class:`Collective` as a dict.
        tp_comm_s / cp_comm_s / step_comm_s: the layers' TP all-reduces, the layers' CP query
            exchange and all_to_all, the step's collectives outside the layers (s, all layers).
        comm_s: their sum.
        weight_bytes / kv_bytes: HBM bytes the rank reads: its blocks' weights and LM head; its
            KV shard.
        weights_s / kv_s / lm_head_s: the blocks' weights, attention over the KV shard, the LM
            head (rooflines: max(FLOPs / rate, bytes / achieved HBM bandwidth)), seconds.
        hbm_s: their sum.
        total_s: launch_s + host_s + comm_s + hbm_s (the TTIT).
        overlapped_s: max(launch_s, host_s + comm_s + hbm_s): the step if the host's launches
            overlapped the device's work completely.
        modes: {"eager": {...}, "cuda_graphs": {...}}, each launch_cost_s, launch_s, total_s,
            overlapped_s.
    """

    strategy: str
    exchange: str
    cuda_graphs: bool
    tokens_per_rank: int
    launches_per_layer: int
    launches_outside_layers: int
    launches: int
    launches_by_source: dict
    outside_by_source: dict
    launch_cost_s: float
    launch_s: float
    host_s: float
    fixed_s: float
    collectives: list
    tp_comm_s: float
    cp_comm_s: float
    step_comm_s: float
    comm_s: float
    weight_bytes: float
    kv_bytes: float
    weights_s: float
    kv_s: float
    lm_head_s: float
    hbm_s: float
    total_s: float
    overlapped_s: float
    modes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def query_exchange(cfg: ModelConfig, hw: HardwareProfile, tp: int, cp: int, batch: int, context_tokens: int,
                   dtype: str, strategy: str) -> str:
    """The exchange the runtime runs for this decode step: "none" at CP 1, "pass-kv" when the
    heuristic picked pass-KV, else :func:`choose_query_exchange` with the engine's inputs
    (``InferenceEngine._query_exchange``: this TP rank's heads, the padded query block,
    attention FLOPs per rank, ``cp_latency_s + ring_step_overhead_s``, ``a2a_latency_s``, one
    read of the rank's KV shard at the achieved HBM bandwidth)."""
    if cp == 1:
        return NO_EXCHANGE
    if strategy == PASS_KV:
        return PASS_KV
    e = 4 if dtype == "fp32" else 2
    heads, dh = cfg.num_heads // tp, cfg.head_dim
    q_block = math.ceil(batch / cp) * heads * dh * e
    flops = batch * 4 * heads * dh * 1 * (context_tokens + 1) / cp
    kv_bytes = batch * (context_tokens + 1) / cp * 2 * max(1, cfg.num_kv_heads // tp) * dh * e
    chosen, *_costs = choose_query_exchange(cp, q_block, flops, hw.attn_flops_per_s,
                                            hw.cp_bandwidth_bytes_per_s,
                                            hw.cp_latency_s + hw.ring_step_overhead_s, hw.a2a_latency_s,
                                            kv_read_s=kv_bytes / (hw.memory_bandwidth_bytes_per_s
                                                                  * hw.memory_efficiency))
    return chosen


def decode_step_cost(cfg: ModelConfig, hw: HardwareProfile, tp: int, cp: int, context_tokens: int, batch: int,
                     dtype: str, strategy: str, block_weight_bytes: float, cuda_graphs: bool = False,
                     code: DecodeStepCode = DecodeStepCode()) -> DecodeCost:
    """TTIT of one decode step on ``context_tokens`` cached tokens per sequence.

    Args:
        cfg / hw: model dimensions and hardware profile.
        tp / cp: degrees; batch: sequences decoding together.
        dtype: weight dtype ("fp8" = fp8-rowwise, "bf16", "fp32"); KV and activations are
            fp32 for "fp32", else bf16.
        strategy: the heuristic's variant for the step (pass-Q for GQA models).
        block_weight_bytes: one block's weights on one TP rank (bytes; the planner's
            ``block_weight_bytes``).
        cuda_graphs: report the CUDA-graph figures as ``launch_s`` / ``total_s``.
        code: the launch model.

    Returns:
        DecodeCost.

    Source: module doc; arXiv 2411.01783 §3.6, §4.3.
    """
    e = 4 if dtype == "fp32" else 2
    layers, dh, h = cfg.num_layers, cfg.head_dim, cfg.hidden_size
    heads, kv_heads = cfg.num_heads // tp, kv_heads_per_rank(cfg, tp)
    hbm = hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency
    exchange = query_exchange(cfg, hw, tp, cp, batch, context_tokens, dtype, strategy)
    rows = math.ceil(batch / cp)

    per_layer = code.layer_launches(dtype == "fp8", exchange)
    outside = code.outside_launches(exchange)
    n_layer, n_out = sum(per_layer.values()), sum(outside.values())
    launches = layers * n_layer + n_out
    host_per_block = hw.layer_overhead_s
    if hw.launch_s == 0 and hw.graph_node_s == 0:   # a CPU profile: measured host time per block
        host_per_block += (cp - 1) * hw.ring_step_overhead_s
    host_s = layers * host_per_block

    colls = decode_collectives(cfg, hw, tp, cp, batch, context_tokens, dtype, exchange)
    tp_comm = sum(c.count * c.time_s for c in colls if c.per == "layer" and c.group == "tp") * layers
    cp_comm = sum(c.count * c.time_s for c in colls if c.per == "layer" and c.group == "cp") * layers
    step_comm = sum(c.count * c.time_s for c in colls if c.per == "step")
    comm_s = tp_comm + cp_comm + step_comm

    head_bytes = cfg.vocab_size / tp * h * e
    matmul_params = (2 * h * cfg.num_heads * dh + 2 * h * cfg.num_kv_heads * dh + 3 * h * cfg.intermediate_size) / tp
    weights_s = layers * max(2.0 * matmul_params * rows / hw.linear_flops_per_s, block_weight_bytes / hbm)
    kv_layer = 2 * math.ceil(batch * context_tokens / cp) * kv_heads * dh * e
    attn_flops = batch * 4 * heads * dh * context_tokens / cp        # the rank's shard, every query row
    kv_s = layers * max(attn_flops / hw.attn_flops_per_s, kv_layer / hbm)
    lm_head_s = max(2.0 * rows * cfg.vocab_size * h / tp / hw.linear_flops_per_s, head_bytes / hbm)
    hbm_s = weights_s + kv_s + lm_head_s
    device_s = host_s + comm_s + hbm_s

    modes = {}
    for mode, cost, fixed in (("eager", hw.launch_s, 0.0), ("cuda_graphs", hw.graph_node_s, hw.graph_launch_s)):
        lt = launches * cost + fixed
        modes[mode] = {"launch_cost_s": cost, "launch_s": lt, "total_s": lt + device_s,
                       "overlapped_s": max(lt, device_s)}
    chosen = modes["cuda_graphs" if cuda_graphs else "eager"]
    return DecodeCost(
        strategy=strategy, exchange=exchange, cuda_graphs=cuda_graphs, tokens_per_rank=rows,
        launches_per_layer=n_layer, launches_outside_layers=n_out, launches=launches,
        launches_by_source=per_layer, outside_by_source=outside,
        launch_cost_s=chosen["launch_cost_s"], launch_s=chosen["launch_s"], host_s=host_s,
        fixed_s=chosen["launch_s"] + host_s,
        collectives=[asdict(c) for c in colls], tp_comm_s=tp_comm, cp_comm_s=cp_comm, step_comm_s=step_comm,
        comm_s=comm_s, weight_bytes=layers * block_weight_bytes + head_bytes, kv_bytes=layers * kv_layer,
        weights_s=weights_s, kv_s=kv_s, lm_head_s=lm_head_s, hbm_s=hbm_s, total_s=chosen["total_s"],
        overlapped_s=chosen["overlapped_s"], modes=modes)


def layer_launch_floor(fp8: bool, code: Optional[DecodeStepCode] = None) -> int:
    """Launches of a decoder layer without any CP exchange: the floor a prefill layer's fixed
    cost is charged with (a prefill runs these and more: FP8 chunks, ring steps, merges)."""
    return sum((code or DecodeStepCode()).layer_launches(fp8, NO_EXCHANGE).values())
