"""The ``cp-megatron plan`` subcommand: arguments, tables, the sweep plot.

The cost model itself is :mod:`cp_megatron.planner` (pure); this module only parses the
flags, formats the result and draws the curve.  Bad input is one line naming the flag and
exit code 2.

Source: docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cp_megatron.atomic import pyplot, save_figure

from cp_megatron.planner import WEIGHT_DTYPES, PlanInputError, paper_decode_comparison, plan, sweep_batch, sweep_cp

_PROG = "cp-megatron plan"


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _secs(value: float) -> str:
    if value >= 1.0:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def format_plan(p: dict) -> str:
    """The readable table printed by ``cp-megatron plan``."""
    kind = ("full prefill" if p["cached_tokens"] == 0 else
            "decode step" if p["new_tokens"] == 1 else "partial prefill")
    layers = p["attention_flops"] / p["attention_flops_per_layer"] if p["attention_flops_per_layer"] else 0
    rows = [
        f"plan      {p['model']} on {p['hardware']}: TP{p['tp']} x CP{p['cp']} = {p['gpus']} GPUs "
        f"({p['nodes']} node{'s' if p['nodes'] > 1 else ''})",
        f"round     {kind}: T = {p['new_tokens']:,} new on P = {p['cached_tokens']:,} cached tokens, "
        f"batch {p['batch']} (miss rate {p['miss_rate']:.2%})",
        f"dtypes    weights {p['dtype']}, attention and KV cache {p['kv_dtype']}",
        f"variant   {p['strategy']}  (Alg. 1/5: T*B = {p['heuristic']['new_tokens']:,} vs KV-hidden "
        f"threshold {p['kv_hidden_threshold_tokens']:,.0f}; miss rate {p['miss_rate']:.4f} vs "
        f"{p['miss_rate_threshold']:.4f})",
        "",
        f"{'':34}{'per layer':>14}{f'x {layers:.0f} layers':>16}",
        f"{'attention FLOPs':34}{_si(p['attention_flops_per_layer'], 'FLOP'):>14}"
        f"{_si(p['attention_flops'], 'FLOP'):>16}",
        f"{'linear FLOPs':34}{_si(p['linear_flops_per_layer'], 'FLOP'):>14}"
        f"{_si(p['linear_flops'], 'FLOP'):>16}",
        f"{'CP bytes sent per GPU':34}{_si(p['cp_comm_bytes_per_layer'], 'B'):>14}"
        f"{_si(p['cp_comm_bytes_per_layer'] * layers, 'B'):>16}",
        f"{'TP bytes sent per GPU':34}{_si(p['tp_comm_bytes_per_layer'], 'B'):>14}"
        f"{_si(p['tp_comm_bytes_per_layer'] * layers, 'B'):>16}",
        "",
        f"{'round, time on the slowest GPU':34}{'':>14}",
        *_time_rows(p),
        f"{'TTFT':34}{_secs(p['ttft_s']):>14}   ({_si(p['achieved_flops_per_gpu'], 'FLOP/s')} per GPU)",
        "",
    ] + format_decode(p) + [""] + format_memory(p["memory"])
    rows += [f"warning   {w}" for w in p["warnings"]]
    return _device_words("\n".join(rows), p["hardware"])


# Profiles of CPU ranks: the shipped cpu-gloo and those `cp-megatron bench hardware` measures.
_CPU_PROFILES = ("cpu", "measured-")


def _device_words(text: str, hardware: str) -> str:
    """On a CPU profile, say ranks and machines instead of GPUs and nodes."""
    if not hardware.startswith(_CPU_PROFILES):
        return text
    text = re.sub(r" \(\d+ nodes?\)", "", text)  # ranks on one machine or many: the planner cannot tell
    for gpu_word, cpu_word in (("GPUs", "CPU ranks"), ("GPU", "rank"), ("nodes", "machines"), ("node", "machine")):
        text = text.replace(gpu_word, cpu_word)
    return text


# (label, RoundCost key) of the round's time breakdown.
_TIME_ROWS = (("linear layers", "linear_s"), ("attention (ring compute)", "attention_s"),
              ("TP all-reduce", "tp_comm_s"), ("CP ring + all_to_all, exposed", "cp_comm_exposed_s"),
              ("element-wise (HBM-bound)", "elementwise_s"), ("fixed (launches, per block)", "fixed_s"),
              ("LM head", "lm_head_s"))


def _time_rows(p: dict) -> list[str]:
    return [f"  {label:32}{_secs(p[key]):>14}" for label, key in _TIME_ROWS]


_KIND_WORDS = {"all_reduce": "all-reduce", "all_gather": "all_gather", "all_to_all": "all_to_all",
               "send_recv": "ring send/recv"}


def format_decode(p: dict) -> list[str]:
    """Rows of the decode step's TTIT breakdown (:class:`cp_megatron.decode_cost.DecodeCost`):
    launches, each collective, the HBM terms, the total eager and from a CUDA graph."""
    d = p["decode"]
    layers = round(p["attention_flops"] / p["attention_flops_per_layer"]) if p["attention_flops_per_layer"] else 0
    eager, graph = d["modes"]["eager"], d["modes"]["cuda_graphs"]
    hw = p["hardware_profile"]
    hbm = hw["memory_bandwidth_bytes_per_s"] * hw["memory_efficiency"]
    rows = [f"decode step  TTIT of one step on {p['context_tokens']:,} cached tokens: {d['strategy']}, query exchange "
            f"{d['exchange']}, batch {p['batch']} ({d['tokens_per_rank']} per CP rank); "
            f"{'CUDA graph' if d['cuda_graphs'] else 'eager'} (--cuda-graphs)",
            f"  {'kernel launches':32}{d['launches']:>14,}   ({d['launches_per_layer']} per layer x {layers} "
            f"+ {d['launches_outside_layers']} outside; eager {_secs(eager['launch_s'])} at "
            f"{_secs(eager['launch_cost_s'])}, CUDA graph {_secs(graph['launch_s'])} at "
            f"{_secs(graph['launch_cost_s'])} + {_secs(hw['graph_launch_s'])})"]
    for c in d["collectives"]:
        where = f"{c['count']} x {layers} layers" if c["per"] == "layer" else f"{c['count']} per step"
        total = c["count"] * c["time_s"] * (layers if c["per"] == "layer" else 1)
        rows.append(f"  {c['group'].upper() + ' ' + _KIND_WORDS[c['kind']]:32}{_secs(total):>14}   "
                    f"({where}, {_si(c['in_bytes'], 'B')} each over {c['ranks']} ranks on {c['nodes']} "
                    f"node{'s' if c['nodes'] > 1 else ''}: {_secs(c['time_s'])}, of which "
                    f"{_secs(c['latency_s'])} latency; {c['where']})")
    rows += [f"  {'weights read':32}{_secs(d['weights_s']):>14}   "
             f"({_si(d['weight_bytes'], 'B')} with the LM head, at {_si(hbm, 'B/s')})",
             f"  {'KV cache read (attention)':32}{_secs(d['kv_s']):>14}   ({_si(d['kv_bytes'], 'B')})",
             f"  {'LM head':32}{_secs(d['lm_head_s']):>14}"]
    if d["host_s"]:
        rows.append(f"  {'host work per block (measured)':32}{_secs(d['host_s']):>14}")
    rows += [f"{'TTIT':34}{_secs(p['ttit_s']):>14}   (eager {_secs(p['ttit_eager_s'])}, CUDA graph "
             f"{_secs(p['ttit_cuda_graphs_s'])}; launches overlapped with the device's work: eager "
             f"{_secs(eager['overlapped_s'])}, graph {_secs(graph['overlapped_s'])})"]
    return rows


def format_batch_sweep(points: list[dict]) -> str:
    """The decode table printed by ``cp-megatron plan --sweep batch=...``."""
    first = points[0]
    rows = [f"sweep     decode of {first['model']} on {first['hardware']}, TP{first['tp']} x CP{first['cp']}, "
            f"context {first['context_tokens']:,}, {'CUDA graph' if first['cuda_graphs'] else 'eager'}",
            f"{'batch':>6}{'padded':>8}{'TTIT':>11}{'tokens/s':>10}{'launches':>10}{'weights':>10}{'KV read':>10}"
            f"{'TP':>9}{'CP':>9}{'memory':>8}"]
    for p in points:
        d = p["decode"]
        rows.append(f"{p['batch']:>6}{d['tokens_per_rank'] * p['cp']:>8}{_secs(p['ttit_s']):>11}"
                    f"{p['batch'] / p['ttit_s']:>10.0f}{_secs(d['launch_s']):>10}{_secs(d['weights_s']):>10}"
                    f"{_secs(d['kv_s']):>10}{_secs(d['tp_comm_s']):>9}{_secs(d['cp_comm_s']):>9}"
                    f"{'fits' if p['fits_in_memory'] else 'no fit':>8}")
    return "\n".join(rows)


def format_paper_decode(rows: list[dict]) -> str:
    """The markdown table printed by ``cp-megatron plan --paper-decode``: the planner's TTIT
    (eager, CUDA graph) and TTFT beside arXiv 2411.01783 Tables 6-7, with the decode terms."""
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    lines = ["| source | TP x CP, context | TTIT paper (ms) | planner, CUDA graph | dev. | planner, eager | "
             "launches (graph) | TP all-reduce | CP exchange | step collectives | weights | KV read | LM head | "
             "paper's FP8 recipe: weights + | attention block / layer, planner vs Table 8 (us) | "
             "TTFT paper / planner (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["decode"]
        block = (f"{r['attention_block_us']:.1f} vs {r['paper_attention_block_us']:.1f}"
                 if r["paper_attention_block_us"] is not None else
                 f"{r['attention_block_us']:.1f} vs -" if r["attention_block_us"] is not None else "-")
        lines.append(
            f"| {r['source']} | TP{r['tp']} x CP{r['cp']}, {r['context_tokens'] // 1000}K | {ms(r['paper_ttit_s'])} | "
            f"**{ms(r['ttit_cuda_graphs_s'])}** | {r['ttit_deviation']:+.0%} | {ms(r['ttit_eager_s'])} | "
            f"{ms(d['modes']['cuda_graphs']['launch_s'])} ({d['launches']:,}) | {ms(d['tp_comm_s'])} | "
            f"{ms(d['cp_comm_s'])} ({d['exchange']}) | {ms(d['step_comm_s'])} | {ms(d['weights_s'])} | "
            f"{ms(d['kv_s'])} | {ms(d['lm_head_s'])} | {ms(r['recipe_weights_delta_s'])} | {block} | "
            f"{r['paper_ttft_s']:.2f} / {r['ttft_s']:.2f} ({r['ttft_deviation']:+.0%}) |")
    return "\n".join(lines)


def format_memory(m: dict) -> list[str]:
    """Rows of the per-GPU memory report (:func:`cp_megatron.planner.memory_report`)."""
    phases = m["activation_phases"]
    peak = max(phases, key=phases.get)
    allow = m["allowances"]
    fits = ", ".join(f"{name} ({_si(m['capacity_bytes'][name], 'B')}) {'fits' if ok else 'DOES NOT FIT'}"
                     for name, ok in m["fits"].items())
    return [f"memory    per GPU, weights {m['weights']} as loaded:",
            f"  {'weights':32}{_si(m['weight_bytes'], 'B'):>12}",
            f"  {'KV cache capacity':32}{_si(m['kv_cache_capacity_bytes'], 'B'):>12}   "
            f"(context {_si(m['kv_cache_bytes'], 'B')}, + generation budget and margin)",
            f"  {'activations (prefill peak)':32}{_si(m['activation_bytes'], 'B'):>12}   (phase '{peak}' of a layer)",
            f"  {'communication buffers':32}{_si(m['comm_buffer_bytes'], 'B'):>12}   (CP ring receive buffers)",
            f"  {'total, as the dry run counts':32}{_si(m['total_bytes'], 'B'):>12}",
            f"  {'+ allowances':32}{_si(sum(allow.values()), 'B'):>12}   (CUDA context "
            f"{_si(allow['cuda_context'], 'B')}, NCCL {_si(allow['nccl'], 'B')}, fragmentation "
            f"{_si(allow['fragmentation'], 'B')}; docs/planner.md)",
            f"  {'= needed':32}{_si(m['total_with_allowances_bytes'], 'B'):>12}   {fits}",
            f"check     {m['dryrun_command']}  (measures the four categories above on fake tensors"
            + ("; CONFIG: a run config with these inputs, named by plan --config)" if " CONFIG " in m["dryrun_command"]
               else ")")]


def format_sweep(points: list[dict]) -> str:
    """The scaling table printed by ``cp-megatron plan --sweep cp=...``."""
    first = points[0]
    rows = [f"sweep     {first['model']} on {first['hardware']}, TP{first['tp']}, context "
            f"{first['context_tokens']:,} (cached {first['cached_tokens']:,}), batch {first['batch']}",
            f"{'cp':>5}{'gpus':>6}  {'variant':8}{'TTFT':>12}{'speedup':>10}{'efficiency':>12}{'TTIT':>12}"
            f"{'memory':>9}"]
    for p in points:
        rows.append(f"{p['cp']:>5}{p['gpus']:>6}  {p['strategy']:8}{_secs(p['ttft_s']):>12}"
                    f"{p['speedup']:>9.2f}x{p['efficiency']:>12.1%}{_secs(p['ttit_s']):>12}"
                    f"{'fits' if p['fits_in_memory'] else 'no fit':>9}")
    return _device_words("\n".join(rows), points[0]["hardware"])


def plot_sweep(points: list[dict], path: str) -> None:
    """Write the TTFT-vs-CP curve (with ideal linear scaling) and the efficiency to a PNG."""
    plt = pyplot()  # matplotlib: optional dependency, only for --plot
    cps = [p["cp"] for p in points]
    ttft = [p["ttft_s"] for p in points]
    ideal = [ttft[0] * cps[0] / c for c in cps]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.loglog(cps, ttft, "o-", label="planner")
    ax1.loglog(cps, ideal, "--", color="gray", label="ideal linear scaling")
    ax1.set_xlabel("CP size (nodes of TP%d)" % points[0]["tp"])
    ax1.set_ylabel("TTFT (s)")
    ax1.set_xticks(cps, [str(c) for c in cps])
    ax1.legend()
    ax2.semilogx(cps, [100 * p["efficiency"] for p in points], "o-")
    ax2.set_xticks(cps, [str(c) for c in cps])
    ax2.set_ylim(0, 105)
    ax2.set_xlabel("CP size")
    ax2.set_ylabel("parallel efficiency (%)")
    fig.suptitle(f"{points[0]['model']} on {points[0]['hardware']}, "
                 f"context {points[0]['context_tokens']:,} tokens (predicted)")
    fig.tight_layout()
    save_figure(fig, Path(path))


def _parse_sweep(text: str) -> tuple[str, list[int]]:
    """``cp=1,2,4`` or ``batch=1,8,64`` -> (key, sizes)."""
    key, _, values = text.partition("=")
    key = key.strip()
    if key not in ("cp", "batch") or not values:
        raise PlanInputError("--sweep", f"expected cp=N1,N2,... or batch=B1,B2,..., got {text!r}")
    try:
        sizes = [int(v) for v in values.split(",")]
    except ValueError:
        raise PlanInputError("--sweep", f"expected integers after {key}=, got {values!r}") from None
    if any(c < 1 for c in sizes):
        raise PlanInputError("--sweep", f"{key} sizes must be >= 1, got {values!r}")
    return key, sizes


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cp-megatron plan`` (sets ``func=run_plan``)."""
    p = subparsers.add_parser(
        "plan", help="predict TTFT / TTIT / memory of a TP x CP deployment (analytic model)",
        description="Analytic cost model of context-parallel prefill and decode "
                    "(arXiv 2411.01783); see docs/planner.md.")
    p.add_argument("--model", default=None, help="model preset, e.g. llama3.1-405b")
    p.add_argument("--hardware", default=None, help="hardware profile (h100-rdma, h100-tcp, h200, cpu-gloo) or a profile "
                        ".json, e.g. docs/bench/hardware.json from `cp-megatron bench hardware`")
    p.add_argument("--tp", type=int, default=None, help="TP degree (GPUs per CP rank)")
    p.add_argument("--cp", type=int, default=None, help="CP degree (required unless --sweep)")
    p.add_argument("--context", type=int, default=None, help="context tokens per sequence, T + P")
    p.add_argument("--cached", type=int, default=0, help="P, tokens already cached (default 0)")
    p.add_argument("--batch", type=int, default=1, help="sequences per round (default 1)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None,
                   help="weight dtype (default fp8 for llama3.1-405b as in the paper, else bf16)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate after the round (the KV cache reserves them; default 0, or "
                        "generation.max_new_tokens of --config)")
    p.add_argument("--kv-margin", type=int, default=None,
                   help="context tokens the KV cache reserves for later turns (default 8192, or "
                        "runtime.kv_cache_margin_tokens of --config)")
    p.add_argument("--config", default=None, metavar="RUN.yaml",
                   help="take tp, cp, dtype, hardware, max_new_tokens, the KV margin (and, for a dummy model "
                        "or random prompt, the model and the context) from a run config; flags override; "
                        "the memory report names `cp-megatron dryrun RUN.yaml --layers 2`")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="TTIT of a decode step replayed from a CUDA graph (default: eager, or "
                        "runtime.cuda_graphs of --config); both are printed")
    p.add_argument("--paper-decode", action="store_true",
                   help="print the planner's TTIT beside the paper's Tables 6 and 7 (405B, batch 1) as a "
                        "markdown table, with the decode terms (--hardware, default h100-rdma)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sweep", default=None, metavar="cp=1,2,4,8,16",
                   help="scaling curve over CP sizes (cp=...), or decode over batch sizes (batch=...)")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="with --sweep cp=...: write the curve")
    p.set_defaults(func=run_plan)
    return p


_DTYPE_OF = {"float32": "fp32", "bfloat16": "bf16"}


def _from_config(args: argparse.Namespace) -> dict:
    """Planner inputs of ``--config`` (None when not given); flags given explicitly win.

    Raises:
        PlanInputError: the config cannot be loaded, or a required input is in neither.
    """
    values = {"model": args.model, "hardware": args.hardware, "tp": args.tp, "cp": args.cp,
              "context_tokens": args.context, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
              "kv_margin_tokens": args.kv_margin, "dryrun_config": None, "cuda_graphs": args.cuda_graphs}
    if args.config is not None:
        from cp_megatron.config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as err:
            raise PlanInputError("--config", str(err)) from None
        from_cfg = {"tp": cfg.parallel.tp, "cp": cfg.parallel.cp, "hardware": cfg.attention.hardware,
                    "dtype": "fp8" if cfg.model.weights == "fp8-rowwise" else _DTYPE_OF[cfg.model.dtype],
                    "max_new_tokens": cfg.generation.max_new_tokens,
                    "kv_margin_tokens": cfg.runtime.kv_cache_margin_tokens,
                    "model": cfg.model.preset if cfg.model.format == "dummy" else None,
                    "context_tokens": cfg.prompt.random_tokens if cfg.prompt is not None else None,
                    # runtime.cuda_graphs where the config schema has it
                    "cuda_graphs": getattr(cfg.runtime, "cuda_graphs", None)}
        values = {k: (v if v is not None else from_cfg.get(k)) for k, v in values.items()}
        values["dryrun_config"] = args.config
        if cfg.parallel.pp != 1:
            raise PlanInputError("--config", f"parallel.pp = {cfg.parallel.pp}: the planner models PP 1 only")
    for key, flag, why in (("model", "--model", "the checkpoint's preset, e.g. llama3.1-405b"),
                           ("hardware", "--hardware", "a profile name or .json"),
                           ("tp", "--tp", "the TP degree"),
                           ("context_tokens", "--context", "context tokens per sequence")):
        if values[key] is None:
            raise PlanInputError(flag, f"required ({why}){'; --config does not give it' if args.config else ''}")
    values["max_new_tokens"] = values["max_new_tokens"] or 0
    values["cuda_graphs"] = bool(values["cuda_graphs"])
    if values["kv_margin_tokens"] is None:
        from cp_megatron.planner import DEFAULT_KV_MARGIN_TOKENS

        values["kv_margin_tokens"] = DEFAULT_KV_MARGIN_TOKENS
    return values


def run_plan(args: argparse.Namespace) -> int:
    """Run ``cp-megatron plan``; returns the exit code (2 on bad input)."""
    if args.paper_decode:
        try:
            rows = paper_decode_comparison(args.hardware or "h100-rdma")
        except PlanInputError as err:
            print(f"{_PROG}: error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(rows, indent=2) if args.json else format_paper_decode(rows))
        return 0
    try:
        values = _from_config(args)
    except PlanInputError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    args.cp = values.pop("cp")
    kwargs = dict(values, cached_tokens=args.cached, batch=args.batch)
    try:
        if args.sweep is None:
            if args.cp is None:
                raise PlanInputError("--cp", "required unless --sweep cp=... is given")
            if args.plot:
                raise PlanInputError("--plot", "needs --sweep cp=...")
            result = plan(cp=args.cp, **kwargs).to_dict()
        else:
            key, sizes = _parse_sweep(args.sweep)
            if args.plot and key != "cp":
                raise PlanInputError("--plot", "needs --sweep cp=...")
            if args.plot and not args.plot.lower().endswith(".png"):
                raise PlanInputError("--plot", f"expected a .png path, got {args.plot!r}")
            if key == "cp":
                points = sweep_cp(sizes, **kwargs)
            else:
                if args.cp is None:
                    raise PlanInputError("--cp", "required with --sweep batch=...")
                kwargs.pop("batch")
                points = sweep_batch(sizes, cp=args.cp, **kwargs)
            if args.plot:
                try:
                    plot_sweep(points, args.plot)
                except OSError as err:
                    raise PlanInputError("--plot", f"cannot write {args.plot!r}: {err}") from None
            result = {"sweep": key, "points": points, "plot": args.plot}
    except PlanInputError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.sweep is None:
        print(format_plan(result))
    elif result["sweep"] == "batch":
        print(format_batch_sweep(result["points"]))
    else:
        print(format_sweep(result["points"]))
        if args.plot:
            print(f"plot      {args.plot}")
    return 0
