"""The one rule for which tensor-parallel sizes a model allows.

Used by the runtime (:class:`~cp_megatron.model.llama.LlamaStage`), the checkpoint readers
and converter (a TP slice must hold whole heads) and the planner, so that none of them
accepts a TP size another refuses.

Source: Megatron-LM tensor parallelism (Shoeybi et al. 2019, §3): attention is split by
heads (each TP rank owns whole query and KV heads), the MLP's intermediate dimension and
the vocabulary (embedding / LM head) are split evenly.
"""

from __future__ import annotations

from typing import Optional


def tp_problem(config, tp_size: int, *, replicate_kv_heads: bool = False) -> Optional[str]:
    """Why ``tp_size`` cannot split ``config`` (None when it can).

    Args:
        config: a :class:`~cp_megatron.model.config.ModelConfig`.
        tp_size: tensor-parallel degree.
        replicate_kv_heads: also accept a TP size that is a multiple of num_kv_heads (each
            KV head copied onto tp/NKV ranks, Megatron-LM's multi-node TP).  The runtime and
            the checkpoints do not implement it; the planner costs it as the paper's
            multi-node TP baseline (arXiv 2411.01783 §4.2.1).

    Returns:
        None, or one line naming the model, the TP size and the dimension it does not
        divide: num_kv_heads (every TP rank needs whole KV heads), num_heads,
        intermediate_size or vocab_size.
    """
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        return f"{config.name}: tp={tp_size!r} must be an integer >= 1"
    kv_split = config.num_kv_heads % tp_size == 0 or (replicate_kv_heads and tp_size % config.num_kv_heads == 0)
    if not kv_split or config.num_heads % tp_size:
        return (f"{config.name}: tp={tp_size} does not divide num_kv_heads={config.num_kv_heads} "
                f"(num_heads={config.num_heads}); use a TP size that divides num_kv_heads")
    for what, n in (("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):
        if n % tp_size:
            return f"{config.name}: tp={tp_size} must divide {what}={n}"
    return None
