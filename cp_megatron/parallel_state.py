"""The one owner of the process topology: TP x CP x PP groups from megatron-core.

This is the only module that imports ``megatron.core.parallel_state``.  It starts
``torch.distributed`` from the usual launcher variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, set by torchrun, the deepspeed launcher or our own spawner),
then calls ``initialize_model_parallel`` (order ``tp-cp-ep-dp-pp``).  With TP inside a
node and CP across nodes, each TP rank has its own CP ring; the rings run side by side.

Backends: gloo on CPU, NCCL on CUDA.  A CP group of size 1 does no communication at all
(a gloo send to one's own rank fails).

Source: docs/design.md §11; megatron-core ``parallel_state.initialize_model_parallel``.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from cp_megatron import device as devices

with warnings.catch_warnings():  # megatron warns that TE / apex are absent: they are optional
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as mpu


@dataclass(frozen=True)
class Topology:
    """Degrees and this process's coordinates in the TP x CP x PP grid."""

    world_size: int
    rank: int
    tp_size: int
    cp_size: int
    pp_size: int
    tp_rank: int
    cp_rank: int
    pp_rank: int
    backend: str


def check_degrees(world_size: int, tp: int, cp: int, pp: int) -> None:
    """Validate parallel degrees.

    Raises:
        ValueError: a degree < 1, or tp * cp * pp != world_size (data parallelism is not
            used for inference here).
    """
    for name, value in (("parallel.tp", tp), ("parallel.cp", cp), ("parallel.pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if tp * cp * pp != world_size:
        raise ValueError(f"parallel: tp*cp*pp = {tp}*{cp}*{pp} = {tp * cp * pp} must equal the "
                         f"world size {world_size}")


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0, *,
                     rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
    """Start torch.distributed from the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), or
    as one rank of a fake job.

    Args:
        backend: "gloo", "nccl" or "fake"; default nccl when CUDA is available, else gloo.
            "fake" is PyTorch's fake process group (``FakeStore``): every collective and
            point-to-point call returns at once without moving data, so one process can
            play any rank of a job of any size (the dry run, :mod:`cp_megatron.dryrun`).
        timeout_s: collective timeout in seconds (a lost rank fails the others after it).
        rank, world_size: required for "fake" (there is no launcher); ignored otherwise.

    Raises:
        ValueError: backend "fake" without rank and world_size, or an unknown backend.

    Source: ``torch.distributed.init_process_group``; the fake backend of
    ``torch.testing._internal.distributed.fake_pg`` (as torchtitan's config validation uses).
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if devices.is_available() else "gloo"
    if backend not in ("gloo", "nccl", "fake"):
        raise ValueError(f"runtime.backend: expected gloo, nccl or fake, got {backend!r}")
    if backend == "fake":
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"backend 'fake' needs 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return
    if backend == "nccl":
        devices.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def initialize(tp: int = 1, cp: int = 1, pp: int = 1, timeout_s: float = 300.0) -> Topology:
    """Create the TP, CP and PP groups (torch.distributed must be initialised).

    Raises:
        ValueError: degrees that do not multiply to the world size.
    """
    world = dist.get_world_size()
    check_degrees(world, tp, cp, pp)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            distributed_timeout_minutes=max(1, int(round(timeout_s / 60))),
            create_gloo_process_groups=False)
    return topology()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and mpu.model_parallel_is_initialized()


def topology() -> Topology:
    """This process's coordinates (parallel state must be initialised)."""
    return Topology(world_size=dist.get_world_size(), rank=dist.get_rank(),
                    tp_size=mpu.get_tensor_model_parallel_world_size(),
                    cp_size=mpu.get_context_parallel_world_size(),
                    pp_size=mpu.get_pipeline_model_parallel_world_size(),
                    tp_rank=mpu.get_tensor_model_parallel_rank(),
                    cp_rank=mpu.get_context_parallel_rank(),
                    pp_rank=mpu.get_pipeline_model_parallel_rank(),
                    backend=dist.get_backend())


def get_cp_group():
    """The CP process group of this rank, or None when parallel state is not initialised."""
    return mpu.get_context_parallel_group() if is_initialized() else None


def get_tp_group():
    return mpu.get_tensor_model_parallel_group()


def get_pp_group():
    return mpu.get_pipeline_model_parallel_group()


def process_groups():
    """This rank's groups as megatron-core's ``ProcessGroupCollection`` (``tp``, ``cp``,
    ``pp``, ``embd``), the explicit ``pg_collection`` that megatron-core modules take
    instead of reading global parallel state.  ``embd`` is None: the LM head of a tied model
    reads the embedding on the same stage (PP 1), so no embedding group is needed.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection(tp=get_tp_group(), cp=mpu.get_context_parallel_group(),
                                  pp=get_pp_group(), embd=None)


def pp_neighbours() -> tuple[Optional[int], Optional[int]]:
    """Global ranks of the previous and next pipeline stage (None at the ends)."""
    stage, stages = mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()
    prev_rank = mpu.get_pipeline_model_parallel_prev_rank() if stage > 0 else None
    next_rank = mpu.get_pipeline_model_parallel_next_rank() if stage < stages - 1 else None
    return prev_rank, next_rank


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) for ``group=None`` outside torch.distributed."""
    if group is None:
        if dist.is_available() and dist.is_initialized():
            raise ValueError("group is None but torch.distributed is initialised: pass the CP group "
                             "or initialise cp_megatron.parallel_state")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def ring_neighbours(group) -> tuple[int, int]:
    """Global ranks of the previous and next rank of the ring over ``group``."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return (dist.get_global_rank(group, (rank - 1) % size),
            dist.get_global_rank(group, (rank + 1) % size))


def destroy() -> None:
    """Tear down parallel state and the default process group (the CP group's shared-memory
    collectives, :mod:`cp_megatron.shm_collectives`, end with it: they are keyed by the group)."""
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
