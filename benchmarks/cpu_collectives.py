"""Latency of decode's CP collectives on one CPU machine: gloo against shared memory.

    python -m benchmarks.cpu_collectives --ranks 2 --calls 2000 --output docs/bench/cpu_collectives.json

Spawns ``--ranks`` ranks (our launcher, gloo, each bound to a core of its own), enables
:mod:`cp_megatron.shm_collectives`, and times, interleaved in rounds of 100 calls, each
collective a decode layer of the default job makes (all-gather-Q at batch 1: the query
block ``[q_len, NH, DH]`` float32 all_gather, then the packed partials ``[N * q_len, NH,
DH + 1]`` all_to_all), once through torch.distributed (gloo) and once through shared memory.
Every call is timed on every rank; reported per rank are the median and mean of the
rank's calls, and the ratio gloo / shm of the medians.  Also checked: both give
bit-identical results.

Source: docs/performance.md §6 ("CPU collectives").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from cp_megatron.atomic import write_json


def _rank(calls: int, q_len: int, heads: int, head_dim: int) -> dict:
    from cp_megatron import shm_collectives
    from cp_megatron.launcher import bind_cores

    n, r = dist.get_world_size(), dist.get_rank()
    bound = bind_cores(r, n, 1) is not None
    torch.set_num_threads(1)
    group = dist.new_group(list(range(n)))
    if not shm_collectives.setup(True, group, device="cpu", bound=bound):
        raise RuntimeError(f"shared-memory collectives not available (bound={bound}, "
                           f"LOCAL_WORLD_SIZE={os.environ.get('LOCAL_WORLD_SIZE')})")
    q = torch.randn(q_len, heads, head_dim) + r
    partials = torch.randn(n * q_len, heads, head_dim + 1) + r
    gathered = torch.empty(n * q_len, heads, head_dim)
    owned = torch.empty_like(partials)

    def via_dist(name):
        if name == "all_gather":
            dist.all_gather_into_tensor(gathered, q, group=group)
        else:
            dist.all_to_all_single(owned, partials, group=group)

    def via_shm(name):
        if name == "all_gather":
            shm_collectives.all_gather_single(gathered, q, group)
        else:
            shm_collectives.all_to_all_single(owned, partials, group)

    results = {}
    for name in ("all_gather", "all_to_all"):
        via_dist(name)
        ref = (gathered if name == "all_gather" else owned).clone()
        via_shm(name)
        same = torch.equal(ref, gathered if name == "all_gather" else owned)
        times = {"gloo": [], "shm": []}
        for _ in range(max(1, calls // 100)):
            for label, fn in (("gloo", via_dist), ("shm", via_shm)):
                dist.barrier()
                for _ in range(100):
                    t0 = time.perf_counter()
                    fn(name)
                    times[label].append(time.perf_counter() - t0)
        results[name] = {"bit_identical": same, **{
            label: {"median_us": statistics.median(v) * 1e6, "mean_us": statistics.fmean(v) * 1e6,
                    "calls": len(v)} for label, v in times.items()}}
        results[name]["gloo_over_shm"] = results[name]["gloo"]["median_us"] / results[name]["shm"]["median_us"]
    return results


def main(argv: list[str] | None = None) -> int:
    from cp_megatron.launcher import spawn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000, help="calls per collective and transport")
    ap.add_argument("--q-len", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9, help="NH (SmolLM2-135M: 9)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    per_rank = spawn(_rank, args.ranks, (args.calls, args.q_len, args.heads, args.head_dim), timeout_s=600)
    report = {"command": "python -m benchmarks.cpu_collectives " + " ".join(argv or []),
              "ranks": args.ranks, "q_len": args.q_len, "heads": args.heads, "head_dim": args.head_dim,
              "per_rank": per_rank}
    print(json.dumps(report, indent=1))
    if args.output:
        write_json(args.output, report)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
