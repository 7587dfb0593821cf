"""A run job: from a validated config to an answer (``cp-megatron run`` and the benchmark
suites both call :func:`run`; the command line itself is :mod:`cp_megatron.cli.run`).

Order of work:
1. *pre-flight* (one process, before any rank starts): open the checkpoint's metadata,
   check TP against the heads, build the tokenizer, tokenize the prompt and check it fits
   the model's context -- every failure is a one-line :class:`ConfigError`;
2. start the ranks (our own spawner on one machine) or join (under torchrun / the
   deepspeed launcher: RANK and WORLD_SIZE are set);
3. on every rank: process groups, this rank's engine (:func:`cp_megatron.factory.build_engine`),
   then a :class:`~cp_megatron.session.ChatSession`: prefill, decode, and for
   ``prompt.turns`` one partial prefill per later turn;
4. rank 0 returns the result; the summary table goes to stdout, ``--output`` gets the JSON.

Status goes to stderr at once (pre-flight, ranks starting, weights loading), progress bars
only on a terminal (plain lines otherwise).

Source: arXiv 2411.01783 §3 (what runs), §3.4 (multi-turn prefill), §3.6 (heuristic).
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Optional

from cp_megatron.config import RunConfig
from cp_megatron.launcher import under_launcher
from cp_megatron.preflight import Prepared, prepare


def status(message: str) -> None:
    """One status line on stderr, at once (``[cp-megatron] ...``)."""
    print(f"[cp-megatron] {message}", file=sys.stderr, flush=True)


def explain_choice(h: dict) -> str:
    """Why the heuristic picked its variant, in words (``h``: HeuristicDecision.to_dict()).

    Alg. 1 / 5: pass-KV when T >= the KV-hidden threshold (the KV transfer hides behind
    attention) or when the miss rate T/(T+P) >= 2*NKV/NH - 4*T*BW/(N*C*e); that second
    threshold is negative when T is large for the link, and then every miss rate passes.
    For a pass-Q round, the cost of each query exchange the engine compared
    (:func:`~cp_megatron.attention.heuristic.choose_query_exchange`), per layer.
    """
    if h["forced"]:
        return "forced by attention.strategy"
    t, kv_hidden, threshold = h["new_tokens"], h["kv_hidden_threshold_tokens"], h["miss_rate_threshold"]
    if t >= kv_hidden:
        return f"T={t:,} >= {kv_hidden:,.0f} tokens: the KV transfer hides behind attention"
    if threshold <= 0:
        return (f"miss-rate threshold {threshold:.3f} <= 0 (T large for the link): pass-KV at any miss rate")
    rel = ">=" if h["miss_rate"] >= threshold else "<"
    why = f"miss rate {h['miss_rate']:.3f} {rel} threshold {threshold:.3f} (Alg. 5)"
    if h.get("all_gather_q_s", 0) > 0:     # the engine compared the query exchanges of a pass-Q round
        costs = [("ring", h["ring_q_exposed_s"]), ("all-gather", h["all_gather_q_s"]),
                 ("replicated", h["replicated_q_s"])]
        why += "; queries per layer " + ", ".join(f"{name} {s * 1e6:,.0f} us" for name, s in costs
                                                   if s > 0 or name != "replicated")
    return why


# -- on every rank ------------------------------------------------------------------------------
class _Progress:
    """Rank 0's view of one turn: a prefill bar over this stage's layers, then a decode
    bar that starts after the prefill; on a non-terminal, one plain line per phase."""

    def __init__(self, topo, stage, turn: int, max_new_tokens: int) -> None:
        from tqdm import tqdm

        self.on = topo.rank == 0
        self.tty = self.on and sys.stderr.isatty()
        self.turn, self.max_new, self.decode_bar, self.decode_s, self.steps = turn, max_new_tokens, None, 0.0, 0
        self.first_decode = None
        self.prefill_bar = tqdm(total=stage.num_local_layers, desc=f"turn {turn} prefill layers",
                                disable=not self.tty, file=sys.stderr, leave=False)

    def layer_done(self) -> None:
        if self.prefill_bar is not None:
            self.prefill_bar.update(1)

    def round_done(self, m) -> None:
        from tqdm import tqdm

        if m.kind != "decode" or self.decode_bar is None:     # a prefill round (or chunk of one)
            if self.prefill_bar is not None:
                self.prefill_bar.close()
                self.prefill_bar = None
            if self.on:
                status(f"turn {self.turn} {m.kind}: T={m.new_tokens:,} new on P={m.cached_tokens:,} cached "
                       f"(miss rate {m.miss_rate:.3f}) -> {m.strategy} [{explain_choice(m.heuristic)}] "
                       f"in {m.time_s:.2f} s")
            # Decoding starts now: its bar counts decode steps (the prefill's token is step 0).
            if self.decode_bar is None:
                self.decode_bar = tqdm(total=max(self.max_new - 1, 0), desc=f"turn {self.turn} decode",
                                       disable=not self.tty, file=sys.stderr, leave=False)
        else:
            if not self.steps:
                self.first_decode = m
            self.steps, self.decode_s = self.steps + 1, self.decode_s + m.time_s
            self.decode_bar.update(1)

    def close(self) -> None:
        if self.decode_bar is not None:
            self.decode_bar.close()
        if self.on and self.steps:
            m = self.first_decode
            status(f"turn {self.turn} decode: {self.steps} steps in {self.decode_s:.2f} s -> {m.strategy} "
                   f"[{explain_choice(m.heuristic)}]")


def rank_main(cfg: RunConfig, prep: Prepared) -> Optional[dict]:
    """Build this rank's engine, run every turn; return the result on global rank 0."""
    from cp_megatron.engine import SamplingParams
    from cp_megatron.factory import rank_engine
    from cp_megatron.session import ChatSession

    par, rt = cfg.parallel, cfg.runtime
    topo, engine, tok = rank_engine(cfg, prep, status=status, progress=sys.stderr.isatty())
    if topo.rank == 0:
        status(f"{len(prep.first_turn):,} prompt tokens, strategy={cfg.attention.strategy}")

    gen = cfg.generation
    params = SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_p, rt.seed, tuple(gen.stop))
    session = ChatSession(engine, tok, prep.first_turn, prep.messages, params,
                          prefill_chunk_tokens=gen.prefill_chunk_tokens)
    progress: dict = {"turn": None}

    def layer_done(*_) -> None:  # a forward hook must return None (else it replaces the output)
        if progress["turn"] is not None:
            progress["turn"].layer_done()

    for layer in engine.stage.layers.values():
        layer.register_forward_hook(layer_done)
    turns_out, rounds_out = [], []
    for turn in range(1, 2 + len(prep.turn_texts)):
        if turn > 1:
            session.ask(prep.turn_texts[turn - 2])
        progress["turn"] = bar = _Progress(topo, engine.stage, turn, gen.max_new_tokens)
        g, text, rounds, fed = session.reply(on_round=bar.round_done)
        bar.close()
        progress["turn"] = None
        turns_out.append(turn_summary(turn, fed, g, text, rounds))
        rounds_out += [round_record(turn, r, i if g.prefill_rounds > 1 and i < g.prefill_rounds else None)
                       for i, r in enumerate(rounds)]
    if topo.rank != 0:
        return None
    return {"model": prep.model_config.name, "parallel": {"tp": par.tp, "cp": par.cp, "pp": par.pp},
            "text": turns_out[-1]["text"], "token_ids": turns_out[-1]["token_ids"],
            "turns": turns_out, "rounds": rounds_out}


def round_record(turn: int, r, prefill_chunk: Optional[int] = None) -> dict:
    """One round for the JSON: its RoundMetrics, the turn, and ``ttft_s`` (prefill rounds)
    or ``ttit_s`` (decode rounds) -- the same seconds as ``time_s`` under the field's name;
    ``prefill_chunk``: the chunk's index (0, 1, ...) in a chunked prefill
    (``generation.prefill_chunk_tokens``), else absent."""
    d = {"turn": turn, **r.to_dict()}
    if prefill_chunk is not None:
        d["prefill_chunk"] = prefill_chunk
    d["ttit_s" if r.kind == "decode" else "ttft_s"] = r.time_s
    return d


def turn_summary(turn: int, fed: int, g, text: str, rounds) -> dict:
    """One turn for the JSON and the summary table (its rounds are in the top-level list).

    ``ttft_s``: the prefill round(s) (seconds; all chunks of a chunked prefill);
    ``prefill_chunks``: its rounds; ``ttit_s``: median decode step (seconds);
    ``decode_tokens_per_s``: decode steps / their total time; ``prefill_strategy`` /
    ``decode_strategy``: the variants used (every distinct one, '+'-joined).
    """
    prefill, decode = rounds[:g.prefill_rounds], rounds[g.prefill_rounds:]
    decode_s = sum(r.time_s for r in decode)
    first = rounds[0]
    return {"turn": turn, "fed_tokens": fed, "cached_tokens": first.cached_tokens, "text": text,
            "token_ids": g.token_ids, "finish_reason": g.finish_reason,
            "ttft_s": sum(r.time_s for r in prefill), "prefill_chunks": len(prefill),
            "ttit_s": statistics.median(r.time_s for r in decode) if decode else None,
            "decode_tokens_per_s": len(decode) / decode_s if decode_s > 0 else None,
            "miss_rate": first.miss_rate,
            "prefill_strategy": "+".join(dict.fromkeys(r.strategy for r in prefill)),
            "decode_strategy": "+".join(sorted({r.strategy for r in decode})) or None,
            "kv_cache_bytes_rank0": rounds[-1].kv_cache_bytes,
            "kv_cache_capacity_bytes_rank0": rounds[-1].kv_cache_capacity_bytes}


# -- entry -------------------------------------------------------------------------------------
def run(cfg: RunConfig) -> Optional[dict]:
    """Pre-flight, then start or join the ranks; returns the result on rank 0 (else None).

    Raises:
        ConfigError: pre-flight failures (before any rank starts).
        RankFailure: a rank failed or the job timed out (every rank is stopped).
        Interrupted: a stop signal (every rank is stopped, temporary files removed).
    """
    from cp_megatron.launcher import spawn, start_fork_server

    if under_launcher():
        from cp_megatron import parallel_state

        prep = prepare(cfg, world_size=int(os.environ["WORLD_SIZE"]))
        try:
            return rank_main(cfg, prep)
        finally:
            parallel_state.destroy()
    start_fork_server()   # its imports (torch, megatron-core) overlap the pre-flight below
    prep = prepare(cfg)
    par = cfg.parallel
    status(f"starting {par.world_size} rank{'s' if par.world_size > 1 else ''} (tp={par.tp} cp={par.cp} "
           f"pp={par.pp}) on {cfg.runtime.device}")
    results = spawn(rank_main, par.world_size, (cfg, prep), timeout_s=cfg.runtime.timeout_s,
                    threads_per_rank=cfg.runtime.threads_per_rank, backend=None)
    return results[0]
