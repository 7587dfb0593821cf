"""Restore from the host tier vs the prefill it replaces: a 4K-token document's KV at CP2.

The server's host tier (``serve.host_kv_cache_memory``, docs/serve.md) keeps an idle
sequence's KV in host memory when the device needs the room; a later request with that
prefix *restores* it (every CP rank copies its own shard back) instead of prefilling the
document again.  This measures both on the run config's engine (default
``configs/default.yaml``: SmolLM2-135M GGUF, CP2, float32, CPU), in spawned ranks:

1. a ``--tokens``-token document (seeded random ids) is prefilled once and offloaded
   (``InferenceEngine.offload``), which warms both paths up;
2. ``--repeats`` interleaved pairs, the order alternating (prefill then restore, restore
   then prefill): *prefill* = a full prefill of the document as a fresh sequence (the
   round that a restore replaces), the sequence freed after; *restore* =
   ``InferenceEngine.restore`` of the offloaded document, then offloaded again (its time
   recorded too).  Each sample is the slowest rank's wall time between two barriers (on
   CUDA after a synchronize of the device and the copy stream);
3. a check that the restored KV gives the prefilled one's logits: one 16-token question
   on the restored document and on a prefilled copy (``torch.equal``).

Output: medians (ms), the ratio prefill / restore (the acceptance asks >= 5x at 4K
tokens), every sample, the bytes per rank moved, and the machine's load average.

Run (from the repository root)::

    python -m benchmarks.kv_offload configs/default.yaml --tokens 4096 --repeats 7 \\
        --output docs/bench/kv_offload.json

Source: issue #23 (host offload of idle sessions); arXiv 2411.01783 §3.5 (persistent KV).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _rank_job(cfg, prep, tokens: int, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from cp_megatron import device as devices
    from cp_megatron.factory import rank_engine
    from cp_megatron.preflight import random_prompt

    cp = cfg.parallel.cp
    capacity = 3 * (-(-tokens // cp)) + 256                  # the document twice + a question
    topo, engine, _ = rank_engine(cfg, prep, kv_capacity=capacity)
    dev = engine.stage.device
    doc = random_prompt(tokens, prep.model_config.vocab_size, seed=0)
    question = random_prompt(16, prep.model_config.vocab_size, seed=1)

    def slowest(fn) -> float:
        """Wall time of ``fn`` on the slowest rank (s), between barriers."""
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        devices.synchronize(dev)
        engine.host_kv.synchronize()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=dev)   # NCCL: on the device
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    stored = 0                                                # the offloaded document's id
    engine.forward({stored: doc})
    first_offload = slowest(lambda: engine.offload(stored))
    prefill_s, restore_s, offload_s, next_id = [], [], [first_offload], 1

    def prefill() -> None:
        nonlocal next_id
        sid, next_id = next_id, next_id + 1
        prefill_s.append(slowest(lambda: engine.forward({sid: doc})))
        engine.truncate(sid, 0)

    def restore() -> None:
        restore_s.append(slowest(lambda: engine.restore(stored, stored, tokens)))
        offload_s.append(slowest(lambda: engine.offload(stored)))

    for i in range(repeats):
        for step in ((prefill, restore) if i % 2 == 0 else (restore, prefill)):
            step()
    shard_tokens = len(engine.host_kv.entries[stored].positions[topo.cp_rank])
    # The restored KV gives the prefilled KV's logits.
    engine.restore(stored, stored, tokens)
    engine.forward({next_id: doc})
    restored, _ = engine.forward({stored: question}, all_logits=True)
    prefilled, _ = engine.forward({next_id: question}, all_logits=True)
    host = engine.host_kv
    return {"cp_rank": topo.cp_rank, "prefill_s": prefill_s, "restore_s": restore_s, "offload_s": offload_s,
            "restored_logits_equal": bool(torch.equal(restored, prefilled)),
            "shard_tokens": shard_tokens, "shard_bytes": shard_tokens * engine.kv_cache.bytes_per_slot,
            "restored_bytes_total": host.restored_bytes, "restore_seconds_metric": host.restore_seconds,
            "copy_stream_async": host.stream.asynchronous, "device": str(dev)}


def main(argv=None) -> int:
    from cp_megatron.atomic import write_json
    from cp_megatron.bench.common import load_average, machine_info
    from cp_megatron.config import load_config
    from cp_megatron.launcher import spawn
    from cp_megatron.preflight import Prepared, check_model, context_limit, heuristic_hardware

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="configs/default.yaml")
    ap.add_argument("--tokens", type=int, default=4096, help="document length (tokens)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved prefill / restore pairs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole job")
    ap.add_argument("--output", help="JSON file (written atomically)")
    args = ap.parse_args(argv)

    cfg = load_config(Path(args.config), list(args.overrides))
    reader, _ = check_model(cfg)
    prep = Prepared(reader.config, [], [], None, heuristic_hardware(cfg), context_limit(cfg, reader.config))
    load_before = load_average()
    ranks = spawn(_rank_job, cfg.parallel.world_size, (cfg, prep, args.tokens, args.repeats),
                  timeout_s=args.timeout, threads_per_rank=cfg.runtime.threads_per_rank, backend=None)
    r0 = ranks[0]                                 # every rank's samples are the slowest rank's
    prefill_ms = statistics.median(r0["prefill_s"]) * 1e3
    restore_ms = statistics.median(r0["restore_s"]) * 1e3
    offload_ms = statistics.median(r0["offload_s"]) * 1e3
    report = {
        "benchmark": "kv_offload", "command": " ".join(["python -m benchmarks.kv_offload"] + (argv or sys.argv[1:])),
        "config": args.config, "overrides": args.overrides, "model": reader.config.name,
        "model_file": Path(reader.config.name).name, "dtype": cfg.model.dtype, "cp": cfg.parallel.cp, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
        "device": r0["device"], "copy_stream_async": r0["copy_stream_async"], "document_tokens": args.tokens,
        "repeats": args.repeats,
        "results": {"prefill_ms_median": prefill_ms, "restore_ms_median": restore_ms,
                    "offload_ms_median": offload_ms, "prefill_over_restore": prefill_ms / restore_ms,
                    "restored_logits_equal": all(r["restored_logits_equal"] for r in ranks),
                    "shard_bytes_per_rank": [r["shard_bytes"] for r in ranks],
                    "shard_tokens_per_rank": [r["shard_tokens"] for r in ranks],
                    "prefill_s": r0["prefill_s"], "restore_s": r0["restore_s"], "offload_s": r0["offload_s"],
                    "restore_seconds_metric_per_rank": [r["restore_seconds_metric"] for r in ranks]},
        "notes": ["each sample: the slowest rank's wall time between barriers; prefill and restore interleaved, "
                  "the order alternating", "prefill = a full prefill of the document as a fresh sequence "
                  "(what a restore replaces); restore = InferenceEngine.restore of its offloaded KV"],
        "machine": machine_info(load_before),
    }
    res = report["results"]
    print(f"[kv_offload] {Path(reader.config.name).name} CP{cfg.parallel.cp} {cfg.model.dtype} on {r0['device']}, "
          f"{args.tokens}-token document, {args.repeats} interleaved repeats: prefill {prefill_ms:.1f} ms, "
          f"restore {restore_ms:.1f} ms ({res['prefill_over_restore']:.0f}x faster), offload {offload_ms:.1f} ms; "
          f"{res['shard_bytes_per_rank'][0] / 2 ** 20:.1f} MiB per rank; restored logits equal: "
          f"{res['restored_logits_equal']}; load {load_before} -> {report['machine']['load_average_after']}",
          flush=True)
    if args.output:
        write_json(Path(args.output), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
