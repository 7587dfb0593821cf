"""``cp-megatron serve``: an OpenAI-compatible server whose sequences keep their KV
sharded over the CP ranks.

    scheduler.py  rounds: admission, fused prefill, batched decode, prefix reuse, KV budget
    protocol.py   OpenAI request bodies (strict) and error / usage objects
    app.py        the FastAPI app on global rank 0
    metrics.py    Prometheus metrics
    ranks.py      every rank's loop (rank 0 leads, the others run the broadcast rounds)

The command line is :mod:`cp_megatron.cli.serve`.  Start-up is ``run``'s: pre-flight in one process (exit code 2 on a bad config), then the
ranks are spawned here, or this process joins as one rank under torchrun / the deepspeed
launcher.  Rank 0 serves HTTP on ``serve.host:serve.port``.

Source: arXiv 2411.01783 §3 (CP inference over a persistent, sharded KV cache).
"""

from __future__ import annotations

import os
import socket

from cp_megatron.config import ConfigError, RunConfig

# After one rank fails, the others get this long to answer clients and exit (s).
RANK_FAILURE_GRACE_S = 15.0


def _check_port(host: str, port: int) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"serve.port: cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(cfg: RunConfig) -> int:
    """Pre-flight, then start (or join) the ranks and serve until SIGTERM / SIGINT.

    Returns:
        0 after a drained shutdown.

    Raises:
        ConfigError: pre-flight failures (before any rank starts), e.g. both KV budgets
            given or a budget below the model's minimum (:func:`~cp_megatron.serve.budget.kv_budget`).
        RankFailure: a rank failed (every rank is stopped).
    """
    from cp_megatron.launcher import spawn, start_fork_server, under_launcher
    from cp_megatron.preflight import Prepared, check_model, context_limit, heuristic_hardware
    from cp_megatron.serve.budget import kv_budget
    from cp_megatron.serve.ranks import rank_main

    def prepare(world_size=None) -> Prepared:
        reader, _ = check_model(cfg, world_size)
        return Prepared(reader.config, [], [], None, heuristic_hardware(cfg), context_limit(cfg, reader.config),
                        reader.index)

    if under_launcher():
        from cp_megatron import parallel_state

        prep = prepare(int(os.environ["WORLD_SIZE"]))
        budget = kv_budget(cfg, prep.model_config, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if int(os.environ["RANK"]) == 0:
            _check_port(cfg.serve.host, cfg.serve.port)
        try:
            rank_main(cfg, prep, budget)
        finally:
            parallel_state.destroy()
        return 0
    start_fork_server()   # its imports (torch, megatron-core) overlap the pre-flight below
    prep = prepare()
    budget = kv_budget(cfg, prep.model_config)
    _check_port(cfg.serve.host, cfg.serve.port)
    spawn(rank_main, cfg.parallel.world_size, (cfg, prep, budget), timeout_s=float("inf"),
          threads_per_rank=cfg.runtime.threads_per_rank, backend=None, forward_signals=True,
          grace_s=RANK_FAILURE_GRACE_S)
    return 0
