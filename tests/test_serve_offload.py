"""The host tier of the KV cache through ``cp-megatron serve`` at CP2 (tiny dummy model),
and its /metrics.  Oracle: the same greedy request served with no eviction (the prefix
still on the device) and on a cold cache; the byte counts of the tiny model's slots."""

from __future__ import annotations

import pytest
import torch

from serve_helpers import Server

TINY = "model: {format: dummy, preset: tiny}\nparallel: {cp: 2}\nruntime: {timeout_s: 120}\n"
TINY_SLOT = 2 * 2 * 2 * 16 * 4        # K and V x 2 layers x 2 KV heads x head_dim 16 x float32


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.unit
def test_metrics_turn_every_ranks_totals_into_counters():
    from cp_megatron.serve.metrics import ServeMetrics

    m = ServeMetrics()
    m.kv_cache_bytes([(10, 20, 0, 0, 0, 0), (11, 20, 0, 0, 0, 0)])
    m.on_host_tier(offloads=2, restores=0, drops=0)
    m.kv_cache_bytes([(10, 20, 300, 300, 0, 0), (11, 20, 310, 310, 0, 0)])
    m.on_host_tier(offloads=0, restores=1, drops=1)
    m.kv_cache_bytes([(10, 20, 100, 300, 200, 5_000_000), (11, 20, 90, 310, 220, 7_000_000)])
    m.kv_cache_bytes([(10, 20, 100, 300, 200, 5_000_000), (11, 20, 90, 310, 220, 7_000_000)])   # unchanged
    v = m.registry.get_sample_value
    assert v("cp_megatron_kv_offloads_total") == 2 and v("cp_megatron_kv_restores_total") == 1
    assert v("cp_megatron_host_kv_evictions_total") == 1
    assert [v("cp_megatron_host_kv_cache_bytes", {"rank": r}) for r in "01"] == [100, 90]
    assert [v("cp_megatron_kv_offload_bytes_total", {"rank": r}) for r in "01"] == [300, 310]
    assert [v("cp_megatron_kv_restore_bytes_total", {"rank": r}) for r in "01"] == [200, 220]
    assert [v("cp_megatron_kv_restore_seconds_total", {"rank": r}) for r in "01"] == [0.005, 0.007]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sessions_evicted_to_the_host_tier_get_the_tokens_of_no_eviction_cp2(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    # 700 tokens on the device (two 300-token sessions, not three); the host tier holds 1000
    # slots per rank (each session's shard is about 153).
    server = Server(cfg, ["serve.kv_cache_tokens=700", f"serve.host_kv_cache_memory={1000 * TINY_SLOT}",
                          "serve.max_num_seqs=4"])
    try:
        client = server.client()

        def complete(prompt):
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                          extra_body={"return_token_ids": True})
            return r.choices[0].token_ids, r.usage.prompt_tokens_details.cached_tokens

        doc = ids(300, 1)
        q1, q2 = doc + [7], doc + [8, 9]
        t1, _ = complete(q1)
        no_eviction, cached = complete(q2)                       # the doc forked on the device
        assert cached == 300
        assert server.metric("cp_megatron_kv_offloads_total") == 0
        complete(ids(500, 2))                                    # needs the room: both sessions go to the host
        assert server.metric("cp_megatron_kv_offloads_total") == 2
        held = [server.metric("cp_megatron_host_kv_cache_bytes", f'{{rank="{r}"}}') for r in "01"]
        assert sum(held) == (len(q1) + 3 + len(q2) + 3) * TINY_SLOT and min(held) > 0   # each rank its shard
        restored, cached = complete(q2)                          # the same request again: restored
        assert restored == no_eviction and cached == len(q2) - 1
        follow = q1 + t1 + [5]                                   # the first session's next turn: taken back
        warm, cached = complete(follow)
        assert cached == len(q1) + 3
        assert server.metric("cp_megatron_kv_restores_total") == 2
        for r in "01":
            assert server.metric("cp_megatron_kv_restore_bytes_total", f'{{rank="{r}"}}') > 0
            assert server.metric("cp_megatron_kv_restore_seconds_total", f'{{rank="{r}"}}') > 0
        for request, tokens in ((follow, warm), (q2, no_eviction)):
            server.post("/reset_prefix_cache")                   # cold oracle (the host tier is emptied too)
            assert complete(request) == (tokens, 0)
        assert "host tier: offloaded" in "".join(server.lines)
    finally:
        server.kill()
