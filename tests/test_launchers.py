"""The default config: the right answer as shipped; then, on a shorter real document (the
same model and settings, so each launch costs seconds, not a 4K-token prefill), the same greedy
tokens at CP 1, 2 and 4 and under torchrun and the deepspeed launcher as with the embedded
launch; every shipped config validates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cp_megatron.config import load_config

REPO = Path(__file__).resolve().parents[1]
# The default config on the BSD licence (~400 tokens, a real text) with 12 new tokens: the
# launch paths are compared on it; the shipped 4K-token job runs once (its answer).
SHORT = ["--set", "prompt.file=/usr/share/common-licenses/BSD",
         "--set", "prompt.question=May the name of the University be used to endorse products?",
         "--set", "generation.max_new_tokens=12"]
RUN = [sys.executable, "-m", "cp_megatron.cli", "run", "configs/default.yaml"]
# The document states once that "Yoyodyne, Inc." disclaims copyright in Gnomovision.
ANSWER = "Yoyodyne"


def _result(cmd, out: Path) -> dict:
    proc = subprocess.run(cmd + ["--output", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=500, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _tokens(cmd, out: Path) -> list[int]:
    return _result(cmd, out)["token_ids"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_default_config_as_shipped_answers(tmp_path):
    result = _result(RUN, tmp_path / "r.json")
    assert ANSWER in result["text"], result["text"]
    first = result["rounds"][0]
    assert first["strategy"] == "pass-kv" and first["miss_rate"] == 1.0 and first["ttft_s"] > 0


@pytest.fixture(scope="module")
def embedded_tokens(tmp_path_factory):
    result = _result(RUN + SHORT, tmp_path_factory.mktemp("embedded") / "r.json")
    assert result["turns"][0]["fed_tokens"] > 300 and len(result["token_ids"]) == 12, result
    return result["token_ids"]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_same_tokens_at_cp_1_and_4_as_at_cp_2(tmp_path, embedded_tokens):
    for cp in (1, 4):
        assert _tokens(RUN + SHORT + ["--set", f"parallel.cp={cp}"], tmp_path / f"cp{cp}.json") == \
            embedded_tokens, f"cp={cp}"


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_torchrun_default_config_matches_embedded_launch(tmp_path, embedded_tokens):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] + RUN[1:] + SHORT
    assert _tokens(cmd, tmp_path / "r.json") == embedded_tokens


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_deepspeed_default_config_matches_embedded_launch(tmp_path, embedded_tokens):
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert deepspeed, "the deepspeed launcher is a test dependency (pip install -e '.[test]')"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", "29531", "--module", "cp_megatron.cli", "run",
           "configs/default.yaml"] + SHORT
    assert _tokens(cmd, tmp_path / "r.json") == embedded_tokens


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_config(str(REPO / "configs" / name))
    assert cfg.parallel.world_size >= 1
