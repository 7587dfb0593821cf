"""Bad inputs found before any rank starts (one line naming the key, exit code 2), a stop
signal turned into an orderly exit code, the CP-rank that disagrees named in the
attention's mismatch message, and pre-flight's imports (no megatron-core before the ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cp_megatron import parallel_state
from cp_megatron.attention import context_parallel_attention
from cp_megatron.cli import main
from cp_megatron.config import ConfigError, load_config
from cp_megatron.launcher import Interrupted, spawn, stop_on_signals

DUMMY = "model: {format: dummy, preset: tiny}\nprompt: {random_tokens: 8}\ngeneration: {max_new_tokens: 1}\n"


def _run(capsys, *args) -> tuple[int, list[str]]:
    code = main(["run", *args])
    err = capsys.readouterr().err.splitlines()
    return code, [line for line in err if line.strip() and not line.startswith("[cp-megatron] ")]  # not status


@pytest.mark.unit
@pytest.mark.parametrize("override, key", [
    ("prompt.text=", "prompt.text"),  # the shell's --set prompt.text="" 
    ("prompt.turns=[]", "prompt.turns"),
    ("prompt.messages=[]", "prompt.messages"),
    ("parallel.cp=true", "parallel.cp"),
    ("parallel.tp=false", "parallel.tp"),
    ("generation.max_new_tokens=true", "generation.max_new_tokens"),
    ("runtime.seed=true", "runtime.seed"),
    ("runtime.timeout_s=true", "runtime.timeout_s"),
])
def test_empty_prompts_and_booleans_for_numbers_are_one_line_exit_2(tmp_path, capsys, override, key):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(DUMMY)
    unset = ["--set", "prompt.random_tokens=null"] if override.startswith("prompt.") else []
    code, lines = _run(capsys, str(cfg), *unset, "--set", override)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"cp-megatron: config error: {key}:"), lines


@pytest.mark.unit
def test_integers_stay_integers_and_ints_fill_float_fields():
    cfg = load_config(None, ["parallel.cp=2", "runtime.timeout_s=30"], text=DUMMY)
    assert cfg.parallel.cp == 2 and cfg.runtime.timeout_s == 30.0
    with pytest.raises(ConfigError, match="parallel.cp"):
        load_config(None, ["parallel.cp=2.0"], text=DUMMY)


@pytest.mark.unit
def test_cuda_device_without_cuda_is_one_line_exit_2_before_any_rank(tmp_path, capsys, monkeypatch):
    import cp_megatron.launcher

    cfg = tmp_path / "run.yaml"
    cfg.write_text(DUMMY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # as a CPU build of torch says
    monkeypatch.setattr(cp_megatron.launcher, "spawn", lambda *a, **k: pytest.fail("ranks started without CUDA"))
    code, lines = _run(capsys, str(cfg), "--set", "runtime.device=cuda")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("cp-megatron: config error: runtime.device: cuda, but this "
                                                   "torch build has no CUDA device"), lines


@pytest.mark.unit
@pytest.mark.parametrize("target", ["dir", "file-as-folder"])
def test_unwritable_output_is_exit_2_before_any_rank(tmp_path, capsys, monkeypatch, target):
    import cp_megatron.cli.run as run_module

    cfg = tmp_path / "run.yaml"
    cfg.write_text(DUMMY)
    out = tmp_path if target == "dir" else cfg / "result.json"
    monkeypatch.setattr(run_module, "run", lambda cfg: pytest.fail("a job started despite a bad --output"))
    code, lines = _run(capsys, str(cfg), "--output", str(out))
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"cp-megatron: --output {out}:"), lines


@pytest.mark.unit
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signal_becomes_interrupted_with_exit_code_128_plus_signal(sig):
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as info:
        with stop_on_signals():
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert info.value.exit_code == 128 + sig and str(info.value) == f"stopped by {sig.name}"
    assert signal.getsignal(sig) is before


def _dtype_mismatch(odd_rank: int) -> str:
    parallel_state.initialize(tp=1, cp=3)
    rank = parallel_state.topology().cp_rank
    dtype = torch.bfloat16 if rank == odd_rank else torch.float32
    q, k = torch.randn(4, 4, 8, dtype=dtype), torch.randn(4, 2, 8, dtype=dtype)
    pos = torch.arange(4) + 4 * rank
    try:
        context_parallel_attention(q, k, k, pos, pos)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("odd_rank", [0, 2])
def test_dtype_mismatch_names_the_rank_that_differs(odd_rank):
    messages = spawn(_dtype_mismatch, 3, (odd_rank,), timeout_s=100)
    for message in messages:  # the same message on every rank, naming the odd one
        assert f"CP rank(s) [{odd_rank}] differ from the others" in message, message
    assert len(set(messages)) == 1


# What ``cp-megatron run`` / ``serve`` do in the launching process before any rank starts.
_PREFLIGHT_IMPORTS = textwrap.dedent("""
    import sys
    from cp_megatron.cli import build_parser
    from cp_megatron.config import load_config
    from cp_megatron.preflight import prepare
    import cp_megatron.checkpoint.gguf_reader, cp_megatron.checkpoint.gguf_vocab, cp_megatron.job, cp_megatron.serve
    build_parser()
    text = sys.argv[1] + "attention: {attn_flops_per_s: 1.0e+11}\\n"   # the default-profile path too
    prep = prepare(load_config(None, text=text))
    assert prep.hardware.name == "cpu-gloo" and prep.hardware.attn_flops_per_s == 1e11, prep.hardware
    print(sorted(m for m in sys.modules if m.partition(".")[0] == "megatron"))
""")


@pytest.mark.integration  # a fresh interpreter: this process has imported megatron-core long ago
@pytest.mark.timeout(120)
def test_command_line_and_preflight_import_no_megatron_core():
    # megatron-core takes ~4-5 s to import; the ranks need it, the launching process must not pay it too
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _PREFLIGHT_IMPORTS, DUMMY], capture_output=True, text=True,
                          timeout=100, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
