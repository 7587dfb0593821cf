"""Context-parallel attention: kernels, LSE merge, ring pass-KV / pass-Q, decode, heuristic."""

from cp_megatron.attention.api import context_parallel_attention, decide_strategy
from cp_megatron.attention.heuristic import AUTO, PASS_KV, PASS_Q, HeuristicDecision, choose_strategy
from cp_megatron.attention.ring import RingStats

__all__ = ["context_parallel_attention", "decide_strategy", "choose_strategy", "HeuristicDecision",
           "RingStats", "AUTO", "PASS_KV", "PASS_Q"]
