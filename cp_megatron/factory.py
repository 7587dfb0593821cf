"""Build this rank's inference engine from a checkpoint reader: the one place that puts a
model stage, its weight slice and an :class:`~cp_megatron.engine.InferenceEngine` together.

``cp-megatron run``, the benchmark suites, ``convert --verify`` and the tests all call
:func:`build_engine`; the process groups come first (:func:`cp_megatron.parallel_state.initialize`).

Source: megatron-core TP partitioning (column / row parallel layers) and the stage layout
of pipeline parallelism (contiguous layer ranges); arXiv 2411.01783 §3 (CP inference).
"""

from __future__ import annotations

from typing import Optional

import torch

from cp_megatron.engine import InferenceEngine
from cp_megatron.hardware import HardwareProfile
from cp_megatron.model.llama import LlamaStage, StageLayout
from cp_megatron.model.weights import load_weights
from cp_megatron.parallel_state import Topology


def build_engine(reader, topo: Topology, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", strategy: str = "auto",
                 hardware: Optional[HardwareProfile] = None, kv_capacity: int = 0,
                 progress: bool = False) -> InferenceEngine:
    """This rank's stage (its TP slice and PP layer range) with weights from ``reader``,
    wrapped in an engine.

    Args:
        reader: a checkpoint reader (:func:`cp_megatron.checkpoint.open_checkpoint`) or a
            :class:`~cp_megatron.model.weights.DummyReader`; its ``config`` is the model's.
        topo: this rank's place in the TP x CP x PP grid.
        dtype: weights and activations (torch.float32 or torch.bfloat16).
        device: where the stage lives.
        strategy: "auto" (Alg. 1 / Alg. 5 per round), "pass-kv" or "pass-q".
        hardware: C and BW for the heuristic (None: by device).
        kv_capacity: tokens to reserve in the KV cache up front.
        progress: a weight-loading bar on stderr.

    Raises:
        ValueError: the TP size does not split the model (:mod:`cp_megatron.model.tp_rule`),
            or a tensor is missing or mis-shaped in the checkpoint (CheckpointError).
    """
    layout = StageLayout(topo.tp_size, topo.tp_rank, topo.pp_size, topo.pp_rank)
    stage = LlamaStage(reader.config, layout, dtype=dtype, device=device)
    load_weights(stage, reader, progress=progress)
    return InferenceEngine(stage, topo, strategy=strategy, hardware=hardware, kv_capacity=kv_capacity)
