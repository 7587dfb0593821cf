"""Hardware profiles: the constants of the variant heuristic and of the planner.

Pure data.  C (achieved attention FLOP/s per GPU) and BW (CP link bandwidth per GPU)
feed Alg. 1 / Alg. 5 (:mod:`cp_megatron.attention.heuristic`); the other fields feed
the cost model (:mod:`cp_megatron.planner`).

Sources: paper §4 (H100 power-capped at 800 TF/s BF16, 8 GPUs per node over NVLink,
400 Gb/s RDMA per GPU on GTT, 100 Gb/s TCP on GTI); NVIDIA H100/H200 SXM data sheets
(HBM capacity and bandwidth, NVLink 900 GB/s bidirectional); FlashAttention-3 (Shah et
al., arXiv 2407.08608, §4.1: BF16 forward on H100 SXM5 reaches ~648 TF/s of the 989 peak,
65%, for head dim 128 at 16K tokens, and up to 740 TF/s, 75%, for head dim 256).
Achieved rates are fractions of the peak chosen from those sources, never fitted to the
paper's TTFTs.  Latencies are orders of magnitude for small NCCL / gloo messages (not from
the paper); only decode (TTIT) is sensitive to them.  The "cpu-gloo" values are measured
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
        cp_latency_s: fixed cost of one CP message (send/recv or all_to_all) in seconds.
        tp_latency_s: fixed cost of one small TP all-reduce in seconds.
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

    def to_dict(self) -> dict:
        return asdict(self)


GB = 1e9
PROFILES: dict[str, HardwareProfile] = {
    # Paper's GTT cluster: H100 power-capped, 400 Gb/s RDMA per GPU.
    # attn 540 TF/s = 67.5% of the capped 800 TF/s (FA3 reaches 65-75% of peak);
    # linear 600 TF/s = 75% of 800 (large GEMMs; FP8 speed-up not credited, see docs);
    # TP 450 GB/s = one direction of NVLink4 (900 GB/s bidirectional); HBM3 3.35 TB/s.
    "h100-rdma": HardwareProfile(
        name="h100-rdma", peak_flops_per_s=800e12, attn_flops_per_s=540e12,
        linear_flops_per_s=600e12, cp_bandwidth_bytes_per_s=400e9 / 8,
        tp_bandwidth_bytes_per_s=450 * GB, memory_bandwidth_bytes_per_s=3.35e12,
        memory_bytes=80 * 2**30, gpus_per_node=8, cp_latency_s=10e-6, tp_latency_s=10e-6),
    # Paper's GTI cluster: same GPUs, 100 Gb/s TCP front-end network per GPU.
    "h100-tcp": HardwareProfile(
        name="h100-tcp", peak_flops_per_s=800e12, attn_flops_per_s=540e12,
        linear_flops_per_s=600e12, cp_bandwidth_bytes_per_s=100e9 / 8,
        tp_bandwidth_bytes_per_s=450 * GB, memory_bandwidth_bytes_per_s=3.35e12,
        memory_bytes=80 * 2**30, gpus_per_node=8, cp_latency_s=50e-6, tp_latency_s=10e-6),
    # H200 SXM: same compute as H100 SXM (989 TF/s dense BF16, not power-capped), 141 GB
    # HBM3e at 4.8 TB/s; attn 600 TF/s ~ 61% and linear 700 TF/s ~ 71% of 989 (FA3 / GEMM).
    "h200": HardwareProfile(
        name="h200", peak_flops_per_s=989e12, attn_flops_per_s=600e12,
        linear_flops_per_s=700e12, cp_bandwidth_bytes_per_s=400e9 / 8,
        tp_bandwidth_bytes_per_s=450 * GB, memory_bandwidth_bytes_per_s=4.8e12,
        memory_bytes=141 * GB, gpus_per_node=8, cp_latency_s=10e-6, tp_latency_s=10e-6),
    # One CPU thread per rank, gloo over loopback: `cp-megatron bench hardware` on the 2-core
    # Xeon CI machine (docs/bench/hardware.json) in round numbers (rates and bandwidths rounded
    # down by at most 8%, latencies and RAM to the nearest round value).  Measure your
    # own machine the same way and pass the JSON where a profile name is accepted.
    "cpu-gloo": HardwareProfile(
        name="cpu-gloo", peak_flops_per_s=125e9, attn_flops_per_s=100e9,
        linear_flops_per_s=125e9, cp_bandwidth_bytes_per_s=1.5 * GB,
        tp_bandwidth_bytes_per_s=1.6 * GB, memory_bandwidth_bytes_per_s=10 * GB,
        memory_bytes=24 * 2**30, gpus_per_node=1, cp_latency_s=150e-6, tp_latency_s=250e-6),
}


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


def load_profile(spec: str) -> HardwareProfile:
    """A profile by name (``h100-rdma`` ...) or from a JSON file (a path ending in ``.json``,
    or any existing file that is not a profile name).

    The file holds the :class:`HardwareProfile` fields as one object, or a report whose
    ``"profile"`` key holds them -- what ``cp-megatron bench hardware`` writes
    (docs/bench/hardware.json).  Rates are FLOP/s, bandwidths bytes/s, latencies seconds;
    every number must be finite and positive (``gpus_per_node`` an integer).

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
    kind = "a positive integer" if integral else "a finite positive number"
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except OverflowError:  # an integer too large for a float
        number = None
    if number is None or not math.isfinite(number) or number <= 0 or (integral and number != int(number)):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ProfileError(f"hardware profile {spec}: {name}: expected {kind}, got {shown}")
    return int(number) if integral else number
