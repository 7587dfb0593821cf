"""The hot path is GPU-shaped: inside the per-layer loop no host transfer and only the
ring's communication (docs/design.md §9; issue: plan each round once).

Each rank instruments the tensor methods that read a device back to the host
(``.cpu()``, ``.item()``, ``.tolist()``, ``nonzero``, ``torch.cuda.synchronize``) and every
``torch.distributed`` communication call, counts them while a decoder layer runs and
over the whole round, for a prefill (pass-KV) and decode rounds at CP 2 and 3 (auto with the
static decode step, the GPU's: all-gather-Q, two collectives per layer whatever CP; forced
replicated-Q planned round by round: one; forced ring pass-Q: N-1 exchanges and an all_to_all),
with models of 2 and 4 layers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from cp_megatron import parallel_state
from cp_megatron.engine import InferenceEngine, SamplingParams
from cp_megatron.launcher import spawn
from cp_megatron.model.config import get_preset
from cp_megatron.model.llama import LlamaStage, StageLayout
from cp_megatron.model.weights import DummyReader, load_weights

pytestmark = pytest.mark.integration

# isend / irecv are not wrapped: P2POp checks their identity; they run inside batch_isend_irecv.
HOST_METHODS = ("cpu", "item", "tolist", "nonzero")
COMM_FUNCS = ("batch_isend_irecv", "send", "recv", "all_reduce", "all_gather",
              "all_gather_into_tensor", "all_gather_single", "all_gather_object", "all_to_all_single", "all_to_all",
              "broadcast", "broadcast_object_list", "reduce_scatter_tensor", "barrier")


class Counter:
    """Counts calls by name, split into inside a decoder layer and anywhere in the round."""

    def __init__(self) -> None:
        self.in_layer = 0
        self.layer_calls: dict[str, int] = {}
        self.round_calls: dict[str, int] = {}

    def hit(self, name: str) -> None:
        self.round_calls[name] = self.round_calls.get(name, 0) + 1
        if self.in_layer:
            self.layer_calls[name] = self.layer_calls.get(name, 0) + 1

    def reset(self) -> None:
        self.layer_calls, self.round_calls = {}, {}


def _instrument(counter: Counter) -> None:
    def wrap(owner, name, label):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counter.hit(label)
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    for name in HOST_METHODS:
        wrap(torch.Tensor, name, name)
    wrap(torch, "nonzero", "nonzero")
    wrap(torch.cuda, "synchronize", "synchronize")
    for name in COMM_FUNCS:
        wrap(dist, name, name)


def _job(cp: int, layers: int, strategy: str = "auto", static_decode: bool = True) -> list[dict]:
    topo = parallel_state.initialize(1, cp, 1)
    config = dataclasses.replace(get_preset("tiny"), num_layers=layers)
    stage = LlamaStage(config, StageLayout())
    load_weights(stage, DummyReader(config, seed=3))
    engine = InferenceEngine(stage, topo, kv_capacity=64, strategy=strategy, static_decode=static_decode)
    counter = Counter()

    def enter(*_):
        counter.in_layer += 1

    def leave(*_):
        counter.in_layer -= 1

    for layer in stage.layers.values():
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave)
    _instrument(counter)
    greedy = {0: SamplingParams(), 1: SamplingParams()}
    rounds = []
    prompts = {0: list(range(1, 60)), 1: list(range(7, 40))}
    for feed in (prompts, {0: [5], 1: [9]}, {0: [6], 1: [11]}):
        counter.reset()
        _, metrics = engine.step(feed, greedy)
        rounds.append({"kind": metrics.kind, "strategy": metrics.strategy,
                       "layer": dict(counter.layer_calls), "round": dict(counter.round_calls)})
    return rounds


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cp,strategy,static", [(2, "auto", True), (3, "replicated-q", False), (3, "pass-q", True)])
def test_layers_do_no_host_transfer_and_only_ring_communication(cp, strategy, static):
    by_layers = {layers: spawn(_job, cp, (cp, layers, strategy, static), timeout_s=240) for layers in (2, 4)}
    decode = "all-gather-q" if strategy == "auto" else strategy
    prefill = "pass-kv" if strategy == "auto" else strategy
    for layers, per_rank in by_layers.items():
        for rank, rounds in enumerate(per_rank):
            kinds = [(r["kind"], r["strategy"]) for r in rounds]
            assert kinds == [("prefill", prefill), ("decode", decode), ("decode", decode)], kinds
            for r in rounds:
                host = {k: v for k, v in r["layer"].items() if k in HOST_METHODS + ("synchronize",)}
                assert host == {}, (layers, rank, r["kind"], host)
                comm = {k: v for k, v in r["layer"].items() if k not in host}
                if r["strategy"] == "all-gather-q":   # O(1) in CP size
                    expected = {"all_gather_single": layers, "all_to_all_single": layers}
                elif r["strategy"] == "replicated-q":   # one: the partials' all_gather
                    expected = {"all_gather_single": layers}
                else:
                    expected = {"batch_isend_irecv": (cp - 1) * layers}
                if r["strategy"] == "pass-q":
                    expected["all_to_all_single"] = layers
                assert comm == expected, (layers, rank, r["kind"], comm)
    # Per round, everything outside the layers is the same whatever the layer count.
    for rank in range(cp):
        for r2, r4 in zip(by_layers[2][rank], by_layers[4][rank]):
            outside = lambda r: {k: v - r["layer"].get(k, 0) for k, v in r["round"].items()}  # noqa: E731
            assert outside(r2) == outside(r4), (rank, outside(r2), outside(r4))
            assert outside(r2).get("all_reduce", 0) == 1     # the sampled ids, once per round
