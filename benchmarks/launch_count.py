"""Kernel launches and collectives per decoder layer, counted on CPU (a launch-count proxy).

    python -m benchmarks.launch_count --cp 1 2 4 --batch 1 4 --weights dtype fp8-rowwise

Each CP size runs as a fresh gloo job of ``--tp`` x CP ranks.  A ``TorchDispatchMode`` counts
the non-view aten ops (what a device would launch: each is at least one kernel) and the c10d
ops (collectives, P2P) dispatched while one decoder layer runs (the second layer of the
stage, so no op belongs to the embedding), for a prefill round and for decode rounds of
``--batch`` sequences with one token each.  Reported per rank: the largest count over the
ranks is what bounds a step.  These are CPU counts of a small model; the 405B figures come
from ``cp-megatron dryrun`` (fake CUDA tensors), which sees the same op sequence.

Source: issue #22 (launches per layer, O(1) collectives in CP size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cp_megatron.launcher import spawn

_SKIP = {"aten::detach", "aten::lift_fresh", "aten::_to_copy.no_op"}


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops: ``launches`` (non-view aten), ``collectives`` (c10d) by name."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.launches: Counter = Counter()
        self.collectives: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            name = func.name()
            if name.startswith("c10d::"):
                self.collectives[name] += 1
            elif not func.is_view and name not in _SKIP and not name.startswith("aten::_local_scalar"):
                self.launches[name] += 1
        return func(*args, **(kwargs or {}))


def _job(tp: int, cp: int, batch_sizes: list[int], weights: str, strategy: str, prompt: int) -> list[dict]:
    from cp_megatron import parallel_state
    from cp_megatron.engine import InferenceEngine, SamplingParams
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.llama import LlamaStage, StageLayout
    from cp_megatron.model.weights import DummyReader, load_weights

    topo = parallel_state.initialize(tp, cp, 1)
    config = dataclasses.replace(get_preset("tiny"), num_layers=3, num_heads=8, num_kv_heads=2,
                                 hidden_size=128, intermediate_size=256)
    stage = LlamaStage(config, StageLayout(tp, topo.tp_rank), weights=weights)
    load_weights(stage, DummyReader(config, seed=1))
    engine = InferenceEngine(stage, topo, kv_capacity=4 * prompt, strategy=strategy)
    counter = OpCounter()
    layer = list(stage.layers.values())[1]
    layer.register_forward_pre_hook(lambda *_: setattr(counter, "active", True))
    layer.register_forward_hook(lambda *_: setattr(counter, "active", False))
    results = []
    greedy = SamplingParams()
    b_max = max(batch_sizes)
    with counter:
        feed = {s: [(7 * s + i) % 500 + 1 for i in range(prompt)] for s in range(b_max)}
        counter.launches.clear(), counter.collectives.clear()
        _, m = engine.step(feed, {s: greedy for s in feed})
        results.append({"round": f"prefill B={b_max} T={prompt}", "strategy": m.strategy,
                        "launches": sum(counter.launches.values()),
                        "collectives": dict(counter.collectives), "ops": dict(counter.launches)})
        for b in batch_sizes:
            for _ in range(2):   # the second of two steps (anything lazy is set up by then)
                counter.launches.clear(), counter.collectives.clear()
                _, m = engine.step({s: [s + 3] for s in range(b)}, {s: greedy for s in range(b)})
            results.append({"round": f"decode B={b}", "strategy": m.strategy,
                            "launches": sum(counter.launches.values()),
                            "collectives": dict(counter.collectives), "ops": dict(counter.launches)})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--weights", nargs="+", default=["dtype"])
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--prompt", type=int, default=40, help="prompt tokens per sequence")
    parser.add_argument("--ops", action="store_true", help="print the op names of each round")
    parser.add_argument("--output", help="JSON file")
    args = parser.parse_args(argv)
    report = []
    print("| weights | CP | round | strategy | launches / layer (max over ranks) | collectives / layer |")
    print("|---|---|---|---|---|---|")
    for weights in args.weights:
        for cp in args.cp:
            per_rank = spawn(_job, args.tp * cp, (args.tp, cp, args.batch, weights, args.strategy, args.prompt),
                             timeout_s=600)
            for i, row in enumerate(per_rank[0]):
                worst = max(per_rank, key=lambda r: r[i]["launches"])[i]
                coll = ", ".join(f"{k.removeprefix('c10d::')} {v}" for k, v in sorted(worst["collectives"].items()))
                print(f"| {weights} | {cp} | {row['round']} | {row['strategy']} | {worst['launches']} | {coll or '-'} |")
                if args.ops:
                    print("    " + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in
                                            sorted(worst["ops"].items(), key=lambda kv: -kv[1])))
                report.append({"weights": weights, "cp": cp, **worst})
    if args.output:
        from pathlib import Path

        from cp_megatron.atomic import write_json
        write_json(Path(args.output), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
