"""The server's KV budget: ``serve.kv_cache_memory`` (bytes per rank, or a fraction of a
rank's device memory) or ``serve.kv_cache_tokens``, turned into the scheduler's token
budget for the CP group and the slots each rank reserves up front.

One slot of one rank holds one token's K and V in every layer of its pipeline stage:
``2 x ceil(layers / pp) x (NKV / tp) x DH x e`` bytes.  A CP group of N ranks that each
reserve S slots holds about N x S tokens; sharding leaves a rank at most about one token
per sequence above its share per round, so ``2 x max_num_seqs`` slots per rank are kept
as headroom: tokens = N x (S - headroom).

The host tier (``serve.host_kv_cache_memory``, bytes per rank or a fraction of the host's
memory per rank; 0 / absent: off) is counted in the same slots: ``host_slots_per_rank`` =
bytes // slot bytes, and an offloaded sequence takes, on every rank, as many as the rank
holding most of it (the scheduler's accounting keeps every rank within the budget).

Source: vLLM ``gpu_memory_utilization`` / ``kv_cache_memory_bytes`` (a budget in bytes
turned into KV blocks at start-up); arXiv 2411.01783 §3.3 (each CP rank holds 1/N).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from cp_megatron.config import ConfigError, RunConfig

DEFAULT_KV_CACHE_TOKENS = 65536   # serve.kv_cache_tokens when neither budget is given


@dataclass(frozen=True)
class KVBudget:
    """The server's KV budget.

    Attributes:
        tokens: tokens the CP group may cache (the scheduler's budget).
        slots_per_rank: slots every rank reserves up front (tokens / cp + headroom).
        bytes_per_slot: K/V bytes of one slot of one rank (all its layers).
        source: how it was given, for messages ("serve.kv_cache_memory = ...").
        host_slots_per_rank: slots of the host tier on every rank (0: no host tier).
        host_source: how the host tier was given ("" when off).
    """

    tokens: int
    slots_per_rank: int
    bytes_per_slot: int
    source: str
    host_slots_per_rank: int = 0
    host_source: str = ""

    @property
    def bytes_per_rank(self) -> int:
        return self.slots_per_rank * self.bytes_per_slot

    @property
    def host_bytes_per_rank(self) -> int:
        return self.host_slots_per_rank * self.bytes_per_slot


def bytes_per_slot(model_config, dtype: str, tp: int, pp: int) -> int:
    """K/V bytes of one cache slot on one rank: 2 x ceil(layers / pp) x (NKV / tp) x DH x e."""
    import torch

    e = torch.finfo(getattr(torch, dtype)).bits // 8
    layers = -(-model_config.num_layers // pp)
    return 2 * layers * max(1, model_config.num_kv_heads // tp) * model_config.head_dim * e


def device_memory_bytes(device: str, local_ranks: int) -> int:
    """Memory one rank may draw a fraction of: the GPU's total memory on CUDA; on CPU the
    host's physical memory divided by the ``local_ranks`` ranks that share it."""
    if device == "cuda":
        from cp_megatron import device as devices

        return devices.total_memory(0)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_ranks)


def kv_budget(cfg: RunConfig, model_config, local_ranks: Optional[int] = None) -> KVBudget:
    """The KV budget of ``cfg.serve`` for ``model_config`` (checked before any rank starts).

    Args:
        cfg: the run config (``serve``, ``parallel``, ``model.dtype``, ``runtime.device``).
        model_config: the checkpoint's model config (layers, KV heads, head dim).
        local_ranks: ranks sharing this host's memory (a CPU fraction); default the world size.

    Returns:
        :class:`KVBudget`.

    Raises:
        ConfigError: both ``kv_cache_memory`` and ``kv_cache_tokens`` given, a budget
            smaller than the model's minimum (headroom + one slot per rank), or a host tier
            (``host_kv_cache_memory``) that holds no slot.
    """
    sv, par = cfg.serve, cfg.parallel
    per_slot = bytes_per_slot(model_config, cfg.model.dtype, par.tp, par.pp)
    budget = _device_budget(cfg, model_config, per_slot, local_ranks)
    host_slots, host_source = _host_tier(cfg, model_config, per_slot, local_ranks)
    return KVBudget(budget.tokens, budget.slots_per_rank, per_slot, budget.source, host_slots, host_source)


def _host_tier(cfg: RunConfig, model_config, per_slot: int, local_ranks: Optional[int]) -> tuple[int, str]:
    """(host-tier slots per rank, how it was given) of ``serve.host_kv_cache_memory``."""
    sv, par = cfg.serve, cfg.parallel
    mem = sv.host_kv_cache_memory
    if not mem:
        return 0, ""
    if mem <= 1:
        total = device_memory_bytes("cpu", local_ranks or par.world_size)
        per_rank = int(mem * total)
        source = (f"serve.host_kv_cache_memory = {mem:g} of {total / 2 ** 30:.2f} GiB "
                  f"(host memory / ranks on the host)")
    else:
        per_rank = int(mem)
        source = f"serve.host_kv_cache_memory = {per_rank} bytes per rank"
    slots = per_rank // per_slot
    if slots < 1:
        raise ConfigError(f"serve.host_kv_cache_memory: {per_rank} bytes per rank hold no KV slot of "
                          f"{model_config.name} ({per_slot} bytes each at {cfg.model.dtype}, tp={par.tp}, "
                          f"pp={par.pp}); give at least {per_slot} bytes per rank, or 0 for no host tier")
    return slots, source


def _device_budget(cfg: RunConfig, model_config, per_slot: int, local_ranks: Optional[int]) -> KVBudget:
    sv, par = cfg.serve, cfg.parallel
    headroom = 2 * sv.max_num_seqs
    if sv.kv_cache_memory is not None and sv.kv_cache_tokens is not None:
        raise ConfigError("serve: give kv_cache_memory (bytes per rank or a fraction of device memory) or "
                          "kv_cache_tokens, not both")
    if sv.kv_cache_memory is None:
        tokens = sv.kv_cache_tokens if sv.kv_cache_tokens is not None else DEFAULT_KV_CACHE_TOKENS
        return KVBudget(tokens, -(-tokens // par.cp) + headroom, per_slot, f"serve.kv_cache_tokens = {tokens}")
    mem = sv.kv_cache_memory
    if mem <= 1:
        total = device_memory_bytes(cfg.runtime.device, local_ranks or par.world_size)
        per_rank = int(mem * total)
        where = "GPU memory" if cfg.runtime.device == "cuda" else "host memory / ranks on the host"
        source = f"serve.kv_cache_memory = {mem:g} of {total / 2 ** 30:.2f} GiB ({where})"
    else:
        per_rank = int(mem)
        source = f"serve.kv_cache_memory = {per_rank} bytes per rank"
    slots = per_rank // per_slot
    if slots <= headroom:
        raise ConfigError(f"serve.kv_cache_memory: {per_rank} bytes per rank hold {slots} KV slots of "
                          f"{model_config.name} ({per_slot} bytes each at {cfg.model.dtype}, tp={par.tp}, "
                          f"pp={par.pp}); the minimum is {headroom + 1} slots (2 x serve.max_num_seqs "
                          f"headroom + 1) = {(headroom + 1) * per_slot} bytes per rank")
    return KVBudget(par.cp * (slots - headroom), slots, per_slot, source)
