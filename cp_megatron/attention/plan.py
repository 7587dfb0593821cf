"""The attention plan of one round: built once on the host, read by every layer.

Every layer of a round attends the same query tokens to the same KV slots (only the
values differ), so everything that depends on positions alone is decided once per round
(docs/design.md §9): the ring variant, the padded length of the rotating block, and for
each ring step the list of kernel calls (*blocks*) that attend the queries in hand to the
KV in hand.  A layer then does device work and the ring's P2P only: no host transfer,
no shape exchange, no mask built.  This is vLLM's per-step ``AttentionMetadata`` idea.

Visibility comes from positions and sequence ids alone (docs/design.md §2):

    kv token j is visible to query token i  <=>  seq(j) == seq(i) and pos(j) <= pos(i)

Queries are grouped into *runs* (one sequence, consecutive positions).  For a run with
positions [qa, qb] the KV slots of its sequence split into

* pos < qa             -> every query sees every key: one plain (non-causal) block;
* qa <= pos <= qb      -> the diagonal, cut into runs of consecutive positions [x, y]:
                          queries [x, y] against it form a square causal block, queries
                          (y, qb] see all of it (plain block), queries before x none;
* pos > qb             -> invisible: no block.

So no block ever needs an explicit mask, whatever the placement (load-balanced chunks,
round-robin decode tokens, uneven caches, several sequences): kernels see only plain or
square causal blocks.  A decode token is a run of one query: one plain block over the
KV slots of its sequence.  Padding slots (sequence id < 0) are in no block.

Source: arXiv 2411.01783 §3.3–3.5 (sharding, ring variants, decode); docs/design.md §2, §4, §9.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch

from cp_megatron.attention.heuristic import ALL_GATHER_Q, PASS_KV, PASS_Q, Q_VARIANTS, REPLICATED_Q

KVIndex = Union[slice, torch.Tensor]


@dataclass(frozen=True)
class Run:
    """Rows ``[start, stop)`` of a block: one sequence, consecutive positions from ``pos``."""

    start: int
    stop: int
    seq: int
    pos: int

    @property
    def last_pos(self) -> int:
        return self.pos + self.stop - self.start - 1


def find_runs(pos: torch.Tensor, seq: torch.Tensor) -> list[Run]:
    """Maximal runs of consecutive positions within one sequence; padding (seq < 0) dropped.

    Args:
        pos: int64 ``[T]`` global positions (host tensor).
        seq: int64 ``[T]`` sequence ids (host tensor), negative for padding.
    """
    n = pos.numel()
    if n == 0:
        return []
    breaks = (seq[1:] != seq[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = [0] + (torch.nonzero(breaks).flatten() + 1).tolist()
    stops = starts[1:] + [n]
    pos_l, seq_l = pos.tolist(), seq.tolist()
    return [Run(a, b, seq_l[a], pos_l[a]) for a, b in zip(starts, stops) if seq_l[a] >= 0]


@dataclass(frozen=True)
class Block:
    """One kernel call: query rows ``[q0, q1)`` of the block in hand against KV slots ``kv``.

    Attributes:
        q0, q1: query rows (contiguous) of the query block in hand.
        kv: KV slots of the KV block in hand: a ``slice`` (a view, no copy) or an int64
            index tensor (gathered with ``index_select``), on the plan's device.
        causal: square block with the same positions on both sides (q1 - q0 == KV slots,
            ascending positions): top-left causal.  Otherwise every query sees every key.
        first: no earlier block of the same accumulator wrote rows ``[q0, q1)``
            (set by :func:`build_plan`): the executor copies the result instead of
            merging it into an empty accumulator.
    """

    q0: int
    q1: int
    kv: KVIndex
    causal: bool = False
    first: bool = False

    def to(self, device: torch.device) -> "Block":
        if isinstance(self.kv, slice):
            return self
        return replace(self, kv=self.kv.to(device, non_blocking=True))


def _as_index(idx: torch.Tensor) -> KVIndex:
    """A slice when ``idx`` (host, ascending) is one contiguous range, else the tensor."""
    if idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx.clone()


def plan_blocks(q_pos: torch.Tensor, q_seq: torch.Tensor, kv_pos: torch.Tensor,
                kv_seq: torch.Tensor, *, causal: bool = True) -> list[Block]:
    """The blocks that attend queries (q_pos, q_seq) to KV slots (kv_pos, kv_seq) exactly.

    Args:
        q_pos, q_seq: int64 ``[Tq]`` host tensors, seq < 0 for padding rows.
        kv_pos, kv_seq: int64 ``[Tkv]`` host tensors, seq < 0 for padding slots.
        causal: apply pos(j) <= pos(i); otherwise only the sequences must match.

    Returns:
        Blocks (host index tensors) whose LSE-merge (Eq. 4) is the exact attention of
        every query row; rows that see no key are in no block.
    """
    blocks: list[Block] = []
    for run in find_runs(q_pos, q_seq):
        in_seq = kv_seq == run.seq
        if not causal:
            idx = torch.nonzero(in_seq).flatten()
            if idx.numel():
                blocks.append(Block(run.start, run.stop, _as_index(idx)))
            continue
        qa, qb = run.pos, run.last_pos
        if qa == qb:     # one query (a decode token): every key up to it, one plain block
            idx = torch.nonzero(in_seq & (kv_pos <= qa)).flatten()
            if idx.numel():
                blocks.append(Block(run.start, run.stop, _as_index(idx)))
            continue
        before = torch.nonzero(in_seq & (kv_pos < qa)).flatten()
        if before.numel():
            blocks.append(Block(run.start, run.stop, _as_index(before)))
        diag = torch.nonzero(in_seq & (kv_pos >= qa) & (kv_pos <= qb)).flatten()
        if diag.numel() == 0:
            continue
        diag = diag[torch.argsort(kv_pos[diag], stable=True)]
        for kr in find_runs(kv_pos[diag], torch.zeros_like(diag)):
            idx = diag[kr.start: kr.stop]
            q0 = run.start + (kr.pos - qa)                          # the query at position x
            q1 = run.start + (kr.last_pos - qa) + 1                 # one past position y
            blocks.append(Block(q0, q1, _as_index(idx), causal=q1 - q0 > 1))
            if q1 < run.stop:
                blocks.append(Block(q1, run.stop, _as_index(idx)))
    return blocks


@dataclass
class DecodeBatch:
    """One kernel call for a whole decode batch: every query row against its KV slots.

    Built once per round when every block of the round is one query row (decode) and the
    variant attends all rows at once (all-gather-Q, replicated-Q, or CP 1).  ``rows`` query rows:
    the gathered block of all-gather-Q and replicated-Q (``cp_size * q_len`` rows, rank-major,
    padding rows included), or the local queries at CP 1.  One of three modes:

    * "slice": exactly one row has keys here, in one contiguous slot range ``kv``: every
      row attends to that view (no gather; the other rows are padding, their partials are
      never read) -- batch 1;
    * "gather": ``kv_index`` int64 ``[rows, L]`` slots per row (padded with slot 0) and
      ``bias`` float32 ``[rows, L]`` (0 for a real slot, -inf for padding; lengths, not a
      causal mask: a decode row sees its whole prefix) -- one gather and one batched
      kernel;
    * "empty": no row has a key on this rank: the partials are (0, -inf).

    Two more modes are the static decode step's (:mod:`cp_megatron.decode_step`, issue #22):
    shapes fixed by the step's buckets, contents on the device, so that consecutive steps run the
    same kernels with the same shapes (what CUDA graph replay needs).  The KV is the view
    ``[0, kv_len)`` of the cache whatever the cached lengths:

    * "lengths": row r sees slots ``[0, lengths[r])`` (the cache holds one sequence, so its keys
      are a prefix): aten's varlen flash kernel with ``seqused_k`` on CUDA (fp16 / bf16), else
      the math kernel with ``hidden`` = slot >= length;
    * "masked": row r sees the slots of its sequence at positions <= its own, from the cache's
      device layout (several sequences interleaved in the cache): the math kernel with ``hidden``.

    Attributes:
        mode, rows, kv, kv_index, bias: as above (index tensors on the plan's device).
        lengths: int32 ``[rows]`` keys per row (what a varlen kernel takes as ``cache_seqlens``;
            ``seqused_k`` of the static step).
        kv_len: the static step's KV view length (slots).
        kernel: the static step's kernel (:func:`~cp_megatron.attention.kernels.decode_kernel_name`).
        cu_seqlens_q, cu_seqlens_k: int32 ``[rows + 1]`` (0..rows, and zeros) for the varlen kernel.
        hidden: bool ``[rows, kv_len]`` slots a row must not see (math kernel), made on the
            device by the step each time it runs.
        empty_rows: bool ``[rows]`` rows without keys whose LSE the varlen kernel must set to
            -inf, or None when no such row matters.
    """

    mode: str
    rows: int
    kv: Optional[slice] = None
    kv_index: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None
    kv_len: int = 0
    kernel: str = ""
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    empty_rows: Optional[torch.Tensor] = None
    _head_bias: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def static(self) -> bool:
        """The static decode step's modes ("lengths", "masked")."""
        return self.mode in ("lengths", "masked")

    def to(self, device: torch.device) -> "DecodeBatch":
        for name in ("kv_index", "bias", "lengths"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device, non_blocking=True))
        self._head_bias.clear()
        return self

    def head_bias(self, num_kv_heads: int) -> torch.Tensor:
        """``bias`` repeated per KV head, ``[NKV * rows, 1, L]`` (KV-head-major), made on the
        first layer's call and reused by the round's other layers."""
        got = self._head_bias.get(num_kv_heads)
        if got is None:
            got = self.bias.repeat(num_kv_heads, 1).unsqueeze(1)
            self._head_bias[num_kv_heads] = got
        return got


def build_decode_batch(steps: Sequence[tuple[int, Sequence[Block]]], q_len: int, num_queries: int
                       ) -> Optional[DecodeBatch]:
    """The :class:`DecodeBatch` of a plan: ``steps`` are (rank src, blocks of src's query rows
    against the local KV), rows ``src * q_len + q0`` of the gathered block; ``num_queries``
    the real query rows of all ranks.  None when a block has more than one query row (not a
    decode round).  Host work, once per round."""
    slots: dict[int, torch.Tensor] = {}
    for src, blocks in steps:
        for b in blocks:
            if b.q1 - b.q0 != 1 or b.causal:
                return None
            row = src * q_len + b.q0
            idx = torch.arange(b.kv.start, b.kv.stop) if isinstance(b.kv, slice) else b.kv
            slots[row] = idx if row not in slots else torch.cat([slots[row], idx])
    rows = len(steps) * q_len
    if not slots:
        return DecodeBatch("empty", rows)
    if len(slots) == 1 and num_queries == 1:     # batch 1: every other row is padding
        (idx,) = slots.values()
        kv = _as_index(torch.sort(idx).values)
        if isinstance(kv, slice):
            return DecodeBatch("slice", rows, kv=kv, lengths=torch.tensor([idx.numel()], dtype=torch.int32))
    longest = max(int(t.numel()) for t in slots.values())
    kv_index = torch.zeros(rows, longest, dtype=torch.long)
    bias = torch.full((rows, longest), float("-inf"))
    lengths = torch.zeros(rows, dtype=torch.int32)
    for row, idx in slots.items():
        n = int(idx.numel())
        kv_index[row, :n], bias[row, :n], lengths[row] = idx, 0.0, n
    return DecodeBatch("gather", rows, kv_index=kv_index, bias=bias, lengths=lengths)


@dataclass
class AttentionPlan:
    """What every layer of one round needs to run ring attention, decided once.

    Attributes:
        strategy: "pass-kv", "pass-q" (ring), "all-gather-q" or "replicated-q" (docs/design.md §7).
        cp_rank, cp_size: this rank and N.
        num_queries: this rank's query rows (Tq).
        q_len: pass-Q's rotating query block length: max Tq over ranks (padding rows
            are in no block).
        kv_len: pass-KV's rotating KV block length: max Tkv over ranks.  The caller
            passes KV with at least this many slots (cache storage is reserved that
            large, so the padded block is a view).
        local_kv_len: this rank's valid KV slots.
        steps: ``steps[s]`` are the blocks of ring step s, which holds rank
            ``(cp_rank - s) % N``'s rotating block: pass-KV: local queries against that
            rank's KV; pass-Q: that rank's queries against the local KV.
        causal, scale: the visibility rule and the softmax scale.
        decode: the whole batch as one kernel call (:class:`DecodeBatch`), for decode
            rounds of all-gather-Q, replicated-Q and CP 1; None otherwise.
        store_rows: replicated-Q: the rows of the gathered block (``cp_size * q_len`` rows, which
            the layers run on every rank) whose K/V this rank stores, ``[cp_rank * q_len,
            cp_rank * q_len + num_queries)``, handed to ``KVCache.begin_round(rows=...)``;
            None: every row the layers run is this rank's.
    """

    strategy: str
    cp_rank: int
    cp_size: int
    num_queries: int
    q_len: int
    kv_len: int
    local_kv_len: int
    steps: list[list[Block]] = field(default_factory=list)
    causal: bool = True
    scale: Optional[float] = None
    decode: Optional[DecodeBatch] = None
    store_rows: Optional[slice] = None

    @property
    def rows(self) -> int:
        """Query rows the layers run on this rank: the gathered block for replicated-Q, else
        this rank's queries."""
        return self.cp_size * self.q_len if self.strategy == REPLICATED_Q else self.num_queries

    @property
    def empty(self) -> bool:
        """No rank has a query or no rank has a key: the output is (0, -inf), no ring."""
        return self.q_len == 0 or self.kv_len == 0

    @property
    def sent_kv_len(self) -> int:
        """KV slots the layer must provide: the padded ring block (pass-KV) or its own."""
        return self.kv_len if self.strategy == PASS_KV and self.cp_size > 1 else self.local_kv_len

    @property
    def collectives_per_layer(self) -> int:
        """Communication calls a layer makes: 0 at CP 1; pass-KV N-1 ring exchanges;
        pass-Q N-1 and an all_to_all; all-gather-Q an all_gather and an all_to_all; replicated-Q
        one all_gather (of the partials)."""
        if self.cp_size == 1 or self.empty:
            return 0
        return {PASS_KV: self.cp_size - 1, PASS_Q: self.cp_size, ALL_GATHER_Q: 2, REPLICATED_Q: 1}[self.strategy]

    def num_blocks(self) -> int:
        return sum(len(s) for s in self.steps)

    def to(self, device: torch.device | str) -> "AttentionPlan":
        """Move the index tensors to ``device`` (once per round)."""
        device = torch.device(device)
        self.steps = [[b.to(device) for b in step] for step in self.steps]
        if self.decode is not None:
            self.decode.to(device)
        return self


def build_plan(strategy: str, cp_rank: int, q_layouts: Sequence[tuple[torch.Tensor, torch.Tensor]],
               kv_layouts: Sequence[tuple[torch.Tensor, torch.Tensor]], *, causal: bool = True,
               scale: Optional[float] = None) -> AttentionPlan:
    """Plan one round of ring attention from every rank's token placement.

    Args:
        strategy: "pass-kv", "pass-q", "all-gather-q" or "replicated-q" (already decided:
            Alg. 1 / Alg. 5 and :func:`~cp_megatron.attention.heuristic.choose_query_exchange`).
        cp_rank: this rank.
        q_layouts: per CP rank, (positions, sequence ids) int64 host ``[Tq_r]`` of its queries.
        kv_layouts: per CP rank, (positions, sequence ids) int64 host ``[Tkv_r]`` of its KV
            slots, in slot order (seq < 0: an empty slot).
        causal, scale: visibility rule and softmax scale (None: 1/sqrt(DH)).

    Returns:
        :class:`AttentionPlan` with host index tensors (call :meth:`AttentionPlan.to`).

    Raises:
        ValueError: an unknown strategy or layouts of different lengths.

    Source: arXiv 2411.01783 Alg. 2 (pass-KV), Alg. 3 (pass-Q), Alg. 4 (decode).
    """
    if strategy not in (PASS_KV, *Q_VARIANTS):
        raise ValueError(f"build_plan: strategy must be one of {(PASS_KV, *Q_VARIANTS)}, got {strategy!r}")
    size = len(q_layouts)
    if len(kv_layouts) != size or not 0 <= cp_rank < size:
        raise ValueError(f"build_plan: {len(q_layouts)} query layouts, {len(kv_layouts)} KV layouts, "
                         f"rank {cp_rank}")
    plan = AttentionPlan(strategy=strategy, cp_rank=cp_rank, cp_size=size,
                         num_queries=int(q_layouts[cp_rank][0].numel()),
                         q_len=max(int(p.numel()) for p, _ in q_layouts),
                         kv_len=max(int(p.numel()) for p, _ in kv_layouts),
                         local_kv_len=int(kv_layouts[cp_rank][0].numel()), causal=causal, scale=scale)
    if strategy == REPLICATED_Q:
        start = cp_rank * plan.q_len
        plan.store_rows = slice(start, start + plan.num_queries)
    if plan.empty:
        return plan
    written = torch.zeros(plan.q_len, dtype=torch.bool)      # rows of the accumulator written
    for step in range(size):
        src = (cp_rank - step) % size
        q_pos, q_seq = q_layouts[cp_rank] if strategy == PASS_KV else q_layouts[src]
        kv_pos, kv_seq = kv_layouts[src] if strategy == PASS_KV else kv_layouts[cp_rank]
        if strategy != PASS_KV:   # each step fills its own accumulator (that rank's partials)
            written.zero_()
        plan.steps.append(_mark_first(plan_blocks(q_pos, q_seq, kv_pos, kv_seq, causal=causal), written))
    if strategy in (ALL_GATHER_Q, REPLICATED_Q):
        plan.decode = build_decode_batch([((cp_rank - s) % size, b) for s, b in enumerate(plan.steps)],
                                         plan.q_len, sum(int(p.numel()) for p, _ in q_layouts))
    elif size == 1:
        plan.decode = build_decode_batch([(0, plan.steps[0])], plan.q_len, plan.num_queries)
    return plan


def _mark_first(blocks: list[Block], written: torch.Tensor) -> list[Block]:
    """Flag the blocks whose rows no earlier block wrote; mark their rows written."""
    out = []
    for b in blocks:
        rows = written[b.q0:b.q1]
        out.append(replace(b, first=not bool(rows.any())))
        rows.fill_(True)
    return out
