"""Hardware profiles: the constants of the variant heuristic and of the planner.

Pure data.  C (achieved attention FLOP/s per GPU) and BW (CP link bandwidth per GPU)
feed Alg. 1 / Alg. 5 (:mod:`cp_megatron.attention.heuristic`); the other fields feed
the cost model (:mod:`cp_megatron.planner`).

Sources: paper §4.1 and App. A (the GTT / GTI hosts: 8 H100 per node over NVLink, power
limited to 500 W, 800 TF/s BF16 peak, 96 GB HBM2e at 2.4 TB/s; 400 Gb/s RDMA per GPU on GTT,
100 Gb/s TCP on GTI); NVIDIA H100/H200 SXM data sheets (NVLink 900 GB/s bidirectional, H200
HBM); FlashAttention-3 (Shah et al., arXiv 2407.08608, §4.1: BF16 forward on H100 SXM5
reaches ~648 TF/s of the 989 peak, 65%, for head dim 128 at 16K tokens, and up to 740 TF/s,
75%, for head dim 256).  Achieved rates are fractions of the peak chosen from those sources,
never fitted to the paper's TTFTs or TTITs.  GPU latencies come from NCCL's own cost model
(src/graph/tuning.cc), the achieved HBM fraction from a published H100 copy benchmark, the
cost of a kernel launch (eager, and replayed from a CUDA graph) from published launch
measurements; decode (TTIT) is what they move.  The "cpu-gloo" values are measured
(``cp-megatron bench hardware``, one thread per rank, loopback gloo, 2-core CI machine).
docs/planner.md tabulates each constant.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class HardwareProfile:
    """Per-GPU (or per-rank) hardware constants.

    Attributes:
        name: profile name.
        peak_flops_per_s: dense BF16 peak of one GPU (FLOP/s).
        attn_flops_per_s: C, achieved attention FLOP/s per GPU (heuristic input).
        linear_flops_per_s: achieved FLOP/s of the linear layers per GPU.
        cp_bandwidth_bytes_per_s: BW, inter-node bandwidth per GPU used by the CP ring (bytes/s).
        tp_bandwidth_bytes_per_s: intra-node (NVLink) all-reduce bus bandwidth per GPU (bytes/s).
        memory_bandwidth_bytes_per_s: HBM bandwidth (bytes/s), bounds decode.
        memory_bytes: HBM capacity per GPU (bytes).
        gpus_per_node: GPUs sharing the fast intra-node link.
        cp_latency_s: fixed cost of one CP ring message (a small send/recv between nodes) in seconds.
        tp_latency_s: fixed cost of one small all-reduce among the GPUs of one node (seconds).
        a2a_latency_s: fixed cost of one small all_to_all over the CP group (seconds).
        net_hop_latency_s: cost of one network hop of a collective (NCCL's tree all-reduce over
            ``nodes`` nodes crosses 2 * ceil(log2(nodes)) of them; a ring all_gather one per
            step between nodes), seconds.
        memory_efficiency: achieved fraction of ``memory_bandwidth_bytes_per_s`` in streaming
            kernels (weight reads of decode GEMMs, KV reads, element-wise work); 1.0 when the
            bandwidth itself was measured by a copy.
        layer_overhead_s: fixed time of one transformer block per round that neither a byte, a
            FLOP nor a kernel-launch term covers (host work measured on a CPU profile; 0 on the
            GPU profiles, whose blocks cost their launches), seconds.
        ring_step_overhead_s: fixed host time added per block by each ring step after the first
            (posting one more exchange and its attention call); also the ``a`` of the runtime's
            ring / all-gather-Q rule (:func:`cp_megatron.attention.heuristic.choose_query_exchange`),
            seconds.
        launch_s: cost of one kernel launched eagerly from PyTorch (Python, dispatcher and
            ``cudaLaunchKernel``), charged per launch of the planner's code model, seconds
            (0: no launch term, e.g. a CPU profile whose ``layer_overhead_s`` is measured).
        graph_node_s: cost of one kernel replayed from a CUDA graph (seconds; 0: as above).
        graph_launch_s: fixed cost of one graph replay (``cudaGraphLaunch``), once per step, seconds.
        ring_base_latency_s: base latency of one NCCL ring collective (all_gather), seconds.
        nvlink_hop_latency_s: latency of one NVLink hop of an NCCL ring step inside a node, seconds.
    """

    name: str
    peak_flops_per_s: float
    attn_flops_per_s: float
    linear_flops_per_s: float
    cp_bandwidth_bytes_per_s: float
    tp_bandwidth_bytes_per_s: float
    memory_bandwidth_bytes_per_s: float
    memory_bytes: float
    gpus_per_node: int
    cp_latency_s: float = 10e-6
    tp_latency_s: float = 10e-6
    a2a_latency_s: float = 10e-6
    net_hop_latency_s: float = 5e-6
    memory_efficiency: float = 1.0
    layer_overhead_s: float = 0.0
    ring_step_overhead_s: float = 0.0
    launch_s: float = 0.0
    graph_node_s: float = 0.0
    graph_launch_s: float = 0.0
    ring_base_latency_s: float = 0.0
    nvlink_hop_latency_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


GB = 1e9

# Latencies of small NCCL collectives from NCCL's own cost model (NVIDIA/nccl
# src/graph/tuning.cc, unchanged from 2.19 to 2.30.7: latency = baseLat + hops * hwLat, LL
# protocol, the one NCCL picks for messages of a few KB): base 6.8 us (tree) / 6.6 us (ring);
# one NVLink hop 0.6 us; one network hop 5.0 us (tree; also what a ring uses when its
# communicator has one GPU per node, as a CP group has) / 2.7 us (ring).
_NCCL_RING_BASE_S = 6.6e-6
_NCCL_NVLINK_HOP_S = 0.6e-6
_NCCL_NVLINK_ALLREDUCE_8_S = 6.8e-6 + 2 * 7 * _NCCL_NVLINK_HOP_S   # tree over 8 GPUs: 15.2 us
_NCCL_NET_P2P_S = _NCCL_RING_BASE_S + 2.7e-6                      # one message, one network hop: 9.3 us
_NCCL_NET_TREE_HOP_S = 5.0e-6
# Achieved HBM bandwidth: a device-to-device copy on H100 SXM5 80 GB reaches 2,903 of
# 3,350 GB/s (86.7%; Voltage Park / AI@GT H100 cluster benchmark, github.com/aigatech/vpbenchmarking).
# No copy benchmark of the paper's HBM2e part was found: the same fraction is assumed.
_H100_COPY_EFFICIENCY = 2903 / 3350
# Kernel launches.  Eager: 5 us per PyTorch op -- a simple op costs 5 us without autograd
# (pytorch/pytorch#41383, measured; ~2 us for a tensor-tensor op, half of it Python, per the
# maintainer there), "usually between 5-20 microseconds" on the CPU side (Holistic Trace
# Analysis docs, cuda_kernel_launch_stats), 6.3-7.5 us per raw CUDA launch + sync and
# 2.6-2.8 us per asynchronous enqueue (github.com/ahrefs/ocannl issue 488, a chain of no-op
# kernels).  CUDA graph: ~0.58 us per node replayed plus ~15 us per replay (the same
# measurement, 8 to 117 nodes; an RTX 5070 Ti, no H100 figure was found).  The paper runs
# decode from CUDA graphs (§4.3).
_EAGER_LAUNCH_S = 5.0e-6
_ENQUEUE_S = 2.65e-6
_GRAPH_NODE_S = 0.6e-6
_GRAPH_LAUNCH_S = 15e-6
_GPU_LATENCIES = dict(cp_latency_s=_NCCL_NET_P2P_S, tp_latency_s=_NCCL_NVLINK_ALLREDUCE_8_S,
                      a2a_latency_s=_NCCL_NET_P2P_S, net_hop_latency_s=_NCCL_NET_TREE_HOP_S,
                      memory_efficiency=_H100_COPY_EFFICIENCY,
                      layer_overhead_s=0.0, ring_step_overhead_s=2 * _ENQUEUE_S,
                      launch_s=_EAGER_LAUNCH_S, graph_node_s=_GRAPH_NODE_S, graph_launch_s=_GRAPH_LAUNCH_S,
                      ring_base_latency_s=_NCCL_RING_BASE_S, nvlink_hop_latency_s=_NCCL_NVLINK_HOP_S)

PROFILES: dict[str, HardwareProfile] = {
    # Paper's GTT cluster (§4.1, App. A): H100 power-limited to 500 W (800 TF/s BF16 peak) with
    # 96 GB HBM2e at 2.4 TB/s, 400 Gb/s RDMA per GPU.
    # attn 540 TF/s = 67.5% of the capped 800 TF/s (FA3 reaches 65-75% of peak);
    # linear 600 TF/s = 75% of 800 (large GEMMs; FP8 speed-up not credited, see docs);
    # TP 450 GB/s = one direction of NVLink4 (900 GB/s bidirectional).
    "h100-rdma": HardwareProfile(
        name="h100-rdma", peak_flops_per_s=800e12, attn_flops_per_s=540e12,
        linear_flops_per_s=600e12, cp_bandwidth_bytes_per_s=400e9 / 8,
        tp_bandwidth_bytes_per_s=450 * GB, memory_bandwidth_bytes_per_s=2.4e12,
        memory_bytes=96 * GB, gpus_per_node=8, **_GPU_LATENCIES),
    # Paper's GTI cluster: same GPUs, 100 Gb/s TCP front-end network per GPU; a message over
    # TCP costs tens of us (50 us here, an order of magnitude, not from a measurement).
    "h100-tcp": HardwareProfile(
        name="h100-tcp", peak_flops_per_s=800e12, attn_flops_per_s=540e12,
        linear_flops_per_s=600e12, cp_bandwidth_bytes_per_s=100e9 / 8,
        tp_bandwidth_bytes_per_s=450 * GB, memory_bandwidth_bytes_per_s=2.4e12,
        memory_bytes=96 * GB, gpus_per_node=8,
        **{**_GPU_LATENCIES, "cp_latency_s": 50e-6, "a2a_latency_s": 50e-6,
           "net_hop_latency_s": 50e-6 - 6.6e-6}),
    # H200 SXM: same compute as H100 SXM (989 TF/s dense BF16, not power-capped), 141 GB
    # HBM3e at 4.8 TB/s; attn 600 TF/s ~ 61% and linear 700 TF/s ~ 71% of 989 (FA3 / GEMM).
    # Same NVLink 4, NICs and NCCL as h100-rdma; the copy efficiency is assumed equal to the
    # H100's (no public H200 copy benchmark was found).
    "h200": HardwareProfile(
        name="h200", peak_flops_per_s=989e12, attn_flops_per_s=600e12,
        linear_flops_per_s=700e12, cp_bandwidth_bytes_per_s=400e9 / 8,
        tp_bandwidth_bytes_per_s=450 * GB, memory_bandwidth_bytes_per_s=4.8e12,
        memory_bytes=141 * GB, gpus_per_node=8, **_GPU_LATENCIES),
    # One CPU thread per rank, gloo over loopback: `cp-megatron bench hardware` on the 2-core
    # Xeon CI machine (docs/bench/hardware.json) in round numbers (rates and bandwidths rounded
    # down by at most 8%, latencies and RAM to the nearest round value).  Measure your
    # own machine the same way and pass the JSON where a profile name is accepted.
    # The decode terms (2026-12-05, runtime after #10): all_to_all 110 us (median of 7 runs on
    # a busy machine, 65-217 us), 0.6 ms of CPU time per block and 0.6 ms per extra ring step
    # (two runs: 571 / 586 us and 537 / 721 us).  No launch term (launch_s = 0): the measured
    # host time per block covers every op.  A gloo all_gather is a ring of (N - 1) messages, each
    # the measured 150 us of one message (net_hop_latency_s; no base, ring_base_latency_s = 0).
    "cpu-gloo": HardwareProfile(
        name="cpu-gloo", peak_flops_per_s=125e9, attn_flops_per_s=100e9,
        linear_flops_per_s=125e9, cp_bandwidth_bytes_per_s=1.5 * GB,
        tp_bandwidth_bytes_per_s=1.6 * GB, memory_bandwidth_bytes_per_s=10 * GB,
        memory_bytes=24 * 2**30, gpus_per_node=1, cp_latency_s=150e-6, tp_latency_s=250e-6,
        a2a_latency_s=110e-6, net_hop_latency_s=150e-6, memory_efficiency=1.0,
        layer_overhead_s=0.6e-3, ring_step_overhead_s=0.6e-3),
}


# may be 0 (not measured / none)
ZERO_OK_FIELDS = ("layer_overhead_s", "ring_step_overhead_s", "launch_s", "graph_node_s", "graph_launch_s",
                  "ring_base_latency_s", "nvlink_hop_latency_s")


class ProfileError(ValueError):
    """A hardware profile that cannot be used: unknown name, unreadable or invalid JSON file."""


def get_profile(name: str) -> HardwareProfile:
    """Return the hardware profile called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown hardware profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


def default_hardware(device) -> HardwareProfile:
    """Heuristic constants when none are configured: cpu-gloo on CPU, h100-rdma on CUDA.

    Args:
        device: a ``torch.device`` or a device type string ("cpu", "cuda", "cuda:1").
    """
    kind = getattr(device, "type", str(device).partition(":")[0])
    return get_profile("h100-rdma" if kind == "cuda" else "cpu-gloo")


def load_profile(spec: str) -> HardwareProfile:
    """A profile by name (``h100-rdma`` ...) or from a JSON file (a path ending in ``.json``,
    or any existing file that is not a profile name).

    The file holds the :class:`HardwareProfile` fields as one object, or a report whose
    ``"profile"`` key holds them -- what ``cp-megatron bench hardware`` writes
    (docs/bench/hardware.json).  Rates are FLOP/s, bandwidths bytes/s, latencies seconds;
    every number must be finite and positive (``gpus_per_node`` an integer,
    ``memory_efficiency`` at most 1, the fields of :data:`ZERO_OK_FIELDS` may be 0).
    Fields with defaults may be left out (older files load unchanged).

    Raises:
        ProfileError: unknown name; unreadable file or not JSON; a missing, unknown,
            non-finite or non-positive field (the message names the file and the field).
    """
    if spec in PROFILES or not (spec.lower().endswith(".json") or Path(spec).is_file()):
        try:
            return get_profile(spec)
        except ValueError as err:
            raise ProfileError(f"{err}, or a path to a profile .json") from None
    try:
        data = json.loads(Path(spec).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: bad JSON
        raise ProfileError(f"hardware profile {spec}: cannot read JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("profile"), dict):
        data = data["profile"]
    if not isinstance(data, dict):
        raise ProfileError(f"hardware profile {spec}: expected a JSON object of profile fields")
    known = {f.name: f for f in fields(HardwareProfile)}
    unknown = sorted(set(data) - set(known))
    missing = sorted(name for name, f in known.items() if name not in data and f.default is MISSING)
    if unknown or missing:
        raise ProfileError(f"hardware profile {spec}: unknown fields {unknown}, missing fields {missing}")
    values = {name: _profile_value(spec, name, value) for name, value in data.items()}
    return HardwareProfile(**values)


def _profile_value(spec: str, name: str, value):
    """One field of a profile file, checked: a printable name, else a finite positive number."""
    if name == "name":
        if not isinstance(value, str) or not value.strip() or not value.isprintable():
            raise ProfileError(f"hardware profile {spec}: name: expected a non-empty one-line string")
        return value
    integral = name == "gpus_per_node"
    zero_ok = name in ZERO_OK_FIELDS
    kind = ("a positive integer" if integral else "a finite number >= 0" if zero_ok else
            "a number in (0, 1]" if name == "memory_efficiency" else "a finite positive number")
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except OverflowError:  # an integer too large for a float
        number = None
    if (number is None or not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok)
            or (integral and number != int(number)) or (name == "memory_efficiency" and number > 1)):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ProfileError(f"hardware profile {spec}: {name}: expected {kind}, got {shown}")
    return int(number) if integral else number
