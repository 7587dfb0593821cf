"""Runtime state of inference: the model stage, the sharded KV cache, rounds, metrics.

One *round* runs the new tokens of a batch through the model: a full prefill (nothing
cached), a partial prefill (a new turn on top of the cached conversation) or a decode
step (one token per sequence).  Placement follows the paper: load-balanced 2N chunks of
the new tokens for prefill, round-robin ranks for decode tokens (§3.3, §3.5).

A round is planned once, on the host, with no collective (docs/design.md §9): placement
is a deterministic function of the lengths, the cached lengths and the decode step, so
every rank knows where every token of every rank goes.  The engine keeps the host-side
layout of every CP rank's cache, decides the ring variant by Alg. 1 / Alg. 5 on the global
T and P (or the forced one), and builds the round's :class:`AttentionPlan`.  The layers
then do device work and the ring's P2P only (plus pass-Q's all_to_all).  Activations move
between pipeline stages point to point; at the end of the round the sampled token ids
(not the logits) are shared with every rank by one small all-reduce.

On CUDA, a decode round of all-gather-Q (or of CP 1) is a *static* step (:mod:`cp_megatron.decode_step`):
the same kernels with the same shapes every step -- a bucket of query rows on every rank, KV
writes through a slot tensor, a bucketed KV view, inputs copied into persistent buffers -- so
that with ``cuda_graphs`` it is captured once per bucket and replayed (:mod:`cp_megatron.cuda_graphs`).

Source: arXiv 2411.01783 §3.3–3.6 (sharding, ring variants, heuristic, decode).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from cp_megatron import device as devices
from cp_megatron import parallel_state, shm_collectives
from cp_megatron.attention import decide_strategy
from cp_megatron.attention.heuristic import (ALL_GATHER_Q, PASS_Q, REPLICATED_Q, HeuristicDecision,
                                             choose_query_exchange)
from cp_megatron.attention.plan import AttentionPlan, build_plan
from cp_megatron.attention.ring import RingStats
from cp_megatron.decode_step import (DecodeStep, StaticDecode, clear_older, plan_static_decode, sampling_rows,
                                     step_lru)
from cp_megatron.hardware import HardwareProfile, default_hardware
from cp_megatron.model.kv_cache import DEFAULT_GROWTH_SLOTS, KVLayout
from cp_megatron.model.kv_offload import HostKVStore
from cp_megatron.model.llama import LlamaStage
from cp_megatron.parallel_state import Topology
from cp_megatron.sampling import (FAILED_TOKEN, SamplingParams, TokenLogprobs, draw_rng, draw_seed,  # noqa: F401
                                  logprob_columns, sample_next, sample_rows, unpack_logprobs)
from cp_megatron.sharding import decode_owner, shard_new_tokens


@dataclass
class RoundMetrics:
    """One round's figures (all ranks agree on everything but the per-rank fields).

    Attributes:
        kind: "prefill" (P = 0), "partial-prefill" (P > 0, T > 1 per sequence) or "decode".
        new_tokens: T, new tokens of the round, all sequences (tokens).
        cached_tokens: P, tokens already cached for these sequences (tokens).
        miss_rate: T / (T + P).
        strategy: variant used ("pass-kv" / "pass-q" / "all-gather-q").
        heuristic: the inequality values behind the choice (HeuristicDecision.to_dict()).
        time_s: wall time of the round on this rank, up to its last collective (seconds).
        attention_s / comm_s: this rank's time in local attention / exposed ring
            communication (incl. pass-Q's all_to_all) during the round (seconds); measured
            only when the engine profiles (``profile=True``), else 0.
        kv_cache_bytes: K/V bytes this rank holds after the round (valid slots).
        kv_cache_capacity_bytes: K/V storage this rank has reserved after the round (bytes the
            device holds for the cache: valid slots and spare capacity).
    """

    kind: str
    new_tokens: int
    cached_tokens: int
    miss_rate: float
    strategy: str
    heuristic: dict
    time_s: float = 0.0
    attention_s: float = 0.0
    comm_s: float = 0.0
    kv_cache_bytes: int = 0
    kv_cache_capacity_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


_PADDING = SamplingParams()     # a padding row of the static decode step: greedy, never read


@dataclass
class _Placement:
    positions: torch.Tensor    # int64 [n] global positions of a rank's new tokens (host)
    seq_ids: torch.Tensor      # int64 [n]
    flat_index: torch.Tensor   # int64 [n] index into the round's flat list of new tokens


@dataclass
class RoundPlan:
    """Everything decided about one round before any layer runs (host side).

    Attributes:
        seq_ids: the round's sequences, in the order of the caller's dict.
        lengths / cached: T_b and P_b per sequence (tokens).
        kind: "prefill", "partial-prefill" or "decode".
        decision: the heuristic's choice (Alg. 1 / Alg. 5) and its inputs.
        placements: per CP rank, where that rank's new tokens go (real tokens only).
        attention: this rank's :class:`AttentionPlan` (index tensors on the device); for a
            static decode round the step's plan, set when the round runs.
        static: a static decode round's host plan (:class:`~cp_megatron.decode_step.StaticDecode`),
            else None.
    """

    seq_ids: list[int]
    lengths: list[int]
    cached: list[int]
    kind: str
    decision: HeuristicDecision
    placements: list[_Placement]
    attention: Optional[AttentionPlan]
    static: Optional[StaticDecode] = None


class InferenceEngine:
    """Holds one rank's model stage and KV cache and runs rounds over the whole grid.

    Args:
        stage: this rank's :class:`LlamaStage`.
        topo: this rank's :class:`Topology` (from :mod:`cp_megatron.parallel_state`).
        strategy: "auto" (heuristic per round: Alg. 1 / Alg. 5, then for pass-Q rounds ring,
            all-gather or replicated queries by
            :func:`~cp_megatron.attention.heuristic.choose_query_exchange`), "pass-kv", "pass-q"
            (ring, Alg. 3 / Alg. 4), "all-gather-q" or "replicated-q".
        hardware: C and BW for the heuristic (default by device).
        kv_capacity: cache slots (tokens) to reserve on this rank up front; see
            :func:`cp_megatron.sharding.kv_slots_per_rank` (prompt, generation budget and the
            margin for later turns).
        kv_growth_slots: past the reservation the cache grows in steps of this many slots
            (one copy per growth, never doubling; :class:`~cp_megatron.model.kv_cache.KVCache`).
        profile: time ring attention (compute, exposed communication, all_to_all) with
            host clocks on CPU and CUDA events on a GPU.  Off by default: the hot path then
            has no timing at all.  A profiled decode round runs eagerly (no graph replay).
        static_decode: run decode rounds of all-gather-Q and of CP 1 as the static step
            (:mod:`cp_megatron.decode_step`); False plans them like any round (one kernel call
            on the valid slots).  Default (None): on a CUDA stage (the dry run's fake one too),
            not on CPU, where the padding rows' extra compute shares the host's memory bandwidth
            with the other ranks (docs/performance.md §8: +12% TTIT at CP 2); the tests run both.
        cuda_graphs: capture the static decode step once per step key and replay it
            (:mod:`cp_megatron.cuda_graphs`); CUDA only.

    Raises:
        ValueError: ``kv_growth_slots`` < 1, or ``cuda_graphs`` without a CUDA stage or without
            the static step.
    """

    def __init__(self, stage: LlamaStage, topo: Topology, *, strategy: str = "auto",
                 hardware: Optional[HardwareProfile] = None, kv_capacity: int = 0,
                 kv_growth_slots: int = DEFAULT_GROWTH_SLOTS, profile: bool = False,
                 static_decode: Optional[bool] = None, cuda_graphs: bool = False) -> None:
        if kv_growth_slots < 1:
            raise ValueError(f"kv_growth_slots: expected >= 1 slots, got {kv_growth_slots}")
        if cuda_graphs and (stage.device.type != "cuda" or devices.is_fake()):
            raise ValueError(f"cuda_graphs: needs a CUDA device, the stage is on {stage.device}"
                             + (" (fake)" if devices.is_fake() else ""))
        if static_decode is None:
            static_decode = stage.device.type == "cuda"
        if cuda_graphs and not static_decode:
            raise ValueError("cuda_graphs: needs static_decode (the graph is the static decode step)")
        self.stage, self.topo, self.strategy, self.profile = stage, topo, strategy, profile
        self.static_decode = static_decode
        self.last_step_key = None                   # StepKey of the last static decode round
        self._steps: dict = {}                      # StepKey -> DecodeStep (buffers and plan)
        self.graphs = None
        if cuda_graphs:
            from cp_megatron.cuda_graphs import GraphCache

            self.graphs = GraphCache()
        self.hardware = hardware or default_hardware(stage.device)
        self.kv_cache = stage.new_kv_cache(kv_capacity)
        self.kv_cache.growth_slots = kv_growth_slots
        # Host-side layout of every CP rank's cache; this rank's is its cache's own.
        self.layouts = [KVLayout() for _ in range(topo.cp_size)]
        self.layouts[topo.cp_rank] = self.kv_cache.layout
        self.cached_lengths: dict[int, int] = {}   # sequence id -> P (global tokens cached)
        self.decode_steps = 0
        self.cp_group = parallel_state.get_cp_group() if topo.cp_size > 1 else None
        self._prev_stage, self._next_stage = (parallel_state.pp_neighbours() if topo.pp_size > 1
                                              else (None, None))

    # -- planning (host only, no collective) --------------------------------------------------
    def _placements(self, lengths: list[int], cached: list[int], seq_ids: list[int],
                    decode: bool) -> list[_Placement]:
        cp = self.topo.cp_size
        if decode:  # one token per sequence on its round-robin owner
            owner = [decode_owner(self.decode_steps, s, cp) for s in seq_ids]
            out = []
            for r in range(cp):
                mine = [b for b in range(len(seq_ids)) if owner[b] == r]
                out.append(_Placement(torch.tensor([cached[b] for b in mine], dtype=torch.long),
                                      torch.tensor([seq_ids[b] for b in mine], dtype=torch.long),
                                      torch.tensor(mine, dtype=torch.long)))
            return out
        out = []
        for r in range(cp):
            shard = shard_new_tokens(lengths, cp, r, cached, seq_ids)
            out.append(_Placement(shard.positions, shard.seq_ids, shard.index))
        return out

    def plan_round(self, new_tokens: Mapping[int, list[int]]) -> RoundPlan:
        """Place the round's tokens on every CP rank, choose the variant, plan attention.

        Host work only: reads no device tensor, starts no collective.  Does not change
        the engine's state (:meth:`forward` / :meth:`step` commit it).
        """
        seq_ids = list(new_tokens)
        lengths = [len(new_tokens[s]) for s in seq_ids]
        cached = [self.cached_lengths.get(s, 0) for s in seq_ids]
        t_total, p_total = sum(lengths), sum(cached)
        decode = all(t == 1 for t in lengths) and all(p > 0 for p in cached)
        kind = "decode" if decode else "partial-prefill" if p_total > 0 else "prefill"
        decision = decide_strategy(t_total, p_total, self.topo.cp_size,
                                   self.stage.config.num_heads, self.stage.config.num_kv_heads,
                                   self.stage.dtype, self.hardware, self.strategy)
        places = self._placements(lengths, cached, seq_ids, decode)
        if decision.strategy == PASS_Q and not decision.forced and self.topo.cp_size > 1:
            decision = self._query_exchange(decision, lengths, cached, places)
        cp = self.topo.cp_size
        if decode and self.static_decode and (cp == 1 or decision.strategy == ALL_GATHER_Q):
            owners = [decode_owner(self.decode_steps, s, cp) for s in seq_ids]
            static = plan_static_decode(tokens=[new_tokens[s][0] for s in seq_ids], seq_ids=seq_ids,
                                        cached=cached, owners=owners, cp_rank=self.topo.cp_rank, cp_size=cp,
                                        kv_cache=self.kv_cache, head_dim=self.stage.config.head_dim)
            return RoundPlan(seq_ids, lengths, cached, kind, decision, places, None, static)
        q_layouts = [(p.positions, p.seq_ids) for p in places]
        kv_layouts = [(torch.cat([lay.positions, p.positions]), torch.cat([lay.seq_ids, p.seq_ids]))
                      for lay, p in zip(self.layouts, places)]
        attention = build_plan(decision.strategy, self.topo.cp_rank, q_layouts, kv_layouts)
        return RoundPlan(seq_ids, lengths, cached, kind, decision, places,
                         attention.to(self.stage.device))

    def _query_exchange(self, decision: HeuristicDecision, lengths: list[int], cached: list[int],
                        places: list[_Placement]) -> HeuristicDecision:
        """Ring pass-Q, all-gather-Q or replicated-Q for a pass-Q round (the heuristic module's
        rule), with this TP rank's heads and the round's padded query block.  Replicated-Q is
        offered only to rounds planned per round: the static decode step runs all-gather-Q."""
        cfg, tp, n = self.stage.config, self.topo.tp_size, self.topo.cp_size
        heads = cfg.num_heads // tp
        e = torch.finfo(self.stage.dtype).bits // 8
        q_len = max(len(p.positions) for p in places)
        flops = sum(4 * heads * cfg.head_dim * t * (p + t) for t, p in zip(lengths, cached)) / n
        hw = self.hardware
        cache = self.kv_cache           # one read of a rank's shard: 1/N of every sequence's K and V
        kv_bytes = sum(p + t for t, p in zip(lengths, cached)) / n * 2 * cache.num_kv_heads * cache.head_dim * e
        offered = not self.static_decode
        strategy, ring, gather, replicated = choose_query_exchange(
            n, q_len * heads * cfg.head_dim * e, flops, hw.attn_flops_per_s, hw.cp_bandwidth_bytes_per_s,
            hw.cp_latency_s + hw.ring_step_overhead_s,
            shm_collectives.LATENCY_S if shm_collectives.active(self.cp_group) else hw.a2a_latency_s,
            kv_read_s=kv_bytes / (hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency),
            partial_block_bytes=q_len * heads * (cfg.head_dim + 1) * 4 if offered else None,
            replicated_dense_s=self._replicated_dense_s(n, q_len))
        return dataclasses.replace(decision, strategy=strategy, ring_q_exposed_s=ring, all_gather_q_s=gather,
                                   replicated_q_s=replicated if offered else 0.0)

    def _replicated_dense_s(self, cp_size: int, q_len: int) -> float:
        """D of replicated-Q: what running the dense layers on all ``cp_size * q_len`` rows costs
        one layer beyond this rank's ``q_len`` rows (seconds).

        On a GPU each rank reads its weights from its own memory: the roofline max(weight bytes /
        achieved memory bandwidth, FLOPs / ``linear_flops_per_s``) of the rows, extra rows minus own.
        The CP ranks of a CPU job share one host's memory system, so every other rank's copy of
        the dense part reads the weights again through it: (N - 1) x weight bytes / bandwidth.
        Measured: the default job's TTIT at CP 2 was 0.266 s replicated, against 0.206 s for the
        pre-#22 checkout in the same run (docs/performance.md §6)."""
        cfg, hw = self.stage.config, self.hardware
        h, dh = cfg.hidden_size, cfg.head_dim
        params = (h * (cfg.num_heads + 2 * cfg.num_kv_heads) * dh + cfg.num_heads * dh * h
                  + 3 * h * cfg.intermediate_size) / self.topo.tp_size
        e = 1 if self.stage.weights == "fp8-rowwise" else torch.finfo(self.stage.dtype).bits // 8
        weights_s = params * e / (hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency)
        if self.stage.device.type == "cpu":
            return (cp_size - 1) * weights_s
        return (max(weights_s, 2 * params * cp_size * q_len / hw.linear_flops_per_s)
                - max(weights_s, 2 * params * q_len / hw.linear_flops_per_s))

    # -- one round -----------------------------------------------------------------------
    def _run(self, new_tokens: Mapping[int, list[int]], all_logits: bool):
        """Plan and run the stage; returns (plan, local logits or None, local rows, stats).

        For a static decode round the logits are the step's ``[R, vocab]`` (every row of this
        rank's step) and the local rows are the step's device ``out_rows`` (B for padding)."""
        plan = self.plan_round(new_tokens)
        place = plan.placements[self.topo.cp_rank]
        device = self.stage.device
        stats = RingStats() if self.profile else None
        if plan.kind == "decode":
            self.decode_steps += 1
        for r, p in enumerate(plan.placements):        # the other ranks' caches, on the host
            if r != self.topo.cp_rank:
                self.layouts[r].append(p.positions, p.seq_ids)
        if plan.static is not None:
            return self._run_static(plan, stats)
        self.kv_cache.begin_round(place.positions, place.seq_ids, min_capacity=plan.attention.sent_kv_len,
                                  rows=plan.attention.store_rows)

        # Rows of the output everyone needs: the last token of each sequence, or all (host).
        t_total = sum(plan.lengths)
        ends = torch.cumsum(torch.tensor(plan.lengths, dtype=torch.long), 0) - 1
        wanted = torch.arange(t_total) if all_logits else ends
        row_of = torch.full((t_total,), -1, dtype=torch.long)
        row_of[wanted] = torch.arange(len(wanted))
        rows = row_of[place.flat_index]                       # [n_local]: output row or -1
        local_idx = torch.nonzero(rows >= 0).flatten()        # this rank's tokens that have one
        local_rows = rows[local_idx]

        flat = torch.tensor([t for s in plan.seq_ids for t in new_tokens[s]], dtype=torch.long)
        rows_of, positions = place.flat_index, place.positions
        if plan.attention.strategy == REPLICATED_Q:   # the layers run every rank's rows (the gathered block)
            rows_of, positions = self._gathered_rows(plan.placements, plan.attention.q_len)
            local_idx = local_idx + plan.attention.store_rows.start
        inputs = self._stage_input(flat, rows_of)
        out = self.stage(inputs, positions.to(device), self.kv_cache, plan.attention,
                         cp_group=self.cp_group, stats=stats, logits_index=local_idx.to(device))
        if not self.stage.layout.is_last:
            if len(rows_of):
                dist.send(out.contiguous(), self._next_stage)
            out = None
        for s, t, p in zip(plan.seq_ids, plan.lengths, plan.cached):
            self.cached_lengths[s] = p + t
        return plan, out, local_rows, len(wanted), stats

    def _decode_step(self, static: StaticDecode) -> DecodeStep:
        """The :class:`DecodeStep` of the round's key (made once per key; the steps and graphs of
        an older KV storage are dropped, they point into it).  A graph reads its step's buffers:
        when a key's step is made anew (its old one left the LRU), the key's graph goes too."""
        key = static.key
        clear_older(self._steps, key.generation)
        if self.graphs is not None:
            self.graphs.drop(lambda k: k.generation == key.generation and (k != key or key in self._steps))
        return step_lru(self._steps, key, lambda: DecodeStep(
            key, stage=self.stage, kv_cache=self.kv_cache, cp_rank=self.topo.cp_rank, cp_size=self.topo.cp_size,
            strategy=ALL_GATHER_Q if self.topo.cp_size > 1 else PASS_Q, cp_group=self.cp_group), limit=16)

    def _run_static(self, plan: RoundPlan, stats: Optional[RingStats]):
        """Run a static decode round (:mod:`cp_megatron.decode_step`): host bookkeeping, two
        copies into the step's buffers, then the step eagerly or its graph's replay."""
        static, place = plan.static, plan.placements[self.topo.cp_rank]
        step = self._decode_step(static)
        self.last_step_key = static.key
        self.kv_cache.begin_round(place.positions, place.seq_ids, min_capacity=static.min_capacity,
                                  slots=step.slots)
        assert self.kv_cache.allocations == static.key.generation, (self.kv_cache.allocations, static.key)
        step.load(static)
        plan.attention = step.plan
        if not self.stage.layout.is_first:
            dist.recv(step.hidden_in, self._prev_stage)           # R rows, padding included
        if self.graphs is not None and stats is None:
            out = self.graphs.run(static.key, step.forward)
        else:
            out = step.forward(stats)
        if not self.stage.layout.is_last:
            dist.send(out.contiguous(), self._next_stage)
            out = None
        for s, t, p in zip(plan.seq_ids, plan.lengths, plan.cached):
            self.cached_lengths[s] = p + t
        return plan, out, step.out_rows, len(plan.seq_ids), stats

    def _metrics(self, plan: RoundPlan, start: float, stats: Optional[RingStats]) -> RoundMetrics:
        if stats is not None:
            stats.resolve()
        d = plan.decision
        return RoundMetrics(kind=plan.kind, new_tokens=d.new_tokens, cached_tokens=d.cached_tokens,
                            miss_rate=d.miss_rate, strategy=d.strategy, heuristic=d.to_dict(),
                            time_s=time.perf_counter() - start,
                            attention_s=stats.compute_s if stats else 0.0,
                            comm_s=stats.exposed_comm_s if stats else 0.0,
                            kv_cache_bytes=self.kv_cache.nbytes(),
                            kv_cache_capacity_bytes=self.kv_cache.capacity_bytes())

    def _owns_output(self, out) -> bool:
        return out is not None and self.topo.tp_rank == 0

    @torch.no_grad()
    def step(self, new_tokens: Mapping[int, list[int]], sampling: Mapping[int, SamplingParams],
             draws: Optional[Mapping[int, int]] = None, *, return_logprobs: bool = False):
        """Run one round and sample the next token of each sequence.

        The rank holding a sequence's last token (last pipeline stage, TP rank 0) samples
        it (:func:`~cp_megatron.sampling.sample_rows`); one all-reduce of the ``[B]`` int64
        ids tells every rank (not the logits).  When some sequence asks for logprobs, the
        drawn token's logprob and the top alternatives ride in the same int64 all-reduce
        (``[B, 2 + 2k]``, :func:`~cp_megatron.sampling.logprob_columns`).

        Args:
            new_tokens: sequence id -> new token ids (same on every rank).
            sampling: sequence id -> its :class:`SamplingParams`.
            draws: sequence id -> tokens sampled for it so far (seeds top-p draws, so a
                seeded sequence gives the same tokens at any CP size and on any rank);
                default 0.
            return_logprobs: also return the per-sequence logprobs.

        Returns:
            (next token id per sequence in the order of ``new_tokens`` --
            :data:`~cp_megatron.sampling.FAILED_TOKEN` where that sequence's sampling
            failed --, RoundMetrics), identical on every rank; with ``return_logprobs`` a
            third item, per sequence None or :class:`~cp_megatron.sampling.TokenLogprobs`.
        """
        start = time.perf_counter()
        plan, out, local_rows, n_rows, stats = self._run(new_tokens, all_logits=False)
        k = max((sampling[s].logprobs for s in plan.seq_ids if sampling[s].logprobs is not None), default=None)
        width = 1 if k is None else 2 + 2 * k
        if plan.static is not None:     # every row of the step; padding rows land in the dump row B
            packed = torch.zeros(n_rows + 1, width, dtype=torch.long, device=self.stage.device)
            if self._owns_output(out):
                draws = draws or {}
                seqs = sampling_rows(plan.static, self.topo.cp_rank, plan.seq_ids, None)
                ids = sample_rows(out, [sampling[s] if s is not None else _PADDING for s in seqs],
                                  [draws.get(s, 0) if s is not None else 0 for s in seqs])
                packed[local_rows, 0] = ids
                if k is not None:
                    packed[local_rows, 1:] = logprob_columns(out, ids, k)
            packed = packed[:n_rows]
        else:
            packed = torch.zeros(n_rows, width, dtype=torch.long, device=self.stage.device)
        if plan.static is None and self._owns_output(out) and len(local_rows):
            seqs = [plan.seq_ids[i] for i in local_rows.tolist()]           # host tensor
            draws = draws or {}
            ids = sample_rows(out, [sampling[s] for s in seqs], [draws.get(s, 0) for s in seqs])
            rows = local_rows.to(packed.device)
            packed[rows, 0] = ids
            if k is not None:
                packed[rows, 1:] = logprob_columns(out, ids, k)
        if self.topo.world_size > 1:
            dist.all_reduce(packed)                    # one owner per row, zeros elsewhere
        host = packed.cpu()                            # the round's one read of the device
        tokens = host[:, 0].tolist()
        metrics = self._metrics(plan, start, stats)
        if not return_logprobs:
            return tokens, metrics
        wanted = [sampling[s].logprobs for s in plan.seq_ids]
        return tokens, metrics, (unpack_logprobs(host[:, 1:], wanted) if k is not None else [None] * n_rows)

    @torch.no_grad()
    def forward(self, new_tokens: Mapping[int, list[int]], *, all_logits: bool = False
                ) -> tuple[torch.Tensor, RoundMetrics]:
        """Run one round and return logits on every rank (tests, benchmarks).

        Generation uses :meth:`step`, which shares token ids instead of logits.

        Args:
            new_tokens: sequence id -> new token ids (same on every rank).
            all_logits: logits for every new token, not only the last of each sequence.

        Returns:
            (logits float32 ``[B, vocab]`` for the last new token of each sequence, in the
            order of ``new_tokens`` -- or ``[sum T_b, vocab]`` with all_logits --, and the
            round's :class:`RoundMetrics`), identical on every rank.
        """
        start = time.perf_counter()
        plan, out, local_rows, n_rows, stats = self._run(new_tokens, all_logits=all_logits)
        device = self.stage.device
        if plan.static is not None:     # every row of the step; padding rows land in the dump row B
            logits = torch.zeros(n_rows + 1, self.stage.config.vocab_size, dtype=torch.float32, device=device)
            if self._owns_output(out):
                logits[local_rows] = out
            logits = logits[:n_rows]
        else:
            logits = torch.zeros(n_rows, self.stage.config.vocab_size, dtype=torch.float32, device=device)
        if plan.static is None and self._owns_output(out) and len(local_rows):
            logits[local_rows.to(device)] = out
        if self.topo.world_size > 1:
            dist.all_reduce(logits)
        devices.synchronize(device)   # CUDA: time_s covers the round's last collective
        return logits, self._metrics(plan, start, stats)

    def _stage_input(self, flat: torch.Tensor, rows_of: torch.Tensor) -> torch.Tensor:
        """The stage's input rows: token ids ``flat[rows_of]`` on the first stage, else the
        previous stage's hidden ``[len(rows_of), D]`` (received)."""
        device = self.stage.device
        if self.stage.layout.is_first:
            return flat[rows_of].to(device)
        hidden = torch.empty(len(rows_of), self.stage.config.hidden_size, dtype=self.stage.dtype, device=device)
        if len(rows_of):
            dist.recv(hidden, self._prev_stage)
        return hidden

    @staticmethod
    def _gathered_rows(places: list[_Placement], q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replicated-Q's rows: every rank's new tokens padded to ``q_len``, rank-major (the
        gathered block of :mod:`~cp_megatron.attention.decode`).  Returns (index into the round's
        flat tokens, positions), int64 host ``[N * q_len]``; a padding row takes token 0 at
        position 0 (no block reads it, no slot stores it)."""
        index = torch.zeros(len(places) * q_len, dtype=torch.long)
        positions = torch.zeros(len(places) * q_len, dtype=torch.long)
        for r, p in enumerate(places):
            n = len(p.flat_index)
            index[r * q_len:r * q_len + n], positions[r * q_len:r * q_len + n] = p.flat_index, p.positions
        return index, positions

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep only the first ``length`` tokens of sequence ``seq_id`` (on every rank), e.g.
        to roll back a round or to branch a conversation; ``length`` 0 forgets it."""
        for r, layout in enumerate(self.layouts):
            if r == self.topo.cp_rank:
                self.kv_cache.truncate(seq_id, length)
            else:
                layout.truncate(seq_id, length)
        if length:
            self.cached_lengths[seq_id] = min(length, self.cached_lengths.get(seq_id, 0))
        else:
            self.cached_lengths.pop(seq_id, None)

    def fork(self, src_seq: int, dst_seq: int, length: int) -> None:
        """Start sequence ``dst_seq`` as a copy of the first ``length`` tokens of ``src_seq``
        (every rank copies its own shard; ``src_seq`` is untouched)."""
        for r, layout in enumerate(self.layouts):
            if r == self.topo.cp_rank:
                self.kv_cache.fork(src_seq, dst_seq, length)
            else:
                layout.fork(src_seq, dst_seq, length)
        self.cached_lengths[dst_seq] = min(length, self.cached_lengths.get(src_seq, 0))

    def reset(self) -> None:
        """Forget every sequence (empty the cache and the host tier)."""
        for layout in self.layouts:
            layout.clear()
        self.kv_cache.clear()
        self.cached_lengths.clear()
        self.decode_steps = 0
        if getattr(self, "_host_kv", None) is not None:
            self._host_kv.clear()

    # -- the host tier (idle sequences off the device) -----------------------------------------
    @property
    def host_kv(self) -> HostKVStore:
        """This rank's host tier of the KV cache (:mod:`cp_megatron.model.kv_offload`),
        created on first use."""
        if getattr(self, "_host_kv", None) is None:
            self._host_kv = HostKVStore(self.stage.device)
        return self._host_kv

    def offload(self, seq_id: int) -> int:
        """Move sequence ``seq_id`` to the host tier (on every rank: each copies its own
        shard, all layers, K and V, with every CP rank's positions) and free its device
        slots (compacting, as :meth:`truncate`); a later :meth:`restore` gives the same
        K/V at the same positions on the same ranks.  Outside any layer: one gather of the
        sequence's slots per layer, the host copy queued on the side stream.

        Returns:
            bytes this rank copied to the host.

        Raises:
            KeyError: ``seq_id`` is not cached on the device.
            ValueError: ``seq_id`` is already in the host tier.
        """
        if seq_id not in self.cached_lengths:
            raise KeyError(f"offload: sequence {seq_id} is not cached on the device")
        positions = [lay.positions[lay.seq_ids == seq_id] for lay in self.layouts]
        own, k, v = self.kv_cache.export_sequence(seq_id)
        positions[self.topo.cp_rank] = own
        entry = self.host_kv.put(seq_id, positions, k, v, self.cached_lengths.get(seq_id, 0))
        self.truncate(seq_id, 0)
        return entry.nbytes

    def restore(self, seq_id: int, dst_seq: int, length: int) -> None:
        """Bring the first ``length`` tokens of host-tier sequence ``seq_id`` back onto the
        device as sequence ``dst_seq`` (every rank restores its own slots).  With
        ``dst_seq == seq_id`` the entry leaves the host tier (the sequence is taken back);
        otherwise it stays, unchanged (a branch).

        Raises:
            KeyError: ``seq_id`` is not in the host tier.
            ValueError: ``dst_seq`` is already cached on the device.
        """
        if dst_seq in self.cached_lengths:
            raise ValueError(f"restore: sequence {dst_seq} is already cached on the device")
        store = self.host_kv
        entry = store.entries[seq_id]
        positions = store.restore(seq_id, self.kv_cache, self.topo.cp_rank, dst_seq, length)
        for r, (layout, pos) in enumerate(zip(self.layouts, positions)):
            if r != self.topo.cp_rank:
                layout.append(pos, torch.full((len(pos),), dst_seq, dtype=torch.long))
        self.cached_lengths[dst_seq] = min(length, entry.length)
        if dst_seq == seq_id:
            store.drop(seq_id)

    def drop_offloaded(self, seq_id: int) -> None:
        """Forget host-tier sequence ``seq_id`` on this rank.

        Raises:
            KeyError: ``seq_id`` is not in the host tier.
        """
        self.host_kv.drop(seq_id)


# -- generation ------------------------------------------------------------------------------
@dataclass
class Generation:
    """Generated tokens of one sequence and why it stopped ("eos", "stop", "length")."""

    seq_id: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    pending: Optional[int] = None   # last sampled token, not yet fed (its KV is not cached)
    prefill_rounds: int = 1         # rounds its prefill took (chunks; 1 = unchunked)


def prefill_chunks(n_tokens: int, chunk_tokens: Optional[int]) -> list[tuple[int, int]]:
    """Split ``n_tokens`` new tokens into consecutive chunks of at most ``chunk_tokens``.

    Args:
        n_tokens: new tokens of the prefill (>= 0).
        chunk_tokens: chunk size (tokens, >= 1), or None / 0 for one chunk.

    Returns:
        ``[(start, end), ...]`` covering ``[0, n_tokens)``; the last chunk may be shorter.

    Raises:
        ValueError: ``chunk_tokens`` below 0.

    Source: chunked prefill as in vLLM (``enable_chunked_prefill``) and SGLang
    (``chunked_prefill_size``); each chunk after the first is a partial prefill (§3.5).
    """
    if chunk_tokens is not None and chunk_tokens < 0:
        raise ValueError(f"prefill_chunk_tokens: expected >= 1 tokens (or 0 / None for no chunking), got {chunk_tokens}")
    if not chunk_tokens or n_tokens <= chunk_tokens:
        return [(0, n_tokens)]
    return [(a, min(a + chunk_tokens, n_tokens)) for a in range(0, n_tokens, chunk_tokens)]


def generate(engine: InferenceEngine, new_tokens: dict[int, list[int]], params: SamplingParams, *,
             eos_ids: tuple = (), decode_text=None, on_round=None, prefill_chunk_tokens: Optional[int] = None
             ) -> tuple[dict[int, Generation], list[RoundMetrics]]:
    """Prefill (full or partial) ``new_tokens`` of each sequence, then decode until EOS,
    a stop string or ``max_new_tokens``.

    With ``prefill_chunk_tokens``, a sequence feeding more than that many tokens is
    prefilled in chunks of at most that many, one round per chunk (sequences one after the
    other); every chunk after the first is a partial prefill on the tokens the earlier
    chunks cached, with its own ring variant (Alg. 5).  Only the last chunk's sampled
    token is kept, so the tokens equal an unchunked prefill's (up to float rounding).

    Args:
        engine: the rank's engine (its cache may already hold these sequences).
        new_tokens: sequence id -> tokens to feed now.
        params: sampling settings.
        eos_ids: token ids that end a sequence.
        decode_text: ``ids -> str`` for stop strings (None: no stop strings).
        on_round: callback ``(RoundMetrics) -> None`` after each round (progress).
        prefill_chunk_tokens: largest prefill round per sequence (tokens); None: no chunking.

    Returns:
        ({seq_id: Generation}, [RoundMetrics of the prefill round(s) -- one per chunk, see
        ``Generation.prefill_rounds`` --, then each decode round]).

    Raises:
        ValueError: ``prefill_chunk_tokens`` below 0.
    """
    gens = {s: Generation(s) for s in new_tokens}
    rounds = []
    feed = dict(new_tokens)
    chunks = {s: prefill_chunks(len(t), prefill_chunk_tokens) for s, t in new_tokens.items()}
    if any(len(c) > 1 for c in chunks.values()):
        for s, spans in chunks.items():       # every chunk but the last: its sampled token is dropped
            for a, b in spans[:-1]:
                _, metrics = engine.step({s: feed[s][a:b]}, {s: params}, {s: 0})
                rounds.append(metrics)
                if on_round is not None:
                    on_round(metrics)
            gens[s].prefill_rounds = len(spans)
        feed = {s: t[chunks[s][-1][0]:] for s, t in feed.items()}
    while feed:
        tokens, metrics = engine.step(feed, {s: params for s in feed},
                                      {s: len(gens[s].token_ids) for s in feed})
        rounds.append(metrics)
        if on_round is not None:
            on_round(metrics)
        for s, token in zip(feed, tokens):
            if token == FAILED_TOKEN:
                raise RuntimeError(f"sampling failed for sequence {s} (see the log)")
            g = gens[s]
            g.token_ids.append(token)
            g.pending = token
            if token in eos_ids:
                g.finish_reason = "eos"
            elif decode_text is not None and params.stop and any(
                    stop in decode_text(g.token_ids) for stop in params.stop):
                g.finish_reason = "stop"
            elif len(g.token_ids) >= params.max_new_tokens:
                g.finish_reason = "length"
        feed = {s: [g.pending] for s, g in gens.items() if not g.finish_reason}
    return gens, rounds
