"""Peak RSS per rank and KV-cache allocations for a long prefill and a few decode tokens.

    python -m benchmarks.kv_memory --tokens 32768 --cp 2 --checkout after=. \
        --checkout before=/tmp/cp_megatron_before --output docs/bench/kv_memory.json

For each checkout (run in a fresh process with it on PYTHONPATH), CP ranks of the dummy
``tiny-long`` model (float32) prefill ``--tokens`` random tokens in one round, then decode
``--decode`` tokens.  Each rank reports its peak RSS (``ru_maxrss``) after the prefill
and after the decode, the cache storage reserved, and how often the storage was
allocated (where the checkout counts it).  The cache is reserved as the main job does:
``sharding.kv_slots_per_rank`` where the checkout has it, else nothing (as before).

Source: issue "A GPU-ready hot path" (memory acceptance); docs/design.md §10.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path



def _job(tokens: int, decode: int, cp: int) -> dict:
    import resource

    import torch

    from cp_megatron import parallel_state, sharding
    from cp_megatron.engine import InferenceEngine
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.llama import LlamaStage, StageLayout
    from cp_megatron.model.weights import DummyReader, load_weights

    topo = parallel_state.initialize(1, cp, 1)
    config = get_preset("tiny-long")
    stage = LlamaStage(config, StageLayout())
    load_weights(stage, DummyReader(config, seed=0))
    reserve = getattr(sharding, "kv_slots_per_rank", None)
    capacity = reserve(tokens, decode, cp) if reserve else 0
    engine = InferenceEngine(stage, topo, kv_capacity=capacity)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731  (KiB on Linux)
    before = peak()
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    logits, metrics = engine.forward({0: ids})
    after_prefill = peak()
    for _ in range(decode):
        logits, _ = engine.forward({0: [int(logits[0].argmax())]})
    cache = engine.kv_cache
    return {"cp_rank": topo.cp_rank, "kv_capacity_reserved": capacity, "ttft_s": metrics.time_s,
            "rss_before_prefill_bytes": before, "rss_after_prefill_bytes": after_prefill,
            "rss_after_decode_bytes": peak(), "kv_tokens": cache.num_tokens,
            "kv_valid_bytes": cache.nbytes(), "kv_storage_slots": cache.capacity,
            "kv_allocations": getattr(cache, "allocations", None)}


def _measure(tokens: int, decode: int, cp: int) -> list[dict]:
    from cp_megatron.launcher import spawn

    return spawn(_job, cp, (tokens, decode, cp), timeout_s=1800)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--decode", type=int, default=8)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--output")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # inside one checkout: print the per-rank results as JSON
        print(json.dumps(_measure(args.tokens, args.decode, args.cp)))
        return 0
    report = {"model": "tiny-long", "dtype": "float32", "tokens": args.tokens, "decode": args.decode,
              "cp": args.cp, "results": {}}
    here = Path(__file__).resolve()
    for item in args.checkout or [f"current={here.parents[1]}"]:
        label, _, path = item.partition("=")
        env = dict(os.environ, PYTHONPATH=str(Path(path).resolve()))
        proc = subprocess.run([sys.executable, str(here), "--worker", "--tokens", str(args.tokens),
                               "--decode", str(args.decode), "--cp", str(args.cp)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"kv_memory: {label}: {proc.stderr[-2000:]}")
        ranks = json.loads(proc.stdout.strip().splitlines()[-1])
        report["results"][label] = ranks
        for r in ranks:
            print(f"[kv_memory] {label} rank {r['cp_rank']}: peak RSS {r['rss_after_prefill_bytes'] / 2**20:.0f} MiB "
                  f"after prefill, {r['rss_after_decode_bytes'] / 2**20:.0f} MiB after decode; KV "
                  f"{r['kv_valid_bytes'] / 2**20:.0f} MiB valid in {r['kv_storage_slots']} slots, "
                  f"allocations {r['kv_allocations']}; TTFT {r['ttft_s']:.2f} s", flush=True)
    if args.output:
        from cp_megatron.atomic import write_json   # the driver's checkout (workers may be older)

        write_json(Path(args.output), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
