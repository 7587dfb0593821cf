"""Decode's CP collectives on one CPU machine through shared memory, not gloo.

On CPU, gloo's cost per collective is its thread hand-offs, not its bytes: for the few KB of
a decode layer's all_gather and all_to_all, the rank that arrives last waits ~300 us per
call (two ranks on cores of their own), where the data would cross shared memory in ~10 us.
A decode step makes two such calls per layer (all-gather-Q, docs/design.md §8), which on the
default job is most of what CP 2 adds to CP 1's TTIT.  DeepSpeed ships the shared-memory
all_reduce that its CPU inference uses for exactly this (``deepspeed.ops.op_builder.cpu.
ShareMemCommBuilder``: ``inference_all_reduce_``, a sum over every rank of the job in a
shared-memory segment, JIT-compiled once into ``~/.cache/torch_extensions``).  This module
expresses the two collectives as that sum:

* **all_gather** of ``x`` ``[M, ...]`` from N ranks: a zeroed ``[N, M, ...]`` buffer, rank r
  writes its ``x`` into row r, one all_reduce.  Adding zeros is exact in floating point, so
  the result is bit-identical to gloo's gather (a -0.0 becomes +0.0).
* **all_to_all** of ``x`` ``[N * M, ...]`` (block j for rank j): a zeroed ``[N, N * M, ...]``
  buffer, rank r writes ``x`` into row r, one all_reduce, rank r keeps column block r.

It is used only where it is safe and a gain, decided once per job on every rank together
(:func:`setup`): device CPU, the CP group is the whole job (tp = pp = 1), every rank on this
machine (``LOCAL_WORLD_SIZE == WORLD_SIZE``) and bound to cores of its own
(:func:`cp_megatron.launcher.bind_cores`; the kernel waits by spinning, which must not take
a core from the rank it waits for), ``runtime.shm_collectives: true`` (the default), and the
op compiled and loaded on every rank.  Anything else, and every CUDA, fake (dry-run) or
TP/PP job, keeps torch.distributed unchanged.  Float32 goes as is; bfloat16 / float16 too
where the CPU has the AVX-512 kernel, else through float32 (exact both ways).

The segment of each rank (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
66 MiB) is unlinked as soon as every rank has mapped them all; DeepSpeed itself never does.

Source: DeepSpeed ``csrc/cpu/comm/shm.cpp`` (``symmetric_naive_all_reduce``) and
``deepspeed.comm.torch.TorchBackend.inference_all_reduce``; measured figures in
docs/performance.md §6.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

from cp_megatron.launcher import SHM_NAME, arm_parent_death_signal, segment_path, stale_segments  # noqa: F401  (SHM_NAME, stale_segments: for callers and tests)
_GROUP = None                             # the CP group whose collectives go through shared memory
_RANK, _SIZE = 0, 1                       # this rank's place in it
# One decode-sized call (a few KB), median on the rank that arrives last, 2 ranks on cores of
# their own: all_gather 31 us, all_to_all 67 us, against gloo's 464 / 244 us in the same run
# (`python -m benchmarks.cpu_collectives`, docs/bench/cpu_collectives.json).  The heuristic's
# collective latency g where shared memory carries the decode collectives.
LATENCY_S = 50e-6
_LEVEL = 0                                # the kernel's vector level: 1 = AVX2 (fp32), 2 = AVX-512 (+bf16/fp16)


def _builder():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")   # else DeepSpeed logs that it guessed CPU
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    return ShareMemCommBuilder()


def _build_dir() -> str:
    """Where the op is compiled to: ``TORCH_EXTENSIONS_DIR`` or the default cache."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory("deepspeed_shm_comm", verbose=False)


_SO = "deepspeed_shm_comm.so"
# shm.cpp's struct allreduce_workspace, one per rank in /dev/shm: 2 x 1 MiB small-message and
# 2 x 32 MiB large-message buffers, and the states (rounded up to a page)
SEGMENT_BYTES = 2 * 2**20 + 2 * 32 * 2**20 + 4096
BUILD_TIMEOUT_S = 600.0                   # the longest a rank waits for the op's compile or its lock


def is_built() -> bool:
    """Whether the op is compiled already (in ``TORCH_EXTENSIONS_DIR`` or the default cache)
    and its library is a whole ELF file (not one a killed linker left half-written)."""
    return _elf_complete(os.path.join(_build_dir(), _SO))


def _elf_complete(path: str) -> bool:
    """Whether ``path`` is an ELF file that holds its whole section-header table (which the
    linker writes last, at the end): loading a truncated library dies of SIGBUS, which no
    ``except`` catches.  Source: the ELF-64 header (e_shoff at 0x28, e_shentsize / e_shnum
    at 0x3A / 0x3C)."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(64), os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] not in (1, 2):
        return False
    order = "little" if head[5] == 1 else "big"
    shoff = int.from_bytes(head[0x28:0x30], order)
    shentsize, shnum = int.from_bytes(head[0x3A:0x3C], order), int.from_bytes(head[0x3C:0x3E], order)
    return 0 < shoff and shoff + shentsize * shnum <= size


@contextlib.contextmanager
def _build_lock(timeout_s: float):
    """Hold ``<build dir>/cp_megatron.lock`` (``flock``: the kernel releases it when its holder
    dies, where torch's own ``lock`` file outlives a killed build and makes every later build
    wait forever).  Under it, a torch ``lock`` file is a dead build's: removed, as is a
    half-written library.

    Raises:
        TimeoutError: another process held the lock for ``timeout_s`` seconds.
    """
    folder = _build_dir()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "cp_megatron.lock"), "w") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{folder}: another build held the lock for {timeout_s:.0f} s") from None
                time.sleep(0.1)
        for stale in ("lock",) + (() if _elf_complete(os.path.join(folder, _SO)) else (_SO,)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, stale))
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_in_child(timeout_s: float) -> None:
    """Compile the op in a child process of its own session (``python -m
    cp_megatron.shm_collectives``), on every core, and wait for it.  The child and its compilers
    die with this process (the child's parent-death signal ends its session).

    Raises:
        RuntimeError: the build failed (its last line of output in the message).
        TimeoutError: it did not end within ``timeout_s`` seconds.
    """
    proc = subprocess.Popen([sys.executable, "-m", "cp_megatron.shm_collectives"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the op's build took more than {timeout_s:.0f} s") from None
    finally:
        if proc.poll() is None:
            _kill_session(proc.pid)
            proc.wait()
    if proc.returncode != 0:
        lines = [line for line in out.splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"the build exited with {proc.returncode}")


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (the build child and its compilers: ninja
    gives each compile a process group of its own, so a group kill misses them)."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                session = int(f.read().rsplit(")", 1)[1].split()[3])    # state ppid pgrp session
            if session == sid:
                os.kill(int(name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):                     # ended meanwhile
            pass
    if os.getsid(0) == sid:
        os.kill(me, signal.SIGKILL)


def _build_child_main() -> None:
    """The child of :func:`_build_in_child`: dies, with its compilers, when its parent does;
    compiles under the build lock on every core this machine allows."""
    def end_session(_signum, _frame):
        _kill_session(os.getsid(0))

    signal.signal(signal.SIGTERM, end_session)
    arm_parent_death_signal(signal.SIGTERM)
    if os.getppid() == 1:                                   # the parent died before the prctl
        end_session(None, None)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    with _build_lock(BUILD_TIMEOUT_S):
        _builder().load(verbose=False)


def load(say: Callable[[str], None] = lambda _line: None):
    """Compile (first use only, ~25 s on 2 cores) and load DeepSpeed's shared-memory op; None if it
    cannot be built or loaded here (no compiler, not Linux, a build that timed out).  ``say``
    gets one line before a compile.  The compile runs in a child process
    (:func:`_build_in_child`), so that a killed rank leaves no compiler running and a broken
    library cannot kill the rank."""
    bound = os.sched_getaffinity(0)
    try:
        if not is_built():
            say("compiling DeepSpeed's shared-memory all_reduce for the CPU collectives "
                f"(first run only, ~25 s on 2 cores; cached in {_build_dir()})")
            _build_in_child(BUILD_TIMEOUT_S)
        # the rank is bound to one core by now: a stale build that ninja redoes here gets every
        # core (46 s bound to one core, 23 s on both, on a 2-core box)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        with _build_lock(BUILD_TIMEOUT_S):
            return _builder().load(verbose=False)
    except Exception as exc:  # noqa: BLE001  (a missing compiler raises anything from ninja to OSError)
        say(f"shared-memory collectives unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "gloo carries them")
        return None
    finally:
        os.sched_setaffinity(0, bound)


def setup(enabled: bool, cp_group, *, device: str, bound: bool,
          say: Callable[[str], None] = lambda _line: None) -> bool:
    """Decide, on every rank together, whether ``cp_group``'s decode collectives use shared
    memory (module doc for the conditions), and if so open the segments.  Call once per job,
    after the process groups exist; it makes two gloo all_reduces (the decision; every segment
    mapped and whole).

    Args:
        enabled: ``runtime.shm_collectives``.
        cp_group: this rank's CP group.
        device: ``runtime.device``; bound: this rank is pinned to cores of its own.
        say: status lines (rank 0's).

    Returns:
        True when :func:`all_gather_single` / :func:`all_to_all_single` now use shared memory.
    """
    global _GROUP, _LEVEL, _RANK, _SIZE
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return False
    world = dist.get_world_size()
    if world < 2 or cp_group is None or dist.get_world_size(cp_group) != world:
        return False
    local = os.environ.get("LOCAL_WORLD_SIZE") == str(world)
    module = None
    if enabled and device == "cpu" and bound and local:
        free = _shm_free_bytes()
        if free < world * SEGMENT_BYTES:   # shm.cpp maps a short segment and writes past its end
            say(f"shared-memory collectives unavailable (/dev/shm has {free / 2**20:.0f} MiB free, "
                f"{world} ranks need {world * SEGMENT_BYTES / 2**20:.0f} MiB); gloo carries them")
        else:
            module = load(say)
    if not _all_ranks(module is not None):        # one decision for all: a split one would hang
        return False
    os.environ["LOCAL_SIZE"] = str(world)          # what shm_interface.cpp checks
    module.initialize(world, dist.get_rank())      # creates this rank's segment, maps the others'
    path = segment_path(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), dist.get_rank())
    try:                                           # shm.cpp takes a short write for a whole one
        whole = os.stat(path).st_size >= SEGMENT_BYTES - 4096
    except OSError:
        whole = False
    mapped = _all_ranks(whole)                     # also: every rank has mapped every segment
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)                            # the mappings stay; nothing is left behind
    if not mapped:
        say("shared-memory collectives unavailable (a segment in /dev/shm came out short); gloo carries them")
        return False
    _watch_signals()
    _GROUP, _LEVEL = cp_group, int(module.vector_kernel_level())
    _RANK, _SIZE = dist.get_rank(cp_group), world
    say(f"decode's CP collectives: shared memory (DeepSpeed's CPU all_reduce), not gloo ({world} ranks)")
    return True


def _all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (one gloo all_reduce MIN)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(int(t))


def _shm_free_bytes() -> int:
    """Bytes free in /dev/shm (0 when it cannot be read)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def active(group=None) -> bool:
    """Whether ``group``'s (any group's, for None) decode collectives go through shared memory."""
    return _GROUP is not None and (group is None or group is _GROUP)


def _sum_(buf: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) ``buf`` in place over every rank; returns the summed tensor (``buf``
    itself, or a new tensor of buf's dtype when the kernel needs float32)."""
    global _IN_KERNEL
    wide = buf if buf.dtype == torch.float32 or _LEVEL >= 2 else buf.float()
    _IN_KERNEL = True
    torch.ops.deepspeed.inference_all_reduce_(wide)
    _IN_KERNEL = False
    return buf if wide is buf else wide.to(buf.dtype)


_IN_KERNEL = False                        # the main thread is inside the spinning kernel


def _watch_signals() -> None:
    """Exit at once on a signal that arrives while the main thread spins in the kernel.

    The kernel waits for its peers by spinning in C++ (with the GIL released), so a Python
    signal handler (:func:`cp_megatron.launcher.stop_on_signals`, under torchrun) cannot run
    until every peer arrives; a peer that died never does, and torchrun's SIGTERM would wait
    for its SIGKILL 30 s later.  Python's C-level handler writes each signal's number to the
    wakeup fd at once; a thread reads it and, if the main thread is still in the kernel a
    moment later, ends the process with 128 + the signal (as the signal itself would).
    Elsewhere the Python handler runs as before.  Main thread only (``set_wakeup_fd``)."""
    import threading

    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:                    # not the main thread: nothing to watch from here
        os.close(r)
        os.close(w)
        return

    def watch() -> None:
        while True:
            data = os.read(r, 64)
            if not data:
                return
            time.sleep(0.2)               # the handler's chance, if the main thread is free
            if _IN_KERNEL:
                os._exit(128 + data[-1])

    threading.Thread(target=watch, name="shm-signal-watch", daemon=True).start()


def _uses_shm(group, t: torch.Tensor) -> bool:
    return group is not None and group is _GROUP and t.dtype in (torch.float32, torch.bfloat16, torch.float16)


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``torch.distributed.all_gather_single(out, inp, group)``: ``out`` ``[N * M, ...]``
    receives every rank's ``inp`` ``[M, ...]`` in rank order; through shared memory where
    :func:`setup` enabled it (module doc), else gloo / NCCL."""
    if not _uses_shm(group, inp):
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
        gather(out, inp, group=group)
        return
    buf = out.view(_SIZE, -1)
    buf.zero_()
    buf[_RANK].copy_(inp.reshape(-1))
    summed = _sum_(buf)
    if summed is not buf:
        buf.copy_(summed)


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """``torch.distributed.all_to_all_single(out, inp, group)`` with equal splits: block j
    of ``inp`` ``[N * M, ...]`` goes to rank j, ``out`` gets block r of every rank in rank
    order; through shared memory where :func:`setup` enabled it (module doc)."""
    if not _uses_shm(group, inp):
        dist.all_to_all_single(out, inp, group=group)
        return
    n, r = _SIZE, _RANK
    buf = inp.new_zeros((n, n, inp.numel() // n))                # [src, dst, block]
    buf[r].copy_(inp.reshape(n, -1))
    summed = _sum_(buf)
    out.view(n, -1).copy_(summed[:, r])


if __name__ == "__main__":      # the op's build, in a process of its own (_build_in_child)
    _build_child_main()
