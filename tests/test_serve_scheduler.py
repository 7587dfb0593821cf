"""The serve scheduler against a fake engine whose logits depend on each sequence's whole
token history (as a real model's do): any wrong reuse, fork, free or batching changes
the tokens.  Oracle: the same request run alone in a fresh scheduler (cold cache)."""

from __future__ import annotations

import pytest
import torch

from cp_megatron.engine import sample_rows
from cp_megatron.sampling import FAILED_TOKEN
from cp_megatron.serve.scheduler import (AdmissionError, Delta, Failed, Finished, GenParams, Request, Scheduler,
                                         common_prefix)

pytestmark = pytest.mark.unit
VOCAB = 97


class FakeEngine:
    """Applies a round message like the ranks do and returns the next token of each fed
    sequence, sampled as the engine samples (``sample_rows``: settings and draw count)."""

    def __init__(self) -> None:
        self.history: dict[int, list[int]] = {}
        self.host: dict[int, list[int]] = {}            # the host tier
        self.fed_tokens = 0

    def run(self, message: dict):
        for seq in message["free"]:
            del self.history[seq]                       # KeyError: freeing an unknown sequence
        for seq in message["host_drop"]:
            del self.host[seq]
        for seq in message["offload"]:
            assert seq not in self.host
            self.host[seq] = self.history.pop(seq)
        for src, dst, n in message["restore"]:
            assert dst not in self.history and len(self.host[src]) >= n
            self.history[dst] = self.host[src][:n]
            if dst == src:
                del self.host[src]
        for src, dst, n in message["fork"]:
            assert dst not in self.history and len(self.history[src]) >= n
            self.history[dst] = self.history[src][:n]
        rows, params, draws = [], [], []
        for seq, tokens in message["feed"].items():
            assert tokens, "a sequence fed no token"
            h = self.history.setdefault(seq, [])
            h.extend(tokens)
            self.fed_tokens += len(tokens)
            g = torch.Generator().manual_seed(hash(tuple(h)) % (2 ** 31))
            rows.append(torch.randn(VOCAB, generator=g))
            params.append(message["sampling"][seq])
            draws.append(message["draws"][seq])
        return sample_rows(torch.stack(rows), params, draws).tolist() if rows else None


def make(**kw) -> Scheduler:
    kw.setdefault("kv_cache_tokens", 100_000)
    return Scheduler(**kw)


def submit(sched, prompt, max_tokens=5, **params) -> tuple[Request, list]:
    events = []
    params.setdefault("temperature", 0.0)
    req = Request(list(prompt), GenParams(max_tokens, **params), events.append)
    sched.submit(req)
    return req, events


def drive(sched, engine, max_rounds=2000) -> list:
    rounds = []
    for _ in range(max_rounds):
        rnd = sched.plan()
        if rnd is None:
            return rounds
        sched.complete(rnd, engine.run(rnd.message))
        rounds.append(rnd)
    raise AssertionError("scheduler did not finish")


def tokens(events) -> list[int]:
    assert sum(isinstance(e, Finished) for e in events) == 1 and isinstance(events[-1], Finished)
    return [t for e in events if isinstance(e, Delta) for t in e.token_ids]


def solo(prompt, **kw) -> list[int]:
    sched, engine = make(), FakeEngine()
    _, events = submit(sched, prompt, **kw)
    drive(sched, engine)
    return tokens(events)


def prompts(n, max_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lengths]


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([7], [1]) == 0 and common_prefix([], [1]) == 0
    a = list(range(1000))
    assert common_prefix(a, a[:637] + [-1] + a[638:]) == 637


def test_concurrent_requests_get_their_solo_outputs_in_fused_rounds():
    ps = prompts(12, 300)
    sched, engine = make(max_prefill_tokens=600, prefix_caching=False), FakeEngine()
    handles = [submit(sched, p) for p in ps]
    rounds = drive(sched, engine)
    for p, (_, events) in zip(ps, handles):
        assert tokens(events) == solo(p)
    assert max(len(r.requests) for r in rounds if r.kind == "prefill") > 1
    assert max(len(r.requests) for r in rounds if r.kind == "decode") > 1
    assert all(sum(len(t) for t in r.message["feed"].values()) <= 600 or len(r.requests) == 1
               for r in rounds if r.kind == "prefill")
    assert engine.history == {}                          # no caching: every sequence freed


def test_next_turn_takes_over_the_cached_sequence_and_matches_cold():
    sched, engine = make(), FakeEngine()
    first = prompts(1, 50, seed=1)[0]
    _, ev1 = submit(sched, first)
    drive(sched, engine)
    out1 = tokens(ev1)
    second = first + out1 + [3, 1, 4, 1, 5]
    fed_before = engine.fed_tokens
    req, ev2 = submit(sched, second)
    rounds = drive(sched, engine)
    assert req.cached_tokens == len(first) + len(out1) - 1       # all but the unfed last token
    assert rounds[0].message["fork"] == [] and engine.fed_tokens - fed_before == 6 + 4
    assert tokens(ev2) == solo(second)
    assert ev2[-1].cached_tokens == req.cached_tokens


def test_branch_forks_and_leaves_the_original_intact():
    sched, engine = make(), FakeEngine()
    doc = prompts(1, 80, seed=2)[0] + [1] * 20
    q1, q2 = doc + [5, 6], doc + [7, 8, 9]
    _, e1 = submit(sched, q1)
    drive(sched, engine)
    r2, e2 = submit(sched, q2)
    rounds = drive(sched, engine)
    assert r2.cached_tokens == len(doc) and len(rounds[0].message["fork"]) == 1
    assert tokens(e2) == solo(q2)
    follow = q1 + tokens(e1) + [2]                          # continue the first branch
    r3, e3 = submit(sched, follow)
    drive(sched, engine)
    assert r3.cached_tokens == len(q1) + len(tokens(e1)) - 1
    assert tokens(e3) == solo(follow)


def test_fork_of_a_running_sequence_while_it_decodes():
    sched, engine = make(), FakeEngine()
    doc = prompts(1, 60, seed=3)[0] + [2] * 10
    _, e1 = submit(sched, doc + [1], max_tokens=8)
    sched.complete(r := sched.plan(), engine.run(r.message))      # prefill of the first request
    _, e2 = submit(sched, doc + [4, 4], max_tokens=8)               # shares doc with a running one
    drive(sched, engine)
    assert tokens(e1) == solo(doc + [1], max_tokens=8)
    assert tokens(e2) == solo(doc + [4, 4], max_tokens=8)


def test_kv_budget_evicts_least_recently_used_and_refuses_what_never_fits():
    sched, engine = make(kv_cache_tokens=100), FakeEngine()
    a, b, c = ([k] * 30 for k in (1, 2, 3))
    for p in (a, b):
        submit(sched, p)
        drive(sched, engine)
    assert len(engine.history) == 2                     # both cached (34 tokens each)
    _, ec = submit(sched, c)
    rounds = drive(sched, engine)
    assert rounds[0].message["free"] == [0]              # a, least recently used, made room
    assert tokens(ec) == solo(c)
    with pytest.raises(AdmissionError) as err:
        submit(sched, [1] * 98, max_tokens=5)
    assert err.value.status == 400
    full = make(max_queue=1)
    submit(full, [1])
    with pytest.raises(AdmissionError) as err:
        submit(full, [2])
    assert err.value.status == 429


def test_requests_wait_for_budget_instead_of_overcommitting():
    sched, engine = make(kv_cache_tokens=80, prefix_caching=False), FakeEngine()
    ps = [[k] * 30 for k in range(1, 5)]                 # 35 tokens reserved each: 2 fit at once
    handles = [submit(sched, p) for p in ps]
    rounds = drive(sched, engine)
    assert max(len(r.requests) for r in rounds) == 2
    assert [tokens(e) for _, e in handles] == [solo(p) for p in ps]


def test_cancel_frees_the_sequence():
    sched, engine = make(), FakeEngine()
    req, events = submit(sched, [5] * 40, max_tokens=50)
    for _ in range(3):
        sched.complete(r := sched.plan(), engine.run(r.message))
    seq = req.seq
    assert seq in engine.history
    sched.cancel(req)
    rnd = sched.plan()
    assert rnd.kind == "free" and rnd.message["free"] == [seq]
    engine.run(rnd.message)
    assert engine.history == {} and sched.in_flight == 0 and sched.plan() is None
    assert not any(isinstance(e, Finished) for e in events)


def test_stop_strings_eos_and_held_back_text():
    letters = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)     # noqa: E731
    prompt = [3] * 10
    ref = solo(prompt, max_tokens=12)
    text = letters(ref)
    stop = text[5:7]
    cut = text.find(stop)
    sched, engine = make(decode_text=letters), FakeEngine()
    _, events = submit(sched, prompt, max_tokens=12, stop=(stop,))
    drive(sched, engine)
    streamed = "".join(e.text for e in events if isinstance(e, Delta))
    assert streamed == text[:cut] and events[-1].finish_reason == "stop"
    sched, engine = make(eos_ids=(ref[3],)), FakeEngine()
    _, events = submit(sched, prompt, max_tokens=12)
    drive(sched, engine)
    assert tokens(events) == ref[:ref.index(ref[3]) + 1] and events[-1].finish_reason == "stop"
    assert solo(prompt, max_tokens=4) == ref[:4]


def test_sampling_is_seeded_per_request_whatever_the_batch():
    p = [9] * 12
    alone = solo(p, max_tokens=8, temperature=1.0, seed=7)
    sched, engine = make(), FakeEngine()
    others = [submit(sched, q, max_tokens=8, temperature=0.7, seed=i) for i, q in enumerate(prompts(5, 40))]
    _, events = submit(sched, p, max_tokens=8, temperature=1.0, seed=7)
    drive(sched, engine)
    assert tokens(events) == alone
    assert solo(p, max_tokens=8, temperature=1.0, seed=8) != alone
    assert all(len(tokens(e)) == 8 for _, e in others)


def test_failure_answers_everyone_and_refuses_new_requests():
    sched, engine = make(), FakeEngine()
    _, e1 = submit(sched, [1] * 5)
    sched.complete(r := sched.plan(), engine.run(r.message))
    _, e2 = submit(sched, [2] * 5)
    sched.fail("rank 1 died")
    assert isinstance(e1[-1], Failed) and isinstance(e2[-1], Failed) and e1[-1].status == 503
    with pytest.raises(AdmissionError) as err:
        submit(sched, [3])
    assert err.value.status == 503


def test_a_fork_source_is_not_evicted_in_the_round_that_copies_it():
    sched, engine = make(kv_cache_tokens=100), FakeEngine()
    doc = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    submit(sched, doc)
    drive(sched, engine)                                  # idle: doc + 4 generated = 44 tokens
    a, b = doc[:30] + [9] * 5, [7] * 20                   # a forks 30 tokens of it; b needs room
    (ra, ea), (rb, eb) = submit(sched, a), submit(sched, b)
    drive(sched, engine)
    assert ra.cached_tokens == 30
    assert tokens(ea) == solo(a) and tokens(eb) == solo(b)


def test_ignore_eos_runs_to_max_tokens_and_min_tokens_holds_eos_and_stop_strings():
    prompt = [3] * 10
    ref = solo(prompt, max_tokens=12)
    eos = ref[3]
    sched, engine = make(eos_ids=(eos,)), FakeEngine()
    _, events = submit(sched, prompt, max_tokens=12, ignore_eos=True)
    drive(sched, engine)
    assert tokens(events) == ref and events[-1].finish_reason == "length"
    # min_tokens: the round's sampling carries the ban on the end ids
    sched = make(eos_ids=(eos,))
    submit(sched, prompt, max_tokens=12, min_tokens=6)
    rnd = sched.plan()
    (params,) = rnd.message["sampling"].values()
    assert params.min_tokens == 6 and params.end_ids == (eos,)
    # ... and stop strings cannot end it earlier either (vLLM)
    letters = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)     # noqa: E731
    stop = letters(ref)[1:3]
    sched, engine = make(decode_text=letters), FakeEngine()
    _, events = submit(sched, prompt, max_tokens=12, stop=(stop,), min_tokens=5)
    drive(sched, engine)
    assert len(tokens(events)) >= 5


class _FailingRows(FakeEngine):
    """Sampling fails (FAILED_TOKEN) for the sequences of requests with top_p == 0.5."""

    def run(self, message):
        ids = super().run(message)
        if ids is None:
            return None
        return [FAILED_TOKEN if message["sampling"][seq].top_p == 0.5 else t
                for seq, t in zip(message["feed"], ids)]


def test_a_failed_sample_fails_its_request_alone_and_frees_its_sequence():
    p, q = [5] * 30, [6] * 40
    alone = solo(q, max_tokens=6)
    sched, engine = make(prefix_caching=False), _FailingRows()
    _, bad = submit(sched, p, max_tokens=6, top_p=0.5, temperature=1.0)
    _, good = submit(sched, q, max_tokens=6)
    drive(sched, engine)
    assert len(bad) == 1 and isinstance(bad[0], Failed) and bad[0].status == 500 and bad[0].code == "sampling_failed"
    assert tokens(good) == alone
    assert sched.seqs == {} and not sched.running and sched.failed is None


def test_an_emit_error_fails_its_request_alone():
    def decode(ids):
        if 13 in ids:
            raise TypeError("boom")
        return ""

    sched, engine = make(decode_text=decode), FakeEngine()
    reqs = [submit(sched, [i] * 8, max_tokens=20) for i in range(8)]
    drive(sched, engine)
    outcomes = [type(e[-1]).__name__ for _, e in reqs]
    assert set(outcomes) == {"Finished", "Failed"} and sched.failed is None and not sched.running
    assert all(e[-1].code == "generation_failed" for _, e in reqs if isinstance(e[-1], Failed))


@pytest.mark.parametrize("budget", [64, 100, 333])
def test_a_long_prompt_is_prefilled_in_chunks_that_carry_the_other_streams_decode_tokens(budget):
    chats = prompts(4, 30, seed=3)
    doc = prompts(1, 1, seed=4)[0] + torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(5)).tolist()
    sched, engine = make(max_prefill_tokens=budget), FakeEngine()
    handles = [submit(sched, p, max_tokens=40) for p in chats]
    for _ in range(3):                                   # the chats start generating
        rnd = sched.plan()
        sched.complete(rnd, engine.run(rnd.message))
    _, doc_events = submit(sched, doc, max_tokens=4)
    rounds = drive(sched, engine)
    for p, (_, events) in zip(chats, handles):
        assert tokens(events) == solo(p, max_tokens=40)
    assert tokens(doc_events) == solo(doc, max_tokens=4)          # same tokens as one unchunked prefill
    chunked = [r for r in rounds if r.chunk is not None]
    starts = [r.chunk[0] for r in chunked]
    assert starts[0] == 0 and [r.chunk[1] for r in chunked][-1] == len(doc)
    assert all(a.chunk[1] == b.chunk[0] for a, b in zip(chunked, chunked[1:]))   # contiguous, in order
    assert len(chunked) >= len(doc) // budget
    for r in chunked:
        assert sum(len(t) for t in r.message["feed"].values()) <= budget        # one token budget
        assert r.partial is (None if r is chunked[-1] else r.requests[-1])
    with_decodes = [r for r in chunked if len(r.requests) > 1]
    assert len(with_decodes) >= len(chunked) - 1                 # the chat streams decode between chunks
    assert all(len(t) == 1 for r in with_decodes for t in list(r.message["feed"].values())[:-1])


# -- the host tier (offload / restore of idle sequences) ------------------------------------------
def test_an_evicted_sequence_goes_to_the_host_tier_and_its_next_turn_restores_it_instead_of_prefilling():
    from cp_megatron.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    sched, engine = make(kv_cache_tokens=100, host_kv_cache_slots=1000, metrics=metrics), FakeEngine()
    outs = {}
    for k in (1, 2, 3):
        _, ev = submit(sched, [k] * 30)
        rounds = drive(sched, engine)
        outs[k] = tokens(ev)
    # the third needed room: the first (least recently used) went to the host tier, not away
    assert rounds[0].message["offload"] == [0] and rounds[0].message["free"] == []
    assert engine.host == {0: [1] * 30 + outs[1][:-1]} and 0 not in engine.history
    turn = [1] * 30 + outs[1] + [4, 4]
    fed = engine.fed_tokens
    req, ev = submit(sched, turn)
    rounds = drive(sched, engine)
    assert rounds[0].message["restore"] == [(0, 0, 34)]          # taken back whole, under its id
    assert rounds[0].message["offload"] == [1]                   # the second, now LRU, made room
    assert req.cached_tokens == 34 and engine.fed_tokens - fed == 3 + 4    # only the new tokens
    assert tokens(ev) == solo(turn)
    assert set(sched.host) == set(engine.host) == {1}
    value = metrics.registry.get_sample_value
    assert value("cp_megatron_kv_offloads_total") == 2 and value("cp_megatron_kv_restores_total") == 1
    assert value("cp_megatron_host_kv_evictions_total") == 0


def test_a_branch_restores_a_prefix_of_a_host_entry_and_the_entry_stays():
    sched, engine = make(kv_cache_tokens=100, host_kv_cache_slots=1000), FakeEngine()
    doc = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    q1, q2 = doc + [5, 6], doc + [7, 8, 9]
    _, e1 = submit(sched, q1)
    drive(sched, engine)
    submit(sched, [9] * 60)                                      # needs the room: q1 goes to the host
    drive(sched, engine)
    assert set(engine.host) == {0}
    r2, e2 = submit(sched, q2)
    rounds = drive(sched, engine)
    assert rounds[0].message["restore"] == [(0, r2.seq, 40)] and r2.seq != 0 and r2.cached_tokens == 40
    assert tokens(e2) == solo(q2) and 0 in sched.host and 0 in engine.host
    follow = q1 + tokens(e1) + [2]                               # continue the first branch
    r3, e3 = submit(sched, follow)
    rounds = drive(sched, engine)
    assert rounds[0].message["restore"] == [(0, 0, 46)] and r3.cached_tokens == 46
    assert tokens(e3) == solo(follow) and 0 not in engine.host


@pytest.mark.parametrize("shard", [None, 17])
def test_the_host_tier_drops_its_least_recently_used_entries_past_its_budget(shard):
    """Budget in slots per rank; an entry costs the most slots one rank holds (``shard_slots``,
    17 as if two ranks split 34 tokens; default all 34)."""
    cost = shard or 34
    sched = make(kv_cache_tokens=40, host_kv_cache_slots=2 * cost + 2,
                 shard_slots=(lambda seq: shard) if shard else None)
    engine = FakeEngine()
    for k in range(1, 5):                                        # the device holds one idle 34-token sequence
        submit(sched, [k] * 30)
        rounds = drive(sched, engine)
    assert rounds[0].message["offload"] == [2] and rounds[0].message["host_drop"] == [0]   # oldest first
    assert set(sched.host) == set(engine.host) == {1, 2} and sched.host_slots_used == 2 * cost
    sched.reset_prefix_cache()                                   # forgets the host tier too
    rnd = sched.plan()
    assert sorted(rnd.message["host_drop"]) == [1, 2] and rnd.message["free"] == [3]
    engine.run(rnd.message)
    assert engine.host == {} and engine.history == {} and sched.host_slots_used == 0


def test_a_sequence_larger_than_the_host_tier_or_its_oldest_entry_is_freed_not_copied():
    sched, engine = make(kv_cache_tokens=40, host_kv_cache_slots=20), FakeEngine()
    submit(sched, [1] * 30)
    drive(sched, engine)
    submit(sched, [2] * 30)
    rounds = drive(sched, engine)
    assert rounds[0].message["free"] == [0] and rounds[0].message["offload"] == []   # 34 > 20 slots
    # Evicted while older than every host entry: dropped at once, i.e. freed on the device.
    sched, engine = make(kv_cache_tokens=80, host_kv_cache_slots=40), FakeEngine()
    for k in (1, 2, 3):                                          # the first goes to the host tier
        submit(sched, [k] * 30)
        drive(sched, engine)
    branch = [1] * 20 + [7] * 5                                  # a branch of it: the entry is used now
    req, ev = submit(sched, branch)
    rounds = drive(sched, engine)
    m = rounds[0].message
    assert m["restore"] == [(0, req.seq, 20)] and m["free"] == [1] and m["offload"] == m["host_drop"] == []
    assert tokens(ev) == solo(branch) and set(engine.host) == {0}
