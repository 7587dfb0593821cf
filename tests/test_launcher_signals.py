"""Ranks never outlive their launcher: SIGTERM / SIGINT to a `cp-megatron run` parent stop
every rank in order (one line, exit 128+signal, temporary folder removed); after SIGKILL
of the parent, which no handler sees, the ranks notice and stop by themselves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from process_helpers import alive as _alive, fork_servers as _fork_servers, rank_pids as _rank_pids

REPO = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 10.0   # on an idle machine; stretched by the load (stop_window_s)
MAX_STRETCH = 6.0      # at most 60 s, well inside the tests' timeouts


def stop_window_s() -> float:
    """STOP_WITHIN_S times how oversubscribed the machine is (1-minute load average per core, at
    least 1): on the loaded 2-core CI box the ranks' exit and the launcher's clean-up get the CPU
    time an idle machine gives them in 10 s; on an idle machine the bound is the same 10 s; never
    more than MAX_STRETCH times it."""
    return STOP_WITHIN_S * min(MAX_STRETCH, max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1)))


class _Job:
    """A ``cp-megatron`` command started with its own TMPDIR; stderr drained into ``lines``
    (so that no rank blocks on a full pipe); every process of it killed at exit."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.proc = subprocess.Popen([sys.executable, "-m", "cp_megatron.cli", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                                     env={**os.environ, "TMPDIR": str(self.tmp), "OMP_NUM_THREADS": "1"})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def text(self) -> str:
        return "".join(self.lines)

    def temp_folders(self) -> list[Path]:
        return list(self.tmp.glob("cp_megatron_*"))

    def signal_and_wait(self, sig: signal.Signals, ranks: list[int]) -> int:
        """Send ``sig`` to the launcher; assert that within stop_window_s() it has exited, no
        rank runs and no temporary folder is left; return its exit code."""
        window = stop_window_s()
        os.kill(self.proc.pid, sig)
        start = time.monotonic()
        code = self.proc.wait(timeout=window)
        while time.monotonic() - start < window and (
                any(_alive(pid) for pid in ranks) or self.temp_folders()):
            time.sleep(0.1)
        left = [pid for pid in ranks if _alive(pid)]
        assert not left, (f"ranks still running {time.monotonic() - start:.1f} s after {sig.name} "
                          f"(window {window:.0f} s): {left}")
        assert not self.temp_folders(), (f"left behind {time.monotonic() - start:.1f} s after {sig.name} "
                                         f"(window {window:.0f} s): {self.temp_folders()}")
        return code

    def __enter__(self) -> "_Job":
        return self

    def __exit__(self, *exc) -> None:
        for pid in [self.proc.pid] + _fork_servers(self.proc.pid) + _rank_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.reader.join(5)


def _wait_for(condition, timeout_s: float, job: _Job) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline and job.proc.poll() is None, job.text()[-3000:]
        time.sleep(0.2)


@pytest.mark.integration
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_to_the_launcher_mid_prefill_leaves_no_rank_and_no_temp_folder(tmp_path, sig):
    cfg = tmp_path / "long.yaml"
    cfg.write_text("model: {format: dummy, preset: tiny-long}\nparallel: {cp: 2}\n"
                   "prompt: {random_tokens: 30000}\ngeneration: {max_new_tokens: 2}\n")
    with _Job(["run", str(cfg)], tmp_path) as job:
        _wait_for(lambda: "weights loaded" in job.text(), 240, job)
        time.sleep(1.5)                          # the ranks are in the prefill now
        ranks = _rank_pids(job.proc.pid)
        assert len(ranks) == 2 and job.temp_folders(), (ranks, job.text()[-2000:])
        code = job.signal_and_wait(sig, ranks)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        text = job.text()
        assert code == 128 + sig, text[-2000:]
        assert text.count("cp-megatron run:") == 1, text[-2000:]
        assert f"cp-megatron run: stopped by {sig.name}; every rank stopped\n" in text, text[-2000:]
        assert "Traceback" not in text, text[-2000:]


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_to_a_bench_suite_stops_its_concurrent_jobs_and_removes_their_folders(tmp_path, sig):
    """`bench scaling` runs a CP1 and a CP2 job at once (3 ranks, a shared turns folder)."""
    out = tmp_path / "out"
    with _Job(["bench", "scaling", "--output-dir", str(out)], tmp_path) as job:
        _wait_for(lambda: len(_rank_pids(job.proc.pid)) == 3, 200, job)
        time.sleep(3.0)                          # the ranks are importing, loading or measuring
        ranks = _rank_pids(job.proc.pid)
        assert len(ranks) == 3, (ranks, job.text()[-2000:])
        folders = [p.name for p in job.temp_folders()]
        for prefix in ("cp_megatron_bench_", "cp_megatron_ranks_"):  # the turns folder, a job's results
            assert any(name.startswith(prefix) for name in folders), folders
        code = job.signal_and_wait(sig, ranks)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), job.text()[-2000:]
    assert not (out / "scaling.json").exists()
    if sig == signal.SIGTERM:
        assert "cp-megatron bench: stopped by SIGTERM; every rank stopped\n" in job.text()


_BIND = """
import json, os, threading
from cp_megatron.launcher import bind_cores
before = sorted(os.sched_getaffinity(0))
ready, done = threading.Event(), threading.Event()
worker = threading.Thread(target=lambda: (ready.set(), done.wait()))
worker.start(); ready.wait()                   # a thread that exists before binding
too_many = bind_cores(0, len(before) + 1, 1)    # more ranks than cores: nothing changes
unchanged = sorted(os.sched_getaffinity(0))
last = bind_cores(len(before) - 1, len(before), 1)
print(json.dumps([before, too_many, unchanged, last, sorted(os.sched_getaffinity(0)),
                  sorted(os.sched_getaffinity(worker.native_id))]))
done.set()
"""


@pytest.mark.integration
def test_bind_cores_pins_every_thread_of_a_rank_to_its_own_cores():
    proc = subprocess.run([sys.executable, "-c", _BIND], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    before, too_many, unchanged, last, after, worker = json.loads(proc.stdout)
    assert too_many is None and unchanged == before
    assert last == [before[-1]] and after == [before[-1]] and worker == [before[-1]]
