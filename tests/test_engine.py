"""The engine and the `cp-megatron run` job: multi-turn partial prefill, parallel
invariance of greedy tokens, config errors, and fail-fast when a rank dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cp_megatron import parallel_state
from cp_megatron.checkpoint import open_checkpoint
from cp_megatron.engine import InferenceEngine, SamplingParams, generate
from cp_megatron.launcher import spawn
from process_helpers import alive, rank_pids
from cp_megatron.model.llama import LlamaStage, StageLayout
from cp_megatron.model.weights import load_weights
from cp_megatron.session import next_turn_tokens

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cp_megatron.cli", "run"]
TURNS = ["What is the capital of France?", "And of Italy?", "Which of the two is larger?"]


def three_turns_job(gguf: str, cp: int):
    """3 turns with partial prefill, then a fresh full prefill of the whole conversation."""
    topo = parallel_state.initialize(1, cp, 1)
    reader = open_checkpoint("gguf", gguf)
    tok = reader.tokenizer()
    stage = LlamaStage(reader.config, StageLayout())
    load_weights(stage, reader)
    params = SamplingParams(max_new_tokens=6)
    engine = InferenceEngine(stage, topo)
    messages = [{"role": "user", "content": TURNS[0]}]
    feed = tok.encode(tok.apply_chat_template(messages))
    conversation, turns = [], []
    for i in range(3):
        gens, rounds = generate(engine, {0: feed}, params, eos_ids=tok.eos_ids)
        g = gens[0]
        turns.append({"feed": len(feed), "cached": rounds[0].cached_tokens, "kind": rounds[0].kind,
                      "miss_rate": rounds[0].miss_rate, "tokens": g.token_ids})
        conversation += feed
        if i < 2:
            conversation += g.token_ids[:-1]
            feed, messages = next_turn_tokens(tok, messages, tok.decode(g.token_ids, skip_special_tokens=True),
                                              g, TURNS[i + 1])
    fresh = InferenceEngine(stage, topo)
    fresh_gens, fresh_rounds = generate(fresh, {0: conversation}, params, eos_ids=tok.eos_ids)
    return turns, fresh_gens[0].token_ids, fresh_rounds[0].kind


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_three_turn_session_partial_prefill_matches_fresh_full_prefill(smollm2_gguf):
    turns, fresh_tokens, fresh_kind = spawn(three_turns_job, 2, (str(smollm2_gguf), 2), timeout_s=500)[0]
    assert turns[0]["kind"] == "prefill" and turns[0]["miss_rate"] == 1.0
    for t in turns[1:]:
        assert t["kind"] == "partial-prefill" and t["cached"] > 0
        assert t["miss_rate"] == pytest.approx(t["feed"] / (t["feed"] + t["cached"]))
        assert t["miss_rate"] < 1.0
    assert fresh_kind == "prefill"
    assert turns[2]["tokens"] == fresh_tokens


def _run_cli(args, timeout=120, env=None):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_dummy_model_20k_prompt_same_greedy_tokens_at_cp_1_2_4(tmp_path):
    cfg = tmp_path / "dummy.yaml"
    cfg.write_text("model: {format: dummy, preset: tiny}\nprompt: {random_tokens: 20000}\n"
                   "generation: {max_new_tokens: 4}\n")
    tokens = {}
    for cp in (1, 2, 4):
        out = tmp_path / f"cp{cp}.json"
        proc = _run_cli([str(cfg), "--set", f"parallel.cp={cp}", "--output", str(out)], timeout=400)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(out.read_text())
        assert result["rounds"][0]["new_tokens"] == 20000
        assert result["rounds"][0]["strategy"] == "pass-kv" or cp == 1
        tokens[cp] = result["token_ids"]
    assert len(tokens[1]) == 4
    assert tokens[1] == tokens[2] == tokens[4]


BAD_CONFIGS = {
    "unknown key": (["--set", "model.formt=hf"], "model.formt"),
    "wrong type": (["--set", "parallel.cp=two"], "parallel.cp"),
    "missing checkpoint": (["--set", "model.path=/nonexistent/model.gguf"], "model.path"),
    "unknown hardware profile": (["--set", "attention.hardware=tpu-v9"], "attention.hardware"),
    "prompt too long": (["--set", "prompt.file=null", "--set", "prompt.question=null",
                         "--set", "prompt.random_tokens=9000"], "prompt"),
    "cuda graphs on cpu": (["--set", "runtime.cuda_graphs=true"], "cuda_graphs"),
}


@pytest.mark.integration
@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_exit_2(case):
    args, key = BAD_CONFIGS[case]
    start = time.monotonic()
    proc = _run_cli(["configs/default.yaml"] + args, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cp-megatron:")]
    assert len(lines) == 1 and key in lines[0], proc.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_world_size_mismatch_under_launcher_is_exit_2():
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = _run_cli(["configs/default.yaml"], timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "WORLD_SIZE=3" in proc.stderr and "parallel" in proc.stderr


def _kill_a_rank_once(cfg: Path, ready: str, pause_s: float) -> str:
    """Run ``cfg`` (CP 2), SIGKILL its last rank ``pause_s`` after the first stderr line that
    holds ``ready``; assert that the job exits non-zero and every rank is gone within 60 s.
    Returns the stderr read before the kill."""
    proc = subprocess.Popen(CLI + [str(cfg)], stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline, seen = time.monotonic() + 200, []
    for line in proc.stderr:
        seen.append(line)
        if ready in line or time.monotonic() > deadline:
            break
    time.sleep(pause_s)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2, (ranks, seen)
    os.kill(ranks[-1], signal.SIGKILL)
    start = time.monotonic()
    try:
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code != 0 and time.monotonic() - start < 60
    while any(alive(pid) for pid in ranks) and time.monotonic() - start < 60:
        time.sleep(0.1)   # orphaned ranks are reaped by init once the fork server is gone
    assert not any(alive(pid) for pid in ranks)
    return "".join(seen)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_killing_one_rank_mid_prefill_stops_every_rank(tmp_path):
    cfg = tmp_path / "long.yaml"
    cfg.write_text("model: {format: dummy, preset: tiny-long}\nparallel: {cp: 2}\n"
                   "prompt: {random_tokens: 30000}\ngeneration: {max_new_tokens: 2}\n")
    _kill_a_rank_once(cfg, "weights loaded", 2.0)       # the ranks are in the prefill


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_killing_one_rank_mid_decode_on_shared_memory_stops_every_rank(tmp_path):
    """DeepSpeed's shared-memory all_reduce waits by spinning, with no timeout: a rank whose peer
    died mid-decode cannot notice it.  The launcher must end it (cp_megatron/shm_collectives.py)."""
    cfg = tmp_path / "decode.yaml"
    cfg.write_text("model: {format: dummy, preset: tiny}\nparallel: {cp: 2}\n"
                   "prompt: {random_tokens: 64}\ngeneration: {max_new_tokens: 100000}\n")
    seen = _kill_a_rank_once(cfg, "prefill:", 1.0)      # the prefill's status line: decoding now
    assert "shared memory" in seen, seen


def truncate_job(cp: int):
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    topo = parallel_state.initialize(1, cp, 1)
    reader = DummyReader(get_preset("tiny"), seed=3)
    stage = LlamaStage(reader.config, StageLayout())
    load_weights(stage, reader)
    engine = InferenceEngine(stage, topo)
    ids = torch.randint(0, 512, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.forward({0: ids[:300], 1: ids[:50]})
    held = engine.kv_cache.num_tokens
    first, _ = engine.forward({0: ids[300:340]}, all_logits=True)
    engine.truncate(0, 300)                     # roll the partial prefill back
    assert engine.kv_cache.num_tokens == held and engine.cached_lengths[0] == 300
    again, metrics = engine.forward({0: ids[300:340]}, all_logits=True)
    assert metrics.cached_tokens == 300
    engine.truncate(0, 300)
    engine.fork(0, 7, 250)                      # branch: a copy of the first 250 tokens
    assert engine.cached_lengths[7] == 250 and engine.cached_lengths[0] == 300
    branch, _ = engine.forward({7: ids[250:340]}, all_logits=True)
    engine.truncate(1, 0)                       # forget sequence 1 entirely
    assert 1 not in engine.cached_lengths and engine.kv_cache.tokens_of(1) == 0
    return first, again, branch[50:]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_truncate_rolls_back_a_round_exactly_and_fork_branches_cp2():
    first, again, branch = spawn(truncate_job, 2, (2,), timeout_s=200)[0]
    assert torch.equal(first, again)
    torch.testing.assert_close(branch, first, rtol=1e-5, atol=1e-5)   # the fork continues like the original


@pytest.mark.unit
def test_heuristic_hardware_from_profile_file_with_overrides(tmp_path):
    from cp_megatron.config import ConfigError, load_config
    from cp_megatron.hardware import get_profile
    from cp_megatron.preflight import heuristic_hardware

    profile = {**get_profile("cpu-gloo").to_dict(), "name": "mine", "attn_flops_per_s": 7e10}
    (tmp_path / "hw.json").write_text(json.dumps({"profile": profile}))
    base = "model: {format: dummy, preset: tiny}\nprompt: {random_tokens: 10}\n"
    path = tmp_path / "run.yaml"
    path.write_text(base + "attention: {hardware: hw.json}\n")  # relative to the config
    hw = heuristic_hardware(load_config(str(path)))
    assert (hw.name, hw.attn_flops_per_s) == ("mine", 7e10)
    hw = heuristic_hardware(load_config(str(path), ["attention.bandwidth_bytes_per_s=5e9"]))
    assert (hw.attn_flops_per_s, hw.cp_bandwidth_bytes_per_s) == (7e10, 5e9)
    # No hardware key: the device's default profile under the overrides, or None (engine default).
    path.write_text(base + "attention: {attn_flops_per_s: 1e9}\n")
    hw = heuristic_hardware(load_config(str(path)))
    assert (hw.name, hw.attn_flops_per_s) == ("cpu-gloo", 1e9)
    path.write_text(base)
    assert heuristic_hardware(load_config(str(path))) is None
    (tmp_path / "hw.json").write_text("{}")
    path.write_text(base + "attention: {hardware: hw.json}\n")
    with pytest.raises(ConfigError, match="attention.hardware.*missing fields"):
        heuristic_hardware(load_config(str(path)))


def decode_variants_job(cp: int, strategy: str, static_decode: bool = True):
    """A batch of 3 sequences of a dummy model: prefill, 10 decode steps (batch 3 then 2), the
    greedy tokens and each round's variant (``static_decode``: the engine's static decode step
    for all-gather-Q and CP 1, else planned round by round)."""
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    topo = parallel_state.initialize(1, cp, 1)
    reader = DummyReader(get_preset("tiny"), seed=5)
    stage = LlamaStage(reader.config, StageLayout())
    load_weights(stage, reader)
    engine = InferenceEngine(stage, topo, strategy=strategy, kv_capacity=256, static_decode=static_decode)
    prompts = {0: list(range(3, 90)), 1: list(range(40, 61)), 2: [7, 8, 9]}
    gens, rounds = generate(engine, prompts, SamplingParams(max_new_tokens=6))
    more, more_rounds = generate(engine, {0: [gens[0].pending], 2: [gens[2].pending]}, SamplingParams(max_new_tokens=5))
    return ({s: g.token_ids for s, g in gens.items()}, {s: g.token_ids for s, g in more.items()},
            [m.strategy for m in rounds + more_rounds if m.kind == "decode"])


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_decode_variants_give_the_same_greedy_tokens_as_cp1_at_cp_2_3():
    """all-gather-Q (auto and forced; the static decode step, and planned round by round),
    replicated-Q (forced, planned round by round: the rule offers it only there, and on CPU its
    shared-memory-bandwidth cost rules it out) and
    ring pass-Q (Alg. 4) against CP 1 (the static step); CP 1 planned round by round too."""
    want = spawn(decode_variants_job, 1, (1, "auto"), timeout_s=200)[0]
    for cp, strategy, variant, static in ((1, "auto", "pass-q", False), (2, "auto", "all-gather-q", True),
                                          (3, "all-gather-q", "all-gather-q", True), (3, "pass-q", "pass-q", True),
                                          (2, "all-gather-q", "all-gather-q", False),
                                          (2, "replicated-q", "replicated-q", False), (3, "replicated-q", "replicated-q", False)):
        got = spawn(decode_variants_job, cp, (cp, strategy, static), timeout_s=200)[0]
        assert got[0] == want[0] and got[1] == want[1], (cp, strategy, got[:2], want[:2])
        assert set(got[2]) == {variant}, (cp, strategy, got[2])
