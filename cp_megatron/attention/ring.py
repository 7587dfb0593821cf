"""The ring loop, written once: rotate a block around the CP group, overlapping compute.

Both variants use it: pass-KV rotates (K, V, positions), pass-Q rotates (Q, positions).
Each of the N steps posts the send of the block in hand to the next rank and the
receive of the previous rank's block (double-buffered), computes on the block in hand,
then waits.  N-1 transfers, N computations; the transfer of step s overlaps the
compute of step s.

Source: arXiv 2411.01783 §3.5, Alg. 2 (pass-KV) and Alg. 3 (pass-Q);
ring-flash-attention's ``RingComm`` (post -> commit -> wait).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from cp_megatron import device as devices
from cp_megatron.parallel_state import ring_neighbours


@dataclass
class RingStats:
    """Opt-in timings of ring attention calls, accumulated (seconds, bytes).

    Timing is off unless a caller passes a RingStats (the engine does with
    ``profile=True``).  Intervals are recorded as marks -- ``time.perf_counter()`` on CPU,
    recorded CUDA events on a GPU -- and summed by :meth:`resolve` once per round, so
    even a profiled round synchronizes with the device once, at its end.

    Attributes:
        ring_s: wall time inside ring loops (compute + exposed communication).
        compute_s: time in local attention (the sum over steps).
        wait_s: time blocked waiting for transfers (exposed ring communication).
        all_to_all_s: pass-Q's return of partial (O, LSE) to their owners.
        sent_bytes: bytes this rank sent (ring transfers and all_to_all).
        calls: ring calls counted.
    """

    ring_s: float = 0.0
    compute_s: float = 0.0
    wait_s: float = 0.0
    all_to_all_s: float = 0.0
    sent_bytes: int = 0
    calls: int = 0
    _pending: list = field(default_factory=list, repr=False, compare=False)

    @property
    def exposed_comm_s(self) -> float:
        """Ring time not spent in local attention (Alg. 2's exposed communication)."""
        return self.ring_s - self.compute_s

    @staticmethod
    def mark(device: torch.device):
        """A point in time on ``device``'s stream: a recorded CUDA event, or a host clock."""
        if device.type == "cuda":
            event = devices.event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name: str, start, end) -> None:
        """Count the interval ``start`` -> ``end`` (two marks) into field ``name``: at once
        for host clocks, at :meth:`resolve` for CUDA events."""
        if isinstance(start, float):
            setattr(self, name, getattr(self, name) + end - start)
        else:
            self._pending.append((name, start, end))

    def resolve(self) -> "RingStats":
        """Sum the recorded intervals into the fields (one device sync on CUDA)."""
        for name, start, end in self._pending:
            end.synchronize()
            setattr(self, name, getattr(self, name) + start.elapsed_time(end) / 1000.0)
        self._pending.clear()
        return self

    def to_dict(self) -> dict:
        self.resolve()
        return {**{k: v for k, v in asdict(self).items() if not k.startswith("_")},
                "exposed_comm_s": self.exposed_comm_s}


class RingComm:
    """Point-to-point transfers to the next rank / from the previous rank of a ring.

    Use: ``recv = comm.send_recv(block)`` for each tensor, ``comm.commit()``, compute,
    ``comm.wait()``.  Refuses misuse (commit twice, wait before commit).
    """

    def __init__(self, group) -> None:
        self.group = group
        self.prev_rank, self.next_rank = ring_neighbours(group)
        self._ops: list[dist.P2POp] = []
        self._reqs: list | None = None
        self.sent_bytes = 0

    def send_recv(self, block: torch.Tensor, recv_buffer: torch.Tensor) -> torch.Tensor:
        """Post sending ``block`` to the next rank and receiving into ``recv_buffer``."""
        if self._reqs is not None:
            raise RuntimeError("RingComm.send_recv after commit(): call wait() first")
        self._ops.append(dist.P2POp(dist.isend, block, self.next_rank, self.group))
        self._ops.append(dist.P2POp(dist.irecv, recv_buffer, self.prev_rank, self.group))
        self.sent_bytes += block.numel() * block.element_size()
        return recv_buffer

    def commit(self) -> None:
        if self._reqs is not None or not self._ops:
            raise RuntimeError("RingComm.commit(): nothing posted, or already committed")
        self._reqs = dist.batch_isend_irecv(self._ops)

    def wait(self) -> None:
        if self._reqs is None:
            raise RuntimeError("RingComm.wait() before commit()")
        for req in self._reqs:
            req.wait()
        self._reqs, self._ops = None, []


def ring_loop(group, blocks: Sequence[torch.Tensor],
              compute: Callable[[int, Sequence[torch.Tensor]], None],
              stats: RingStats | None = None) -> None:
    """Rotate ``blocks`` around the ring; call ``compute(step, blocks_in_hand)`` N times.

    Args:
        group: the CP process group (size N >= 2).
        blocks: tensors of identical shapes on every rank (pad to the longest).
        compute: called with the step s and the blocks in hand; step s on rank r holds
            rank (r - s) mod N's blocks.
        stats: optional (opt-in) accumulator of timings and bytes.

    The caller's tensors are sent but never overwritten: receives go to two buffers
    that alternate (double buffering).  Communication: N-1 ``batch_isend_irecv``, nothing
    else; no host synchronization.
    """
    size = dist.get_world_size(group)
    comm = RingComm(group)
    buffers = [[torch.empty_like(b) for b in blocks], [torch.empty_like(b) for b in blocks]]
    in_hand = list(blocks)
    device = blocks[0].device
    start = stats.mark(device) if stats is not None else None
    for step in range(size):
        last = step == size - 1
        if not last:
            recv = [comm.send_recv(b, buf) for b, buf in zip(in_hand, buffers[step % 2])]
            comm.commit()
        t0 = stats.mark(device) if stats is not None else None
        compute(step, in_hand)
        t1 = stats.mark(device) if stats is not None else None
        if not last:
            comm.wait()
            in_hand = recv
        if stats is not None:
            stats.add("compute_s", t0, t1)
            stats.add("wait_s", t1, stats.mark(device))
    if stats is not None:
        stats.add("ring_s", start, stats.mark(device))
        stats.sent_bytes += comm.sent_bytes
        stats.calls += 1
