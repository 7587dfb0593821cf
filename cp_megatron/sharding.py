"""Load-balanced sharding of sequences over CP ranks, and decode placement.

Pure: no torch.distributed, no megatron.  Every token a rank holds carries its global
position and sequence id (docs/design.md §2); these functions say which tokens go where.

* Full prefill (§3.3): a sequence of T tokens is cut into 2N chunks whose sizes differ by
  at most one; rank r takes chunks r and 2N-1-r, so every rank gets the same share of
  the causal attention work.  Any T works (1, a prime, T < N): chunks may be empty.
* Partial prefill (§3.5.1): the same split applies to the T new tokens only, at positions
  P .. P+T-1; the cached tokens stay where earlier rounds put them.
* Decode (§3.5.3): the KV of a new token goes to one rank, round-robin and offset by
  one each step, so no rank's cache fills first.

Source: arXiv 2411.01783 §3.3, §3.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def chunk_bounds(length: int, num_chunks: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into ``num_chunks`` contiguous chunks, sizes differing by <= 1.

    Raises:
        ValueError: negative length or num_chunks < 1.
    """
    if length < 0 or num_chunks < 1:
        raise ValueError(f"chunk_bounds: need length >= 0 and num_chunks >= 1, got {length}, {num_chunks}")
    cuts = [(i * length) // num_chunks for i in range(num_chunks + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def load_balanced_ranges(length: int, cp_size: int, cp_rank: int) -> list[tuple[int, int]]:
    """Index ranges ``[(a, b), (c, d)]`` of a length-``length`` sequence owned by ``cp_rank``.

    Rank r owns chunks r and 2N-1-r of the 2N-chunk split (§3.3).
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    chunks = chunk_bounds(length, 2 * cp_size)
    return [chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]]


@dataclass(frozen=True)
class Shard:
    """The tokens of a (multi-sequence) batch that one CP rank holds.

    Attributes:
        index: int64 ``[n]`` indices into the flat concatenation of the batch's new tokens.
        positions: int64 ``[n]`` global positions (cached length of the sequence + offset).
        seq_ids: int64 ``[n]`` sequence ids (the sequence's index in the batch).
    """

    index: torch.Tensor
    positions: torch.Tensor
    seq_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


def shard_new_tokens(new_lengths: Sequence[int], cp_size: int, cp_rank: int,
                     cached_lengths: Sequence[int] | None = None,
                     seq_ids: Sequence[int] | None = None) -> Shard:
    """Load-balanced shard of the new tokens of a batch (full or partial prefill).

    Args:
        new_lengths: T_b new tokens per sequence b (>= 0).
        cp_size, cp_rank: N and this rank.
        cached_lengths: P_b tokens already cached per sequence (positions start there);
            default 0 (full prefill).
        seq_ids: sequence id per sequence; default 0..B-1.

    Returns:
        :class:`Shard` for this rank: tokens in order (sequence, chunk r, chunk 2N-1-r).

    Raises:
        ValueError: negative lengths, mismatched list lengths, bad rank.
    """
    cached_lengths = [0] * len(new_lengths) if cached_lengths is None else list(cached_lengths)
    seq_ids = list(range(len(new_lengths))) if seq_ids is None else list(seq_ids)
    if not (len(cached_lengths) == len(seq_ids) == len(new_lengths)):
        raise ValueError("new_lengths, cached_lengths and seq_ids must have one entry per sequence")
    if any(t < 0 for t in new_lengths) or any(p < 0 for p in cached_lengths):
        raise ValueError(f"token counts must be >= 0, got new={list(new_lengths)}, cached={cached_lengths}")
    index, positions, ids = [], [], []
    offset = 0
    for t, p, s in zip(new_lengths, cached_lengths, seq_ids):
        for a, b in load_balanced_ranges(t, cp_size, cp_rank):
            index.append(torch.arange(offset + a, offset + b))
            positions.append(torch.arange(p + a, p + b))
            ids.append(torch.full((b - a,), s, dtype=torch.long))
        offset += t
    cat = lambda xs: torch.cat(xs).long() if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return Shard(cat(index), cat(positions), cat(ids))


def decode_owner(step: int, seq_id: int, cp_size: int) -> int:
    """CP rank that stores the KV of sequence ``seq_id``'s token generated at ``step``.

    Round-robin over ranks, offset by one each step (and by the sequence id, so the
    sequences of a batch spread over ranks at every step).
    """
    return (step + seq_id) % cp_size


def kv_slots_per_rank(prompt_tokens: int, new_tokens: int, cp_size: int, margin_tokens: int = 0) -> int:
    """Cache slots one CP rank reserves for a prompt, the tokens generated after it and a
    margin for the turns that follow.

    A full prefill gives a rank two of 2N chunks whose sizes differ by at most one
    (at most ceil(T / N) + 1 tokens); decode tokens go round-robin (at most
    ceil(G / N) + 1 per rank); a later turn's partial prefill is split the same way as a
    prompt, so ``margin_tokens`` of context cost ceil(M / N) + 1 slots per rank.  Reserving
    this up front means the cache is allocated once.

    Args:
        prompt_tokens: T of the prefill (tokens); new_tokens: G, tokens to generate.
        cp_size: N.
        margin_tokens: M, context tokens reserved for later turns (0: none).

    Returns:
        Slots (tokens) per rank.

    Raises:
        ValueError: a negative count or ``cp_size`` < 1.
    """
    if cp_size < 1 or min(prompt_tokens, new_tokens, margin_tokens) < 0:
        raise ValueError(f"kv_slots_per_rank: expected counts >= 0 and cp_size >= 1, got prompt "
                         f"{prompt_tokens}, new {new_tokens}, margin {margin_tokens}, cp {cp_size}")
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    margin = ceil(margin_tokens, cp_size) + 1 if margin_tokens else 0
    return ceil(prompt_tokens, cp_size) + 1 + ceil(new_tokens, cp_size) + 1 + margin


def kv_growth_slots(growth_tokens: int, cp_size: int) -> int:
    """Slots per rank of one growth step of ``growth_tokens`` context tokens: ceil(G / N)."""
    if growth_tokens < 1 or cp_size < 1:
        raise ValueError(f"kv_growth_slots: expected growth_tokens >= 1 and cp_size >= 1, got "
                         f"{growth_tokens}, {cp_size}")
    return -(-growth_tokens // cp_size)
