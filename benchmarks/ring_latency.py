"""Latency of one decode layer's ring traffic on gloo: the P2P exchange and the all_to_all.

    python -m benchmarks.ring_latency --calls 2000 --output docs/bench/ring_latency.json

Two ranks, each bound to a core of its own before gloo starts (as ``cp-megatron run`` does,
``runtime.bind_cores``), time ``--calls`` of each of: the ring exchange of a decode query
block (``batch_isend_irecv`` of ``[1, 9, 64]`` float32 both ways), pass-Q's return of the
partials (``all_to_all_single`` of ``[2, 1, 9, 65]``), and one whole decode
``planned_attention`` (one query against 2 x 2,048 cached keys, SmolLM2's 9 / 3 heads).
Reported per rank: the 50th, 90th and 99th percentiles in microseconds.  These are the two
meetings per layer that decode at CP 2 pays (arXiv 2411.01783 Alg. 3 / 4) and that CP 1 does
not: docs/performance.md §6 reads the default job's CP2 / CP1 decode ratio from them.

Source: issue "A GPU-ready hot path" (decode ratio); docs/performance.md §6.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from cp_megatron.atomic import write_json


def _percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {f"p{int(q * 100)}_us": round(samples[min(len(samples) - 1, int(len(samples) * q))] * 1e6, 1)
            for q in (0.5, 0.9, 0.99)}


def _job(calls: int) -> dict:
    from cp_megatron import parallel_state
    from cp_megatron.attention.api import planned_attention
    from cp_megatron.attention.plan import build_plan
    from cp_megatron.launcher import bind_cores

    cores = bind_cores(int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]), 1)
    parallel_state.init_distributed("gloo", 300)
    topo = parallel_state.initialize(1, 2, 1)
    group, rank = parallel_state.get_cp_group(), topo.cp_rank
    peer = dist.get_global_rank(group, 1 - rank)
    cached = 2048   # per rank; positions interleaved so both ranks hold half of one sequence
    kv = [(torch.arange(r, 2 * cached, 2), torch.zeros(cached, dtype=torch.long)) for r in range(2)]
    kv[0] = (torch.cat([kv[0][0], torch.tensor([2 * cached])]), torch.cat([kv[0][1], torch.tensor([0])]))
    queries = [(torch.tensor([2 * cached]), torch.tensor([0])), (torch.zeros(0, dtype=torch.long),) * 2]
    plan = build_plan("pass-q", rank, queries, kv)
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(len(queries[rank][0]), 9, 64, generator=gen)
    k, v = (torch.randn(len(kv[rank][0]), 3, 64, generator=gen) for _ in range(2))
    block, recv = torch.randn(1, 9, 64, generator=gen), torch.empty(1, 9, 64)
    partials, owned = torch.randn(2, 1, 9, 65, generator=gen), torch.empty(2, 1, 9, 65)

    def exchange() -> None:
        for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, block, peer, group),
                                           dist.P2POp(dist.irecv, recv, peer, group)]):
            req.wait()

    result = {"rank": rank, "cores": cores}
    for name, fn in (("ring_exchange", exchange),
                     ("all_to_all", lambda: dist.all_to_all_single(owned, partials, group=group)),
                     ("decode_planned_attention", lambda: planned_attention(q, k, v, plan, group=group))):
        for _ in range(50):
            fn()
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        result[name] = _percentiles(samples)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--output", help="JSON file")
    args = parser.parse_args(argv)
    from cp_megatron.launcher import spawn

    torch.set_num_threads(1)
    ranks = spawn(_job, 2, (args.calls,), timeout_s=600, backend=None)
    for r in ranks:
        print(f"[ring_latency] rank {r['rank']} cores {r['cores']}: " + ", ".join(
            f"{k} " + "/".join(str(x) for x in v.values()) + " us (p50/p90/p99)"
            for k, v in r.items() if isinstance(v, dict)))
    if args.output:
        write_json(args.output, {"calls": args.calls, "ranks": ranks})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
