"""Round scheduling on global rank 0: admission, fused prefill, batched decode, prefix reuse.

The scheduler owns no tensors and calls no collective: it turns requests into *rounds*
(:class:`Round`: the new token ids of each sequence, plus the sequences to fork or free
first, and each sequence's sampling settings), which rank 0 broadcasts and every rank
runs, and it turns each round's sampled token ids into text and events for the waiting
HTTP handlers.

* **Fused prefill** (§3.3): the requests admitted together are prefilled in ONE round,
  each sequence load-balanced over the CP ranks by the engine; at most
  ``max_prefill_tokens`` new tokens per round.
* **Batched decode** (§3.5.3, Alg. 4): one round feeds the last sampled token of every
  generating sequence (round-robin placement in the engine).  Prefill and decode rounds
  alternate while both have work, so admissions never stall running streams for long.
* **Chunked prefill**: a prompt with more than ``max_prefill_tokens`` new tokens is
  prefilled in chunks, one per round; each chunk after the first is a partial prefill on
  the KV the earlier chunks left on the ranks (variant by Alg. 5 per chunk).  Every such
  round carries the decode tokens of all generating streams *plus* the chunk, within one
  token budget of ``max_prefill_tokens`` (decode tokens first, the chunk gets the rest,
  at least one token): the streams keep their pace while a long document prefills, as in
  vLLM's chunked-prefill scheduler and SGLang's ``chunked_prefill_size``.  One chunked
  prefill runs at a time; admissions wait for it.  Only the last chunk's sampled token
  is kept.
* **Prefix reuse**: a prompt that shares a prefix with a cached sequence (a previous turn
  of the chat, the same document with another question) only prefills the rest -- a
  partial prefill with P > 0, which the paper's heuristic sends to pass-Q when the miss
  rate is low (Alg. 1).  An idle sequence the prompt fully extends is taken over; any
  other match is *forked* (its first tokens copied under a new id), so a branch never
  changes the original.
* **KV budget**: ``kv_cache_tokens`` tokens for the whole CP group.  A running request
  reserves prompt + max_tokens; idle cached sequences are evicted least recently used
  first; a request that does not fit yet waits (FIFO) and one that can never fit is
  refused at submission.
* **Host tier** (``host_kv_cache_slots`` > 0): an evicted idle sequence is *offloaded*
  instead of freed -- every rank copies its own shard to host memory
  (:mod:`cp_megatron.model.kv_offload`) -- and prefix matching sees host entries as it sees
  cached ones: a match is *restored* onto the device (the whole entry taken back when the
  prompt extends it, else a branch of its first tokens, the entry staying) instead of
  prefilled again.  The tier has its own budget (slots per rank; an entry costs the most
  slots any one rank holds of it) and its own LRU: past the budget the least recently used
  entries are dropped.

Sampling: each round carries the sequences' settings and draw counts; the engine samples
(see :mod:`cp_megatron.serve.ranks`), so a seeded request gives the same tokens whatever
else is in its batch.

Thread model: :meth:`Scheduler.submit` / :meth:`Scheduler.cancel` are called from the
HTTP thread; everything else runs in rank 0's scheduler loop.

Source: arXiv 2411.01783 §3.3 (load-balanced sharding), §3.5 (partial prefill, decode),
Alg. 1 / Alg. 4; prefix caching as in vLLM / SGLang (radix / LRU).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from cp_megatron.sampling import FAILED_TOKEN, SamplingParams, TokenLogprobs


class AdmissionError(Exception):
    """A request refused at submission; ``status`` is the HTTP status (400, 429, 503)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


# -- events sent to the HTTP handler of a request ------------------------------------------------
@dataclass
class Delta:
    """New output of a request: text (may be empty while held back) and token ids."""

    text: str
    token_ids: list[int]
    logprobs: Optional[TokenLogprobs] = None     # of the token, when the request asked


@dataclass
class Finished:
    """The request is done: finish_reason "stop" or "length", and its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    """The request cannot complete (its sampling failed, server failure or shutdown):
    HTTP ``status`` and the error ``code``."""

    status: int
    message: str
    code: str = "server_unavailable"


# -- requests, sequences, rounds ---------------------------------------------------------------
@dataclass
class GenParams:
    """Per-request decoding settings (OpenAI / vLLM names): temperature 0 (or below
    :data:`~cp_megatron.sampling.GREEDY_TEMPERATURE_EPS`) = greedy; ``ignore_eos``: EOS does
    not end the request; ``min_tokens``: EOS cannot be drawn, nor a stop string end it,
    before that many tokens; ``logprobs``: None or how many alternatives per token."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()
    top_k: int = 0
    min_p: float = 0.0
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    logprobs: Optional[int] = None


@dataclass(eq=False)
class Request:
    """One generation request.  ``sink(event)`` is called from the scheduler thread with
    :class:`Delta`, :class:`Finished` or :class:`Failed` events (it must not block)."""

    prompt: list[int]
    params: GenParams
    sink: Callable[[object], None]
    request_id: str = ""
    # scheduler state
    seq: Optional[int] = None
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    pending: Optional[int] = None
    finish_reason: str = ""
    cancelled: bool = False
    seed: int = 0                      # the request's seed, or one drawn at admission
    submitted_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def reserve(self) -> int:
        """KV tokens this request may come to hold (prompt + max_tokens)."""
        return len(self.prompt) + self.params.max_tokens


@dataclass
class _Seq:
    tokens: list[int]                  # token ids whose K/V the ranks hold, in order
    owner: Optional[Request] = None    # the request generating on it (None: idle cache entry)
    last_used: int = 0


@dataclass
class _HostEntry:
    tokens: list[int]                  # token ids of the offloaded sequence, in order
    slots: int                         # host slots it takes per rank (the most any rank holds)
    last_used: int = 0


@dataclass
class Round:
    """One round for every rank.  ``message`` is what rank 0 broadcasts:
    ``{"free": [seq], "host_drop": [seq], "offload": [seq], "restore": [(src, dst, length)],
    "fork": [(src, dst, length)], "feed": {seq: [token ids]}, "sampling": {seq:
    SamplingParams}, "draws": {seq: tokens sampled so far}}``, applied in that order
    (``free``: device sequences; ``host_drop``: host-tier entries; ``offload``: device ->
    host; ``restore``: host -> device, the first ``length`` tokens of ``src`` as ``dst``, the
    entry leaving the host tier when ``dst == src``); ``requests`` are the requests of
    ``feed``'s sequences, in its order."""

    kind: str                          # "prefill", "decode" or "free" (no forward)
    message: dict
    requests: list[Request]
    # A chunk that is not its prompt's last: its request, and (start, end) of the chunk in
    # the prompt; the token sampled after it is dropped.
    partial: Optional[Request] = None
    chunk: Optional[tuple[int, int]] = None


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 1, n          # a[:lo] == b[:lo], a[:hi] != b[:hi]: binary search on slices (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Scheduler:
    """Rank 0's request queue, sequence table and round planner.

    Args:
        kv_cache_tokens: KV budget of the CP group (tokens, all sequences together).
        budget_source: how the budget was given, named in a 400 (e.g. "serve.kv_cache_memory = ...").
        max_num_seqs: sequences generating at once.
        max_prefill_tokens: token budget of a round: new tokens of a fused prefill; a longer
            prompt is prefilled in chunks, each round carrying the decode tokens of the
            generating streams plus at most this many tokens in all.
        max_queue: waiting requests before 429.
        prefix_caching: reuse cached sequences' K/V for matching prompt prefixes.
        eos_ids: token ids that end generation (finish_reason "stop").
        decode_text: ``ids -> str`` (special tokens skipped) for text and stop strings;
            None for a model without tokenizer (text stays empty).
        metrics: optional :class:`~cp_megatron.serve.metrics.ServeMetrics`-like object
            (``on_first_token``, ``on_token``, ``on_round``, ``on_finish``, ``on_host_tier``);
            None for none.
        log: ``str -> None`` for one line per round; None for silence.
        host_kv_cache_slots: host-tier budget in slots per rank (0: no host tier, an evicted
            sequence is freed).
        shard_slots: ``seq -> the most slots any one rank holds of that cached sequence``
            (what its host entry costs); default: all its tokens (an upper bound).
    """

    def __init__(self, *, kv_cache_tokens: int, budget_source: str = "serve.kv_cache_tokens", max_num_seqs: int = 64, max_prefill_tokens: int = 8192,
                 max_queue: int = 256, prefix_caching: bool = True, eos_ids: tuple = (),
                 decode_text: Optional[Callable[[list[int]], str]] = None, metrics=None,
                 log: Optional[Callable[[str], None]] = None, host_kv_cache_slots: int = 0,
                 shard_slots: Optional[Callable[[int], int]] = None) -> None:
        self.kv_cache_tokens, self.max_num_seqs = kv_cache_tokens, max_num_seqs
        self.budget_source = budget_source
        self.max_prefill_tokens, self.max_queue = max_prefill_tokens, max_queue
        self.prefix_caching, self.eos_ids, self.decode_text = prefix_caching, tuple(eos_ids), decode_text
        self.metrics, self.log = metrics, log
        self.seqs: dict[int, _Seq] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.rounds = 0
        self._next_seq = itertools.count()
        self._clock = itertools.count(1)
        self._to_free: list[int] = []
        self.host_kv_cache_slots, self.shard_slots = host_kv_cache_slots, shard_slots
        self.host: dict[int, _HostEntry] = {}      # offloaded sequences (the host tier)
        self._to_offload: list[int] = []           # this round's, in order
        self._to_drop_host: list[int] = []
        self._restores: list[tuple[int, int, int]] = []
        self._host_pinned: set[int] = set()        # host entries this round reads: never dropped in it
        self._host_releasing = 0                   # slots of entries taken back this round (freed after its offloads)
        self._last_kind = ""
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, Optional[Request]]] = []
        self._wake = threading.Event()
        self.draining = False
        self.failed: Optional[str] = None

    # -- HTTP thread -----------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req`` (thread-safe).

        Raises:
            AdmissionError: 503 while draining or failed, 400 if prompt + max_tokens exceeds
                the KV budget, 429 when ``max_queue`` requests already wait.
        """
        with self._lock:
            if self.failed is not None:
                raise AdmissionError(503, f"server unavailable: {self.failed}", "server_unavailable")
            if self.draining:
                raise AdmissionError(503, "server is shutting down", "server_shutting_down")
            if req.reserve > self.kv_cache_tokens:
                raise AdmissionError(400, f"prompt ({len(req.prompt)} tokens) + max_tokens "
                                     f"({req.params.max_tokens}) exceed the server's KV budget of "
                                     f"{self.kv_cache_tokens} tokens ({self.budget_source})",
                                     "kv_budget_exceeded")
            queued = sum(1 for kind, _ in self._inbox if kind == "submit") + len(self.waiting)
            if queued >= self.max_queue:
                raise AdmissionError(429, f"server busy: {queued} requests already queued", "queue_full")
            req.submitted_at = time.perf_counter()
            self._inbox.append(("submit", req))
        self._wake.set()

    def cancel(self, req: Request) -> None:
        """The client went away: stop generating for ``req`` and free its sequence (thread-safe)."""
        with self._lock:
            self._inbox.append(("cancel", req))
        self._wake.set()

    def reset_prefix_cache(self) -> None:
        """Evict every idle cached sequence before the next request is admitted (thread-safe;
        vLLM's ``/reset_prefix_cache``): later requests start cold."""
        with self._lock:
            self._inbox.append(("reset", None))
        self._wake.set()

    def begin_drain(self) -> None:
        """Refuse new requests (503); the loop stops once in-flight ones finish."""
        with self._lock:
            self.draining = True
        self._wake.set()

    # -- scheduler thread --------------------------------------------------------------------------
    def wait(self, timeout: float) -> bool:
        """Block until something arrives (True) or ``timeout`` seconds pass (False)."""
        return self._wake.wait(timeout)

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def cached_tokens_total(self) -> int:
        return sum(len(s.tokens) for s in self.seqs.values())

    @property
    def host_slots_used(self) -> int:
        """Host-tier slots per rank its entries take (the budget's unit)."""
        return sum(e.slots for e in self.host.values()) + self._host_releasing

    def done_draining(self) -> bool:
        """Draining and nothing left to run."""
        with self._lock:
            pending = bool(self._inbox)
        return self.draining and not pending and not self.waiting and not self.running and not self._to_free

    def fail(self, message: str, status: int = 503) -> None:
        """Answer every queued and running request with :class:`Failed` and refuse new ones."""
        with self._lock:
            self.failed = message
            inbox, self._inbox = self._inbox, []
        reqs = list(self.waiting) + self.running + [r for kind, r in inbox if kind == "submit"]
        self.waiting.clear()
        self.running.clear()
        for r in reqs:
            if not r.cancelled and not r.finish_reason:
                r.sink(Failed(status, message))

    def abort_all(self, message: str) -> None:
        """Drain timeout: end every in-flight request with a 503 event (sequences freed)."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for r in [r for kind, r in inbox if kind == "submit"] + list(self.waiting) + list(self.running):
            r.sink(Failed(503, message))
            self._drop(r)
        self.waiting.clear()

    def _take_inbox(self) -> None:
        self._wake.clear()              # set again by anything that arrives after this
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for kind, req in inbox:
            if kind == "submit":
                if req.cancelled:
                    continue
                req.seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
                self.waiting.append(req)
            elif kind == "reset":
                for sid in [sid for sid, s in self.seqs.items() if s.owner is None]:
                    del self.seqs[sid]
                    self._to_free.append(sid)
                self._to_drop_host.extend(self.host)
                self.host.clear()
            elif not req.cancelled and not req.finish_reason:
                req.cancelled = True
                self._drop(req)

    def _drop(self, req: Request) -> None:
        """Forget a request that will not finish normally; free its sequence."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if req.seq is not None and req.seq in self.seqs:
            del self.seqs[req.seq]
            self._to_free.append(req.seq)
        req.seq = None

    def _used(self) -> int:
        return sum(s.owner.reserve if s.owner is not None else len(s.tokens) for s in self.seqs.values())

    def _evict_for(self, need: int, keep=frozenset()) -> bool:
        """Evict idle sequences (LRU first, none in ``keep``) until ``need`` tokens fit:
        to the host tier when it is on, else freed."""
        free = self.kv_cache_tokens - self._used()
        idle = sorted((s.last_used, sid) for sid, s in self.seqs.items() if s.owner is None and sid not in keep)
        for _, sid in idle:
            if free >= need:
                break
            slots = self._offload_cost(sid)
            s = self.seqs.pop(sid)
            free += len(s.tokens)
            if slots is None:
                self._to_free.append(sid)
                continue
            self.host[sid] = _HostEntry(s.tokens, slots, s.last_used)
            self._to_offload.append(sid)
            self._trim_host()
        return free >= need

    def _offload_cost(self, sid: int) -> Optional[int]:
        """Host slots per rank sequence ``sid`` would take, or None when it does not go to
        the host tier (tier off, nothing cached, or larger than the whole tier)."""
        if self.host_kv_cache_slots <= 0 or not self.seqs[sid].tokens:
            return None
        slots = self.shard_slots(sid) if self.shard_slots is not None else len(self.seqs[sid].tokens)
        return slots if slots <= self.host_kv_cache_slots else None

    def _trim_host(self) -> None:
        """Drop host entries, least recently used first (none this round reads), until the
        tier is within its budget.  An entry offloaded in this same round is freed on the
        device instead of being copied."""
        if self.host_slots_used <= self.host_kv_cache_slots:
            return
        for _, hid in sorted((e.last_used, hid) for hid, e in self.host.items() if hid not in self._host_pinned):
            del self.host[hid]
            if hid in self._to_offload:
                self._to_offload.remove(hid)
                self._to_free.append(hid)
            else:
                self._to_drop_host.append(hid)
            if self.host_slots_used <= self.host_kv_cache_slots:
                return

    def _best_match(self, prompt: list[int]) -> tuple[Optional[int], int, bool]:
        """(sequence id, tokens to reuse, whether it is in the host tier) of the longest
        cached or offloaded prefix of ``prompt``; a device sequence wins a tie."""
        if not self.prefix_caching:
            return None, 0, False
        best, best_len, on_host = None, 0, False
        for tier, table in ((False, self.seqs), (True, self.host)):
            for sid, s in table.items():
                n = min(common_prefix(s.tokens, prompt), len(prompt) - 1)  # >= 1 new token for logits
                if n > best_len:
                    best, best_len, on_host = sid, n, tier
        return best, best_len, on_host

    def _admit(self) -> tuple[dict, list[tuple[int, int, int]], list[Request]]:
        feed, forks, admitted, new_tokens = {}, [], [], 0
        sources = set()          # fork sources of this round: the ranks copy them after the frees
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            src, n, on_host = self._best_match(req.prompt)
            if admitted and new_tokens + len(req.prompt) - n > self.max_prefill_tokens:
                break
            if on_host:
                self._host_pinned.add(src)                 # offloads making room must not drop it
                if not self._evict_for(req.reserve, sources):
                    break                                  # the restore lies within the reserve
            else:
                s = self.seqs.get(src) if src is not None else None
                take_over = s is not None and s.owner is None and n == len(s.tokens)
                if not self._evict_for(req.reserve - (n if take_over else 0), sources | {src}):
                    if src is None or not self._evict_for(req.reserve, sources):
                        break                              # wait for running requests to finish
                    # The match was evicted to make room (to the host tier, or freed): match
                    # again; whatever matches now fits the reserve.
                    src, n, on_host = self._best_match(req.prompt)
                    if on_host:
                        self._host_pinned.add(src)
            self.waiting.popleft()
            if on_host:
                seq = self._restore(src, n)                # host -> device instead of a prefill
            elif (src is not None and self.seqs[src].owner is None and n == len(self.seqs[src].tokens)):
                seq = src                                  # extends an idle sequence: take it over
            else:
                seq = next(self._next_seq)
                if n:
                    forks.append((src, seq, n))            # branch: copy the shared prefix
                    sources.add(src)
                self.seqs[seq] = _Seq(list(req.prompt[:n]))
            self.seqs[seq].owner, self.seqs[seq].last_used = req, next(self._clock)
            if src is not None and src in self.seqs:
                self.seqs[src].last_used = next(self._clock)
            req.seq, req.cached_tokens = seq, n
            feed[seq] = req.prompt[n:n + self.max_prefill_tokens]   # longer: the first chunk
            new_tokens += len(feed[seq])
            admitted.append(req)
            self.running.append(req)
            if n + len(feed[seq]) < len(req.prompt):
                break                                      # a chunked prefill runs alone
        return feed, forks, admitted

    def _restore(self, hid: int, n: int) -> int:
        """Plan the restore of the first ``n`` tokens of host entry ``hid``; returns the
        device sequence id: ``hid`` itself when the prompt extends the whole entry (taken
        back: the entry leaves the tier once this round's offloads are done), else a new
        id (a branch: the entry stays)."""
        h = self.host[hid]
        if n == len(h.tokens):
            del self.host[hid]
            self._host_releasing += h.slots
            seq = hid
        else:
            h.last_used = next(self._clock)
            seq = next(self._next_seq)
        self._restores.append((hid, seq, n))
        self.seqs[seq] = _Seq(list(h.tokens[:n]))
        return seq

    def _chunk_round(self, req: Request, decodable: list[Request], start: int,
                     ) -> tuple[dict, list[Request], Optional[tuple[int, int]]]:
        """The decode tokens of ``decodable`` plus the next chunk of ``req``'s prompt from
        ``start``, within ``max_prefill_tokens`` (the chunk gets what the decodes leave, at
        least one token).  Returns (feed, requests in feed order, the chunk's span)."""
        feed = {r.seq: [r.pending] for r in decodable if r is not req}
        room = max(1, self.max_prefill_tokens - len(feed))
        end = min(start + room, len(req.prompt))
        feed[req.seq] = req.prompt[start:end]
        return feed, [r for r in decodable if r is not req] + [req], (start, end)

    def plan(self) -> Optional[Round]:
        """The next round, or None when there is nothing to run."""
        self._take_inbox()
        decodable = [r for r in self.running if r.pending is not None]
        chunking = [r for r in self.running if r.pending is None]   # a prefill left unfinished: chunked
        feed, forks, reqs, kind, span = {}, [], [], "", None
        if chunking:
            req = chunking[0]
            feed, reqs, span = self._chunk_round(req, decodable, len(self.seqs[req.seq].tokens))
            kind = "prefill"
        elif not (decodable and self._last_kind == "prefill"):
            feed, forks, reqs = self._admit()
            kind = "prefill" if feed else ""
            if len(reqs) == 1 and len(reqs[0].prompt) > reqs[0].cached_tokens + len(feed[reqs[0].seq]):
                req = reqs[0]                             # the first chunk, with the decode tokens
                feed, reqs, span = self._chunk_round(req, decodable, req.cached_tokens)
        if not feed and decodable:
            feed, reqs, kind = {r.seq: [r.pending] for r in decodable}, decodable, "decode"
        self._host_pinned.clear()
        self._host_releasing = 0
        if not feed and not (self._to_free or self._to_offload or self._to_drop_host):
            return None
        free, self._to_free = self._to_free, []
        host_drop, self._to_drop_host = self._to_drop_host, []
        offload, self._to_offload = self._to_offload, []
        restore, self._restores = self._restores, []
        self._last_kind = kind
        sampling = {r.seq: self._sampling(r) for r in reqs}
        draws = {r.seq: len(r.generated) for r in reqs}
        partial = reqs[-1] if span is not None and span[1] < len(reqs[-1].prompt) else None
        return Round(kind or "free", {"free": free, "host_drop": host_drop, "offload": offload, "restore": restore,
                                      "fork": forks, "feed": feed, "sampling": sampling, "draws": draws},
                     reqs, partial, span)

    def _sampling(self, r: Request) -> SamplingParams:
        p = r.params
        return SamplingParams(temperature=p.temperature, top_p=p.top_p, seed=r.seed, top_k=p.top_k, min_p=p.min_p,
                              min_tokens=p.min_tokens, end_ids=self.eos_ids if p.min_tokens else (),
                              repetition_penalty=p.repetition_penalty, logprobs=p.logprobs)

    def complete(self, rnd: Round, tokens: Optional[list[int]], metrics=None,
                 logprobs: Optional[list[Optional[TokenLogprobs]]] = None) -> None:
        """Take each sequence's sampled next token (``tokens``, in ``rnd.message["feed"]``
        order; None for a round without feed; ``logprobs`` likewise, or None) and send the
        requests their events.  A sequence whose sampling failed
        (:data:`~cp_megatron.sampling.FAILED_TOKEN`), or whose output cannot be decoded,
        fails alone (500) and is freed; the others go on."""
        self.rounds += 1
        m = rnd.message
        if m["offload"] or m["restore"] or m["host_drop"]:
            if self.metrics is not None:
                self.metrics.on_host_tier(len(m["offload"]), len(m["restore"]), len(m["host_drop"]))
            if self.log is not None:
                self.log(f"[serve] round {self.rounds} host tier: offloaded {m['offload']}, restored "
                         f"{[(src, dst, n) for src, dst, n in m['restore']]} (src, seq, tokens), dropped "
                         f"{m['host_drop']}; {len(self.host)} entries, {self.host_slots_used} of "
                         f"{self.host_kv_cache_slots} slots per rank")
        if metrics is not None:
            if self.metrics is not None:
                self.metrics.on_round(rnd.kind, metrics, len(rnd.requests))
            if self.log is not None:
                chunk = ""
                if rnd.chunk is not None:
                    req = rnd.requests[-1]
                    chunk = (f" chunk {rnd.chunk[0]}:{rnd.chunk[1]} of {len(req.prompt)} prompt tokens"
                             f" (request {req.request_id or '-'}, +{len(rnd.requests) - 1} decode)")
                self.log(f"[serve] round {self.rounds} {rnd.kind}{chunk}: seqs={len(rnd.requests)} "
                         f"T={metrics.new_tokens} P={metrics.cached_tokens} miss_rate={metrics.miss_rate:.3f} "
                         f"-> {metrics.strategy} in {metrics.time_s:.3f} s")
        if tokens is None:
            return
        now = time.perf_counter()
        for row, (req, (seq, fed)) in enumerate(zip(rnd.requests, rnd.message["feed"].items())):
            if req.cancelled or req.seq != seq:
                continue                                    # dropped while the round ran
            s = self.seqs[seq]
            s.tokens.extend(fed)
            s.last_used = next(self._clock)
            if req is rnd.partial:
                continue                                    # a chunk before the last: no token yet
            token = tokens[row]
            if self.metrics is not None:
                if req.generated:
                    self.metrics.on_token(now - req.last_token_at)
                else:
                    self.metrics.on_first_token(now - req.submitted_at)
            req.last_token_at = now
            if token == FAILED_TOKEN:
                self._fail_one(req, "sampling failed for this request (the server logged why)", "sampling_failed")
                continue
            req.generated.append(token)
            req.pending = token
            try:
                self._emit(req, token, logprobs[row] if logprobs is not None else None)
            except Exception as exc:          # noqa: BLE001 -- e.g. a detokenizer error: this request only
                if self.log is not None:
                    self.log(f"[serve] request {req.request_id} failed: {type(exc).__name__}: {exc}")
                self._fail_one(req, f"generation failed: {type(exc).__name__}", "generation_failed")
        for req in [r for r in self.running if r.finish_reason]:
            self.running.remove(req)
            s = self.seqs[req.seq]
            s.owner = None
            if not self.prefix_caching:
                del self.seqs[req.seq]
                self._to_free.append(req.seq)
            if self.metrics is not None:
                self.metrics.on_finish(req.finish_reason)
            req.sink(Finished(req.finish_reason, len(req.prompt), len(req.generated), req.cached_tokens))

    def _fail_one(self, req: Request, message: str, code: str) -> None:
        """End one running request with a 500 (its sequence freed); the others go on."""
        req.cancelled = True
        self._drop(req)
        if self.metrics is not None:
            self.metrics.on_finish("error")
        req.sink(Failed(500, message, code))

    def _emit(self, req: Request, token: int, logprobs: Optional[TokenLogprobs] = None) -> None:
        """Stop checks (EOS, stop strings, max_tokens) and the request's next Delta."""
        p = req.params
        text = self.decode_text(req.generated) if self.decode_text is not None else ""
        may_stop = len(req.generated) >= p.min_tokens
        if token in self.eos_ids and not p.ignore_eos and may_stop:
            req.finish_reason = "stop"
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1) if may_stop else -1
        if cut >= 0:
            text, req.finish_reason = text[:cut], "stop"
        elif not req.finish_reason and len(req.generated) >= p.max_tokens:
            req.finish_reason = "length"
        safe = len(text)
        if not req.finish_reason:  # hold back a partial character or a possible stop-string start
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for s in p.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        new_text = text[req.emitted_chars:safe] if safe > req.emitted_chars else ""
        req.emitted_chars = max(req.emitted_chars, safe)
        req.sink(Delta(new_text, [token], logprobs))
