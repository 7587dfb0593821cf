"""Build this rank's inference engine from a checkpoint reader: the one place that puts a
model stage, its weight slice and an :class:`~cp_megatron.engine.InferenceEngine` together.

``cp-megatron run``, the benchmark suites, ``convert --verify`` and the tests all call
:func:`build_engine`; the process groups come first (:func:`cp_megatron.parallel_state.initialize`).
:func:`rank_engine` does both for a run config (what every rank of ``run`` -- and of a
server -- does after pre-flight).

Source: megatron-core TP partitioning (column / row parallel layers) and the stage layout
of pipeline parallelism (contiguous layer ranges); arXiv 2411.01783 §3 (CP inference).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

from cp_megatron import device as devices
from cp_megatron import shm_collectives
from cp_megatron.engine import InferenceEngine
from cp_megatron.hardware import HardwareProfile
from cp_megatron.model.kv_cache import DEFAULT_GROWTH_SLOTS
from cp_megatron.model.fp8 import backend_for
from cp_megatron.model.llama import LlamaStage, StageLayout
from cp_megatron.model.weights import load_weights
from cp_megatron.parallel_state import Topology


def build_engine(reader, topo: Topology, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", strategy: str = "auto",
                 hardware: Optional[HardwareProfile] = None, kv_capacity: int = 0,
                 kv_growth_slots: int = DEFAULT_GROWTH_SLOTS, profile: bool = False, progress: bool = False, weights: str = "dtype",
                 implementation: str = "native", cuda_graphs: bool = False) -> InferenceEngine:
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
        kv_growth_slots: growth step of the cache past the reservation (slots).
        profile: time ring attention per round (attention_s, comm_s); off, the hot path
            has no timing.
        progress: a weight-loading bar on stderr.
        weights: "dtype" (linear weights in ``dtype``) or "fp8-rowwise" (attention and MLP
            weights float8_e4m3fn with per-row scales, :mod:`cp_megatron.model.fp8`).
        implementation: "native" (:class:`LlamaStage`) or "megatron-core" (a megatron-core
            ``GPTModel`` with ring core attention, :class:`cp_megatron.mcore.stage.McoreLlamaStage`;
            ``weights="dtype"`` only).
        cuda_graphs: capture and replay the static decode step (``runtime.cuda_graphs``; CUDA only).

    Raises:
        ValueError: the TP size does not split the model (:mod:`cp_megatron.model.tp_rule`),
            a tensor is missing or mis-shaped in the checkpoint (CheckpointError), an unknown
            implementation, or FP8 weights with the megatron-core implementation.
    """
    layout = StageLayout(topo.tp_size, topo.tp_rank, topo.pp_size, topo.pp_rank)
    if implementation == "native" and devices.is_fake():
        stage = _fake_stage(reader.config, layout, dtype, device, weights)
        load_weights(stage, reader, progress=progress)
    elif implementation == "native":
        stage = LlamaStage(reader.config, layout, dtype=dtype, device=device, weights=weights)
        load_weights(stage, reader, progress=progress)
    elif implementation == "megatron-core":
        from cp_megatron.mcore.stage import McoreLlamaStage
        from cp_megatron.mcore.weights import load_weights as load_mcore_weights

        stage = McoreLlamaStage(reader.config, layout, dtype=dtype, device=device, weights=weights)
        load_mcore_weights(stage, reader, progress=progress)
    else:
        raise ValueError(f"implementation: expected 'native' or 'megatron-core', got {implementation!r}")
    return InferenceEngine(stage, topo, strategy=strategy, hardware=hardware, kv_capacity=kv_capacity,
                           kv_growth_slots=kv_growth_slots, profile=profile, cuda_graphs=cuda_graphs)


def _fake_stage(config, layout: StageLayout, dtype: torch.dtype, device, weights: str) -> LlamaStage:
    """The dry run's stage (:func:`cp_megatron.device.use_fake_cuda`, under a
    ``FakeTensorMode``): built on the meta device (no memory), then every parameter and
    buffer materialised as a fake tensor on ``device``."""
    with torch.device("meta"):   # megatron's CPU-init path allocates on the default device
        stage = LlamaStage(config, layout, dtype=dtype, device="cpu", weights=weights)
    device = torch.device(device)
    stage.to_empty(device=device)
    stage.device = device
    for module in stage.modules():   # FP8 backend by the target device, not the meta build's
        if hasattr(module, "fp8_backend"):
            module.fp8_backend = backend_for(device)
    return stage


def kv_reservation(prompt_tokens: int, max_new_tokens: int, cp_size: int, margin_tokens: int,
                   growth_tokens: int, kv_capacity: Optional[int] = None) -> dict:
    """The KV cache a run's engine reserves: ``build_engine`` keyword arguments
    ``kv_capacity`` (slots per CP rank for the prompt, the generation budget and
    ``runtime.kv_cache_margin_tokens``) and ``kv_growth_slots`` (one step of
    ``runtime.kv_cache_growth_tokens``).  ``run`` and the dry run both reserve with this;
    the server passes its budget's slots as ``kv_capacity`` (then the first three are unused).

    Raises:
        ValueError: a negative count, ``cp_size`` < 1 or ``growth_tokens`` < 1.

    Source: :func:`cp_megatron.sharding.kv_slots_per_rank`, :func:`~cp_megatron.sharding.kv_growth_slots`.
    """
    from cp_megatron.sharding import kv_growth_slots, kv_slots_per_rank

    if kv_capacity is None:
        kv_capacity = kv_slots_per_rank(prompt_tokens, max_new_tokens, cp_size, margin_tokens)
    return {"kv_capacity": kv_capacity,
            "kv_growth_slots": kv_growth_slots(growth_tokens, cp_size)}


def rank_engine(cfg, prep, *, status: Optional[Callable[[str], None]] = None, progress: bool = False,
                kv_capacity: Optional[int] = None, shm: bool = True):
    """On every rank of a run config's job: join the process groups, open the checkpoint and
    the tokenizer, build this rank's engine.

    Args:
        cfg: the :class:`~cp_megatron.config.RunConfig`.
        prep: its :class:`~cp_megatron.preflight.Prepared` (model config, heuristic hardware,
            the checkpoint's index).
        status: called on global rank 0 with one line before and after loading the weights.
        progress: a weight-loading bar on rank 0.
        shm: allow shared-memory decode collectives (``runtime.shm_collectives``).  A server passes
            False: DeepSpeed's kernel waits by spinning with no timeout, so a rank whose peer died
            mid-round could not notice it and answer 503; gloo's collective fails instead.
        kv_capacity: KV slots to reserve on this rank (the server's budget); default the
            first turn's (prompt + generation + ``runtime.kv_cache_margin_tokens``).

    Returns:
        (:class:`~cp_megatron.parallel_state.Topology`, the engine, the tokenizer or None).

    Raises:
        ConfigError: the checkpoint or tokenizer cannot be opened on this rank.
    """
    from cp_megatron import parallel_state
    from cp_megatron.preflight import open_reader, open_tokenizer
    par, rt = cfg.parallel, cfg.runtime
    local = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    bound = None
    if rt.bind_cores and rt.device == "cpu" and None not in local:   # set by spawn and torchrun
        from cp_megatron.launcher import bind_cores

        bound = bind_cores(int(local[0]), int(local[1]), rt.threads_per_rank)
    torch.set_num_threads(rt.threads_per_rank)
    parallel_state.init_distributed(rt.backend or ("nccl" if rt.device == "cuda" else "gloo"), rt.timeout_s)
    topo = parallel_state.initialize(par.tp, par.cp, par.pp, timeout_s=rt.timeout_s)
    say = status if status is not None and topo.rank == 0 else (lambda _line: None)
    shm_collectives.setup(rt.shm_collectives and shm, parallel_state.get_cp_group(), device=rt.device,
                          bound=bound is not None, say=say)
    device = devices.current_device() if rt.device == "cuda" else torch.device("cpu")
    reader = open_reader(cfg, prep.checkpoint_index)   # pre-flight parsed the header: not again
    tok = open_tokenizer(cfg, reader)
    say(f"loading weights of {prep.model_config.name} (tp={par.tp} cp={par.cp} pp={par.pp}, {cfg.model.dtype})")
    t0 = time.perf_counter()
    engine = build_engine(reader, topo, dtype=getattr(torch, cfg.model.dtype), device=device,
                          strategy=cfg.attention.strategy, hardware=prep.hardware,
                          **kv_reservation(len(prep.first_turn), cfg.generation.max_new_tokens, par.cp,
                                           rt.kv_cache_margin_tokens, rt.kv_cache_growth_tokens,
                                           kv_capacity),
                          profile=rt.profile, progress=progress and topo.rank == 0, weights=cfg.model.weights,
                          implementation=cfg.model.implementation, cuda_graphs=rt.cuda_graphs)
    del reader  # drop the checkpoint's memory maps: the stage holds its own copy
    say(f"weights loaded in {time.perf_counter() - t0:.1f} s")
    return topo, engine, tok
