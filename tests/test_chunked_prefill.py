"""Chunked prefill: a prompt fed in chunks (each after the first a partial prefill on the
sharded KV) gives the tokens of one unchunked prefill.  Oracle: the unchunked greedy run
of the same engine; equality across CP sizes 1, 2, 4 and chunk sizes that do and do not
divide the prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cp_megatron import parallel_state
from cp_megatron.engine import InferenceEngine, SamplingParams, generate, prefill_chunks
from cp_megatron.launcher import spawn
from cp_megatron.model.llama import LlamaStage, StageLayout
from cp_megatron.model.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN = 203                    # prime: no chunk size below divides it
CHUNKS = (None, 64, 100, 29, 202)   # None = unchunked; 202 leaves a 1-token last chunk


@pytest.mark.unit
def test_prefill_chunks_cover_the_prompt_in_order():
    assert prefill_chunks(10, None) == [(0, 10)] and prefill_chunks(10, 10) == [(0, 10)]
    assert prefill_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_chunks(0, 4) == [(0, 0)]
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        prefill_chunks(10, -1)


def chunked_job(cp: int):
    import torch

    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    topo = parallel_state.initialize(1, cp, 1)
    reader = DummyReader(get_preset("tiny"), seed=5)
    stage = LlamaStage(reader.config, StageLayout())
    load_weights(stage, reader)
    prompt = torch.randint(0, reader.config.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    out = {}
    for chunk in CHUNKS:
        engine = InferenceEngine(stage, topo)
        gens, rounds = generate(engine, {0: prompt}, params, prefill_chunk_tokens=chunk)
        g = gens[0]
        prefill = rounds[:g.prefill_rounds]
        out[chunk] = (g.token_ids, [(r.kind, r.new_tokens, r.cached_tokens, r.strategy) for r in prefill])
    return out


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_chunked_prefill_gives_the_unchunked_greedy_tokens_at_cp_1_2_4():
    results = {cp: spawn(chunked_job, cp, (cp,), timeout_s=400)[0] for cp in (1, 2, 4)}
    reference = results[1][None][0]
    assert len(reference) == 6
    for cp, out in results.items():
        for chunk, (tokens, prefill) in out.items():
            assert tokens == reference, (cp, chunk)
            spans = prefill_chunks(PROMPT_LEN, chunk)
            assert [t for _, t, _, _ in prefill] == [b - a for a, b in spans]   # one round per chunk
            assert [p for _, _, p, _ in prefill] == [a for a, _ in spans]        # each on the earlier ones
            assert prefill[0][0] == "prefill"
            assert all(kind != "prefill" for kind, _, _, _ in prefill[1:])      # partial prefills (or a 1-token decode)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_run_records_each_chunk_round_in_its_json(tmp_path):
    cfg = tmp_path / "dummy.yaml"
    cfg.write_text("model: {format: dummy, preset: tiny}\nprompt: {random_tokens: 500}\n"
                   "generation: {max_new_tokens: 3}\nparallel: {cp: 2}\n")
    outs = {}
    for chunk in ("null", "128"):
        out = tmp_path / f"chunk{chunk}.json"
        proc = subprocess.run([sys.executable, "-m", "cp_megatron.cli", "run", str(cfg), "--set",
                               f"generation.prefill_chunk_tokens={chunk}", "--output", str(out)],
                              capture_output=True, text=True, timeout=240, cwd=REPO, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[chunk] = json.loads(out.read_text())
    chunked = outs["128"]
    assert chunked["token_ids"] == outs["null"]["token_ids"]
    records = [r for r in chunked["rounds"] if "prefill_chunk" in r]
    assert [r["prefill_chunk"] for r in records] == [0, 1, 2, 3]
    assert [r["new_tokens"] for r in records] == [128, 128, 128, 116]
    assert [r["cached_tokens"] for r in records] == [0, 128, 256, 384]
    assert chunked["turns"][0]["prefill_chunks"] == 4 and outs["null"]["turns"][0]["prefill_chunks"] == 1
    assert "prefill_chunk" not in outs["null"]["rounds"][0]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_run_refuses_a_chunk_size_below_one():
    proc = subprocess.run([sys.executable, "-m", "cp_megatron.cli", "run", "configs/default.yaml", "--set",
                           "generation.prefill_chunk_tokens=0"], capture_output=True, text=True, timeout=100,
                          cwd=REPO)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "generation.prefill_chunk_tokens" in errors[0]
