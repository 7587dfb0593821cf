"""Suite ``hardware``: measure a hardware profile (the planner's and the heuristic's constants).

Two ranks on this machine (gloo, ``--threads`` torch threads each) run every measurement at
the same time, as the ranks of a CP2 job would, so shared caches and memory bandwidth are
part of what is measured.  Each figure is the median over repeats of the slowest rank:

| field | measurement |
|---|---|
| ``attn_flops_per_s`` (C) | causal self-attention through the ring's own kernel adapter (:func:`cp_megatron.attention.kernels.attention_with_lse`), NH 8, NKV 2, DH 64, float32, at growing block sizes; C is the rate of the largest block.  FLOPs counted as the planner does (4·D·T²/2). |
| ``linear_flops_per_s`` | ``x @ W.t()`` (megatron-core's CPU linear) of [4096, 512] x [1024, 512]ᵀ, float32: 2·M·K·N FLOPs |
| ``memory_bandwidth_bytes_per_s`` | ``dst.copy_(src)`` of 128 MiB float32: 2 x bytes (read + write) |
| ``memory_efficiency`` | a one-token ``x @ W.t()`` with a 64 MiB float32 W (a decode GEMM): bytes of W / time, over the copy's bandwidth (at most 1) |
| ``cp_bandwidth_bytes_per_s`` / ``cp_latency_s`` | one ring step: every rank sends 16 MiB to the next rank and receives from the previous one (isend / irecv, as :class:`cp_megatron.attention.ring.RingComm`); 4-byte messages for the latency |
| ``tp_bandwidth_bytes_per_s`` / ``tp_latency_s`` | ``all_reduce`` of 16 MiB: bus bandwidth 2(n-1)/n · bytes / time; 4 bytes for the latency |
| ``a2a_latency_s`` | ``all_to_all_single`` of one float32 per rank (as pass-Q returns O and LSE) |
| ``layer_overhead_s`` | decode steps of two models with ``tiny``'s dimensions (hidden 64) and 2 and 10 blocks, through the engine at CP1, taking turns step by step: the growth per block of the step's CPU time (median), where bytes and FLOPs are negligible (the runtime's fixed cost of a block) |
| ``ring_step_overhead_s`` | the same at CP2 (two ranks): the growth per block above CP1's; CPU time leaves out the waits for the peer, which the planner costs as the ring and all_to_all latencies |

The two decode-overhead jobs run after the others (one rank, then two).  ``net_hop_latency_s``
is the ring step's latency (unused with one rank per node).  The result is written as ``hardware.json`` whose ``"profile"`` object loads with
:func:`cp_megatron.hardware.load_profile`: ``cp-megatron plan --hardware docs/bench/hardware.json``
and ``attention.hardware: docs/bench/hardware.json`` in a run config use it.  ``hardware.png``
plots the attention rate against the block size.  ``gpus_per_node`` is 1 (every rank is costed
as its own node: CP and TP both go over loopback) and ``memory_bytes`` is the machine's RAM.
It measures CPU ranks on gloo only; for GPUs use a shipped profile (``h100-rdma``, ``h200``
...) or write the JSON by hand (CUDA / NCCL measurement is not implemented).

Source: docs/design.md §8 (C and BW are configuration, defaults measured or given per profile), §13.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

from cp_megatron.bench.common import BenchOptions, finish_report, pyplot, save_figure, start_suite

FULL = {"attention_tokens": [1024, 2048, 4096, 8192], "num_heads": 8, "num_kv_heads": 2, "head_dim": 64,
        "linear_mkn": [4096, 512, 1024], "copy_mib": 128, "gemv_nk": [4096, 4096], "message_mib": 16,
        "repeats": 5, "ranks": 2,
        "overhead_preset": "tiny", "overhead_layers": [2, 10], "overhead_prompt_tokens": 64,
        "overhead_steps": 30}
QUICK = {**FULL, "attention_tokens": [256, 512], "linear_mkn": [256, 256, 256], "copy_mib": 8, "gemv_nk": [512, 512],
         "message_mib": 1, "repeats": 2, "overhead_steps": 4}


def _timed(fn, repeats: int) -> list[float]:
    """Seconds of ``fn()`` per repeat, after one untimed warm-up; ranks start each repeat together."""
    import torch.distributed as dist

    fn()
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _measure(cfg: dict) -> dict:
    """Run on every rank: seconds per repeat of each measurement (this rank's clock)."""
    import torch
    import torch.distributed as dist

    from cp_megatron.attention.kernels import attention_with_lse

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    reps = cfg["repeats"]
    out: dict = {"attention": {}}
    nh, nkv, dh = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
    for t in cfg["attention_tokens"]:
        q = torch.randn(t, nh, dh, generator=g)
        k, v = torch.randn(t, nkv, dh, generator=g), torch.randn(t, nkv, dh, generator=g)
        out["attention"][str(t)] = _timed(lambda: attention_with_lse(q, k, v, scale=dh ** -0.5,
                                                                     is_causal=True), reps)
    m, kdim, n = cfg["linear_mkn"]
    x, w = torch.randn(m, kdim, generator=g), torch.randn(n, kdim, generator=g)
    out["linear"] = _timed(lambda: torch.matmul(x, w.t()), reps)
    gn, gk = cfg["gemv_nk"]
    one, wg = torch.randn(1, gk, generator=g), torch.randn(gn, gk, generator=g)
    out["gemv"] = _timed(lambda: torch.matmul(one, wg.t()), reps)
    src = torch.randn(cfg["copy_mib"] * 2**20 // 4, generator=g)
    dst = torch.empty_like(src)
    out["copy"] = _timed(lambda: dst.copy_(src), reps)

    def ring_step(buf: torch.Tensor, recv: torch.Tensor):
        def step():
            ops = [dist.P2POp(dist.isend, buf, (rank + 1) % world),
                   dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return step

    big = torch.randn(cfg["message_mib"] * 2**20 // 4, generator=g)
    small = torch.zeros(1)
    out["ring_big"] = _timed(ring_step(big, torch.empty_like(big)), reps)
    out["ring_small"] = _timed(ring_step(small, torch.empty_like(small)), max(reps, 20))
    out["allreduce_big"] = _timed(lambda: dist.all_reduce(big), reps)
    out["allreduce_small"] = _timed(lambda: dist.all_reduce(small), max(reps, 20))
    a2a_in, a2a_out = torch.zeros(world), torch.empty(world)
    out["all_to_all_small"] = _timed(lambda: dist.all_to_all_single(a2a_out, a2a_in), max(reps, 20))
    return out


def _decode_overhead(cfg: dict) -> dict:
    """Run on every rank of a CP job (CP = world size): seconds per decode step of models with
    the ``overhead_preset``'s dimensions and each of ``overhead_layers`` blocks, one sequence
    with ``overhead_prompt_tokens`` cached, as ``{"wall_s": {blocks: [...]}, "cpu_s": {...}}``:
    wall time and this thread's CPU time (which excludes waiting for the peer and time the
    process was descheduled).  The models take turns step by step, after one untimed step each."""
    import dataclasses

    import torch.distributed as dist

    from cp_megatron import parallel_state
    from cp_megatron.bench.common import dummy_engine, random_prompt
    from cp_megatron.model.config import get_preset

    topo = parallel_state.initialize(tp=1, cp=dist.get_world_size(), pp=1)
    base = get_preset(cfg["overhead_preset"])
    steps = max(cfg["overhead_steps"], cfg["repeats"])
    prompt = random_prompt(cfg["overhead_prompt_tokens"], base.vocab_size, 0)
    engines = {}
    for layers in cfg["overhead_layers"]:
        config = dataclasses.replace(base, name=f"{base.name}-{layers}-blocks", num_layers=layers)
        # no ring timing, as a run without runtime.profile
        engines[str(layers)] = dummy_engine(config, 0, topo, kv_capacity=len(prompt) + steps + 8,
                                            profile=False)
        engines[str(layers)].forward({0: prompt})
        engines[str(layers)].forward({0: prompt[-1:]})  # warm-up step, untimed
    out: dict = {"wall_s": {name: [] for name in engines}, "cpu_s": {name: [] for name in engines}}
    for _ in range(steps):
        for name, engine in engines.items():
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.thread_time()
            engine.forward({0: prompt[-1:]})
            out["cpu_s"][name].append(time.thread_time() - cpu_start)
            out["wall_s"][name].append(time.perf_counter() - start)
    return out


def _slowest_median(per_rank: list, key: str, sub: str | None = None) -> float:
    """Median over repeats of the slowest rank's time (a repeat is as slow as its slowest rank)."""
    series = [r[key][sub] if sub else r[key] for r in per_rank]
    return statistics.median(max(times) for times in zip(*series))


def decode_overhead(cfg: dict, cp1: list[dict], cp2: list[dict], ring_latency_s: float,
                    a2a_latency_s: float) -> dict:
    """Fixed decode cost per block at CP1 and per extra ring step: the growth per block of the
    step's CPU time (``overhead_layers`` models, median over steps of the busiest rank).

    CPU time is the host and compute work of the step; it leaves out waiting for the peer (the
    ring and all_to_all latencies, which the planner costs separately) and time the process
    was descheduled, so it holds on a shared machine.  ``ring_step_overhead_s`` = CP2's growth
    per block - CP1's (clamped at 0).  Wall-time medians are kept in ``step_s`` for reference.
    """
    small, big = (str(n) for n in cfg["overhead_layers"])
    blocks = cfg["overhead_layers"][1] - cfg["overhead_layers"][0]

    def busiest(ranks: list[dict], kind: str, name: str) -> list[float]:
        return [max(t) for t in zip(*(r[kind][name] for r in ranks))]

    runs = {1: cp1, 2: cp2}
    cpu = {cp: {n: statistics.median(busiest(ranks, "cpu_s", n)) for n in (small, big)}
           for cp, ranks in runs.items()}
    grown = {cp: (t[big] - t[small]) / blocks for cp, t in cpu.items()}
    return {"step_s": {f"cp{cp}": {n: {"cpu_median": cpu[cp][n],
                                       "wall_median": statistics.median(busiest(ranks, "wall_s", n))}
                                   for n in (small, big)} for cp, ranks in runs.items()},
            "per_block_s": {f"cp{cp}": v for cp, v in grown.items()},
            "layer_overhead_s": max(grown[1], 0.0),
            "ring_step_overhead_s": max(grown[2] - grown[1], 0.0)}


def summarise(cfg: dict, per_rank: list[dict], decode_cp1: list[dict], decode_cp2: list[dict]
              ) -> tuple[dict, dict]:
    """(results, profile): rates per measurement and the HardwareProfile fields (SI units).

    ``per_rank``: :func:`_measure` of each rank; ``decode_cp1`` / ``decode_cp2``:
    :func:`_decode_overhead` of each rank of the one- and two-rank jobs."""
    nh, dh = cfg["num_heads"], cfg["head_dim"]
    attention = {}
    for t in cfg["attention_tokens"]:
        flops = 4.0 * nh * dh * t * t / 2  # the planner's count (planner.attention_flops)
        seconds = _slowest_median(per_rank, "attention", str(t))
        attention[str(t)] = {"seconds": seconds, "flops": flops, "flops_per_s": flops / seconds}
    m, k, n = cfg["linear_mkn"]
    linear_s = _slowest_median(per_rank, "linear")
    copy_bytes = 2 * cfg["copy_mib"] * 2**20
    copy_s = _slowest_median(per_rank, "copy")
    gemv_bytes = 4.0 * cfg["gemv_nk"][0] * cfg["gemv_nk"][1]  # the float32 weight, read once
    gemv_s = _slowest_median(per_rank, "gemv")
    message = cfg["message_mib"] * 2**20
    ring_s, ring_lat = _slowest_median(per_rank, "ring_big"), _slowest_median(per_rank, "ring_small")
    ar_s, ar_lat = _slowest_median(per_rank, "allreduce_big"), _slowest_median(per_rank, "allreduce_small")
    a2a_lat = _slowest_median(per_rank, "all_to_all_small")
    ranks = cfg["ranks"]
    results = {
        "attention": attention,
        "linear": {"seconds": linear_s, "flops": 2.0 * m * k * n, "flops_per_s": 2.0 * m * k * n / linear_s},
        "copy": {"seconds": copy_s, "bytes": copy_bytes, "bytes_per_s": copy_bytes / copy_s},
        "gemv": {"seconds": gemv_s, "bytes": gemv_bytes, "bytes_per_s": gemv_bytes / gemv_s},
        "ring_step": {"seconds": ring_s, "bytes": message, "bytes_per_s": message / ring_s,
                      "latency_s": ring_lat},
        "all_reduce": {"seconds": ar_s, "bytes": message,
                       "bus_bytes_per_s": 2.0 * (ranks - 1) / ranks * message / ar_s, "latency_s": ar_lat},
        "all_to_all": {"latency_s": a2a_lat},
    }
    overhead = decode_overhead(cfg, decode_cp1, decode_cp2, ring_lat, a2a_lat)
    results["decode_overhead"] = overhead
    attn_rate = attention[str(max(cfg["attention_tokens"]))]["flops_per_s"]
    profile = {
        "name": f"measured-{platform.node() or 'cpu'}",
        "peak_flops_per_s": max(attn_rate, results["linear"]["flops_per_s"]),
        "attn_flops_per_s": attn_rate,
        "linear_flops_per_s": results["linear"]["flops_per_s"],
        "cp_bandwidth_bytes_per_s": results["ring_step"]["bytes_per_s"],
        "tp_bandwidth_bytes_per_s": results["all_reduce"]["bus_bytes_per_s"],
        "memory_bandwidth_bytes_per_s": results["copy"]["bytes_per_s"],
        "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "gpus_per_node": 1,
        "cp_latency_s": ring_lat,
        "tp_latency_s": ar_lat,
        "a2a_latency_s": a2a_lat,
        "net_hop_latency_s": ring_lat,
        # a one-token matmul streams the weight: the fraction of the copy bandwidth it reaches
        "memory_efficiency": min(1.0, (gemv_bytes / gemv_s) / (copy_bytes / copy_s)),
        "layer_overhead_s": overhead["layer_overhead_s"],
        "ring_step_overhead_s": overhead["ring_step_overhead_s"],
    }
    return results, profile


def table(report: dict) -> str:
    r, p = report["results"], report["profile"]
    lines = [f"{'measurement':44}{'median (slowest rank)':>24}", "-" * 68]
    for t, row in r["attention"].items():
        lines.append(f"{f'attention, causal, {t} tokens':44}{row['flops_per_s'] / 1e9:>18.1f} GFLOP/s")
    lines += [
        f"{'linear (x @ W.t())':44}{r['linear']['flops_per_s'] / 1e9:>18.1f} GFLOP/s",
        f"{'memory copy':44}{r['copy']['bytes_per_s'] / 1e9:>18.2f} GB/s",
        f"{'one-token matmul, weight read':44}{r['gemv']['bytes_per_s'] / 1e9:>18.2f} GB/s",
        f"{'ring step (send next, recv previous)':44}{r['ring_step']['bytes_per_s'] / 1e9:>18.2f} GB/s",
        f"{'ring step, 4 bytes':44}{r['ring_step']['latency_s'] * 1e6:>18.1f} us",
        f"{'all_reduce (bus bandwidth)':44}{r['all_reduce']['bus_bytes_per_s'] / 1e9:>18.2f} GB/s",
        f"{'all_reduce, 4 bytes':44}{r['all_reduce']['latency_s'] * 1e6:>18.1f} us",
        f"{'all_to_all, 4 bytes per rank':44}{r['all_to_all']['latency_s'] * 1e6:>18.1f} us",
        f"{'decode, fixed cost per block (CP1)':44}{p['layer_overhead_s'] * 1e6:>18.1f} us",
        f"{'decode, fixed cost per extra ring step':44}{p['ring_step_overhead_s'] * 1e6:>18.1f} us",
        "",
        f"profile {p['name']}: C = {p['attn_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"BW = {p['cp_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s "
        + ("(--quick: tiny blocks, a smoke test, not a profile to plan with)" if report["quick"] else
           f"(use: cp-megatron plan --hardware {report.get('json_path', 'hardware.json')} ...)"),
    ]
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    plt = pyplot()
    rows = report["results"]["attention"]
    tokens = [int(t) for t in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(tokens, [rows[str(t)]["flops_per_s"] / 1e9 for t in tokens], "o-", color="#4477aa",
            label="causal attention (kernel adapter)")
    ax.axhline(report["results"]["linear"]["flops_per_s"] / 1e9, color="#ee6677", ls="--",
               label="linear (x @ W.t())")
    ax.set_xscale("log", base=2)
    ax.set_xticks(tokens, [f"{t // 1024}K" if t >= 1024 else str(t) for t in tokens])
    ax.set_xlabel("block size (tokens, square causal block)")
    ax.set_ylabel("GFLOP/s per rank (slowest rank, median)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    cfg = report["config"]
    ax.set_title(f"{cfg['ranks']} ranks at once, {cfg['threads_per_rank']} thread/rank, "
                 f"{report['machine']['cpu_count']} cores, float32", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def run(opts: BenchOptions) -> dict:
    """Measure, write ``hardware.json`` (with a loadable ``profile``) and ``hardware.png``."""
    from cp_megatron.launcher import spawn

    log, cfg, load_before = start_suite(opts, "hardware", FULL, QUICK)
    log(f"{cfg['ranks']} ranks, {opts.threads} thread(s) each: attention at {cfg['attention_tokens']} "
        f"tokens, linear, copy, ring step, all_reduce; {cfg['repeats']} repeats")
    per_rank = spawn(_measure, cfg["ranks"], (cfg,), timeout_s=opts.timeout_s,
                     threads_per_rank=opts.threads, backend="gloo")
    log(f"decode overhead: {cfg['overhead_preset']} dimensions with {cfg['overhead_layers']} blocks, "
        f"{cfg['overhead_steps']} steps, CP1 then CP2")
    decode_cp1, decode_cp2 = (spawn(_decode_overhead, n, (cfg,), timeout_s=opts.timeout_s,
                                    threads_per_rank=opts.threads, backend="gloo") for n in (1, 2))
    results, profile = summarise(cfg, per_rank, decode_cp1, decode_cp2)
    return finish_report(
        opts, log, suite="hardware", stem="hardware", cfg=cfg, load_before=load_before, results=results,
        plot=plot, profile=profile, samples=per_rank, decode_samples={"cp1": decode_cp1, "cp2": decode_cp2},
        json_path=str(opts.path("hardware", "json")), notes=[
            "Every figure: per repeat the slowest rank's time, then the median over repeats; the decode "
            "fixed costs use the steps' CPU time (busiest rank), which a shared machine does not inflate.",
            "layer_overhead_s / ring_step_overhead_s: growth of a decode step per block of models "
            "with negligible bytes and FLOPs, at CP1 and CP2 (results.decode_overhead); they "
            "measure this runtime's fixed cost per block on this machine.",
            "profile: HardwareProfile fields (FLOP/s, bytes/s, bytes, seconds); load it with "
            "`cp-megatron plan --hardware <this file>` or attention.hardware in a run config.",
            "attn_flops_per_s is the rate of the largest attention block; FLOPs are counted as "
            "the planner counts them (4*D*T^2/2 for a causal block).",
        ])
