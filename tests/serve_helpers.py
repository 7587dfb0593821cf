"""A real ``cp-megatron serve`` process on 127.0.0.1 for the server tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from cp_megatron.launcher import free_port
from process_helpers import rank_pids

REPO = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "cp_megatron.cli", "serve"]


class Server:
    """Starts the server (its stderr collected in :attr:`lines`) and waits until it listens."""

    def __init__(self, config: Path, overrides=(), start_timeout_s: float = 240.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [str(config), "--host", "127.0.0.1", "--port", str(self.port)]
        for o in overrides:
            args += ["--set", o]
        self.proc = subprocess.Popen(SERVE + args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, cwd=REPO)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(start_timeout_s) or self.proc.poll() is not None:
            self.kill()
            raise AssertionError("server did not start:\n" + "".join(self.lines[-40:]))
        self.rank_pids = rank_pids(self.proc.pid)
        self.rank0_pid = int(re.search(r"rank 0 pid (\d+)", "".join(self.lines)).group(1))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "[serve]" in line and " on http://" in line:
                self._ready.set()
        self._ready.set()

    def client(self, timeout: float = 60.0):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", timeout=timeout, max_retries=0)

    def post(self, path: str, timeout: float = 60.0, **kw) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=timeout, **kw)

    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=timeout)

    def metric(self, name: str, labels: str = "") -> float:
        """A sample of ``GET /metrics``, e.g. ``metric("cp_megatron_kv_cache_bytes", '{rank="0"}')``."""
        for line in self.get("/metrics").text.splitlines():
            if not line.startswith("#") and line.rsplit(" ", 1)[0] == name + labels:
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name + labels)

    def log_since(self, mark: int) -> str:
        return "".join(self.lines[mark:])

    def alive_ranks(self) -> list[int]:
        alive = []
        for pid in self.rank_pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        return alive

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        for pid in self.alive_ranks() if hasattr(self, "rank_pids") else []:
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` s pass (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
