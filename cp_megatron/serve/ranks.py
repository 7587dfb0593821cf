"""What every rank runs under ``cp-megatron serve``.

Global rank 0 runs the HTTP server (uvicorn, in a thread) and the scheduler loop (main
thread): it plans a round, broadcasts it to every rank and runs its share.
The other ranks loop on the broadcast: receive a round, run it, repeat.  All ranks
therefore run the same rounds in the same order.  Each round carries every sequence's
sampling settings (temperature, top_p, seed -- drawn on rank 0 when the request gives
none -- and how many tokens it has drawn): the engine samples a sequence's next token on
the rank that holds its last token, with a generator seeded from those two numbers, and
shares the ids (not logits), so per-request settings need no other agreement.  While idle, rank 0 broadcasts a heartbeat every ``serve.heartbeat_s`` seconds:
the ranks never sit in a collective long enough to time out, and a dead rank breaks the
next broadcast, after which rank 0 answers 503 and exits non-zero.

Source: arXiv 2411.01783 §3.5 (rounds of partial prefill / decode over persistent KV).
"""

from __future__ import annotations

import array
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# How long rank 0 keeps answering 503 after a rank failed, before it exits (s).
FAIL_LINGER_S = 5.0


class SeenTokens:
    """Every sequence's token ids on this rank (the rounds' feeds, forks and frees), for
    the repetition penalty: a bool ``[V]`` mask per sequence on the device, built the first
    time a request on it asks for a penalty and updated from each round's feed after that.

    Host cost: 8 bytes per cached token, O(new tokens) per round.
    Source: vLLM ``repetition_penalty`` (prompt and output tokens both count).
    """

    def __init__(self, vocab_size: int, device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.tokens: dict[int, array.array] = {}
        self.masks: dict = {}

    def free(self, seq: int) -> None:
        self.tokens.pop(seq, None)
        self.masks.pop(seq, None)

    def fork(self, src: int, dst: int, length: int) -> None:
        self.tokens[dst] = self.tokens.get(src, array.array("q"))[:length]
        self.masks.pop(dst, None)

    def _ids(self, ids) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.long)
        return t[(t >= 0) & (t < self.vocab_size)].to(self.device)

    def feed(self, feed: dict) -> None:
        for seq, new in feed.items():
            self.tokens.setdefault(seq, array.array("q")).extend(new)
            if seq in self.masks:
                self.masks[seq][self._ids(new)] = True

    def mask(self, seq: int) -> torch.Tensor:
        if seq not in self.masks:
            m = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            m[self._ids(self.tokens.get(seq, array.array("q")).tolist())] = True
            self.masks[seq] = m
        return self.masks[seq]


def engine_round(engine, message: dict, gather_kv_bytes: bool = False, seen: Optional[SeenTokens] = None):
    """THE adapter between the server and :class:`~cp_megatron.engine.InferenceEngine`:
    every engine call of the server is here.

    Applies ``message`` on this rank: frees sequences, drops host-tier entries, offloads
    sequences to the host tier and restores others from it (each rank moves its own shard),
    forks (copies a prefix of a cached sequence under a new id), then runs one round over
    ``message["feed"]`` and samples each sequence's next token (``message["sampling"]``,
    ``message["draws"]``; a repetition penalty reads ``seen``, which this call keeps up to
    date).

    Returns:
        (next token id per fed sequence in feed order, identical on every rank, or None
        when nothing was fed,
        :class:`~cp_megatron.engine.RoundMetrics` or None,
        KV-cache bytes of every rank, ``[(held, reserved capacity, host-tier bytes held,
        bytes offloaded so far, bytes restored so far, restore time so far in ns)] * world``
        (list) when ``gather_kv_bytes`` else None,
        per fed sequence None or its :class:`~cp_megatron.sampling.TokenLogprobs`, or None).
    """
    for seq in message["free"]:
        engine.truncate(seq, 0)
        if seen is not None:
            seen.free(seq)
    for seq in message["host_drop"]:
        engine.drop_offloaded(seq)
        if seen is not None:
            seen.free(seq)
    for seq in message["offload"]:
        engine.offload(seq)
        if seen is not None:
            seen.masks.pop(seq, None)           # its tokens stay (host ints), its device mask goes
    for src, dst, length in message["restore"]:
        engine.restore(src, dst, length)
        if seen is not None and dst != src:
            seen.fork(src, dst, length)
    for src, dst, length in message["fork"]:
        engine.fork(src, dst, length)
        if seen is not None:
            seen.fork(src, dst, length)
    sampling = message["sampling"]
    if seen is not None and message["feed"]:
        seen.feed(message["feed"])
        sampling = {seq: dataclasses.replace(p, seen=seen.mask(seq)) if p.repetition_penalty != 1.0 else p
                    for seq, p in sampling.items()}
    tokens, metrics, logprobs = (engine.step(message["feed"], sampling, message["draws"], return_logprobs=True)
                                 if message["feed"] else (None, None, None))
    kv_bytes = None
    if gather_kv_bytes:
        host = engine.host_kv
        mine = torch.tensor([engine.kv_cache.nbytes(), engine.kv_cache.capacity_bytes(), host.nbytes(),
                             host.offloaded_bytes, host.restored_bytes, int(host.restore_seconds * 1e9)],
                            dtype=torch.long, device=engine.stage.device)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        kv_bytes = [tuple(int(x) for x in t.tolist()) for t in every]
    return tokens, metrics, kv_bytes, logprobs


def shard_slots(engine):
    """``seq -> the most tokens of that cached sequence any one CP rank holds``, read from
    rank 0's engine (its host-side layouts of every CP rank): what the sequence costs in
    the host tier (:class:`~cp_megatron.serve.scheduler.Scheduler`'s ``shard_slots``)."""
    return lambda seq: max(layout.tokens_of(seq) for layout in engine.layouts)


def _broadcast(message: Optional[dict]) -> dict:
    """Rank 0 sends ``message`` to every rank; others pass None and get it."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_main(cfg, prep, budget) -> Optional[int]:
    """Entry of every rank: build the engine (its KV cache reserved up front for ``budget``,
    a :class:`~cp_megatron.serve.budget.KVBudget`), then lead (rank 0) or follow."""
    from cp_megatron.factory import rank_engine

    topo, engine, tok = rank_engine(cfg, prep, kv_capacity=budget.slots_per_rank, shm=False)
    seen = SeenTokens(prep.model_config.vocab_size, engine.stage.device)
    if topo.rank == 0:
        return _lead(cfg, prep, engine, tok, seen, budget)
    # SIGTERM / Ctrl-C reach every rank (torchrun forwards them, so does our spawner):
    # followers keep running until rank 0, which drains, tells them to stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        message = _broadcast(None)
        if message["op"] == "stop":
            return None
        if message["op"] == "round":
            engine_round(engine, message, message.get("gather_kv_bytes", False), seen)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _lead(cfg, prep, engine, tok, seen: SeenTokens, budget) -> int:
    import uvicorn

    from cp_megatron.serve.app import create_app
    from cp_megatron.serve.metrics import ServeMetrics
    from cp_megatron.serve.scheduler import Scheduler

    sv = cfg.serve
    metrics = ServeMetrics()
    sched = Scheduler(kv_cache_tokens=budget.tokens, budget_source=budget.source, max_num_seqs=sv.max_num_seqs,
                      max_prefill_tokens=sv.max_prefill_tokens, max_queue=sv.max_queue,
                      prefix_caching=sv.prefix_caching,
                      eos_ids=tok.eos_ids if tok is not None else prep.model_config.eos_token_ids,
                      decode_text=(lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok else None,
                      metrics=metrics, log=_log, host_kv_cache_slots=budget.host_slots_per_rank,
                      shard_slots=shard_slots(engine))
    # A checkpoint's name may be its path: the API id is then the file or folder name.
    model_name = sv.model_name or Path(prep.model_config.name).name.removesuffix(".gguf")
    app = create_app(sched, metrics, model_name=model_name, tokenizer=tok,
                     max_context=prep.max_context,
                     vocab_size=prep.model_config.vocab_size,
                     default_max_tokens=sv.default_max_tokens, max_request_bytes=sv.max_request_bytes,
                     log=_log)
    server = uvicorn.Server(uvicorn.Config(app, host=sv.host, port=sv.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server did not start on {sv.host}:{sv.port}")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    _log(f"[serve] {model_name} on http://{sv.host}:{port}/v1 (cp={cfg.parallel.cp}, "
         f"kv_cache_tokens={budget.tokens}, rank 0 pid {os.getpid()})")
    _log(f"[serve] KV budget: {budget.source} -> {budget.slots_per_rank} slots x {budget.bytes_per_slot} bytes = "
         f"{budget.bytes_per_rank / 2 ** 20:.1f} MiB reserved per rank -> {budget.tokens} tokens for the CP group "
         f"(cp={cfg.parallel.cp}, headroom 2 x max_num_seqs slots per rank)")
    if budget.host_slots_per_rank:
        _log(f"[serve] host tier: {budget.host_source} -> {budget.host_slots_per_rank} slots x "
             f"{budget.bytes_per_slot} bytes = {budget.host_bytes_per_rank / 2 ** 20:.1f} MiB per rank "
             f"({'pinned memory, side-stream copies' if cfg.runtime.device == 'cuda' else 'host memory'})")
    empty = {"op": "round", "gather_kv_bytes": True, "free": [], "host_drop": [], "offload": [], "restore": [],
             "fork": [], "feed": {}, "sampling": {}, "draws": {}}
    _broadcast(empty)                       # /metrics shows every rank's reservation from the start
    metrics.kv_cache_bytes(engine_round(engine, empty, True, seen)[2])

    signals = []

    def on_signal(signum, _frame) -> None:
        signals.append(signum)
        _log(f"[serve] {signal.Signals(signum).name}: " + (f"draining {sched.in_flight} request(s)"
             if len(signals) == 1 else "second signal, ending in-flight requests now"))
        sched.begin_drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    drain_started = None
    try:
        while True:
            if sched.draining:
                drain_started = drain_started or time.monotonic()
                if (time.monotonic() - drain_started > sv.drain_timeout_s or len(signals) > 1) and sched.in_flight:
                    sched.abort_all("server is shutting down")
            rnd = sched.plan()
            if rnd is None:
                if sched.done_draining():
                    break
                if not sched.wait(sv.heartbeat_s):
                    _broadcast({"op": "idle"})            # keep the ranks' collectives alive
                continue
            gather = (rnd.kind == "free" or sched.rounds % 16 == 0 or bool(rnd.message["offload"])
                      or bool(rnd.message["restore"]))
            message = {"op": "round", "gather_kv_bytes": gather, **rnd.message}
            _broadcast(message)
            tokens, round_metrics, kv_bytes, logprobs = engine_round(engine, message, gather, seen)
            if kv_bytes is not None:
                metrics.kv_cache_bytes(kv_bytes)
            sched.complete(rnd, tokens, round_metrics, logprobs)
        _broadcast({"op": "stop"})
        _log("[serve] drained; stopping every rank")
        return 0
    except Exception as exc:
        sched.fail(f"a rank failed ({type(exc).__name__}); the server is stopping")
        _log(f"[serve] rank failure: {exc}")
        time.sleep(FAIL_LINGER_S)      # answer 503 meanwhile, then fail this rank
        raise
    finally:
        server.should_exit = True
        thread.join(10)
