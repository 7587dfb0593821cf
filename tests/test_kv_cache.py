"""KV cache reservation: a margin for the turns ahead, fixed-step growth past it, never doubling
(issue #21: a 2,000-token turn after a 1M-token prompt doubled the cache of 405B at CP16).

Oracles: the slot counts the sharding functions give for the same rounds (the cache reserves
what placement puts on the rank), and byte counts from the cache's own shape.
"""

from __future__ import annotations

import pytest
import torch

from cp_megatron.launcher import spawn
from cp_megatron.model.kv_cache import KVCache
from cp_megatron.sharding import decode_owner, kv_growth_slots, kv_slots_per_rank, shard_new_tokens

SLOT_BYTES = 2 * 1 * 1 * 4   # K and V, one layer, one head of DH 1, float32


def _round(cache: KVCache, lengths: list[int], cached: list[int], cp: int, rank: int) -> None:
    shard = shard_new_tokens(lengths, cp, rank, cached, list(range(len(lengths))))
    cache.begin_round(shard.positions, shard.seq_ids)


def _decode(cache: KVCache, step: int, position: int, cp: int, rank: int) -> None:
    if decode_owner(step, 0, cp) == rank:
        cache.begin_round(torch.tensor([position]), torch.tensor([0]))


@pytest.mark.unit
def test_2000_token_turn_after_1m_prompt_at_cp16_adds_nothing_within_the_margin():
    """The paper's run (1M prompt, 64 new tokens, CP16), then a 2,000-token partial prefill: rank 0's
    capacity must not grow (acceptance: at most +5%); the slot counts are the sharding's own."""
    cp, prompt, new, margin = 16, 1_000_000, 64, 8192
    capacity = kv_slots_per_rank(prompt, new, cp, margin)
    assert capacity == 62_500 + 1 + 4 + 1 + 512 + 1
    for rank in (0, 7, 15):
        cache = KVCache(1, 1, 1, dtype=torch.float32, capacity=capacity, growth_slots=kv_growth_slots(16384, cp))
        before = cache.capacity_bytes()
        _round(cache, [prompt], [0], cp, rank)
        for step in range(new):
            _decode(cache, step, prompt + step, cp, rank)
        _round(cache, [2000], [prompt + new], cp, rank)
        assert cache.allocations == 1 and cache.capacity_bytes() == before == capacity * SLOT_BYTES
        assert cache.nbytes() == cache.num_tokens * SLOT_BYTES < cache.capacity_bytes()


@pytest.mark.unit
def test_past_the_margin_the_cache_grows_by_fixed_steps_not_doubling():
    cache = KVCache(1, 1, 1, dtype=torch.float32, capacity=1000, growth_slots=64)
    cache.begin_round(torch.arange(1000), torch.zeros(1000, dtype=torch.long))
    assert cache.allocations == 1 and cache.capacity == 1000
    cache.begin_round(torch.arange(1000, 1001), torch.zeros(1, dtype=torch.long))
    assert cache.capacity == 1024 and cache.allocations == 2        # 1001 rounded up to 16 x 64
    cache.begin_round(torch.arange(1001, 1200), torch.zeros(199, dtype=torch.long))
    assert cache.capacity == 1216 and cache.allocations == 3        # 1200 -> 19 x 64, not 2048
    assert cache.capacity_bytes() == 1216 * SLOT_BYTES and cache.nbytes() == 1200 * SLOT_BYTES
    k, _ = cache.layer(0)
    assert k.shape[0] == 1200                                        # the copies kept every slot


@pytest.mark.unit
def test_growth_keeps_stored_values():
    cache = KVCache(2, 1, 2, dtype=torch.float32, capacity=3, growth_slots=2)
    cache.begin_round(torch.arange(3), torch.zeros(3, dtype=torch.long))
    for layer in range(2):
        cache.store(layer, torch.full((3, 1, 2), float(layer + 1)), torch.full((3, 1, 2), -float(layer + 1)))
    cache.begin_round(torch.arange(3, 5), torch.zeros(2, dtype=torch.long))
    assert cache.capacity == 6
    for layer in range(2):
        k, v = cache.layer(layer, 3)
        assert torch.equal(k, torch.full((3, 1, 2), float(layer + 1)))
        assert torch.equal(v, torch.full((3, 1, 2), -float(layer + 1)))


@pytest.mark.unit
def test_reservation_arguments_are_checked():
    with pytest.raises(ValueError, match="growth_slots"):
        KVCache(1, 1, 1, dtype=torch.float32, growth_slots=0)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(1, 1, 1, dtype=torch.float32, capacity=-1)
    with pytest.raises(ValueError, match="margin"):
        kv_slots_per_rank(10, 1, 2, -1)
    with pytest.raises(ValueError, match="growth_tokens"):
        kv_growth_slots(0, 2)
    assert kv_slots_per_rank(10, 2, 2, 0) == 5 + 1 + 1 + 1
    assert kv_growth_slots(16384, 16) == 1024 and kv_growth_slots(5, 2) == 3


@pytest.mark.unit
def test_margin_and_growth_are_validated_config_fields():
    from cp_megatron.config import ConfigError, load_config

    cfg = load_config(None, [], text="model: {format: dummy, preset: tiny}\n")
    assert cfg.runtime.kv_cache_margin_tokens == 8192 and cfg.runtime.kv_cache_growth_tokens == 16384
    cfg = load_config(None, ["runtime.kv_cache_margin_tokens=0", "runtime.kv_cache_growth_tokens=7"],
                      text="model: {format: dummy, preset: tiny}\n")
    assert (cfg.runtime.kv_cache_margin_tokens, cfg.runtime.kv_cache_growth_tokens) == (0, 7)
    for key, value in (("kv_cache_margin_tokens", -1), ("kv_cache_growth_tokens", 0),
                       ("kv_cache_growth_tokens", "many")):
        with pytest.raises(ConfigError, match=f"runtime.{key}"):
            load_config(None, [f"runtime.{key}={value}"], text="model: {format: dummy, preset: tiny}\n")


def _engine_job(cp: int):
    from cp_megatron import parallel_state
    from cp_megatron.engine import SamplingParams, generate
    from cp_megatron.factory import build_engine
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    topo = parallel_state.initialize(1, cp, 1)
    capacity = kv_slots_per_rank(300, 4, cp, 64)
    engine = build_engine(DummyReader(get_preset("tiny"), seed=1), topo, kv_capacity=capacity,
                          kv_growth_slots=kv_growth_slots(100, cp))
    ids = torch.randint(0, 512, (600,), generator=torch.Generator().manual_seed(2)).tolist()
    _, rounds = generate(engine, {0: ids[:300]}, SamplingParams(max_new_tokens=4))
    _, turn2 = engine.forward({0: ids[300:350]})                     # within the 64-token margin
    _, turn3 = engine.forward({0: ids[350:600]})                     # 250 more: past it
    cache = engine.kv_cache
    return {"capacity": capacity, "slot_bytes": cache.bytes_per_slot, "rounds": [r.to_dict() for r in rounds],
            "turn2": turn2.to_dict(), "turn3": turn3.to_dict(), "final_capacity": cache.capacity,
            "allocations": cache.allocations, "tokens": cache.num_tokens}


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_engine_reports_capacity_and_used_bytes_and_grows_by_steps_cp2():
    results = spawn(_engine_job, 2, (2,), timeout_s=150)
    for rank, r in enumerate(results):
        reserved = r["capacity"] * r["slot_bytes"]
        for m in r["rounds"] + [r["turn2"]]:                         # prompt, decode, turn 2: no growth
            assert m["kv_cache_capacity_bytes"] == reserved, rank
            assert 0 < m["kv_cache_bytes"] <= reserved
        assert r["turn2"]["kv_cache_bytes"] < reserved
        # turn 3 needs more slots than reserved: the cache grows to a multiple of ceil(100 / 2) = 50
        assert r["final_capacity"] % 50 == 0 and r["tokens"] <= r["final_capacity"] < r["tokens"] + 50
        assert r["allocations"] == 2, rank
        assert r["turn3"]["kv_cache_capacity_bytes"] == r["final_capacity"] * r["slot_bytes"]
        assert r["turn3"]["kv_cache_bytes"] == r["tokens"] * r["slot_bytes"]


@pytest.mark.unit
def test_static_step_writes_through_slots_and_the_device_layout_follows_every_change():
    """The static decode step stores rows through a slot tensor (padding rows into the first free
    slot); the device copy of the layout agrees with the host layout after rounds, the step's own
    writes, growth, truncate and fork (oracle: the host layout, slot by slot)."""
    cache = KVCache(1, 1, 2, dtype=torch.float32, capacity=8, growth_slots=4)
    cache.begin_round(torch.arange(3), torch.tensor([0, 0, 1]))
    cache.store(0, torch.ones(3, 1, 2), torch.ones(3, 1, 2))

    def agrees():
        slot_seq, slot_pos = cache.device_layout()
        n = cache.num_tokens
        assert slot_seq.shape[0] == cache.capacity
        assert torch.equal(slot_seq[:n], cache.layout.seq_ids) and torch.equal(slot_pos[:n], cache.layout.positions)

    agrees()
    assert cache.layout.sequence_ids == [0, 1] and cache.tokens_of(0) == 2
    # a static step of 3 rows: one real token of sequence 1 at slot 3, two padding rows at slot 4
    slots = torch.tensor([3, 4, 4])
    cache.begin_round(torch.tensor([1]), torch.tensor([1]), min_capacity=5, slots=slots)
    cache.write_device_layout(slots, torch.tensor([1, -1, -1]), torch.tensor([1, 0, 0]))
    rows = torch.arange(3.0).view(3, 1, 1).expand(3, 1, 2)
    cache.store(0, rows, -rows)
    k, v = cache.layer(0)
    assert cache.num_tokens == 4 and k[3].tolist() == [[0.0, 0.0]] and v[3].tolist() == [[-0.0, -0.0]]
    assert cache.k[0][4].tolist() in ([[1.0, 1.0]], [[2.0, 2.0]])       # the scratch slot: a padding row's
    agrees()
    assert int(cache.device_layout()[0][4]) == -1
    with pytest.raises(ValueError, match="2 rows, the step has 3 slots"):
        cache.store(0, rows[:2], rows[:2])
    cache.begin_round(torch.arange(4, 10), torch.zeros(6, dtype=torch.long))   # grows: 10 -> 12 slots
    assert cache.capacity == 12 and cache.allocations == 2
    agrees()
    cache.truncate(0, 1)                         # sequence 0 keeps position 0 only
    agrees()
    assert cache.device_layout()[0][cache.num_tokens:].eq(-1).all()
    cache.fork(1, 7, 3)
    agrees()
    assert cache.tokens_of(7) == 2 and sorted(cache.layout.sequence_ids) == [0, 1, 7]
    positions, k, v = cache.export_sequence(1)           # the host tier: offload, then restore as 9
    cache.truncate(1, 0)
    agrees()
    cache.import_sequence(9, positions, k, v)
    agrees()
    assert cache.tokens_of(9) == 2 and sorted(cache.layout.sequence_ids) == [0, 7, 9]
    assert cache.capacity_for(cache.capacity) == cache.capacity and cache.capacity_for(13) == 16


@pytest.mark.unit
def test_export_then_import_gives_back_every_slot_of_a_sequence_at_its_positions():
    """The host tier's round trip: a sequence's slots (all layers, K and V) exported, dropped
    (the cache compacts) and imported under another id hold the same values at the same
    positions, and the other sequences are untouched.  Oracle: the values before export."""
    from cp_megatron.model.kv_offload import HostKVStore

    g = torch.Generator().manual_seed(0)
    cache = KVCache(3, 2, 4, dtype=torch.float32, capacity=64)
    seqs = torch.tensor([0, 1, 0, 2, 1, 0, 2, 0])               # interleaved, as rounds leave them
    cache.begin_round(torch.tensor([0, 0, 1, 0, 1, 2, 1, 3]), seqs)
    for layer in range(3):
        cache.store(layer, torch.randn(8, 2, 4, generator=g), torch.randn(8, 2, 4, generator=g))

    def by_position(seq):                                        # {position: (k, v) over layers}
        sel = cache.layout.seq_ids == seq
        pos = cache.layout.positions[sel].tolist()
        k = [cache.layer(i)[0][sel] for i in range(3)]
        v = [cache.layer(i)[1][sel] for i in range(3)]
        return {p: (torch.stack([x[j] for x in k]), torch.stack([x[j] for x in v])) for j, p in enumerate(pos)}

    want, others = by_position(0), (by_position(1), by_position(2))
    store = HostKVStore("cpu")
    positions, k, v = cache.export_sequence(0)
    store.put(0, [positions], k, v, length=4)
    cache.truncate(0, 0)
    assert cache.num_tokens == 4 and cache.tokens_of(0) == 0 and store.nbytes() == 4 * cache.bytes_per_slot
    store.restore(0, cache, 0, 5, length=3)                      # a branch: positions 0..2 as sequence 5
    store.restore(0, cache, 0, 0, length=4)                      # the whole sequence back
    got0, got5 = by_position(0), by_position(5)
    assert sorted(got0) == [0, 1, 2, 3] and sorted(got5) == [0, 1, 2]
    for p in want:
        assert torch.equal(got0[p][0], want[p][0]) and torch.equal(got0[p][1], want[p][1])
        if p < 3:
            assert torch.equal(got5[p][0], want[p][0]) and torch.equal(got5[p][1], want[p][1])
    assert all(torch.equal(a, b) for o, n in zip(others, (by_position(1), by_position(2)))
               for p in o for a, b in zip(o[p], n[p]))
    assert store.restored_bytes == 7 * cache.bytes_per_slot and store.offloaded_bytes == 4 * cache.bytes_per_slot
    assert store.restore_seconds > 0
    with pytest.raises(ValueError, match="import_sequence: expected k and v of shape"):
        cache.import_sequence(9, torch.tensor([0]), k, v)
