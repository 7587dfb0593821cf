"""Attention test cases: global inputs plus a placement of tokens on CP ranks.

A case is a list of *calls*; each call says which global tokens are queries and which are
keys/values on each CP rank.  Every rank builds the same global tensors from the case's
seed, runs ``context_parallel_attention`` on its tokens and returns its outputs; the
test compares them with the float64 reference on the unsharded inputs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from cp_megatron.sharding import decode_owner, shard_new_tokens


@dataclass
class Call:
    q_idx: list[torch.Tensor]      # per rank: indices into the global token arrays
    kv_idx: list[torch.Tensor]


@dataclass
class Case:
    name: str
    seq_lens: list[int]            # tokens per sequence (global arrays hold all of them)
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    causal: bool = True
    dtype: torch.dtype = torch.float32
    strategy: str = "auto"
    calls: list[Call] = field(default_factory=list)

    def tensors(self):
        """Global q [N, NH, DH], k, v [N, NKV, DH] (unit variance), pos, seq [N]."""
        g = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        n = sum(self.seq_lens)
        q = torch.randn(n, self.num_heads, self.head_dim, generator=g)
        k = torch.randn(n, self.num_kv_heads, self.head_dim, generator=g)
        v = torch.randn(n, self.num_kv_heads, self.head_dim, generator=g)
        pos = torch.cat([torch.arange(L) for L in self.seq_lens]).long()
        seq = torch.cat([torch.full((L,), s) for s, L in enumerate(self.seq_lens)]).long()
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), pos, seq


def _offsets(seq_lens):
    out, acc = [], 0
    for L in seq_lens:
        out.append(acc)
        acc += L
    return out


def full_prefill(name, seq_lens, cp_size, **kw) -> Case:
    """Every token new, load-balanced per sequence; queries and KV on the same rank."""
    case = Case(name, list(seq_lens), **kw)
    idx = [shard_new_tokens(seq_lens, cp_size, r).index for r in range(cp_size)]
    case.calls.append(Call(idx, idx))
    return case


def partial_prefill(name, cached, new, cp_size, *, weights=(3, 0, 1, 2), strided=False, **kw) -> Case:
    """P_b cached tokens placed unevenly (some ranks none), T_b new tokens load-balanced."""
    seq_lens = [p + t for p, t in zip(cached, new)]
    case = Case(name, seq_lens, **kw)
    offs = _offsets(seq_lens)
    w = [weights[r % len(weights)] for r in range(cp_size)]
    if sum(w) == 0:
        w[0] = 1
    cached_on = [[] for _ in range(cp_size)]
    for off, p in zip(offs, cached):
        if strided:  # token j on rank j % N: irregular positions everywhere
            for r in range(cp_size):
                cached_on[r].append(torch.arange(off + r, off + p, cp_size))
            continue
        cuts = [0]
        for r in range(cp_size):
            cuts.append(cuts[-1] + (p * w[r]) // sum(w))
        cuts[-1] = p
        for r in range(cp_size):
            cached_on[r].append(torch.arange(off + cuts[r], off + cuts[r + 1]))
    q_idx, kv_idx = [], []
    for r in range(cp_size):
        shard = shard_new_tokens(new, cp_size, r)
        # map shard positions (local to the new tokens) to global token indices
        new_idx = torch.cat([torch.arange(o + p, o + p + t) for o, p, t in zip(offs, cached, new)])
        mine = new_idx[shard.index] if len(shard) else torch.zeros(0, dtype=torch.long)
        q_idx.append(mine)
        kv_idx.append(torch.cat(cached_on[r] + [mine]).long())
    case.calls.append(Call(q_idx, kv_idx))
    return case


def decode(name, prompt_lens, steps, cp_size, **kw) -> Case:
    """Prefill shard, then ``steps`` decode steps: token t of sequence b (its query and
    its KV) lives on decode_owner(t, b, N); one attention call per step."""
    seq_lens = [p + steps for p in prompt_lens]
    case = Case(name, seq_lens, **kw)
    offs = _offsets(seq_lens)
    kv_on = []
    for r in range(cp_size):
        shard = shard_new_tokens(prompt_lens, cp_size, r)
        prompt_idx = torch.cat([torch.arange(o, o + p) for o, p in zip(offs, prompt_lens)])
        kv_on.append([prompt_idx[shard.index]])
    for t in range(steps):
        q_idx = [[] for _ in range(cp_size)]
        for b, (o, p) in enumerate(zip(offs, prompt_lens)):
            owner = decode_owner(t, b, cp_size)
            tok = torch.tensor([o + p + t])
            q_idx[owner].append(tok)
            kv_on[owner].append(tok)
        case.calls.append(Call([torch.cat(x) if x else torch.zeros(0, dtype=torch.long) for x in q_idx],
                               [torch.cat(x).long() for x in kv_on]))
    return case


def all_cases(cp_size: int) -> list[Case]:
    """The acceptance matrix of the attention core for one CP size."""
    n = cp_size
    cases = []
    for length in (1, 2, 7, 97, 1000, 4099):
        for strategy in ("pass-kv", "pass-q", "auto"):
            if length == 4099 and strategy == "auto":
                continue  # auto picks pass-kv for full prefill (asserted in test_heuristic)
            cases.append(full_prefill(f"full-{length}-{strategy}", [length], n, strategy=strategy,
                                      num_heads=4 if length == 4099 else 8))
    for nh, nkv in ((4, 4), (8, 2), (4, 1)):
        for strategy in ("pass-kv", "pass-q"):
            cases.append(full_prefill(f"gqa{nh}x{nkv}-{strategy}", [300], n, strategy=strategy,
                                      num_heads=nh, num_kv_heads=nkv))
    for strategy in ("pass-kv", "pass-q", "auto", "all-gather-q", "replicated-q"):
        cases.append(full_prefill(f"multiseq-{strategy}", [37, 200, 5, 1], n, strategy=strategy))
        cases.append(full_prefill(f"noncausal-{strategy}", [97, 30], n, strategy=strategy, causal=False))
        cases.append(partial_prefill(f"partial-{strategy}", [300, 0, 40], [120, 50, 3], n, strategy=strategy))
        cases.append(partial_prefill(f"partial-strided-{strategy}", [257], [64], n, strategy=strategy,
                                     strided=True, num_kv_heads=1))
        cases.append(decode(f"decode-{strategy}", [50, 33, 7], 8, n, strategy=strategy))
    cases.append(decode("decode-one-all-gather-q", [70], 6, n, strategy="all-gather-q"))   # batch 1: a view
    cases.append(decode("decode-one-replicated-q", [70], 6, n, strategy="replicated-q"))
    for strategy in ("pass-kv", "pass-q", "all-gather-q", "replicated-q"):
        cases.append(full_prefill(f"bf16-full-{strategy}", [1000], n, strategy=strategy,
                                  dtype=torch.bfloat16))
        cases.append(partial_prefill(f"bf16-partial-{strategy}", [400], [100], n, strategy=strategy,
                                     dtype=torch.bfloat16))
        cases.append(decode(f"bf16-decode-{strategy}", [200], 8, n, strategy=strategy,
                            dtype=torch.bfloat16))
    return cases
