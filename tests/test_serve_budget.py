"""The server's KV budget in bytes per rank (``serve.kv_cache_memory``) or tokens
(``serve.kv_cache_tokens``).  Oracles: the slot size computed by hand from the model
(2 x layers x NKV/tp x DH x e), the engine's own KVCache.bytes_per_slot, and the server's
/metrics and 400 answers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cp_megatron.config import ConfigError, load_config
from cp_megatron.model.config import get_preset
from cp_megatron.serve.budget import DEFAULT_KV_CACHE_TOKENS, bytes_per_slot, kv_budget

from serve_helpers import REPO, Server

TINY = "model: {format: dummy, preset: tiny}\nparallel: {cp: 2}\nruntime: {timeout_s: 120}\n"
TINY_SLOT = 2 * 2 * 2 * 16 * 4        # K and V x 2 layers x 2 KV heads x head_dim 16 x float32


def config(tmp_path, text=TINY, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, list(overrides))


@pytest.mark.unit
def test_bytes_per_rank_become_tokens_of_the_cp_group(tmp_path):
    from cp_megatron.model.kv_cache import KVCache
    import torch

    tiny = get_preset("tiny")
    assert bytes_per_slot(tiny, "float32", 1, 1) == TINY_SLOT
    assert KVCache(2, 2, 16, dtype=torch.float32).bytes_per_slot == TINY_SLOT        # the engine agrees
    assert bytes_per_slot(tiny, "bfloat16", 2, 2) == 2 * 1 * 1 * 16 * 2              # TP halves heads, PP layers
    cfg = config(tmp_path, overrides=[f"serve.kv_cache_memory={TINY_SLOT * 1128}", "serve.max_num_seqs=64"])
    b = kv_budget(cfg, tiny)
    assert (b.slots_per_rank, b.tokens, b.bytes_per_rank) == (1128, 2 * (1128 - 128), TINY_SLOT * 1128)
    assert "kv_cache_memory" in b.source
    b4 = kv_budget(config(tmp_path, overrides=[f"serve.kv_cache_memory={TINY_SLOT * 1128}", "parallel.cp=4"]), tiny)
    assert b4.tokens == 2 * b.tokens                                                # CP multiplies capacity
    tokens = kv_budget(config(tmp_path, overrides=["serve.kv_cache_tokens=5000"]), tiny)
    assert tokens.tokens == 5000 and tokens.slots_per_rank == 2500 + 128
    assert kv_budget(config(tmp_path), tiny).tokens == DEFAULT_KV_CACHE_TOKENS


@pytest.mark.unit
def test_a_fraction_is_of_host_memory_per_rank_on_cpu(tmp_path):
    import os

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    b = kv_budget(config(tmp_path, overrides=["serve.kv_cache_memory=0.01"]), get_preset("tiny"))
    assert b.slots_per_rank == int(0.01 * host // 2) // TINY_SLOT                  # 2 ranks share the host
    assert "host memory" in b.source


@pytest.mark.unit
def test_both_budgets_or_a_budget_below_the_minimum_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="kv_cache_memory.*kv_cache_tokens, not both"):
        config(tmp_path, overrides=["serve.kv_cache_memory=1000000", "serve.kv_cache_tokens=100"])
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        config(tmp_path, overrides=["serve.kv_cache_memory=1234.5"])
    with pytest.raises(ConfigError, match=r"hold 100 KV slots.*minimum is 129 slots"):
        kv_budget(config(tmp_path, overrides=[f"serve.kv_cache_memory={TINY_SLOT * 100}"]), get_preset("tiny"))


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bad_budgets_exit_2_with_one_line_before_any_rank(tmp_path):
    # Both forms; a device budget below the model's minimum; a host tier that holds no slot.
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    cases = [(["serve.kv_cache_memory=0.1", "serve.kv_cache_tokens=1000"], "not both"),
             ([f"serve.kv_cache_memory={TINY_SLOT * 100}"], "minimum is 129 slots"),
             ([f"serve.host_kv_cache_memory={TINY_SLOT - 1}"], "serve.host_kv_cache_memory")]
    for overrides, expected in cases:
        sets = [arg for o in overrides for arg in ("--set", o)]
        proc = subprocess.run([sys.executable, "-m", "cp_megatron.cli", "serve", str(cfg), "--port", "0", *sets],
                              capture_output=True, text=True, timeout=100, cwd=REPO)
        assert proc.returncode == 2, (overrides, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("cp-megatron:")]
        assert len(lines) == 1 and expected in lines[0], (overrides, proc.stderr[-2000:])
        assert "weights" not in proc.stderr and "rank" not in proc.stderr.replace(lines[0], ""), proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_server_reserves_the_byte_budget_reports_it_and_refuses_what_exceeds_it(tmp_path):
    import openai

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    server = Server(cfg, [f"serve.kv_cache_memory={TINY_SLOT * 1128}"])
    try:
        log = "".join(server.lines)
        assert "KV budget: serve.kv_cache_memory" in log and "2000 tokens for the CP group" in log
        for r in (0, 1):
            assert server.metric("cp_megatron_kv_cache_capacity_bytes", f'{{rank="{r}"}}') == TINY_SLOT * 1128
        client = server.client()
        with pytest.raises(openai.BadRequestError, match="KV budget of 2000 tokens.*kv_cache_memory"):
            client.completions.create(model="tiny", prompt=[1] * 1500, max_tokens=600)
        r = client.completions.create(model="tiny", prompt=[1] * 1500, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
    finally:
        server.kill()


@pytest.mark.unit
def test_host_tier_budget_in_slots_per_rank_and_its_errors_name_the_field(tmp_path):
    import os

    tiny = get_preset("tiny")
    b = kv_budget(config(tmp_path, overrides=[f"serve.host_kv_cache_memory={TINY_SLOT * 500 + 7}"]), tiny)
    assert (b.host_slots_per_rank, b.host_bytes_per_rank) == (500, 500 * TINY_SLOT)
    assert b.host_source == f"serve.host_kv_cache_memory = {TINY_SLOT * 500 + 7} bytes per rank"
    assert b.tokens == DEFAULT_KV_CACHE_TOKENS                                     # the device budget as before
    for off in ([], ["serve.host_kv_cache_memory=0"], ["serve.host_kv_cache_memory=null"]):
        assert kv_budget(config(tmp_path, overrides=off), tiny).host_slots_per_rank == 0
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    frac = kv_budget(config(tmp_path, overrides=["serve.host_kv_cache_memory=0.01"]), tiny)
    assert frac.host_slots_per_rank == int(0.01 * host // 2) // TINY_SLOT          # 2 ranks share the host
    with pytest.raises(ConfigError, match=rf"^serve.host_kv_cache_memory: {TINY_SLOT - 1} bytes per rank hold "
                                          rf"no KV slot.*at least {TINY_SLOT} bytes"):
        kv_budget(config(tmp_path, overrides=[f"serve.host_kv_cache_memory={TINY_SLOT - 1}"]), tiny)
    for bad, why in (("1234.5", "expected bytes"), ("-1", "greater than or equal to 0"), ("lots", "number")):
        with pytest.raises(ConfigError, match=f"host_kv_cache_memory.*{why}"):
            config(tmp_path, overrides=[f"serve.host_kv_cache_memory={bad}"])
    with pytest.raises(ConfigError, match="host_kv_cache_memory.*prefix_caching"):
        config(tmp_path, overrides=["serve.host_kv_cache_memory=100000", "serve.prefix_caching=false"])
