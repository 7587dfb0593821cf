"""cp_megatron: context-parallel inference for million-token prompts on Llama 3.

Implements "Context Parallelism for Scalable Million-Token Inference"
(Yang et al., arXiv 2411.01783): load-balanced sharding of the sequence over CP
ranks, ring attention in its pass-KV and pass-Q variants chosen per round by the
paper's heuristic, a KV cache that stays sharded across turns, and batched
ring pass-Q decode.  Process groups come from ``megatron.core.parallel_state``.
"""

__version__ = "0.1.0"
