"""The ``cp-megatron dryrun`` subcommand: trace a run config's engine rank by rank on fake
tensors (:mod:`cp_megatron.dryrun`) and print memory, launches, collectives, host syncs and
attention kernels per round, beside the planner's memory figures.

    cp-megatron dryrun CONFIG [--set k=v ...] [--rank R | --all-ranks] [--layers N]
                       [--rounds prefill,partial:2000,decode:2] [--json PATH]

Bad input is one line naming the flag or key and exit code 2; a communication mismatch
(``--all-ranks``) or a host sync inside a layer with ``--fail-on-sync`` is exit code 1.

Source: docs/dryrun.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_PROG = "cp-megatron dryrun"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cp-megatron dryrun`` (sets ``func=run_dryrun``)."""
    p = subparsers.add_parser(
        "dryrun", help="trace a config's engine on fake tensors, rank by rank (no GPU needed)",
        description="Run the same engine as `run` on fake tensors with the fake process group at the "
                    "config's world size: memory, launches, collectives, host syncs per round. "
                    "See docs/dryrun.md.")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (as for run)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--rank", type=int, default=0, help="global rank to trace (default 0)")
    who.add_argument("--all-ranks", action="store_true",
                     help="trace every rank and check that the communication pattern matches up")
    p.add_argument("--layers", type=int, default=None, help="layers to build (default all)")
    p.add_argument("--rounds", default="prefill,partial:2000,decode:2",
                   help="rounds to run (default prefill,partial:2000,decode:2)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt length (default: prompt.random_tokens, prompt.num_tokens, or the prompt tokenized)")
    p.add_argument("--processes", type=int, default=2, help="with --all-ranks: worker processes (default 2)")
    p.add_argument("--capability", default="9.0", help="compute capability of the fake GPU (default 9.0, H100)")
    p.add_argument("--fail-on-sync", action="store_true", help="exit 1 if a host sync happens inside a layer")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON")
    p.set_defaults(func=run_dryrun)
    return p


def build_spec(cfg, layers, rounds_text, prompt_tokens, capability, say=lambda _l: None):
    """A :class:`~cp_megatron.dryrun.DryRunSpec` from a run config.

    Raises:
        ConfigError: no model config or no prompt length can be found, or bad flags.
    """
    import torch

    from cp_megatron import device as devices
    from cp_megatron.config import ConfigError
    from cp_megatron.dryrun import DryRunSpec, parse_rounds
    from cp_megatron.model.config import get_preset
    from cp_megatron.preflight import heuristic_hardware, open_reader, prepare

    m, p = cfg.model, cfg.prompt
    if cfg.runtime.device != "cuda":
        raise ConfigError("runtime.device: the dry run traces fake CUDA tensors; a cpu config runs for real "
                          "(`cp-megatron run`), or trace it as a GPU job with --set runtime.device=cuda")
    if m.implementation != "native":
        raise ConfigError("model.implementation: the dry run traces the native stage only")
    if m.format == "dummy" or (m.path and os.path.exists(cfg.resolve_path(m.path))):
        model = open_reader(cfg).config
    elif m.preset:
        try:
            model = get_preset(m.preset)
        except ValueError as exc:
            raise ConfigError(f"model.preset: {exc}") from None
        say(f"[dryrun] model.path {m.path} is not on this machine: shapes of preset {m.preset}")
    else:
        raise ConfigError(f"model.path: {m.path} is not on this machine; set model.preset (the model the "
                          f"checkpoint holds) for a dry run")
    if prompt_tokens is None and p is not None:
        prompt_tokens = p.random_tokens or p.num_tokens
    if prompt_tokens is None:
        try:
            with devices.use_fake_cuda():
                prompt_tokens = len(prepare(cfg).first_turn)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (the dry run needs the prompt's length: --prompt-tokens or "
                              f"prompt.num_tokens)") from None
    if prompt_tokens < 1:
        raise ConfigError("--prompt-tokens: expected >= 1")
    if layers is not None and not 1 <= layers <= model.num_layers:
        raise ConfigError(f"--layers: expected 1..{model.num_layers}, got {layers}")
    if cfg.parallel.pp > 1 and layers is not None and layers < cfg.parallel.pp:
        raise ConfigError(f"--layers: at least parallel.pp={cfg.parallel.pp} layers")
    try:
        rounds = parse_rounds(rounds_text)
        cap = tuple(int(x) for x in capability.split("."))
    except ValueError as exc:
        raise ConfigError(str(exc) if "--rounds" in str(exc) else f"--capability: expected like 9.0, got "
                                                                   f"{capability!r}") from None
    return DryRunSpec(model_config=model, tp=cfg.parallel.tp, cp=cfg.parallel.cp, pp=cfg.parallel.pp,
                      dtype=getattr(torch, m.dtype), weights=m.weights, strategy=cfg.attention.strategy,
                      hardware=heuristic_hardware(cfg), prompt_tokens=prompt_tokens,
                      max_new_tokens=cfg.generation.max_new_tokens, rounds=rounds,
                      kv_margin_tokens=cfg.runtime.kv_cache_margin_tokens,
                      kv_growth_tokens=cfg.runtime.kv_cache_growth_tokens,
                      layers=layers or model.num_layers, device=cfg.runtime.device, capability=cap)


def planner_figures(spec, round_name: str, cached: int, new: int, strategy: str = "pass-kv") -> dict:
    """The planner's memory per category for one round of the spec (bytes per GPU, full depth):
    weights, the KV cache's reserved capacity (reserved for the first prompt, the generation
    budget and ``runtime.kv_cache_margin_tokens``, as the engine reserves it), the round's
    activation peak and the ring's receive buffers for the round's variant
    (:func:`cp_megatron.planner.memory_report`)."""
    from cp_megatron.attention.heuristic import PASS_KV, PASS_Q
    from cp_megatron.planner import memory_report

    dtype = "fp8" if spec.weights == "fp8-rowwise" else ("bf16" if str(spec.dtype).endswith("bfloat16") else "fp32")
    # all-gather-Q and replicated-Q move float32 partials as pass-Q does (gathered queries, or all
    # ranks' partials, instead of the ring's two Q blocks): costed as pass-Q
    strategy = PASS_Q if strategy in ("pass-q", "all-gather-q", "replicated-q") else PASS_KV
    rep = memory_report(spec.model_config, spec.tp, spec.cp, cached + new, new, 1, dtype, strategy=strategy,
                        max_new_tokens=spec.max_new_tokens, kv_margin_tokens=spec.kv_margin_tokens,
                        reserved_tokens=spec.prompt_tokens)
    out = {"weights": rep.weight_bytes, "kv_cache": rep.kv_cache_capacity_bytes, "kv_cache_used": rep.kv_cache_bytes,
           "activations": rep.activation_bytes, "comm_buffers": rep.comm_buffer_bytes, "total": rep.total_bytes,
           "strategy": strategy}
    out["command"] = (f"cp-megatron plan --model {spec.model_config.name} --tp {spec.tp} --cp {spec.cp} "
                      f"--context {cached + new} --cached {cached} --dtype {dtype} --hardware h100-rdma "
                      f"--max-new-tokens {spec.max_new_tokens} --kv-margin {spec.kv_margin_tokens}")
    return out


def attach_planner(spec, report: dict) -> None:
    """Add ``planner`` figures to each round of a rank report."""
    cached = 0
    for r in report["rounds"]:
        m = r.get("metrics", {})
        new = m.get("new_tokens", 0)
        cached = m.get("cached_tokens", cached)
        r["planner"] = planner_figures(spec, r["round"], cached, new, m.get("strategy", "pass-kv"))


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:9.3f}"


def format_report(rep: dict) -> str:
    """The readable table of one rank's report."""
    from cp_megatron.dryrun import CATEGORIES

    lines = [f"dry run: rank {rep['rank']} (tp {rep['tp_rank']}, cp {rep['cp_rank']}, pp {rep['pp_rank']}) of "
             f"{rep['world_size']}, {rep['layers_traced']} of {rep['layers_full']} layers traced in "
             f"{rep['time_s']:.1f} s"]
    for r in rep["rounds"]:
        m = r.get("metrics", {})
        lines += ["", f"== {r['round']}: T={m.get('new_tokens')} P={m.get('cached_tokens')} "
                      f"variant {m.get('strategy')}  ({r['time_s']:.1f} s traced)"]
        mem, pl = r["memory_full_depth"], r.get("planner", {})
        lines.append(f"  {'memory (GB per GPU, full depth)':34}{'at peak':>10}{'max':>10}{'planner':>10}{'diff':>8}")
        for c in CATEGORIES:
            got, want = mem["max_by_category"][c], pl.get(c)
            diff = f"{100 * (got - want) / want:+7.1f}%" if want else ("    0.0%" if want == 0 and not got else "       -")
            lines.append(f"  {c:34}{_gb(mem['peak_by_category'][c])}{_gb(got)}{_gb(want):>10}{diff}")
        lines.append(f"  {'total (peak; planner: sum of maxima)':34}{_gb(mem['peak_bytes'])}{'':10}{_gb(pl.get('total'))}")
        kv = r["kv_cache"]
        lines.append(f"  KV cache after the round: capacity {_gb(kv['capacity_bytes_full_depth']).strip()} GB, "
                     f"used {_gb(kv['used_bytes_full_depth']).strip()} GB, allocations {kv['allocations']}")
        per = r["launches_per_layer"]
        vals = sorted(set(per.values()))
        lines.append(f"  launches per layer: {', '.join(str(v) for v in vals)} (outside layers "
                     f"{r['launches_outside_layers']})")
        by_src = r["launches_by_layer_and_source"].get("0", {})
        lines.append("    layer 0 by source: " + ", ".join(f"{k} {v}" for k, v in
                                                          sorted(by_src.items(), key=lambda kv: -kv[1])))
        coll = r["collectives_by_layer"].get("0", [])
        summary = {}
        for c in coll:
            key = (c["kind"], tuple(c["group"]), c["dtype"])
            n, b = summary.get(key, (0, 0))
            summary[key] = (n + 1, b + c["bytes"])
        lines.append("  collectives, layer 0: " + ("; ".join(
            f"{n} x {k} on {list(g)} {d} {b / n:,.0f} B" for (k, g, d), (n, b) in summary.items()) or "none"))
        lines.append(f"  host syncs: {len(r['host_syncs'])} ({len(r['host_syncs_inside_layers'])} inside layers): "
                     + ", ".join(sorted({f"{s['kind']} at {s['where']}" for s in r['host_syncs']})))
        lines.append(f"  host-device copies: {len(r['host_device_copies'])}: " + ", ".join(
            sorted({f"{c['kind']} at {c['where']}" for c in r['host_device_copies']})))
        for a in r["attention_kernels"][:6]:
            bad = [k for k, ok in a["constraints"]["checks"].items() if not ok]
            lines.append(f"  attention {a['kernel']} q{a['q']['shape']} k{a['k']['shape']} {a['q']['dtype']} "
                         f"causal={a['is_causal']} x{a['calls']}: "
                         + ("constraints ok" if not bad else "VIOLATES " + "; ".join(bad)))
        if len(r["attention_kernels"]) > 6:
            lines.append(f"  ... {len(r['attention_kernels']) - 6} more attention shapes (see --json)")
    g = rep.get("decode_graph_replayable", {})
    verdict = {True: "yes", False: "no", None: "not checked"}[g.get("replayable")]
    lines += ["", f"decode graph-replayable: {verdict} ({g.get('reason')})"]
    return "\n".join(lines)


def _trace_ranks(args_tuple):
    spec, ranks = args_tuple
    import torch

    from cp_megatron.dryrun import keep_collectives, trace_rank

    torch.set_num_threads(1)
    out = {}
    for r in ranks:
        rep = keep_collectives(trace_rank(spec, r))
        for rd in rep["rounds"]:   # keep what the pattern check and the summary need
            for key in ("launches_by_layer_and_source", "host_device_copies", "attention_kernels", "scaled_mm"):
                rd.pop(key, None)
        out[r] = rep
    return out


def all_ranks(spec, processes: int, say) -> tuple[dict, dict]:
    """Trace every rank in ``processes`` worker processes; (reports by rank, check summary).

    Raises:
        PatternError: the communication does not match up.
    """
    import multiprocessing as mp

    from cp_megatron.dryrun import check_pattern

    world = spec.world_size
    step = 8   # ranks per task: a progress line every few ranks
    chunks = [list(range(i, min(i + step, world))) for i in range(0, world, step)]
    say(f"[dryrun] tracing {world} ranks in {processes} processes")
    reports = {}
    if processes == 1:
        for c in chunks:
            reports.update(_trace_ranks((spec, c)))
            say(f"[dryrun] {len(reports)}/{world} ranks traced")
    else:
        with mp.get_context("spawn").Pool(processes) as pool:
            for part in pool.imap_unordered(_trace_ranks, [(spec, c) for c in chunks]):
                reports.update(part)
                say(f"[dryrun] {len(reports)}/{world} ranks traced")
    return reports, check_pattern(reports)


def run_dryrun(args: argparse.Namespace) -> int:
    """Run ``cp-megatron dryrun``; returns the exit code."""
    from cp_megatron.atomic import output_file_problem, write_json
    from cp_megatron.config import ConfigError, load_config
    from cp_megatron.dryrun import PatternError, trace_rank

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.json and output_file_problem(args.json):
            raise ConfigError(f"--json: {output_file_problem(args.json)}")
        cfg = load_config(args.config, args.overrides)
        spec = build_spec(cfg, args.layers, args.rounds, args.prompt_tokens, args.capability, say)
        if not args.all_ranks and not 0 <= args.rank < spec.world_size:
            raise ConfigError(f"--rank: expected 0..{spec.world_size - 1}, got {args.rank}")
        if args.processes < 1:
            raise ConfigError("--processes: expected >= 1")
    except ConfigError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.all_ranks:
        try:
            reports, summary = all_ranks(spec, args.processes, say)
        except PatternError as exc:
            print(f"{_PROG}: communication mismatch: {exc}", file=sys.stderr)
            return 1
        syncs = sorted({(r, s["where"]) for r, rep in reports.items() for rd in rep["rounds"]
                        for s in rd["host_syncs_inside_layers"]})
        out = {"all_ranks": True, "world_size": spec.world_size, "layers_traced": spec.layers,
               "pattern_check": {"ok": True, **summary}, "time_s": time.perf_counter() - t0,
               "host_syncs_inside_layers": [f"rank {r}: {w}" for r, w in syncs],
               "launches_per_layer": {r: {rd["round"]: sorted(set(rd["launches_per_layer"].values()))
                                          for rd in rep["rounds"]} for r, rep in sorted(reports.items())}}
        for rep in reports.values():
            for rd in rep["rounds"]:
                rd.pop("_collectives", None)
        print(f"pattern check: {spec.world_size} ranks, {summary['sends_matched']} sends matched to their "
              f"receives, {summary['group_calls_matched']} group calls identical across their groups: ok "
              f"({out['time_s']:.0f} s)")
        failed = bool(syncs) and args.fail_on_sync
    else:
        rep = trace_rank(spec, args.rank, say)
        attach_planner(spec, rep)
        out = rep
        print(format_report(rep))
        failed = args.fail_on_sync and any(rd["host_syncs_inside_layers"] for rd in rep["rounds"])
    if args.json:
        write_json(args.json, out)
    if failed:
        print(f"{_PROG}: host sync inside a layer (see host_syncs_inside_layers)", file=sys.stderr)
        return 1
    return 0
