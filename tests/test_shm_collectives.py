"""Decode's CP collectives through shared memory (cp_megatron.shm_collectives): bit-identical to
torch.distributed's gloo collectives, enabled only where every rank agrees it is safe, and no
segment left in /dev/shm."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

from cp_megatron import shm_collectives
from cp_megatron.launcher import _remove_shm_segments, bind_cores, spawn


def _compare(bound_ranks: tuple[int, ...]) -> dict:
    """On each rank: setup (bound as told), then every collective both ways, per dtype."""
    n, r = dist.get_world_size(), dist.get_rank()
    bound = r in bound_ranks and bind_cores(r, n, 1) is not None
    group = dist.new_group(list(range(n)))
    enabled = shm_collectives.setup(True, group, device="cpu", bound=bound)
    out = {"enabled": enabled, "left": shm_collectives.stale_segments(os.environ["MASTER_ADDR"],
                                                                      int(os.environ["MASTER_PORT"]))}
    if not enabled:
        return out
    gen = torch.Generator().manual_seed(r)
    for dtype in (torch.float32, torch.bfloat16):
        q = (torch.randn(3, 9, 64, generator=gen) * 4).to(dtype)             # [q_len, NH, DH]
        q[0, 0, 0] = float("-inf") if r == 0 else float("inf")              # infinities pass unchanged
        partials = torch.randn(n * 3, 9, 65, generator=gen).to(dtype)        # [N * q_len, NH, DH + 1]
        partials[:, :, -1] = float("-inf")
        ref_g, got_g = torch.empty(n * 3, 9, 64, dtype=dtype), torch.empty(n * 3, 9, 64, dtype=dtype)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(ref_g, q, group=group)
        shm_collectives.all_gather_single(got_g, q, group)
        ref_a, got_a = torch.empty_like(partials), torch.empty_like(partials)
        dist.all_to_all_single(ref_a, partials, group=group)
        shm_collectives.all_to_all_single(got_a, partials, group)
        same = lambda a, b: bool(torch.equal(a.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                             b.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)))
        out[str(dtype)] = {"all_gather": same(ref_g, got_g), "all_to_all": same(ref_a, got_a)}
    return out


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_shm_collectives_are_bit_identical_to_gloo_and_leave_no_segment():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs 2 cores (CI has 2)")
    for rank_result in spawn(_compare, 2, ((0, 1),), timeout_s=240):
        assert rank_result["enabled"], rank_result
        assert rank_result["left"] == [], rank_result         # unlinked once every rank mapped them
        for dtype in ("torch.float32", "torch.bfloat16"):
            assert rank_result[dtype] == {"all_gather": True, "all_to_all": True}, rank_result


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_one_rank_without_its_own_core_keeps_every_rank_on_gloo():
    """A rank that is not bound to a core of its own would make its peer spin on its core: the
    decision is every rank's together, so no rank takes shared memory."""
    results = spawn(_compare, 2, ((0,),), timeout_s=240)
    assert [res["enabled"] for res in results] == [False, False], results


@pytest.mark.unit
def test_launcher_removes_a_jobs_stale_segments_only(tmp_path):
    port = 1  # no real job uses port 1
    mine = f"/dev/shm/{shm_collectives.SHM_NAME}_{os.getuid()}_127.0.0.1_{port}_0"
    other = f"/dev/shm/{shm_collectives.SHM_NAME}_{os.getuid()}_127.0.0.1_{port}0_0"
    for path in (mine, other):
        with open(path, "wb") as f:
            f.write(b"x")
    try:
        assert shm_collectives.stale_segments("127.0.0.1", port) == [mine]
        _remove_shm_segments(port)
        assert not os.path.exists(mine) and os.path.exists(other)
    finally:
        for path in (mine, other):
            if os.path.exists(path):
                os.unlink(path)


@pytest.mark.unit
def test_without_setup_the_collectives_are_torch_distributeds():
    assert not shm_collectives.active()
    assert not shm_collectives._uses_shm(object(), torch.zeros(1))


def _low_shm_space(low_rank: int) -> dict:
    """On each rank: /dev/shm reads as 1 MiB free on ``low_rank``, then setup."""
    r = dist.get_rank()
    if r == low_rank:
        shm_collectives._shm_free_bytes = lambda: 2**20
    bound = bind_cores(r, dist.get_world_size(), 1) is not None
    enabled = shm_collectives.setup(True, dist.new_group([0, 1]), device="cpu", bound=bound)
    return {"enabled": enabled, "bound": bound}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_too_little_free_in_dev_shm_keeps_every_rank_on_gloo():
    """DeepSpeed's shm.cpp takes a short write of its 66 MiB segment for a whole one and then
    writes past its end (SIGBUS / SIGSEGV): with less free than every rank's segment, no rank
    takes shared memory."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs 2 cores (CI has 2)")
    results = spawn(_low_shm_space, 2, (1,), timeout_s=240)
    assert [res["bound"] for res in results] == [True, True], results
    assert [res["enabled"] for res in results] == [False, False], results


@pytest.mark.unit
def test_only_a_whole_elf_library_counts_as_built(tmp_path):
    """A linker killed mid-write leaves a truncated library, and loading one dies of SIGBUS."""
    elf = open(os.path.realpath(sys.executable), "rb").read()
    (tmp_path / "whole.so").write_bytes(elf)
    (tmp_path / "cut.so").write_bytes(elf[: len(elf) // 2])
    (tmp_path / "junk.so").write_bytes(b"\x7fELF" + bytes(100))
    assert shm_collectives._elf_complete(str(tmp_path / "whole.so"))
    for name in ("cut.so", "junk.so", "missing.so"):
        assert not shm_collectives._elf_complete(str(tmp_path / name)), name


@pytest.mark.unit
def test_build_lock_clears_a_dead_builds_leftovers_and_waits_for_a_live_one(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = shm_collectives._build_dir()
    os.makedirs(folder, exist_ok=True)
    for name, data in (("lock", b""), ("deepspeed_shm_comm.so", b"\x7fELF\x02\x01" + bytes(20))):
        with open(os.path.join(folder, name), "wb") as f:    # torch's lock of a killed build, a cut library
            f.write(data)
    with shm_collectives._build_lock(5):
        assert sorted(os.listdir(folder)) == ["cp_megatron.lock"]
    with open(os.path.join(folder, "cp_megatron.lock"), "w") as held:   # a live build holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match="held the lock"):
            with shm_collectives._build_lock(0.3):
                pass


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_rank_killed_during_the_build_leaves_no_compiler_running(tmp_path):
    """The build runs in a child session that dies with its parent, compilers included (ninja
    gives each compile a process group of its own)."""
    import signal
    import subprocess
    import time

    script = ("import os, sys; os.environ['TORCH_EXTENSIONS_DIR'] = sys.argv[1]\n"
              "from cp_megatron import shm_collectives\nshm_collectives._build_in_child(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])

    def session_members(sid: int) -> list[int]:
        out = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(name))
        return out

    deadline, child = time.monotonic() + 60, None
    while time.monotonic() < deadline:     # until the child's session runs a compiler
        kids = [int(n) for n in filter(str.isdigit, os.listdir("/proc"))
                if _ppid(n) == parent.pid]
        child = kids[0] if kids else None
        if child and len(session_members(child)) >= 3:
            break
        time.sleep(0.2)
    assert child and len(session_members(child)) >= 3, "the build never started"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while session_members(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_members(child) == []


def _ppid(pid: str) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _signal_while_spinning() -> dict:
    """Rank 0 gets SIGTERM (with a Python handler, as under torchrun) while it spins in the
    kernel for rank 1, which arrives 20 s later."""
    import signal
    import threading
    import time

    r = dist.get_rank()
    bound = bind_cores(r, 2, 1) is not None
    group = dist.new_group([0, 1])
    assert shm_collectives.setup(True, group, device="cpu", bound=bound)
    if r == 1:
        time.sleep(20)
    else:
        def handler(signum, _frame):
            raise KeyboardInterrupt(signum)
        signal.signal(signal.SIGTERM, handler)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    shm_collectives.all_gather_single(torch.empty(2, 4), torch.ones(4), group)
    return {"rank": r}


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_signal_while_the_kernel_spins_ends_the_rank_at_once():
    """The kernel spins with the GIL released and no Python handler can run until its peers
    arrive: the watch thread ends the rank with 128 + SIGTERM instead (torchrun's SIGTERM to a
    rank whose peer died would else wait for its SIGKILL 30 s later)."""
    import time

    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs 2 cores (CI has 2)")
    start = time.monotonic()
    with pytest.raises(Exception, match="143") as failure:
        spawn(_signal_while_spinning, 2, (), timeout_s=60)
    assert time.monotonic() - start < 15, (time.monotonic() - start, failure.value)
