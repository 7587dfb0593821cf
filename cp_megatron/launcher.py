"""Start N ranks on one machine, the way torchrun would, and fail fast.

Used by ``cp-megatron run`` when it is not already under a launcher, and by the
multi-process tests.  Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT, joins torch.distributed (gloo on CPU), runs ``fn(*args)`` and sends back
its return value.  If any rank raises or dies, every other rank is killed at once and
:class:`RankFailure` carries the failing rank's traceback; if the whole job outlives
``timeout_s``, every rank is killed and :class:`RankFailure` says so.  Nothing is left
running either way.

Source: torch.distributed.run (torchrun) environment contract.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence


class RankFailure(RuntimeError):
    """A rank raised, died, or the job timed out.  ``rank`` is the first failing rank."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def cli_job(job: Callable[[], Any]) -> tuple[int, Any]:
    """Run a CLI job (pre-flight, then ranks) and map its failures to exit codes, each with
    one line on stderr: ``(2, None)`` for a :class:`~cp_megatron.config.ConfigError`,
    ``(1, None)`` for a :class:`RankFailure`, else ``(0, job's result)``."""
    import sys

    from cp_megatron.config import ConfigError

    try:
        return 0, job()
    except ConfigError as exc:
        print(f"cp-megatron: config error: {exc}", file=sys.stderr)
        return 2, None
    except RankFailure as exc:
        print(f"cp-megatron: {str(exc).rstrip()}", file=sys.stderr)
        return 1, None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, result_dir: str, threads: int,
               backend: str | None, timeout_s: float, fn: Callable, args: Sequence) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(result_dir) / f"rank{rank}.pkl"
    try:
        import threading

        import torch
        from tqdm import tqdm

        torch.set_num_threads(threads)
        # A rank leaves with os._exit; tqdm's default multiprocessing lock would then be
        # reported as a leaked semaphore. One process, one thread-level lock is enough.
        tqdm.set_lock(threading.RLock())
        from cp_megatron import parallel_state

        if backend is not None:
            parallel_state.init_distributed(backend, timeout_s)
        result = fn(*args)
        payload = ("ok", result)
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(payload, f)
    os.replace(tmp, out)
    if payload[0] == "error":
        os._exit(1)  # do not wait on collectives the failed rank will never join
    try:
        from cp_megatron import parallel_state

        parallel_state.destroy()
    finally:
        os._exit(0)


def spawn(fn: Callable, world_size: int, args: Sequence = (), *, timeout_s: float = 300.0,
          threads_per_rank: int = 1, backend: str | None = "gloo", forward_signals: bool = False,
          grace_s: float = 0.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes; return their results by rank.

    Args:
        fn: a picklable (module-level) function; runs after torch.distributed is up
            (unless ``backend`` is None).
        world_size: number of ranks (>= 1).
        timeout_s: the whole job's limit in seconds; also the collective timeout.
        threads_per_rank: ``torch.set_num_threads`` in each rank.
        backend: "gloo", "nccl", or None to leave torch.distributed alone.
        forward_signals: pass SIGTERM / SIGINT received here on to every rank (as torchrun
            does) and keep waiting for them, instead of dying at once.
        grace_s: after a rank fails, give the others this long to exit on their own
            (e.g. to answer clients) before terminating them.

    Returns:
        ``[fn's return value on rank 0, ..., on rank N-1]``.

    Raises:
        RankFailure: a rank raised or died (message: its traceback or exit code), or the
            job timed out.  All ranks are terminated before it is raised.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cp_megatron_ranks_") as result_dir:
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(r, world_size, port, result_dir, threads_per_rank, backend,
                                   timeout_s, fn, tuple(args)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        previous = {}
        if forward_signals and threading.current_thread() is threading.main_thread():
            def forward(signum, _frame):
                for p in procs:
                    if p.pid is not None and p.exitcode is None:
                        os.kill(p.pid, signum)
            previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                codes = [p.exitcode for p in procs]
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    rank = failed[0]
                    grace_end = time.monotonic() + grace_s
                    while any(p.exitcode is None for p in procs) and time.monotonic() < grace_end:
                        time.sleep(0.05)
                    path = Path(result_dir) / f"rank{rank}.pkl"
                    if path.exists():
                        message = pickle.loads(path.read_bytes())[1]
                    else:
                        message = f"rank {rank} died with exit code {codes[rank]}"
                    raise RankFailure(f"rank {rank} failed: {message}", rank)
                if all(c == 0 for c in codes):
                    break
                if time.monotonic() > deadline:
                    raise RankFailure(f"timed out after {timeout_s:.0f} s; ranks still running: "
                                      f"{[r for r, c in enumerate(codes) if c is None]}")
                time.sleep(0.05)
            results = []
            for r in range(world_size):
                status, value = pickle.loads((Path(result_dir) / f"rank{r}.pkl").read_bytes())
                results.append(value)
            return results
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
