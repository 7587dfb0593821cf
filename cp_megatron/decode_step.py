"""The static decode step: a decode round whose kernels and shapes do not change from one step
to the next, so that a CUDA graph can capture it once and replay it (issue #22).

A decode round of all-gather-Q (or of CP 1) differs from step to step in three ways when run
as planned for prefill: the rank that owns a new token runs T = 1 and the others T = 0 (the
owner moves round-robin, §3), the KV view grows by a token every step (a slice ``[:n]``), and
index tensors built on the host are copied each step.  The static step fixes all three:

* **rows**: every CP rank runs ``rows_per_rank`` query rows, a bucket (the next power of two
  at least the most sequences any rank owns this step), even when it owns fewer new tokens.
  A padding row embeds token 0 at position 0, writes its K/V into a scratch slot (the first
  free slot of the cache, which belongs to no sequence) and sees no key but, for the varlen
  kernel, slot 0 (its output is never read);
* **KV writes** go through a device slot-index tensor (``index_copy_``) instead of a slice
  whose offset moves (:meth:`~cp_megatron.model.kv_cache.KVCache.store`);
* **KV reads** use the view ``[0, kv_len)`` of the cache, ``kv_len`` a bucket of the valid
  slots (at most 1/16 more, at least 256 slots, at most the capacity), with per-row lengths or a
  mask made on the device (:class:`~cp_megatron.attention.plan.DecodeBatch` modes "lengths"
  and "masked");
* **inputs** (token ids, positions, slots, the gathered rows' sequence ids, positions and
  lengths) are packed on the host into one int64 and one int32 tensor and copied into the
  step's device buffers: two host-to-device copies per step, no host sync, no allocation.

The engine runs it on CUDA stages by default (CPU ranks share one host's memory bandwidth, so a
padding row's reads slow the others: ``InferenceEngine(static_decode=True)`` runs it there too).
A step is keyed by :class:`StepKey`; consecutive decode steps of one batch share the key until
``kv_len`` crosses a bucket (every 1/16 of growth) or the cache regrows.  The engine keeps the
:class:`DecodeStep` of each key (its buffers and plan) and, with ``runtime.cuda_graphs``, a
captured graph of :meth:`DecodeStep.forward` per key (:mod:`cp_megatron.cuda_graphs`).  Ring
pass-Q decode (Alg. 4) is not static: it runs as planned for prefill.

Source: arXiv 2411.01783 §3.5 (round-robin decode placement, Alg. 4), vLLM's CUDA-graph decode
(padded batch buckets, persistent input buffers, a slot mapping for KV writes), PyTorch CUDA
graphs notes (static inputs, no host sync or allocation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cp_megatron.attention.kernels import decode_kernel_name
from cp_megatron.attention.plan import AttentionPlan, DecodeBatch
from cp_megatron.model.kv_cache import KVCache

KV_BUCKET_MIN_SLOTS = 256       # the KV view grows in steps of at least this many slots
KV_BUCKET_FRACTION_BITS = 4     # ... and of 1/16 of its length (rounded to a power of two)


def rows_bucket(n: int) -> int:
    """Query rows per rank for a step whose busiest rank owns ``n`` new tokens: the next power of
    two >= n (1, 2, 4, 8, ...), so batch sizes share few graphs."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def kv_bucket(slots: int) -> int:
    """The KV view length for ``slots`` needed slots: rounded up to a multiple of
    max(256, 2^(bits(slots) - 4)), i.e. at most 1/16 (and 256 slots) more than needed."""
    step = max(KV_BUCKET_MIN_SLOTS, 1 << max(0, slots.bit_length() - KV_BUCKET_FRACTION_BITS))
    return -(-max(slots, 1) // step) * step


@dataclass(frozen=True)
class StepKey:
    """What fixes a static decode step's kernels and shapes.

    Attributes:
        rows_per_rank: query rows every CP rank runs (R).
        num_rows: rows the attention sees (``cp_size * R``: all-gather-Q's gathered block).
        kv_len: KV view length (slots).
        mode: "lengths" or "masked" (:class:`~cp_megatron.attention.plan.DecodeBatch`).
        kernel: the attention kernel (:func:`~cp_megatron.attention.kernels.decode_kernel_name`).
        fixup: some real row has no key on this rank and the varlen kernel needs its LSE set.
        generation: the cache's storage allocation count (a graph holds pointers into it).
    """

    rows_per_rank: int
    num_rows: int
    kv_len: int
    mode: str
    kernel: str
    fixup: bool
    generation: int


@dataclass
class StaticDecode:
    """One static decode round as planned on the host (:func:`plan_static_decode`).

    Attributes:
        key: the step's :class:`StepKey`.
        owned: per CP rank, the batch indices of the new tokens it owns (its real rows, in order).
        meta64: int64 host ``[5 R + 2 G]``: this rank's token ids, positions, KV slots, sequence
            ids (-1 padding: what its scratch slot records), output rows (the batch index; B for
            padding), then the G gathered rows' sequence ids (-2 padding: no slot matches it) and
            positions.
        meta32: int32 host ``[3 G + 2]``: cu_seqlens_q (0..G), cu_seqlens_k (zeros), lengths.
        min_capacity: slots the cache must hold for this round (valid ones and the scratch slot).
    """

    key: StepKey
    owned: list[list[int]]
    meta64: torch.Tensor
    meta32: torch.Tensor
    min_capacity: int


def plan_static_decode(*, tokens: Sequence[int], seq_ids: Sequence[int], cached: Sequence[int],
                       owners: Sequence[int], cp_rank: int, cp_size: int, kv_cache: KVCache,
                       head_dim: int) -> StaticDecode:
    """Plan one static decode round on the host: rows, slots, KV view, mode, the packed inputs.

    Args:
        tokens: the new token of each sequence of the batch (batch order).
        seq_ids: the batch's sequence ids; cached: P of each (the new token's position).
        owners: the CP rank that stores each sequence's new token (:func:`~cp_megatron.sharding.decode_owner`).
        cp_rank, cp_size: this rank and N.
        kv_cache: this rank's cache, before the round (its layout, capacity and growth rule).
        head_dim: DH (the kernel's constraints).

    Returns:
        The round's :class:`StaticDecode`.  Reads no device tensor.
    """
    b = len(seq_ids)
    owned = [[i for i in range(b) if owners[i] == r] for r in range(cp_size)]
    rows = rows_bucket(max(len(o) for o in owned))
    g = cp_size * rows
    layout = kv_cache.layout
    n = layout.num_tokens
    mine = owned[cp_rank]
    need = n + len(mine) + 1                               # the valid slots and one scratch slot
    capacity = kv_cache.capacity_for(need)
    kv_len = min(kv_bucket(need), capacity)
    seqs_after = set(layout.sequence_ids) | {seq_ids[i] for i in mine}
    mode = "lengths" if len(seqs_after) <= 1 else "masked"
    kernel = decode_kernel_name(kv_cache.device.type, kv_cache.dtype, head_dim, mode)

    meta64 = torch.zeros(5 * rows + 2 * g, dtype=torch.long)
    ids, pos, slots, seq, out_rows = (meta64[j * rows:(j + 1) * rows] for j in range(5))
    q_seq, q_pos = meta64[5 * rows:5 * rows + g], meta64[5 * rows + g:]
    seq.fill_(-1)
    slots.fill_(n + len(mine))                             # padding rows: the scratch slot
    out_rows.fill_(b)                                      # padding rows: the dump row
    for i, bi in enumerate(mine):
        ids[i], pos[i], slots[i], seq[i], out_rows[i] = tokens[bi], cached[bi], n + i, seq_ids[bi], bi
    meta32 = torch.zeros(3 * g + 2, dtype=torch.int32)
    meta32[:g + 1] = torch.arange(g + 1, dtype=torch.int32)
    lengths = meta32[2 * g + 2:]
    lengths.fill_(1)                                       # padding rows: slot 0 (never read)
    q_seq.fill_(-2)                                        # padding rows: matches no slot (free ones are -1)
    fixup = False
    for r in range(cp_size):
        for i, bi in enumerate(owned[r]):
            row, s = r * rows + i, seq_ids[bi]
            q_seq[row], q_pos[row] = s, cached[bi]
            length = layout.tokens_of(s) + (1 if bi in mine else 0)
            lengths[row] = length
            fixup |= length == 0
    fixup = fixup and kernel == "aten._flash_attention_forward"
    generation = kv_cache.allocations + (1 if capacity > kv_cache.capacity else 0)
    key = StepKey(rows, g, kv_len, mode, kernel, fixup, generation)
    return StaticDecode(key, owned, meta64, meta32, need)


class DecodeStep:
    """The device side of a static decode step of one :class:`StepKey`: input buffers, the
    round's :class:`~cp_megatron.attention.plan.AttentionPlan`, and :meth:`forward`.

    Args:
        key: the step's key.
        stage: this rank's model stage; kv_cache: its cache.
        cp_rank, cp_size: this rank and N; strategy: the plan's variant (all-gather-q at N > 1);
        cp_group: the CP group (None at CP 1).

    Buffers (device, allocated once): ``meta64`` / ``meta32`` (:class:`StaticDecode`) and their
    views, and for a pipeline stage after the first ``hidden_in [R, D]`` (the engine receives into
    it).  Everything :meth:`forward` reads is in them, so a captured graph of it replays any
    step of the same key once they are loaded (:meth:`load`).
    """

    def __init__(self, key: StepKey, *, stage, kv_cache: KVCache, cp_rank: int, cp_size: int,
                 strategy: str, cp_group=None) -> None:
        self.key, self.stage, self.kv_cache, self.cp_group = key, stage, kv_cache, cp_group
        r, g, dev = key.rows_per_rank, key.num_rows, stage.device
        self.meta64 = torch.empty(5 * r + 2 * g, dtype=torch.long, device=dev)
        self.meta32 = torch.empty(3 * g + 2, dtype=torch.int32, device=dev)
        self.ids, self.positions, self.slots, self.seq_ids, self.out_rows = (
            self.meta64[j * r:(j + 1) * r] for j in range(5))
        self.q_seq, self.q_pos = self.meta64[5 * r:5 * r + g], self.meta64[5 * r + g:]
        self.lengths = self.meta32[2 * g + 2:]
        self.hidden_in = None if stage.layout.is_first else torch.empty(
            r, stage.config.hidden_size, dtype=stage.dtype, device=dev)
        self.decode = DecodeBatch(key.mode, g, lengths=self.lengths, kv_len=key.kv_len, kernel=key.kernel,
                                  cu_seqlens_q=self.meta32[:g + 1], cu_seqlens_k=self.meta32[g + 1:2 * g + 2])
        self.plan = AttentionPlan(strategy=strategy, cp_rank=cp_rank, cp_size=cp_size, num_queries=r, q_len=r,
                                  kv_len=key.kv_len, local_kv_len=key.kv_len, decode=self.decode)

    def load(self, static: StaticDecode) -> None:
        """Copy the round's packed inputs into the device buffers (two host-to-device copies)."""
        self.meta64.copy_(static.meta64)
        self.meta32.copy_(static.meta32)

    def forward(self, stats=None) -> torch.Tensor:
        """The step's device work: the attention mask or the layout update it needs, then the
        stage on the R rows.  Returns logits float32 ``[R, vocab]`` on the last stage, else hidden
        ``[R, D]``.  No host sync, no host-to-device copy, no data-dependent shape."""
        d = self.decode
        if d.mode == "masked":     # the cache holds several sequences: visibility from its device layout
            self.kv_cache.write_device_layout(self.slots, self.seq_ids, self.positions)
            slot_seq, slot_pos = self.kv_cache.device_layout()
            slot_seq, slot_pos = slot_seq[:d.kv_len], slot_pos[:d.kv_len]
            d.hidden = (slot_seq[None, :] != self.q_seq[:, None]) | (slot_pos[None, :] > self.q_pos[:, None])
        elif d.kernel == "math":   # one sequence: row r sees slots [0, lengths[r])
            d.hidden = torch.arange(d.kv_len, device=self.lengths.device)[None, :] >= self.lengths[:, None]
        if self.key.fixup:
            d.empty_rows = self.lengths == 0
        inputs = self.ids if self.hidden_in is None else self.hidden_in
        return self.stage(inputs, self.positions, self.kv_cache, self.plan, cp_group=self.cp_group, stats=stats)


def sampling_rows(static: StaticDecode, cp_rank: int, seq_ids: Sequence[int], padding) -> list:
    """Per row of this rank's step: the sequence id of its real rows, ``padding`` for the rest."""
    mine = [seq_ids[b] for b in static.owned[cp_rank]]
    return mine + [padding] * (static.key.rows_per_rank - len(mine))


def step_lru(cache: dict, key, make, limit: int) -> object:
    """``cache[key]``, made by ``make()`` when absent; the least recently used entry goes past
    ``limit`` entries (dicts keep insertion order)."""
    hit = cache.pop(key, None)
    if hit is None:
        hit = make()
    cache[key] = hit
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
    return hit


def clear_older(cache: dict, generation: int) -> None:
    """Drop the entries of ``cache`` (keyed by :class:`StepKey`) of another storage generation."""
    for key in [k for k in cache if k.generation != generation]:
        del cache[key]


__all__ = ["DecodeStep", "StaticDecode", "StepKey", "clear_older", "kv_bucket", "plan_static_decode",
           "rows_bucket", "sampling_rows", "step_lru"]
