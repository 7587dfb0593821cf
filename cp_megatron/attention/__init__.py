"""Context-parallel attention: kernels, LSE merge, ring pass-KV / pass-Q, decode, heuristic.

The pure heuristic is imported eagerly; the torch.distributed parts load on first use,
so pure users (the planner) do not import torch.distributed or megatron.
"""

import importlib

from cp_megatron.attention.heuristic import AUTO, PASS_KV, PASS_Q, HeuristicDecision, choose_strategy

_LAZY = {"context_parallel_attention": "cp_megatron.attention.api",
         "decide_strategy": "cp_megatron.attention.api",
         "RingStats": "cp_megatron.attention.ring"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["context_parallel_attention", "decide_strategy", "choose_strategy", "HeuristicDecision",
           "RingStats", "AUTO", "PASS_KV", "PASS_Q"]
