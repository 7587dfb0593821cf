"""Runtime state of inference: the model stage, the sharded KV cache, sessions, metrics.

One *round* runs the new tokens of a batch through the model: a full prefill (nothing
cached), a partial prefill (a new turn on top of the cached conversation) or a decode
step (one token per sequence).  Placement follows the paper: load-balanced 2N chunks of
the new tokens for prefill, round-robin ranks for decode tokens (§3.3, §3.5).  The ring
variant is chosen once per round by Alg. 1 / Alg. 5 on the global T and P (or forced)
and used by every layer.  Activations move between pipeline stages point to point; the
logits that sampling needs are shared with every rank by one all-reduce.

Source: arXiv 2411.01783 §3.3–3.6 (sharding, ring variants, heuristic, decode).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from cp_megatron import parallel_state
from cp_megatron.attention import decide_strategy
from cp_megatron.attention.api import default_hardware
from cp_megatron.attention.ring import RingStats
from cp_megatron.hardware import HardwareProfile
from cp_megatron.model.llama import LlamaStage
from cp_megatron.parallel_state import Topology
from cp_megatron.sharding import decode_owner, shard_new_tokens


@dataclass
class RoundMetrics:
    """One round's figures (all ranks agree on everything but the per-rank fields).

    Attributes:
        kind: "prefill" (P = 0), "partial-prefill" (P > 0, T > 1 per sequence) or "decode".
        new_tokens: T, new tokens of the round, all sequences (tokens).
        cached_tokens: P, tokens already cached for these sequences (tokens).
        miss_rate: T / (T + P).
        strategy: ring variant used ("pass-kv" / "pass-q").
        heuristic: the inequality values behind the choice (HeuristicDecision.to_dict()).
        time_s: wall time of the round on this rank (seconds).
        attention_s / comm_s: this rank's time in local attention / exposed ring
            communication (incl. pass-Q's all_to_all) during the round (seconds).
        kv_cache_bytes: K/V bytes this rank holds after the round.
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Placement:
    positions: torch.Tensor    # int64 [n] global positions of this rank's new tokens
    seq_ids: torch.Tensor      # int64 [n]
    flat_index: torch.Tensor   # int64 [n] index into the round's flat list of new tokens


class InferenceEngine:
    """Holds one rank's model stage and KV cache and runs rounds over the whole grid.

    Args:
        stage: this rank's :class:`LlamaStage`.
        topo: this rank's :class:`Topology` (from :mod:`cp_megatron.parallel_state`).
        strategy: "auto" (heuristic per round), "pass-kv" or "pass-q".
        hardware: C and BW for the heuristic (default by device).
        kv_capacity: tokens to reserve in the cache up front.
    """

    def __init__(self, stage: LlamaStage, topo: Topology, *, strategy: str = "auto",
                 hardware: Optional[HardwareProfile] = None, kv_capacity: int = 0) -> None:
        self.stage, self.topo, self.strategy = stage, topo, strategy
        self.hardware = hardware or default_hardware(stage.device)
        self.kv_cache = stage.new_kv_cache(kv_capacity)
        self.cached_lengths: dict[int, int] = {}   # sequence id -> P (global tokens cached)
        self.decode_steps = 0
        self.cp_group = parallel_state.get_cp_group()
        self._prev_stage, self._next_stage = (parallel_state.pp_neighbours() if topo.pp_size > 1
                                              else (None, None))

    # -- placement ---------------------------------------------------------------------
    def _place(self, new_lengths: list[int], cached: list[int], seq_ids: list[int]) -> _Placement:
        cp, rank = self.topo.cp_size, self.topo.cp_rank
        if all(t == 1 for t in new_lengths) and all(p > 0 for p in cached):  # decode step
            mine = [b for b, s in enumerate(seq_ids) if decode_owner(self.decode_steps, s, cp) == rank]
            self.decode_steps += 1
            idx = torch.tensor(mine, dtype=torch.long)
            return _Placement(torch.tensor([cached[b] for b in mine], dtype=torch.long),
                              torch.tensor([seq_ids[b] for b in mine], dtype=torch.long), idx)
        shard = shard_new_tokens(new_lengths, cp, rank, cached, seq_ids)
        return _Placement(shard.positions, shard.seq_ids, shard.index)

    # -- one round -----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, new_tokens: dict[int, list[int]], *, all_logits: bool = False
                ) -> tuple[torch.Tensor, RoundMetrics]:
        """Run the new tokens of each sequence through the model; cache their K/V.

        Args:
            new_tokens: sequence id -> new token ids (same on every rank).
            all_logits: return logits for every new token (tests), not only the last of
                each sequence.

        Returns:
            (logits float32 ``[B, vocab]`` for the last new token of each sequence, in the
            order of ``new_tokens`` -- or ``[sum T_b, vocab]`` with all_logits --, and the
            round's :class:`RoundMetrics`), identical on every rank.
        """
        start = time.perf_counter()
        seq_ids = list(new_tokens)
        lengths = [len(new_tokens[s]) for s in seq_ids]
        cached = [self.cached_lengths.get(s, 0) for s in seq_ids]
        flat = torch.tensor([t for s in seq_ids for t in new_tokens[s]], dtype=torch.long)
        t_total, p_total = sum(lengths), sum(cached)
        kind = ("decode" if all(t == 1 for t in lengths) and all(p > 0 for p in cached)
                else "partial-prefill" if p_total > 0 else "prefill")
        decision = decide_strategy(t_total, p_total, self.topo.cp_size,
                                   self.stage.config.num_heads, self.stage.config.num_kv_heads,
                                   self.stage.dtype, self.hardware, self.strategy)
        place = self._place(lengths, cached, seq_ids)
        device = self.stage.device
        stats = RingStats()

        # Rows of the logits everyone needs: the last token of each sequence, or all.
        ends = torch.cumsum(torch.tensor(lengths), 0) - 1
        wanted = torch.arange(t_total) if all_logits else ends
        row_of = {int(t): r for r, t in enumerate(wanted)}
        mine = [(i, row_of[int(t)]) for i, t in enumerate(place.flat_index) if int(t) in row_of]

        inputs = self._stage_input(flat, place)
        out = self.stage(inputs, place.positions.to(device), place.seq_ids.to(device), self.kv_cache,
                         strategy=decision.strategy, cp_group=self.cp_group, hardware=self.hardware,
                         stats=stats,
                         logits_index=torch.tensor([i for i, _ in mine], dtype=torch.long, device=device))
        logits = torch.zeros(len(wanted), self.stage.config.vocab_size, dtype=torch.float32, device=device)
        if self.stage.layout.is_last:
            if self.topo.tp_rank == 0 and mine:
                logits[torch.tensor([r for _, r in mine], device=device)] = out
        elif len(place.flat_index):
            dist.send(out.contiguous(), self._next_stage)
        if self.topo.world_size > 1:
            dist.all_reduce(logits)
        for s, t, p in zip(seq_ids, lengths, cached):
            self.cached_lengths[s] = p + t
        metrics = RoundMetrics(kind=kind, new_tokens=t_total, cached_tokens=p_total,
                               miss_rate=decision.miss_rate, strategy=decision.strategy,
                               heuristic=decision.to_dict(), time_s=time.perf_counter() - start,
                               attention_s=stats.compute_s, comm_s=stats.exposed_comm_s,
                               kv_cache_bytes=self.kv_cache.nbytes())
        return logits, metrics

    def _stage_input(self, flat: torch.Tensor, place: _Placement) -> torch.Tensor:
        device = self.stage.device
        if self.stage.layout.is_first:
            return flat[place.flat_index].to(device)
        hidden = torch.empty(len(place.flat_index), self.stage.config.hidden_size,
                             dtype=self.stage.dtype, device=device)
        if len(place.flat_index):
            dist.recv(hidden, self._prev_stage)
        return hidden

    def reset(self) -> None:
        """Forget every sequence (empty the cache)."""
        self.kv_cache.clear()
        self.cached_lengths.clear()
        self.decode_steps = 0
