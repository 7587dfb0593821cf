"""Live activation bytes through one layer of a CPU prefill, beside the planner's phases.

    python -m benchmarks.activation_phases --dtype bfloat16 --weights fp8-rowwise

Runs a dummy model with the dimensions of ``tests/test_memory_model.py`` (hidden 512,
2 layers) at CP 1 on 1,024 tokens under :class:`cp_megatron.dryrun.LiveBytes` and prints, at the entry and exit of every
module of layer 0, the live bytes and the peak since the previous mark, in units of
X = t*H*e (one hidden state), then ``planner.activation_phases`` for the same inputs and the
layer code of this repository (``planner.LayerCode()``).  The figures quoted in docs/planner.md
("Memory") come from this script.

Source: issue #21 (planner vs measured memory); cp_megatron.planner.activation_phases.
"""

from __future__ import annotations

import argparse
import sys

# The dimensions of tests/test_memory_model.py: one hidden state (t*H*e = 1 MiB) dwarfs the
# round's small host tensors.
TOKENS = 1024


def small_model():
    from cp_megatron.model.config import get_preset

    return get_preset("tiny").with_(hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=2,
                                    head_dim=64, num_layers=2, vocab_size=512)


def _job(dtype_name: str, weights: str) -> list:
    import torch

    from cp_megatron import parallel_state
    from cp_megatron.dryrun import LiveBytes
    from cp_megatron.engine import InferenceEngine
    from cp_megatron.model.llama import LlamaStage, StageLayout
    from cp_megatron.model.weights import DummyReader, load_weights

    SMALL = small_model()
    topo = parallel_state.initialize(1, 1, 1)
    stage = LlamaStage(SMALL, StageLayout(), dtype=getattr(torch, dtype_name), weights=weights)
    load_weights(stage, DummyReader(SMALL, seed=1))
    engine = InferenceEngine(stage, topo, kv_capacity=2 * TOKENS)
    mode, marks = LiveBytes(), []
    for name, module in stage.named_modules():
        if name.startswith("layers.0") and name.count(".") <= 3:
            def pre(_m, _a, name=name):
                marks.append((name, "in", mode.live, mode.peak))
                mode.peak = mode.live

            def post(_m, _a, _o, name=name):
                marks.append((name, "out", mode.live, mode.peak))
                mode.peak = mode.live

            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
    forward = stage.forward

    def measured(*args, **kwargs):
        with mode:
            return forward(*args, **kwargs)

    stage.forward = measured
    engine.forward({0: torch.randint(0, SMALL.vocab_size, (TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()})
    return marks


def main(argv=None) -> int:
    from cp_megatron import planner
    from cp_megatron.launcher import spawn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--weights", choices=("dtype", "fp8-rowwise"), default="fp8-rowwise")
    args = p.parse_args(argv)
    marks = spawn(_job, 1, (args.dtype, args.weights), timeout_s=300)[0]
    SMALL = small_model()
    x = TOKENS * SMALL.hidden_size * (4 if args.dtype == "float32" else 2)
    for name, where, live, peak in marks:
        print(f"{name:36} {where:4} live {live / x:6.2f} X   peak since last mark {peak / x:6.2f} X")
    plan_dtype = "fp8" if args.weights == "fp8-rowwise" else {"float32": "fp32", "bfloat16": "bf16"}[args.dtype]
    phases = planner.activation_phases(SMALL, 1, 1, TOKENS, TOKENS, 1, plan_dtype, planner.LayerCode())
    print("planner (X):", ", ".join(f"{k} {v / x:.2f}" for k, v in phases.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
