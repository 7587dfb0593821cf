"""The default config under torchrun and the deepspeed launcher gives the tokens of the
embedded launch; every shipped config validates."""

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
SHORT = ["--set", "generation.max_new_tokens=8"]


def _tokens(cmd, out: Path) -> list[int]:
    proc = subprocess.run(cmd + ["--output", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=500, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["token_ids"]


@pytest.fixture(scope="module")
def embedded_tokens(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "r.json"
    return _tokens([sys.executable, "-m", "cp_megatron.cli", "run", "configs/default.yaml"] + SHORT, out)


@pytest.mark.timeout(600)
def test_torchrun_default_config_matches_embedded_launch(tmp_path, embedded_tokens):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "cp_megatron.cli", "run", "configs/default.yaml"] + SHORT
    assert _tokens(cmd, tmp_path / "r.json") == embedded_tokens
    assert len(embedded_tokens) == 8


@pytest.mark.timeout(600)
def test_deepspeed_default_config_matches_embedded_launch(tmp_path, embedded_tokens):
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    assert deepspeed, "the deepspeed launcher is a test dependency (pip install -e '.[test]')"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", "29531", "--module", "cp_megatron.cli", "run",
           "configs/default.yaml"] + SHORT
    assert _tokens(cmd, tmp_path / "r.json") == embedded_tokens


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_config(str(REPO / "configs" / name))
    assert cfg.parallel.world_size >= 1
