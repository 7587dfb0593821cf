"""Local attention of a query block against a KV block, planned from global positions.

Visibility comes from positions and sequence ids alone (docs/design.md §2):

    kv token j is visible to query token i  <=>  seq(j) == seq(i) and pos(j) <= pos(i)

Tokens are grouped into *runs* (same sequence, consecutive positions).  For a query run
with positions [qa, qb] the KV tokens of its sequence fall in three classes:

* pos < qa            -> every query sees every key: plain attention, no mask;
* qa <= pos <= qb     -> the diagonal: for each KV run [ea, eb] inside it, queries
                         [ea, eb] form a square causal block and queries (eb, qb] see
                         the whole run; queries before ea see none of it;
* pos > qb            -> invisible: skipped.

Short query runs (decode tokens, odd placements) and irregular diagonals are computed
with an explicit mask, which is then small by construction.  Padding slots carry
sequence id -1 and match nothing.  Partials are merged by LSE (Eq. 4) into float32
accumulators.

Source: arXiv 2411.01783 §3.3–3.5 (load-balanced sharding, partial prefill, decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cp_megatron.attention.kernels import attention_with_lse
from cp_megatron.attention.merge import NEG_INF, merge_into

# Query runs shorter than this are computed with an explicit mask (decode tokens etc.).
MIN_STRUCTURED_RUN = 16
# A diagonal split into more KV runs than this is computed with an explicit mask.
MAX_DIAGONAL_RUNS = 4


@dataclass(frozen=True)
class Run:
    """Tokens ``[start, stop)`` of a block: one sequence, consecutive positions from ``pos``."""

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
        pos: int64 ``[T]`` global positions (CPU).
        seq: int64 ``[T]`` sequence ids (CPU), -1 for padding.
    """
    n = pos.numel()
    if n == 0:
        return []
    breaks = (seq[1:] != seq[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = [0] + (torch.nonzero(breaks).flatten() + 1).tolist()
    stops = starts[1:] + [n]
    pos_l, seq_l = pos.tolist(), seq.tolist()
    return [Run(a, b, seq_l[a], pos_l[a]) for a, b in zip(starts, stops) if seq_l[a] >= 0]


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] along dim 0, as a view when idx is a contiguous ascending range."""
    if idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return t[int(idx[0]): int(idx[-1]) + 1]
    return t.index_select(0, idx.to(t.device))


class LocalAttention:
    """Accumulates the attention of local queries against any number of KV blocks.

    Args:
        q: ``[Tq, NH, DH]``; q_pos / q_seq: int64 ``[Tq]`` (CPU copies are made if needed).
        scale: softmax scale; causal: apply pos(j) <= pos(i).

    After one or more :meth:`add` calls, :attr:`out` ``[Tq, NH, DH]`` float32 and
    :attr:`lse` ``[Tq, NH]`` float32 hold the merged result (0 / -inf for rows that saw
    no key).
    """

    def __init__(self, q: torch.Tensor, q_pos: torch.Tensor, q_seq: torch.Tensor, *,
                 scale: float, causal: bool) -> None:
        self.q, self.scale, self.causal = q, scale, causal
        self.q_pos, self.q_seq = q_pos.cpu(), q_seq.cpu()
        self.runs = find_runs(self.q_pos, self.q_seq)
        self.out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        self.lse = torch.full(q.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)

    def add(self, k: torch.Tensor, v: torch.Tensor, kv_pos: torch.Tensor, kv_seq: torch.Tensor) -> None:
        """Attend the local queries to one KV block and merge the result.

        Args:
            k, v: ``[Tkv, NKV, DH]``; kv_pos / kv_seq: int64 ``[Tkv]`` (seq -1 = padding).
        """
        if not self.runs or k.shape[0] == 0:
            return
        kv_pos, kv_seq = kv_pos.cpu(), kv_seq.cpu()
        short: dict[int, list[Run]] = {}
        for run in self.runs:
            in_seq = kv_seq == run.seq
            if not self.causal:
                self._full(run.start, run.stop, k, v, torch.nonzero(in_seq).flatten())
            elif run.stop - run.start < MIN_STRUCTURED_RUN:
                short.setdefault(run.seq, []).append(run)
            else:
                self._causal_run(run, k, v, kv_pos, in_seq)
        for seq_id, runs in short.items():
            self._masked(runs, k, v, kv_pos, kv_seq == seq_id)

    # -- the three kinds of block -------------------------------------------------------
    def _merge(self, q0: int, q1: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        merge_into(self.out[q0:q1], self.lse[q0:q1], out, lse)

    def _full(self, q0: int, q1: int, k, v, kv_idx: torch.Tensor) -> None:
        if q1 <= q0 or kv_idx.numel() == 0:
            return
        out, lse = attention_with_lse(self.q[q0:q1], _take(k, kv_idx), _take(v, kv_idx),
                                      scale=self.scale)
        self._merge(q0, q1, out, lse)

    def _causal_run(self, run: Run, k, v, kv_pos, in_seq) -> None:
        qa, qb = run.pos, run.last_pos
        self._full(run.start, run.stop, k, v, torch.nonzero(in_seq & (kv_pos < qa)).flatten())
        diag = torch.nonzero(in_seq & (kv_pos >= qa) & (kv_pos <= qb)).flatten()
        if diag.numel() == 0:
            return
        order = torch.argsort(kv_pos[diag])
        diag = diag[order]
        kv_runs = find_runs(kv_pos[diag], torch.zeros_like(diag))
        if len(kv_runs) > MAX_DIAGONAL_RUNS:
            self._masked([run], k, v, kv_pos, in_seq & (kv_pos >= qa) & (kv_pos <= qb))
            return
        for kr in kv_runs:
            idx = diag[kr.start: kr.stop]
            ea, eb = kr.pos, kr.last_pos
            q0 = run.start + (ea - qa)                             # query at position ea
            q1 = run.start + (eb - qa) + 1                         # one past position eb
            out, lse = attention_with_lse(self.q[q0:q1], _take(k, idx), _take(v, idx),
                                          scale=self.scale, is_causal=True)
            self._merge(q0, q1, out, lse)
            self._full(q1, run.stop, k, v, idx)

    def _masked(self, runs: list[Run], k, v, kv_pos, kv_in) -> None:
        """Queries of ``runs`` (one sequence) against the selected keys with a dense mask."""
        kv_idx = torch.nonzero(kv_in).flatten()
        if kv_idx.numel() == 0:
            return
        q_idx = torch.cat([torch.arange(r.start, r.stop) for r in runs])
        q_pos = torch.cat([torch.arange(r.pos, r.last_pos + 1) for r in runs])
        mask = kv_pos[kv_idx][None, :] <= q_pos[:, None]          # [nq, nkv]
        out, lse = attention_with_lse(_take(self.q, q_idx), _take(k, kv_idx), _take(v, kv_idx),
                                      scale=self.scale, mask=mask.to(self.q.device))
        rows = q_idx.to(self.q.device)
        acc_out, acc_lse = self.out.index_select(0, rows), self.lse.index_select(0, rows)
        merge_into(acc_out, acc_lse, out, lse)
        self.out.index_copy_(0, rows, acc_out)
        self.lse.index_copy_(0, rows, acc_lse)
