"""Finding a launcher's rank processes (cp_megatron.launcher forks them from a
multiprocessing fork server, its child) and telling whether a process still runs."""

from __future__ import annotations

import subprocess
from pathlib import Path


def children(pid: int) -> list[int]:
    return [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def fork_servers(launcher: int) -> list[int]:
    """The launcher's fork server (the ranks' parent)."""
    return [c for c in children(launcher) if b"forkserver" in cmdline(c)]


def rank_pids(launcher: int) -> list[int]:
    """The rank processes of ``launcher``: its fork server's children (multiprocessing's
    resource tracker, the launcher's other child, is not one)."""
    return [rank for server in fork_servers(launcher) for rank in children(server)]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
