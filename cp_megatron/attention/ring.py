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
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from cp_megatron.parallel_state import ring_neighbours


@dataclass
class RingStats:
    """Timings of ring attention calls, accumulated (seconds, bytes).

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

    @property
    def exposed_comm_s(self) -> float:
        """Ring time not spent in local attention (Alg. 2's exposed communication)."""
        return self.ring_s - self.compute_s

    def to_dict(self) -> dict:
        return {**asdict(self), "exposed_comm_s": self.exposed_comm_s}


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


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
    """Rotate ``blocks`` around the ring; call ``compute(src_rank, blocks_in_hand)`` N times.

    Args:
        group: the CP process group (size N >= 2).
        blocks: tensors of identical shapes on every rank (pad to the longest).
        compute: called with the group rank that owns the blocks in hand
            (step s on rank r holds rank (r - s) mod N's blocks) and those blocks.
        stats: optional accumulator of timings and bytes.

    The caller's tensors are sent but never overwritten: receives go to two buffers
    that alternate (double buffering).
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    comm = RingComm(group)
    buffers = [[torch.empty_like(b) for b in blocks], [torch.empty_like(b) for b in blocks]]
    in_hand = list(blocks)
    start = time.perf_counter()
    for step in range(size):
        last = step == size - 1
        if not last:
            recv = [comm.send_recv(b, buf) for b, buf in zip(in_hand, buffers[step % 2])]
            comm.commit()
        t0 = time.perf_counter()
        compute((rank - step) % size, in_hand)
        if stats is not None:
            _sync(in_hand[0])
            stats.compute_s += time.perf_counter() - t0
        if not last:
            t1 = time.perf_counter()
            comm.wait()
            if stats is not None:
                stats.wait_s += time.perf_counter() - t1
            in_hand = recv
    if stats is not None:
        stats.ring_s += time.perf_counter() - start
        stats.sent_bytes += comm.sent_bytes
        stats.calls += 1
