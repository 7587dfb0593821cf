"""The per-rank sharded KV cache: what this CP rank holds of every sequence.

Each CP rank keeps the K/V of the tokens it was given (load-balanced prefill chunks,
round-robin decode tokens), for the layers of its pipeline stage and the KV heads of
its TP rank, with the global position and sequence id of each token.  The cache stays
sharded across turns: a new turn's partial prefill only appends (§3.5.1); nothing is
ever gathered.  Token order inside the cache is arbitrary; positions say everything.

Source: arXiv 2411.01783 §3.5 (persistent KV cache, multi-turn partial prefill).
"""

from __future__ import annotations

import torch


class KVCache:
    """K/V storage for ``num_layers`` layers of one rank.

    Args:
        num_layers: layers of this pipeline stage.
        num_kv_heads: KV heads of this TP rank (NKV / tp).
        head_dim: DH.
        dtype, device: storage dtype and device.
        capacity: tokens to reserve up front (grows by doubling when exceeded).

    Shapes: ``k[layer]``, ``v[layer]``: ``[capacity, NKV_local, DH]``; ``positions``,
    ``seq_ids``: int64 ``[capacity]``; the first :attr:`num_tokens` entries are valid.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str = "cpu", capacity: int = 0) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.num_tokens = 0
        self._round_start = 0
        self._alloc(max(capacity, 0))

    def _alloc(self, capacity: int) -> None:
        shape = (capacity, self.num_kv_heads, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_pos = torch.zeros(capacity, dtype=torch.long, device=self.device)
        new_seq = torch.full((capacity,), -1, dtype=torch.long, device=self.device)
        n = self.num_tokens
        if n:
            for layer in range(self.num_layers):
                new_k[layer][:n] = self.k[layer][:n]
                new_v[layer][:n] = self.v[layer][:n]
            new_pos[:n], new_seq[:n] = self.positions[:n], self.seq_ids[:n]
        self.k, self.v, self.positions, self.seq_ids = new_k, new_v, new_pos, new_seq
        self.capacity = capacity

    def begin_round(self, positions: torch.Tensor, seq_ids: torch.Tensor) -> None:
        """Reserve slots for this round's tokens (int64 ``[T]`` positions and sequence ids)."""
        t = int(positions.numel())
        needed = self.num_tokens + t
        if needed > self.capacity:
            self._alloc(max(needed, 2 * self.capacity))
        self._round_start = self.num_tokens
        self.positions[self._round_start:needed] = positions
        self.seq_ids[self._round_start:needed] = seq_ids
        self.num_tokens = needed

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this round's K/V ``[T, NKV_local, DH]`` of ``layer`` into the reserved slots."""
        a, b = self._round_start, self.num_tokens
        if k.shape[0] != b - a:
            raise ValueError(f"KVCache.store: layer {layer} got {k.shape[0]} tokens, round reserved {b - a}")
        self.k[layer][a:b] = k
        self.v[layer][a:b] = v

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v ``[n, NKV_local, DH]``, positions, seq_ids ``[n]``) of all cached tokens."""
        n = self.num_tokens
        return self.k[layer][:n], self.v[layer][:n], self.positions[:n], self.seq_ids[:n]

    def tokens_of(self, seq_id: int) -> int:
        """Tokens of sequence ``seq_id`` held by this rank."""
        return int((self.seq_ids[: self.num_tokens] == seq_id).sum())

    def nbytes(self) -> int:
        """Bytes of valid K/V held (all layers, K and V), excluding spare capacity."""
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        return self.num_tokens * per_token

    def truncate(self, seq_id: int, length: int) -> None:
        """Drop the tokens of sequence ``seq_id`` at positions >= ``length`` (compacting)."""
        n = self.num_tokens
        keep = (self.seq_ids[:n] != seq_id) | (self.positions[:n] < length)
        if bool(keep.all()):
            return
        idx = torch.nonzero(keep).flatten()
        m = int(idx.numel())
        for layer in range(self.num_layers):
            self.k[layer][:m] = self.k[layer][:n].index_select(0, idx)
            self.v[layer][:m] = self.v[layer][:n].index_select(0, idx)
        self.positions[:m] = self.positions[:n].index_select(0, idx)
        self.seq_ids[:m] = self.seq_ids[:n].index_select(0, idx)
        self.seq_ids[m:n] = -1
        self.num_tokens = self._round_start = m

    def fork(self, src: int, dst: int, length: int) -> None:
        """Copy this rank's tokens of sequence ``src`` at positions < ``length`` under the new
        id ``dst`` (appended; ``src`` is untouched), e.g. to branch a cached conversation."""
        n = self.num_tokens
        idx = torch.nonzero((self.seq_ids[:n] == src) & (self.positions[:n] < length)).flatten()
        m = int(idx.numel())
        if n + m > self.capacity:
            self._alloc(max(n + m, 2 * self.capacity))
        for layer in range(self.num_layers):
            self.k[layer][n:n + m] = self.k[layer][:n].index_select(0, idx)
            self.v[layer][n:n + m] = self.v[layer][:n].index_select(0, idx)
        self.positions[n:n + m] = self.positions[:n].index_select(0, idx)
        self.seq_ids[n:n + m] = dst
        self.num_tokens = self._round_start = n + m

    def clear(self) -> None:
        self.num_tokens = 0
        self._round_start = 0
