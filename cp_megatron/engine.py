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
    def _place(self, new_lengths: list[int], cached: list[int], seq_ids: list[int],
               decode: bool) -> _Placement:
        cp, rank = self.topo.cp_size, self.topo.cp_rank
        if decode:  # one token per sequence on its round-robin owner
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
        decode = all(t == 1 for t in lengths) and all(p > 0 for p in cached)
        kind = "decode" if decode else "partial-prefill" if p_total > 0 else "prefill"
        decision = decide_strategy(t_total, p_total, self.topo.cp_size,
                                   self.stage.config.num_heads, self.stage.config.num_kv_heads,
                                   self.stage.dtype, self.hardware, self.strategy)
        place = self._place(lengths, cached, seq_ids, decode)
        device = self.stage.device
        stats = RingStats()

        # Rows of the logits everyone needs: the last token of each sequence, or all.
        ends = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0) - 1
        wanted = torch.arange(t_total) if all_logits else ends
        row_of = torch.full((t_total,), -1, dtype=torch.long)
        row_of[wanted] = torch.arange(len(wanted))
        rows = row_of[place.flat_index]                       # [n_local]: logits row or -1
        local_idx = torch.nonzero(rows >= 0).flatten()        # this rank's tokens that have one
        local_rows = rows[local_idx]

        inputs = self._stage_input(flat, place)
        out = self.stage(inputs, place.positions.to(device), place.seq_ids.to(device), self.kv_cache,
                         strategy=decision.strategy, cp_group=self.cp_group, hardware=self.hardware,
                         stats=stats, logits_index=local_idx.to(device))
        logits = torch.zeros(len(wanted), self.stage.config.vocab_size, dtype=torch.float32, device=device)
        if self.stage.layout.is_last:
            if self.topo.tp_rank == 0 and len(local_rows):
                logits[local_rows.to(device)] = out
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

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep only the first ``length`` tokens of sequence ``seq_id`` (on every rank), e.g.
        to roll back a round or to branch a conversation; ``length`` 0 forgets it."""
        self.kv_cache.truncate(seq_id, length)
        if length:
            self.cached_lengths[seq_id] = min(length, self.cached_lengths.get(seq_id, 0))
        else:
            self.cached_lengths.pop(seq_id, None)

    def fork(self, src_seq: int, dst_seq: int, length: int) -> None:
        """Start sequence ``dst_seq`` as a copy of the first ``length`` tokens of ``src_seq``
        (every rank copies its own shard; ``src_seq`` is untouched)."""
        self.kv_cache.fork(src_seq, dst_seq, length)
        self.cached_lengths[dst_seq] = min(length, self.cached_lengths.get(src_seq, 0))

    def reset(self) -> None:
        """Forget every sequence (empty the cache)."""
        self.kv_cache.clear()
        self.cached_lengths.clear()
        self.decode_steps = 0


# -- generation ------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """Decoding settings: temperature 0 = greedy; else temperature + top-p with a seed
    (the same generator state on every rank keeps the ranks in lockstep)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple = ()


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> list[int]:
    """Next token per row of ``logits`` ``[B, V]`` float32 (greedy or temperature / top-p)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p    # always keeps the top token
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # [B, 1]
    return order.gather(-1, choice).flatten().tolist()


@dataclass
class Generation:
    """Generated tokens of one sequence and why it stopped ("eos", "stop", "length")."""

    seq_id: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    pending: Optional[int] = None   # last sampled token, not yet fed (its KV is not cached)


def generate(engine: InferenceEngine, new_tokens: dict[int, list[int]], params: SamplingParams, *,
             eos_ids: tuple = (), decode_text=None, on_round=None
             ) -> tuple[dict[int, Generation], list[RoundMetrics]]:
    """Prefill (full or partial) ``new_tokens`` of each sequence, then decode until EOS,
    a stop string or ``max_new_tokens``.

    Args:
        engine: the rank's engine (its cache may already hold these sequences).
        new_tokens: sequence id -> tokens to feed now.
        params: sampling settings.
        eos_ids: token ids that end a sequence.
        decode_text: ``ids -> str`` for stop strings (None: no stop strings).
        on_round: callback ``(RoundMetrics) -> None`` after each round (progress).

    Returns:
        ({seq_id: Generation}, [RoundMetrics of the prefill round, then each decode round]).
    """
    generator = torch.Generator().manual_seed(params.seed)
    gens = {s: Generation(s) for s in new_tokens}
    rounds = []
    feed = dict(new_tokens)
    while feed:
        logits, metrics = engine.forward(feed)
        rounds.append(metrics)
        if on_round is not None:
            on_round(metrics)
        for s, token in zip(feed, sample_next(logits, params, generator)):
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
