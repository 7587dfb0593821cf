"""Ranks never outlive their launcher: SIGTERM / SIGINT to a `cp-megatron run` parent stop
every rank in order (one line, exit 128+signal, temporary folder removed); after SIGKILL
of the parent, which no handler sees, the ranks notice and stop by themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cp_megatron.cli", "run"]
STOP_WITHIN_S = 10.0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _rank_pids(parent: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in children:  # the rank processes, not multiprocessing's resource tracker
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except FileNotFoundError:
            pass
    return pids


@pytest.mark.integration
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_to_the_launcher_mid_prefill_leaves_no_rank_and_no_temp_folder(tmp_path, sig):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cfg = tmp_path / "long.yaml"
    cfg.write_text("model: {format: dummy, preset: tiny-long}\nparallel: {cp: 2}\n"
                   "prompt: {random_tokens: 30000}\ngeneration: {max_new_tokens: 2}\n")
    proc = subprocess.Popen(CLI + [str(cfg)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            cwd=REPO, env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    loaded = threading.Event()

    def drain() -> None:  # keep reading so that no rank blocks on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if "weights loaded" in line:
                loaded.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert loaded.wait(240), "".join(lines)[-3000:]
        time.sleep(1.5)                          # the ranks are in the prefill now
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2, (ranks, "".join(lines)[-2000:])
        assert list(tmp.glob("cp_megatron_ranks_*")), "the job's temporary folder should exist"
        assert proc.poll() is None, "the job ended before the signal; make the prompt longer"
        os.kill(proc.pid, sig)
        start = time.monotonic()
        code = proc.wait(timeout=STOP_WITHIN_S)
        while any(_alive(pid) for pid in ranks) and time.monotonic() - start < STOP_WITHIN_S:
            time.sleep(0.1)
        left = [pid for pid in ranks if _alive(pid)]
        while list(tmp.glob("cp_megatron_ranks_*")) and time.monotonic() - start < STOP_WITHIN_S:
            time.sleep(0.1)
        assert not left, f"ranks still running {time.monotonic() - start:.1f} s after {sig.name}: {left}"
        assert not list(tmp.glob("cp_megatron_ranks_*")), "temporary folder left behind"
    finally:
        for pid in [proc.pid] + _rank_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    reader.join(5)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 128 + sig, "".join(lines)[-2000:]
        text = "".join(lines)
        assert text.count("cp-megatron run:") == 1, text[-2000:]
        assert f"cp-megatron run: stopped by {sig.name}; every rank stopped\n" in text, text[-2000:]
        assert "Traceback" not in text, text[-2000:]


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_to_a_bench_suite_stops_its_concurrent_jobs_and_removes_their_folders(tmp_path, sig):
    """`bench scaling` runs a CP1 and a CP2 job at once (3 ranks, a shared turns folder)."""
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "cp_megatron.cli", "bench", "scaling", "--output-dir", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                            env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 200
        while len(_rank_pids(proc.pid)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(3.0)                              # the ranks are importing, loading or measuring
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 3, (ranks, "".join(lines)[-2000:])
        assert list(tmp.glob("cp_megatron_bench_*")) and list(tmp.glob("cp_megatron_ranks_*"))
        os.kill(proc.pid, sig)
        start = time.monotonic()
        code = proc.wait(timeout=STOP_WITHIN_S)
        while time.monotonic() - start < STOP_WITHIN_S and (
                any(_alive(pid) for pid in ranks) or list(tmp.glob("cp_megatron_*"))):
            time.sleep(0.1)
        assert not [pid for pid in ranks if _alive(pid)], f"ranks still running after {sig.name}"
        assert not list(tmp.glob("cp_megatron_*")), list(tmp.glob("cp_megatron_*"))
    finally:
        for pid in [proc.pid] + _rank_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    reader.join(5)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), "".join(lines)[-2000:]
    assert not (out / "scaling.json").exists()
    if sig == signal.SIGTERM:
        assert "cp-megatron bench: stopped by SIGTERM; every rank stopped\n" in "".join(lines)

