"""The per-rank sharded KV cache: what this CP rank holds of every sequence.

Each CP rank keeps the K/V of the tokens it was given (load-balanced prefill chunks,
round-robin decode tokens), for the layers of its pipeline stage and the KV heads of
its TP rank.  The cache stays sharded across turns: a new turn's partial prefill only
appends (§3.5.1); nothing is ever gathered.  Token order inside the cache is arbitrary;
positions say everything.

Two halves (docs/design.md §10):

* :class:`KVLayout` -- host-side bookkeeping: the global position and sequence id of
  every slot.  The engine keeps one per CP rank (placement is deterministic), so it plans
  a round without asking any rank and without reading the device.
* :class:`KVCache` -- device storage ``[capacity, NKV_local, DH]`` per layer, reserved up
  front (prompt + generation budget + a margin for the turns after it) so a long prefill
  allocates once; the ring sends a view of it (no per-layer copy for padding).  Past the
  reservation the storage grows in fixed steps of ``growth_slots`` (rounded up), never by
  doubling: a 2,000-token follow-up turn on a 1M-token cache must not double it (issue #21).

A round writes its K/V either into the slice of slots it added (prefill), or -- the static
decode step (:mod:`cp_megatron.decode_step`, issue #22) -- through a device slot-index tensor
(``index_copy_``), so that the same kernels with the same shapes run every step whatever the
offset; that step's padding rows write into the first free slot (a scratch slot that belongs to
no sequence).  For decode batches whose cache holds several sequences, the cache also keeps a
device copy of its layout (:meth:`KVCache.device_layout`), from which the step computes its
visibility mask on the device.

Source: arXiv 2411.01783 §3.5 (persistent KV cache, multi-turn partial prefill).
"""

from __future__ import annotations

import torch

# Growth step of a cache built without one (tests, benchmarks): slots per rank.  The engine
# passes the run's own (runtime.kv_cache_growth_tokens / cp).
DEFAULT_GROWTH_SLOTS = 256


class KVLayout:
    """Positions and sequence ids of one rank's cache slots, on the host.

    Shapes: :attr:`positions`, :attr:`seq_ids` int64 ``[num_tokens]`` (CPU).
    """

    def __init__(self) -> None:
        self._pos = torch.zeros(0, dtype=torch.long)
        self._seq = torch.zeros(0, dtype=torch.long)
        self.num_tokens = 0
        self._counts: dict[int, int] = {}      # sequence id -> slots (kept as slots come and go)

    @property
    def positions(self) -> torch.Tensor:
        return self._pos[: self.num_tokens]

    @property
    def seq_ids(self) -> torch.Tensor:
        return self._seq[: self.num_tokens]

    def append(self, positions: torch.Tensor, seq_ids: torch.Tensor) -> None:
        """Add slots for new tokens (int64 ``[T]`` host tensors), growing by doubling."""
        t = int(positions.numel())
        need = self.num_tokens + t
        if need > self._pos.numel():
            size = max(need, 2 * self._pos.numel())
            self._pos = torch.cat([self._pos[: self.num_tokens], torch.zeros(size - self.num_tokens, dtype=torch.long)])
            self._seq = torch.cat([self._seq[: self.num_tokens], torch.full((size - self.num_tokens,), -1, dtype=torch.long)])
        self._pos[self.num_tokens: need] = positions
        self._seq[self.num_tokens: need] = seq_ids
        self.num_tokens = need
        self._count(seq_ids)

    def _count(self, seq_ids: torch.Tensor) -> None:
        if seq_ids.numel() <= 64:      # decode rounds: a few ids
            for s in seq_ids.tolist():
                self._counts[s] = self._counts.get(s, 0) + 1
            return
        ids, counts = torch.unique(seq_ids, return_counts=True)
        for s, n in zip(ids.tolist(), counts.tolist()):
            self._counts[s] = self._counts.get(s, 0) + n

    def tokens_of(self, seq_id: int) -> int:
        """Slots of sequence ``seq_id``."""
        return self._counts.get(seq_id, 0)

    @property
    def sequence_ids(self) -> list[int]:
        """The sequence ids that hold at least one slot (host; no tensor is read)."""
        return list(self._counts)

    def truncate(self, seq_id: int, length: int) -> torch.Tensor | None:
        """Drop slots of ``seq_id`` at positions >= ``length``, compacting.

        Returns:
            int64 ``[kept]`` host indices of the kept slots (old numbering), or None when
            nothing was dropped.
        """
        keep = (self.seq_ids != seq_id) | (self.positions < length)
        if bool(keep.all()):
            return None
        idx = torch.nonzero(keep).flatten()
        m = int(idx.numel())
        self._pos[:m], self._seq[:m] = self.positions[idx], self.seq_ids[idx]
        self.num_tokens = m
        self._counts = {}
        self._count(self.seq_ids)
        return idx

    def fork(self, src: int, dst: int, length: int) -> torch.Tensor:
        """Append copies of the slots of ``src`` at positions < ``length`` under id ``dst``.

        Returns:
            int64 ``[m]`` host indices of the copied slots.
        """
        idx = torch.nonzero((self.seq_ids == src) & (self.positions < length)).flatten()
        self.append(self.positions[idx], torch.full((int(idx.numel()),), dst, dtype=torch.long))
        return idx

    def clear(self) -> None:
        self.num_tokens = 0
        self._counts = {}


class KVCache:
    """K/V storage for ``num_layers`` layers of one rank, with its :class:`KVLayout`.

    Args:
        num_layers: layers of this pipeline stage.
        num_kv_heads: KV heads of this TP rank (NKV / tp).
        head_dim: DH.
        dtype, device: storage dtype and device.
        capacity: slots (tokens) to reserve up front.
        growth_slots: past the reservation the storage grows to the slots needed rounded up
            to a multiple of this (>= 1); each growth copies the valid slots once, so
            reserve enough up front (``runtime.kv_cache_margin_tokens``).

    Raises:
        ValueError: ``capacity`` < 0 or ``growth_slots`` < 1.

    Shapes: ``k[layer]``, ``v[layer]``: ``[capacity, NKV_local, DH]``; the first
    ``layout.num_tokens`` slots are valid, later ones are zero padding that the round
    plan never reads.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str = "cpu", capacity: int = 0,
                 growth_slots: int = DEFAULT_GROWTH_SLOTS) -> None:
        if capacity < 0:
            raise ValueError(f"KVCache: capacity must be >= 0 slots, got {capacity}")
        if growth_slots < 1:
            raise ValueError(f"KVCache: growth_slots must be >= 1, got {growth_slots}")
        self.growth_slots = growth_slots
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.layout = KVLayout()
        self._round_start = 0
        self._round_slots: torch.Tensor | None = None   # static decode: int64 [rows] slots to write
        self._round_rows: slice | None = None           # replicated-Q: this rank's rows of the block
        self._slot_seq: torch.Tensor | None = None      # device copy of the layout (device_layout)
        self._slot_pos: torch.Tensor | None = None
        self.allocations = 0          # storage (re)allocations so far (1 when reserved well)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if capacity > 0:
            self._alloc(capacity)

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    def _alloc(self, capacity: int) -> None:
        shape = (capacity, self.num_kv_heads, self.head_dim)
        n = self.layout.num_tokens
        new_k, new_v = [], []
        for layer in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if n:
                k[:n], v[:n] = self.k[layer][:n], self.v[layer][:n]
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.capacity = new_k, new_v, capacity
        self.allocations += 1
        if self._slot_seq is not None:        # the device layout follows the storage
            self._slot_seq = self._slot_pos = None
            self.device_layout()

    def capacity_for(self, slots: int) -> int:
        """The capacity :meth:`reserve` gives for ``slots`` (no change made)."""
        if slots <= self.capacity:
            return self.capacity
        return -(-slots // self.growth_slots) * self.growth_slots

    def reserve(self, capacity: int) -> None:
        """Make room for at least ``capacity`` slots: grow (one copy) to ``capacity`` rounded
        up to a multiple of ``growth_slots`` if the storage is shorter."""
        if capacity > self.capacity:
            self._alloc(self.capacity_for(capacity))

    def begin_round(self, positions: torch.Tensor, seq_ids: torch.Tensor, *, min_capacity: int = 0,
                    slots: torch.Tensor | None = None, rows: slice | None = None) -> None:
        """Add this round's slots (int64 host ``[T]`` positions and sequence ids) and make the
        storage at least ``min_capacity`` slots long (the ring's padded block).

        Args:
            positions, seq_ids: the round's real tokens; they take slots ``[n, n + T)``.
            min_capacity: storage to keep at least (slots).
            slots: the static decode step's int64 device ``[rows]`` slot of each row it stores
                (rows >= T): the first T are ``n .. n + T - 1``, the padding rows' a free slot
                (the caller's promise, not read back).  :meth:`store` then writes through it
                with ``index_copy_``, and the device layout (if kept) is the step's to update.
            rows: replicated-Q (docs/design.md §8): the layers compute K/V for every rank's rows
                (the gathered block) and :meth:`store` keeps only this slice of them, this
                rank's T tokens.  None: every row handed to :meth:`store` is this rank's.
        """
        self._round_rows = rows
        self._round_start = self.layout.num_tokens
        self.reserve(max(self._round_start + int(positions.numel()), min_capacity))
        self.layout.append(positions, seq_ids)
        self._round_slots = slots
        if slots is None and self._slot_seq is not None and positions.numel():
            a, b = self._round_start, self.layout.num_tokens
            self._slot_seq[a:b] = seq_ids.to(self.device)
            self._slot_pos[a:b] = positions.to(self.device)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this round's K/V ``[T, NKV_local, DH]`` of ``layer`` into its slots (the static
        decode step: ``[rows, NKV_local, DH]`` through its slot tensor, one ``index_copy_`` each;
        replicated-Q: every rank's rows, of which the ``rows`` slice of :meth:`begin_round` is kept).

        Raises:
            ValueError: the row count is not the round's."""
        if self._round_rows is not None:
            k, v = k[self._round_rows], v[self._round_rows]
        if self._round_slots is not None:
            if k.shape[0] != self._round_slots.shape[0]:
                raise ValueError(f"KVCache.store: layer {layer} got {k.shape[0]} rows, the step has "
                                 f"{self._round_slots.shape[0]} slots")
            self.k[layer].index_copy_(0, self._round_slots, k)
            self.v[layer].index_copy_(0, self._round_slots, v)
            return
        a, b = self._round_start, self.layout.num_tokens
        if k.shape[0] != b - a:
            raise ValueError(f"KVCache.store: layer {layer} got {k.shape[0]} tokens, round reserved {b - a}")
        self.k[layer][a:b] = k
        self.v[layer][a:b] = v

    def device_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ids and positions of every slot on the device, int64 ``[capacity]`` each
        (-1 / 0 for a free slot), made on the first call (one host-to-device copy) and kept up
        to date from then on: by :meth:`begin_round`, :meth:`truncate`, :meth:`fork`, growth, and
        by the static decode step (:meth:`write_device_layout`) inside its device work.

        The static decode step computes from them, on the device, which slots each query row
        sees (same sequence, position <= its own) when the cache holds several sequences."""
        if self._slot_seq is None:
            self._slot_seq = torch.full((self.capacity,), -1, dtype=torch.long, device=self.device)
            self._slot_pos = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
            self._refill_device_layout()
        return self._slot_seq, self._slot_pos

    def _refill_device_layout(self) -> None:
        if self._slot_seq is None:
            return
        n = self.layout.num_tokens
        self._slot_seq[n:] = -1
        if n:
            self._slot_seq[:n] = self.layout.seq_ids.to(self.device)
            self._slot_pos[:n] = self.layout.positions.to(self.device)

    def write_device_layout(self, slots: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Set the device layout of ``slots`` (int64 device ``[rows]``) to ``seq_ids`` / ``positions``
        (int64 device ``[rows]``; -1 for the padding rows' scratch slot): two ``index_copy_``."""
        slot_seq, slot_pos = self.device_layout()
        slot_seq.index_copy_(0, slots, seq_ids)
        slot_pos.index_copy_(0, slots, positions)

    def layer(self, layer: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[length, NKV_local, DH]`` of K and V storage (default: the valid slots)."""
        n = self.layout.num_tokens if length is None else length
        return self.k[layer][:n], self.v[layer][:n]

    def tokens_of(self, seq_id: int) -> int:
        """Tokens of sequence ``seq_id`` held by this rank."""
        return self.layout.tokens_of(seq_id)

    @property
    def bytes_per_slot(self) -> int:
        """Bytes of one slot over all layers, K and V: 2 * layers * NKV_local * DH * e."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def nbytes(self) -> int:
        """Bytes of valid K/V held (all layers, K and V), excluding spare capacity."""
        return self.layout.num_tokens * self.bytes_per_slot

    def capacity_bytes(self) -> int:
        """Bytes of K/V storage reserved (all layers, K and V): what the device holds."""
        return self.capacity * self.bytes_per_slot

    def truncate(self, seq_id: int, length: int) -> None:
        """Drop the tokens of sequence ``seq_id`` at positions >= ``length`` (compacting)."""
        idx = self.layout.truncate(seq_id, length)
        if idx is None:
            return
        m = int(idx.numel())
        dev_idx = idx.to(self.device)
        for layer in range(self.num_layers):
            self.k[layer][:m] = self.k[layer].index_select(0, dev_idx)
            self.v[layer][:m] = self.v[layer].index_select(0, dev_idx)
        self._round_start = m
        self._round_slots = None
        self._refill_device_layout()

    def fork(self, src: int, dst: int, length: int) -> None:
        """Copy this rank's tokens of sequence ``src`` at positions < ``length`` under the new
        id ``dst`` (appended; ``src`` is untouched), e.g. to branch a cached conversation."""
        n = self.layout.num_tokens
        self.reserve(n + self.layout.tokens_of(src))
        idx = self.layout.fork(src, dst, length).to(self.device)
        m = int(idx.numel())
        for layer in range(self.num_layers):
            self.k[layer][n:n + m] = self.k[layer].index_select(0, idx)
            self.v[layer][n:n + m] = self.v[layer].index_select(0, idx)
        self._round_start = n + m
        self._round_slots = None
        self._refill_device_layout()

    def export_sequence(self, seq_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy out this rank's slots of sequence ``seq_id`` (all layers, K and V), in layout
        order, e.g. to move an idle sequence to the host tier; the cache is unchanged.

        Returns:
            (positions int64 ``[m]`` on the host, k, v ``[layers, m, NKV_local, DH]`` in the
            cache's dtype, new tensors on the cache's device).  Copies queued on the current
            stream (``index_select``); ``m`` may be 0.
        """
        idx = torch.nonzero(self.layout.seq_ids == seq_id).flatten()
        positions = self.layout.positions[idx]
        shape = (self.num_layers, int(idx.numel()), self.num_kv_heads, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if idx.numel():
            dev_idx = idx.to(self.device)
            for layer in range(self.num_layers):
                torch.index_select(self.k[layer][: self.num_tokens], 0, dev_idx, out=k[layer])
                torch.index_select(self.v[layer][: self.num_tokens], 0, dev_idx, out=v[layer])
        return positions, k, v

    def import_sequence(self, seq_id: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        stream=None) -> None:
        """Append slots for sequence ``seq_id`` holding the given K/V (the inverse of
        :meth:`export_sequence`; growing the storage first if needed).

        Args:
            seq_id: id of the new slots (not already in the cache).
            positions: int64 ``[m]`` host global positions of the slots.
            k, v: ``[layers, m, NKV_local, DH]`` in the cache's dtype, on any device (pinned
                host memory for an asynchronous copy).
            stream: a :class:`~cp_megatron.device.CopyStream` to copy on (it waits for the
                current stream, and the current stream waits for it after), or None for
                plain copies.

        Raises:
            ValueError: shapes that do not match the cache or ``positions``.
        """
        m = int(positions.numel())
        want = (self.num_layers, m, self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"KVCache.import_sequence: expected k and v of shape {want}, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        n = self.layout.num_tokens
        self.reserve(n + m)
        if m:
            if stream is not None:
                stream.after_current()
            copy = stream.copy if stream is not None else (lambda dst, src: dst.copy_(src))
            for layer in range(self.num_layers):
                copy(self.k[layer][n:n + m], k[layer])
                copy(self.v[layer][n:n + m], v[layer])
            if stream is not None:
                stream.join()
        self.layout.append(positions, torch.full((m,), seq_id, dtype=torch.long))
        self._round_start = n + m
        self._round_slots = None
        if self._slot_seq is not None and m:         # the static decode step's device layout follows
            self._slot_seq[n:n + m] = seq_id
            self._slot_pos[n:n + m] = positions.to(self.device)

    def clear(self) -> None:
        self.layout.clear()
        self._round_start = 0
        self._round_slots = None
        self._refill_device_layout()
