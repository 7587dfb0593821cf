"""Start N ranks on one machine, the way torchrun would, and fail fast.

Used by ``cp-megatron run`` when it is not already under a launcher, and by the
multi-process tests.  Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT, joins torch.distributed (gloo on CPU), runs ``fn(*args)`` and sends back
its return value.  If any rank raises or dies, every other rank is killed at once and
:class:`RankFailure` carries the failing rank's traceback; if the whole job outlives
``timeout_s``, every rank is killed and :class:`RankFailure` says so.  Nothing is left
running either way:

* under :func:`stop_on_signals` (the CLI), SIGTERM / SIGINT / SIGHUP to the launcher
  raise :class:`Interrupted`; :func:`spawn` then stops its ranks and removes its
  temporary folder before the exception leaves it (what Slurm's cancel or Ctrl-C expect);
* a rank whose launcher disappears without a word (SIGKILL, a crash) notices within a
  fraction of a second -- Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) and a
  watchdog thread on the launcher's pid as the portable fallback -- removes the job's
  temporary folders and exits.

Ranks are forked from a fork server (``multiprocessing``'s "forkserver" start method) that
imported torch, megatron-core and the engine once (:data:`PRELOAD`), not started as fresh
interpreters that each import them again (~5 s of CPU per rank): a CP4 job starts its ranks
~15 CPU-seconds sooner, and a process that launches many jobs (the test suite, a benchmark)
pays the import once.  The server is a clean single-threaded process that has run no torch
op and touched no CUDA device, so forking it is as safe as spawning (it is what
multiprocessing offers instead of fork for threaded parents).  Its children would inherit
the server's environment, working directory and ``sys.path`` as they were when it started,
so each rank is handed the launcher's current environment and directory, and the job's
function and arguments are unpickled only after they are applied (``sys.path`` is the
server's: the launcher's when its first job started).

Source: torch.distributed.run (torchrun) environment contract.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
from multiprocessing import forkserver
import os
import pickle
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1          # <linux/prctl.h>
_ORPHAN_SIGNAL = signal.SIGUSR1  # what the kernel sends a rank when its launcher dies
_WATCHDOG_S = 0.2              # how often a rank checks that its launcher is alive
# Imported once by the fork server that ranks are forked from (module doc); none of them
# touches CUDA at import.  The last one freezes the collector's view of the others (gc.freeze).
PRELOAD = ("torch", "torch.distributed", "cp_megatron.factory", "cp_megatron.fork_server_freeze")


class RankFailure(RuntimeError):
    """A rank raised, died, or the job timed out.  ``rank`` is the first failing rank."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class Interrupted(BaseException):
    """The launcher got SIGTERM, SIGINT or SIGHUP; ``exit_code`` is 128 + the signal number.

    A BaseException (like KeyboardInterrupt) so that ``except Exception`` blocks let it pass.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopRequest:
    """The first stop signal received under :func:`stop_on_signals` (seen by every thread)."""

    def __init__(self) -> None:
        self.event, self.signum = threading.Event(), 0

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted(self.signum)


_STOP = _StopRequest()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGINT / SIGHUP into :class:`Interrupted` for the body.

    The main thread gets the exception at once; :func:`spawn` running in any thread sees
    the request within its polling interval, stops its ranks, removes its temporary
    folder and raises :class:`Interrupted` too.  A second signal while stopping is only
    recorded.  Outside the main thread this is a no-op (Python delivers signals there only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame) -> None:
        first = not _STOP.event.is_set()
        if first:
            _STOP.signum = signum
            _STOP.event.set()
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP.event.clear()


def arm_parent_death_signal(signum: int) -> None:
    """Have Linux send ``signum`` to this process when the thread that started it ends
    (``prctl(PR_SET_PDEATHSIG)``); nothing where there is no prctl (not Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _die_with_launcher(launcher_pid: int, folders: Sequence[str]) -> None:
    """In a rank: when the launcher process goes away, remove ``folders`` and exit.

    The kernel's parent-death signal (Linux) and a watchdog thread polling the launcher's pid
    (everywhere) both lead here; either is enough.  SIGINT is ignored: a Ctrl-C reaches
    the whole process group, and the launcher stops the ranks in order.
    """
    def orphaned() -> None:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        os._exit(1)

    parent = os.getppid()   # the launcher, or the fork server it started (it exits with it)

    def on_signal(_signum, _frame) -> None:
        if os.getppid() != parent or not _alive(launcher_pid):
            orphaned()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(_ORPHAN_SIGNAL, on_signal)
    arm_parent_death_signal(_ORPHAN_SIGNAL)   # not Linux: the watchdog below does the job

    def watchdog() -> None:
        while os.getppid() == parent and _alive(launcher_pid):
            time.sleep(_WATCHDOG_S)
        orphaned()

    if not _alive(launcher_pid):  # the launcher died before the signal was armed
        orphaned()
    threading.Thread(target=watchdog, name="launcher-watchdog", daemon=True).start()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def under_launcher() -> bool:
    """True when torchrun / the deepspeed launcher started this process (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start_fork_server() -> None:
    """Start the fork server that :func:`spawn` forks ranks from, now, without waiting for it.

    It imports :data:`PRELOAD` (torch, megatron-core, the engine: several seconds) in its own
    process, so a launcher that calls this before its pre-flight (GGUF header, tokenizer)
    has both done at once on two cores; :func:`spawn` then finds it running.  Without the
    call, :func:`spawn` starts it itself.  Idempotent; a server that starts for a job whose
    pre-flight then fails exits when this process does (after its imports).

    Source: ``multiprocessing.forkserver.ensure_running`` (starts the server, does not wait
    for its preload).
    """
    mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    forkserver.ensure_running()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_cores(local_rank: int, local_world_size: int, threads: int) -> list[int] | None:
    """Pin this process (all its threads) to ``threads`` CPU cores of its own.

    Local rank r takes cores ``[r * threads, (r + 1) * threads)`` of the cores this
    process may run on (``os.sched_getaffinity``, which honours taskset, numactl and
    cgroup cpusets), as DeepSpeed's ``--bind_cores_to_rank`` and Intel's launchers do.
    Without it the kernel moves ranks between cores and at times runs two ranks of a ring
    on one core while another idles; each ring exchange then waits for a time slice.  On
    the default job (CP 2 on a 2-core machine) that alone made decode ~1.5x slower.

    Args:
        local_rank, local_world_size: this process's place among the ranks of this machine
            (LOCAL_RANK / LOCAL_WORLD_SIZE under torchrun).
        threads: torch threads per rank (cores per rank).

    Returns:
        the cores bound, or None when there are fewer available cores than
        ``local_world_size * threads`` (then nothing is changed: ranks share cores, and a
        process that was already given a narrower set by its launcher keeps it).
    """
    available = sorted(os.sched_getaffinity(0))
    if local_world_size * threads > len(available) or not 0 <= local_rank < local_world_size:
        return None
    cores = available[local_rank * threads:(local_rank + 1) * threads]
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass
    return cores


def _rank_main(rank: int, world_size: int, port: int, result_dir: str, threads: int,
               backend: str | None, timeout_s: float, launcher_pid: int, orphan_folders: Sequence[str],
               launcher_state: tuple[dict, str], job: bytes) -> None:
    """One rank: take the launcher's environment and working directory (the fork server's
    are those of its start), then unpickle and run the job ``(fn, args)``."""
    _die_with_launcher(launcher_pid, (result_dir, *orphan_folders))
    env, cwd = launcher_state
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(result_dir) / f"rank{rank}.pkl"
    try:
        os.chdir(cwd)
        fn, args = pickle.loads(job)
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
    try:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f)
        os.replace(tmp, out)
    except OSError:  # the launcher is gone and its folder with it
        os._exit(1)
    if payload[0] == "error":
        os._exit(1)  # do not wait on collectives the failed rank will never join
    try:
        from cp_megatron import parallel_state

        parallel_state.destroy()
    finally:
        os._exit(0)


def spawn(fn: Callable, world_size: int, args: Sequence = (), *, timeout_s: float = 300.0,
          threads_per_rank: int = 1, backend: str | None = "gloo",
          orphan_folders: Sequence[str] = (), forward_signals: bool = False,
          grace_s: float = 0.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes; return their results by rank.

    Args:
        fn: a picklable (module-level) function; runs after torch.distributed is up
            (unless ``backend`` is None).
        world_size: number of ranks (>= 1).
        timeout_s: the whole job's limit in seconds; also the collective timeout.
        threads_per_rank: ``torch.set_num_threads`` in each rank.
        backend: "gloo", "nccl", or None to leave torch.distributed alone.
        orphan_folders: further folders of this job that a rank removes when the
            launcher dies without cleaning up (its own result folder always is).
        forward_signals: pass SIGTERM / SIGINT received here on to every rank (as torchrun
            does; a server's ranks drain) and keep waiting for them, instead of stopping
            them at once.  SIGHUP still stops them.
        grace_s: after a rank fails, give the others this long to exit on their own
            (e.g. to answer clients) before terminating them.

    Returns:
        ``[fn's return value on rank 0, ..., on rank N-1]``.

    Raises:
        RankFailure: a rank raised or died (message: its traceback or exit code), or the
            job timed out.  All ranks are terminated before it is raised.
        Interrupted: a stop signal arrived (see :func:`stop_on_signals`); all ranks are
            terminated and the temporary folder removed before it is raised.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))      # takes effect when the server first starts
    forkserver.ensure_running()      # its imports happen now, before this job owns a folder
    job = pickle.dumps((fn, tuple(args)))
    state = (dict(os.environ), os.getcwd())
    port = free_port()
    result_dir, procs, previous = None, [], {}
    try:
        # The folder exists only once ``result_dir`` names it: a stop signal is held until then.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            result_dir = tempfile.mkdtemp(prefix="cp_megatron_ranks_")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(r, world_size, port, result_dir, threads_per_rank, backend,
                                   timeout_s, os.getpid(), tuple(orphan_folders), state, job))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        if forward_signals and threading.current_thread() is threading.main_thread():
            def forward(signum, _frame) -> None:
                for p in procs:
                    if p.pid is not None and p.exitcode is None:
                        os.kill(p.pid, signum)
            previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        deadline = time.monotonic() + timeout_s
        while True:
            _STOP.check()
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
        return [pickle.loads((Path(result_dir) / f"rank{r}.pkl").read_bytes())[1]
                for r in range(world_size)]
    finally:
        # A stop signal now waits until the ranks are gone and the folder removed (blocked
        # first: a signal arriving while the handlers are restored must not skip the cleanup).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _stop_ranks(procs)
            if result_dir is not None:
                shutil.rmtree(result_dir, ignore_errors=True)
            _remove_shm_segments(port)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


SHM_NAME = "deepspeed_allreduce_buffer"  # DeepSpeed shm.cpp's SHM_BUFFER_NAME (cp_megatron.shm_collectives)


def segment_path(addr: str, port, rank) -> str:
    """The /dev/shm file of ``rank``'s shared-memory collective segment in the job at
    ``addr:port`` (shm.cpp's name: ``SHM_BUFFER_NAME_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    return os.path.join("/dev/shm", f"{SHM_NAME}_{os.getuid()}_{addr}_{port}_{rank}")


def stale_segments(addr: str, port: int) -> list[str]:
    """Paths of a job's shared-memory collective segments still in /dev/shm (a rank killed
    between creating and unlinking its segment; :mod:`cp_megatron.shm_collectives`)."""
    prefix = os.path.basename(segment_path(addr, port, ""))
    try:
        return [os.path.join("/dev/shm", n) for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:
        return []


def _remove_shm_segments(port: int) -> None:
    """Remove what a rank killed mid-setup left of the job's shared-memory collectives (the
    ranks unlink their segments themselves)."""
    for path in stale_segments("127.0.0.1", port):
        try:
            os.unlink(path)
        except OSError:
            pass


def _stop_ranks(procs) -> None:
    """SIGTERM every rank still running, SIGKILL what is left after 5 s; reap them all."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
