"""The host tier of one rank's KV cache: idle sequences' shards moved off the device.

An idle cached sequence evicted from the device under memory pressure is *offloaded*: this
rank copies its own slots of that sequence (every layer of its pipeline stage, K and V, the
KV heads of its TP rank) to host memory, with the global positions every CP rank held, and
frees them on the device (the cache compacts as a truncate does).  Nothing is gathered: each
CP rank keeps its own shard, so a *restore* puts every slot back on the rank it came from
and the round plan sees the same layout as before the offload -- the same K/V at the same
positions, hence the same attention and the same tokens.

Copies run on a side stream (:class:`~cp_megatron.device.CopyStream`) into page-locked
host buffers on CUDA, so an offload overlaps the round that follows it; a restore's copies
are waited for by the current stream (device side, no host sync) before the round reads
them.  On CPU both are plain copies (an offload keeps the gathered copy itself).

The store holds what it is given: the budget (``serve.host_kv_cache_memory``) and the LRU
order of the tier are the scheduler's (:mod:`cp_megatron.serve.scheduler`), which tells
every rank which entries to offload, restore and drop.

Source: arXiv 2411.01783 §3.5 (persistent sharded KV cache across turns); KV offloading
to host memory as in vLLM's CPU offload / LMCache and SGLang's HiCache (hierarchical
radix cache).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from cp_megatron import device as devices
from cp_megatron.model.kv_cache import KVCache


@dataclass
class HostKVEntry:
    """One offloaded sequence on this rank.

    Attributes:
        positions: per CP rank, int64 ``[m_r]`` host global positions of the slots that rank
            held (this rank's own in the order of ``k`` / ``v``).
        k, v: this rank's K/V ``[layers, m, NKV_local, DH]`` on the host (pinned on CUDA).
        length: tokens of the sequence cached on the CP group when it was offloaded.
        ready: event recorded after the device-to-host copy (None on CPU, where it is done).
    """

    positions: list[torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    length: int
    ready: object = None

    @property
    def nbytes(self) -> int:
        """Host bytes of this rank's K and V."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class HostKVStore:
    """This rank's offloaded sequences, with byte counters for ``/metrics``.

    Args:
        device: the device of the KV cache the entries come from and go back to.

    Attributes:
        offloaded_bytes / restored_bytes: bytes copied to / from the host so far (this rank).
        restore_seconds: total time of the restores whose copies are known to be done
            (host clock on CPU; CUDA events on the copy stream, read once complete).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stream = devices.CopyStream(self.device)
        self.entries: dict[int, HostKVEntry] = {}
        self.offloaded_bytes = 0
        self.restored_bytes = 0
        self._restore_seconds = 0.0
        self._pending_timings: list[tuple[object, object]] = []

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.entries

    def nbytes(self) -> int:
        """Host bytes held by every entry of this rank."""
        return sum(e.nbytes for e in self.entries.values())

    def put(self, seq_id: int, positions: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
            length: int) -> HostKVEntry:
        """Keep sequence ``seq_id``: ``k``, ``v`` ``[layers, m, NKV_local, DH]`` (a copy made
        by :meth:`~cp_megatron.model.kv_cache.KVCache.export_sequence`, on the cache's
        device) go to the host; on CUDA the copy is queued on the side stream.

        Raises:
            ValueError: ``seq_id`` is already offloaded.
        """
        if seq_id in self.entries:
            raise ValueError(f"HostKVStore.put: sequence {seq_id} is already in the host tier")
        if k.device.type == "cpu":                    # the gathered copy is the host copy
            entry = HostKVEntry(positions, k, v, length)
        else:
            k_host = devices.host_empty(k.shape, k.dtype, k.device)
            v_host = devices.host_empty(v.shape, v.dtype, v.device)
            self.stream.after_current()
            self.stream.copy(k_host, k)
            self.stream.copy(v_host, v)
            entry = HostKVEntry(positions, k_host, v_host, length, self.stream.mark())
        self.entries[seq_id] = entry
        self.offloaded_bytes += entry.nbytes
        return entry

    def restore(self, seq_id: int, cache: KVCache, cp_rank: int, dst_seq: int, length: int,
                ) -> list[torch.Tensor]:
        """Append this rank's slots of ``seq_id`` at positions < ``length`` to ``cache``
        under id ``dst_seq``; the entry stays (drop it with :meth:`drop`).

        Returns:
            per CP rank, int64 host positions of that rank's restored slots (for the
            engine's layouts of the other ranks).

        Raises:
            KeyError: ``seq_id`` is not in the host tier.
        """
        entry = self.entries[seq_id]
        positions = [p[p < length] for p in entry.positions]
        own = entry.positions[cp_rank]
        k, v = entry.k, entry.v
        if len(positions[cp_rank]) != len(own):    # a shorter prefix (a branch): pick its slots
            idx = torch.nonzero(own < length).flatten()
            self._wait(entry)
            k_sel = devices.host_empty((k.shape[0], len(idx), *k.shape[2:]), k.dtype, self.device)
            v_sel = devices.host_empty(k_sel.shape, v.dtype, self.device)
            torch.index_select(k, 1, idx, out=k_sel)
            torch.index_select(v, 1, idx, out=v_sel)
            k, v = k_sel, v_sel
        cache.reserve(cache.num_tokens + len(positions[cp_rank]))   # any growth is queued before the copies
        self.stream.after_current()
        start = self.stream.mark()                                   # times the copies, not what they wait for
        cache.import_sequence(dst_seq, positions[cp_rank], k, v, self.stream)
        self._pending_timings.append((start, self.stream.mark()))
        self.restored_bytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        return positions

    def drop(self, seq_id: int) -> None:
        """Forget ``seq_id`` (its host memory returns to the allocator once pending copies
        are done).

        Raises:
            KeyError: ``seq_id`` is not in the host tier.
        """
        del self.entries[seq_id]

    def clear(self) -> None:
        self.entries.clear()

    def _wait(self, entry: HostKVEntry) -> None:
        """Host reads of ``entry`` wait for its device-to-host copy."""
        if entry.ready is not None:
            entry.ready.synchronize()
            entry.ready = None

    @property
    def restore_seconds(self) -> float:
        """Seconds spent restoring so far (restores whose copies are still running on the
        side stream are counted once done; reading never blocks)."""
        still = []
        for start, end in self._pending_timings:
            if end.query():
                self._restore_seconds += start.elapsed_time(end) / 1e3
            else:
                still.append((start, end))
        self._pending_timings = still
        return self._restore_seconds

    def synchronize(self) -> None:
        """Block until every queued copy is done (benchmarks; never on the serving path)."""
        self.stream.synchronize()
        for entry in self.entries.values():
            entry.ready = None

