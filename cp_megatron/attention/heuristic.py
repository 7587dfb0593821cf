"""Choosing the ring variant per round: pass-KV or pass-Q (Alg. 1 and Alg. 5, Eq. 5).

Pure maths: no torch.distributed, no megatron.

With T new tokens, P cached tokens, N CP ranks, NH query heads, NKV KV heads,
e bytes per element, C achieved attention FLOP/s per rank and BW the CP link
bandwidth per rank (bytes/s):

    pass-KV  if  T >= N*C*NKV*e / (2*NH*BW)                       (KV transfer hidden)
             or  T/(T+P) >= 2*NKV/NH - 4*T*BW / (N*C*e)             (Eq. 5, counts the all_to_all)
    pass-Q   otherwise

When pass-Q wins, the query blocks reach every rank either around the ring (Alg. 3 / Alg. 4:
N-1 P2P steps, each hidden behind one step's attention) or by one all_gather (then one
attention call over every rank's queries; the all_to_all and merge are the same).  With q
the bytes of one rank's (padded) query block, t = A / (N*C) one ring step's attention (A
this rank's attention FLOPs of the round), a the ring step's latency (P2P + host work per
step), g an all_gather's and r one read of this rank's KV shard of the round's sequences (its
bytes over the achieved HBM bandwidth: a ring step's attention is bandwidth-bound when its
query block has few rows, so a step takes t' = max(t, r)).  The ring runs N attention calls,
each reading the shard again; all-gather-Q runs one over every rank's rows, which reads it
once and takes max(N*t, r).  Each variant's cost beyond the round's N*t of attention FLOPs:

    ring pass-Q    = N*t' - N*t + (N-1) * max(0, a + q/BW - t')
    all-gather-Q   = max(N*t, r) - N*t + g + (N-1) * q/BW
    all-gather-Q  if  all-gather-Q <= ring pass-Q,  else ring pass-Q

With r = 0 (compute-bound rounds: prefill) that is the exposed ring exchange against the
all_gather.  Decode (a few KB of queries, the shard read N times around the ring) therefore
all-gathers, at batch 1 and at batch 32 alike: its collectives per layer stay two (all_gather +
all_to_all) whatever N.

A third way needs no query exchange at all: **replicated-Q**.  Every CP rank runs the layers'
dense part on every rank's rows itself (all-gather-Q's gathered block, computed instead of
gathered; only each token's owner stores its K/V), attends them to its KV shard and all-gathers
the packed (O, LSE) partials, which every rank merges: one collective per layer instead of two.
It pays D, the dense time of the N*q_len rows beyond this rank's q_len (0 while the layers are
weight-bound: decode), and the partials' all_gather receives N times the all_to_all's bytes
(o, one rank's packed float32 partial block):

    replicated-Q   = max(N*t, r) - N*t + D + (N-1)^2 * o/BW
    replicated-Q  if  replicated-Q < min(all-gather-Q, ring pass-Q)

(all three beyond the partials' all_to_all, which replicated-Q's all_gather replaces at the same
latency).  The engine offers it to decode rounds it plans per round (the eager path); its static
decode step, the one CUDA graphs replay, runs all-gather-Q.

Source: Yang et al., arXiv 2411.01783, §3.6, Algorithms 1 and 5 (the query exchange: §3.5.2,
Alg. 3 / Alg. 4, and the all-gather decode of vLLM's decode context parallelism, SGLang and
TRT-LLM Helix); replicated-Q: the partials and their merge are Eq. 4's, the trade of redundant
weight-bound work for one collective is docs/performance.md §6's (issue #22).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PASS_KV = "pass-kv"
PASS_Q = "pass-q"
ALL_GATHER_Q = "all-gather-q"
REPLICATED_Q = "replicated-q"
AUTO = "auto"
STRATEGIES = (AUTO, PASS_KV, PASS_Q, ALL_GATHER_Q, REPLICATED_Q)
Q_VARIANTS = (PASS_Q, ALL_GATHER_Q, REPLICATED_Q)      # the queries (or the rows) move; the KV stays


@dataclass(frozen=True)
class HeuristicDecision:
    """The variant chosen for one round and the values that chose it.

    Attributes:
        strategy: "pass-kv", "pass-q" (ring), "all-gather-q" or "replicated-q".
        forced: True when the user forced the variant (the inequalities are still reported).
        new_tokens: T (tokens).
        cached_tokens: P (tokens).
        miss_rate: T / (T + P), in [0, 1].
        kv_hidden_threshold_tokens: N*C*NKV*e / (2*NH*BW) (tokens); pass-KV when T >= it.
        miss_rate_threshold: 2*NKV/NH - 4*T*BW / (N*C*e); pass-KV when miss_rate >= it.
        ring_q_exposed_s: ring pass-Q's cost beyond the attention FLOPs (exposed query
            exchange and repeated KV reads, s), when the engine compared the query exchanges
            (:func:`choose_query_exchange`), else 0.
        all_gather_q_s: all-gather-Q's (the all_gather and a KV read above the FLOPs, s), idem.
        replicated_q_s: replicated-Q's (the dense rows, the partials' extra bytes and a KV read
            above the FLOPs, s) when the engine offered it, else 0.
    """

    strategy: str
    forced: bool
    new_tokens: int
    cached_tokens: int
    miss_rate: float
    kv_hidden_threshold_tokens: float
    miss_rate_threshold: float
    ring_q_exposed_s: float = 0.0
    all_gather_q_s: float = 0.0
    replicated_q_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def choose_strategy(new_tokens: int, cached_tokens: int, cp_size: int, num_heads: int,
                    num_kv_heads: int, bytes_per_element: float, attn_flops_per_s: float,
                    bandwidth_bytes_per_s: float, force: str = AUTO) -> HeuristicDecision:
    """Pick pass-KV or pass-Q for one round (Alg. 1 / Alg. 5).

    Args:
        new_tokens: T, uncached tokens of the round (all sequences), >= 0.
        cached_tokens: P, tokens already in the KV cache, >= 0.
        cp_size: N, CP ranks (>= 1).
        num_heads / num_kv_heads: NH / NKV (per TP rank or global: only the ratio matters).
        bytes_per_element: e (2 for bf16, 4 for float32, 1 for fp8).
        attn_flops_per_s: C, achieved attention FLOP/s per rank (> 0).
        bandwidth_bytes_per_s: BW, CP link bandwidth per rank in bytes/s (> 0).
        force: "auto" (decide), "pass-kv", "pass-q", "all-gather-q" or "replicated-q" (forced;
            values still computed).  Auto answers "pass-kv" or "pass-q"; :func:`choose_query_exchange`
            then picks how pass-Q's queries travel.

    Returns:
        HeuristicDecision.

    Raises:
        ValueError: a negative count, non-positive constants, or an unknown ``force``.
    """
    if force not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {force!r}")
    if new_tokens < 0 or cached_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got T={new_tokens}, P={cached_tokens}")
    if cp_size < 1 or num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"cp_size, num_heads, num_kv_heads must be >= 1, got "
                         f"{cp_size}, {num_heads}, {num_kv_heads}")
    if bytes_per_element <= 0 or attn_flops_per_s <= 0 or bandwidth_bytes_per_s <= 0:
        raise ValueError("bytes_per_element, attn_flops_per_s and bandwidth_bytes_per_s must be > 0")
    n, c, bw, e = cp_size, attn_flops_per_s, bandwidth_bytes_per_s, bytes_per_element
    t, p = new_tokens, cached_tokens
    total = t + p
    miss_rate = t / total if total else 1.0
    kv_hidden = n * c * num_kv_heads * e / (2.0 * num_heads * bw)
    miss_threshold = 2.0 * num_kv_heads / num_heads - 4.0 * t * bw / (n * c * e)
    if force != AUTO:
        strategy = force
    elif t >= kv_hidden or miss_rate >= miss_threshold:
        strategy = PASS_KV
    else:
        strategy = PASS_Q
    return HeuristicDecision(strategy=strategy, forced=force != AUTO, new_tokens=t,
                             cached_tokens=p, miss_rate=miss_rate,
                             kv_hidden_threshold_tokens=kv_hidden,
                             miss_rate_threshold=miss_threshold)


def choose_query_exchange(cp_size: int, query_block_bytes: float, attention_flops: float,
                          attn_flops_per_s: float, bandwidth_bytes_per_s: float,
                          ring_step_latency_s: float, collective_latency_s: float,
                          kv_read_s: float = 0.0, partial_block_bytes: float | None = None,
                          replicated_dense_s: float = 0.0) -> tuple[str, float, float, float]:
    """Ring pass-Q, all-gather-Q or replicated-Q for a round that pass-Q runs (the module doc's rule).

    Args:
        cp_size: N (>= 2).
        query_block_bytes: q, one rank's padded query block (bytes).
        attention_flops: A, this rank's attention FLOPs of the round (all ring steps).
        attn_flops_per_s: C; bandwidth_bytes_per_s: BW (bytes/s).
        ring_step_latency_s: a, one ring step's fixed cost (P2P latency + host work), seconds.
        collective_latency_s: g, one small all_gather's latency, seconds.
        kv_read_s: r, one read of this rank's KV shard of the round's sequences at the achieved
            HBM bandwidth, seconds (0: not costed).
        partial_block_bytes: o, one rank's packed float32 (O, LSE) partial block (bytes); None:
            replicated-Q is not offered.
        replicated_dense_s: D, the dense layer time of the N * q_len rows beyond this rank's
            q_len rows (seconds).

    Returns:
        (strategy "pass-q", "all-gather-q" or "replicated-q", ring pass-Q's seconds beyond the
        attention FLOPs (exposed exchanges and the repeated KV reads), all-gather-Q's (the
        all_gather, and the one KV read where it exceeds the FLOPs), replicated-Q's (inf when not
        offered)), each beyond the partials' all_to_all.
    """
    n = cp_size
    transfer = query_block_bytes / bandwidth_bytes_per_s
    step = attention_flops / (n * attn_flops_per_s)
    ring_step = max(step, kv_read_s)
    ring = n * (ring_step - step) + (n - 1) * max(0.0, ring_step_latency_s + transfer - ring_step)
    gather = max(0.0, kv_read_s - n * step) + collective_latency_s + (n - 1) * transfer
    replicated = (math.inf if partial_block_bytes is None else
                  max(0.0, kv_read_s - n * step) + replicated_dense_s
                  + (n - 1) ** 2 * partial_block_bytes / bandwidth_bytes_per_s)
    if replicated < min(gather, ring):
        return REPLICATED_Q, ring, gather, replicated
    return (ALL_GATHER_Q if gather <= ring else PASS_Q), ring, gather, replicated
