"""Suite ``peers``: TTFT of the default SmolLM2 config against Hugging Face transformers.

Our side: the run config (``configs/default.yaml``: SmolLM2-135M-Instruct from its GGUF
file, float32, the GPL-2 document and a question through the chat template) at CP 1,
its prefill round's ``RoundMetrics.time_s``.  Their side:
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` in float32, one forward
over the same token ids (``use_cache=True, logits_to_keep=1``, as ``generate`` runs its
prefill).  Both run with the same ``torch.set_num_threads``, each in its own process,
loaded once; the two take turns (ours, theirs, theirs, ours, ... so that neither side
always runs first), and the medians and their ratio are reported.  The last-token logits of both are compared as a check that
the two compute the same thing.

transformers (and accelerate) are test extras: imported lazily, with a clear error.

Source: arXiv 2411.01783 §4 (TTFT); docs/design.md §14 (transformers is the model oracle).
"""

from __future__ import annotations

import importlib.util
import os
import time

from cp_megatron.bench.common import (BenchError, BenchOptions, Job, Log, finish_report, pyplot,
                                      run_interleaved, save_figure, summary, turn)

FULL = {"repeats": 5, "prompt_tokens": None}
QUICK = {"repeats": 1, "prompt_tokens": 128}
SIDES = ("ours", "transformers")


def schedule(repeats: int) -> list[str]:
    """Set-ups, warm-ups, then the timed rounds in the order ours, theirs, theirs, ours, ..."""
    keys = [f"{s}/setup" for s in SIDES] + [f"{s}/warmup" for s in SIDES]
    for r in range(repeats):
        keys += [f"{s}/{r}" for s in (SIDES if r % 2 == 0 else SIDES[::-1])]
    return keys


def stem(threads: int) -> str:
    """File name stem: ``peers`` at 1 thread, ``peers-2threads`` etc. otherwise."""
    return "peers" if threads == 1 else f"peers-{threads}threads"


def _ours_job(turns, cfg, prep, ids: list[int], repeats: int) -> dict:
    import torch

    from cp_megatron import parallel_state
    from cp_megatron.factory import build_engine
    from cp_megatron.preflight import open_reader

    topo = parallel_state.initialize(tp=1, cp=1, pp=1)
    with turn(turns, "ours/setup"):
        engine = build_engine(open_reader(cfg), topo, dtype=getattr(torch, cfg.model.dtype),
                              strategy=cfg.attention.strategy, kv_capacity=len(ids),
                              profile=True)
    samples, logits = [], None
    for key in ["warmup"] + list(range(repeats)):
        with turn(turns, f"ours/{key}"):
            cpu_start = time.process_time()
            out, metrics = engine.forward({0: ids})
            cpu_s = time.process_time() - cpu_start
            engine.reset()
        if key != "warmup":
            samples.append({"ttft_s": metrics.time_s, "cpu_s": cpu_s, "attention_s": metrics.attention_s,
                            "kind": metrics.kind, "strategy": metrics.strategy})
            logits = out[0]
    return {"samples": samples, "logits": logits.tolist(), "threads": torch.get_num_threads()}


def _transformers_job(turns, source: dict, ids: list[int], repeats: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    with turn(turns, "transformers/setup"):
        model = AutoModelForCausalLM.from_pretrained(source["folder"], dtype=torch.float32,
                                                     **({"gguf_file": source["gguf_file"]}
                                                        if source["gguf_file"] else {})).eval()
    input_ids = torch.tensor([ids])
    samples, logits = [], None
    for key in ["warmup"] + list(range(repeats)):
        with turn(turns, f"transformers/{key}"):
            cpu_start, start = time.process_time(), time.perf_counter()
            with torch.inference_mode():
                out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            ttft, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        if key != "warmup":
            samples.append({"ttft_s": ttft, "cpu_s": cpu_s})
            logits = out.logits[0, -1].float()
        del out
    return {"samples": samples, "logits": logits.tolist(), "threads": torch.get_num_threads(),
            "transformers": transformers.__version__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def _check_extras() -> None:
    missing = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchError(f"the peers suite needs {' and '.join(missing)} (test extras): "
                         "pip install -e '.[test]'")


def _source(cfg) -> dict:
    """Where transformers loads the same checkpoint from."""
    path = cfg.resolve_path(cfg.model.path) if cfg.model.path else None
    if cfg.model.format == "gguf":
        return {"folder": os.path.dirname(path), "gguf_file": os.path.basename(path)}
    if cfg.model.format == "hf":
        return {"folder": path, "gguf_file": None}
    raise BenchError(f"peers: model.format must be gguf or hf (transformers loads those), got "
                     f"{cfg.model.format!r}")


def table(report: dict) -> str:
    r = report["results"]
    head = f"{'side':<14} {'TTFT s (median)':>15} {'min':>8} {'max':>8} {'tokens/s':>9}"
    lines = [head, "-" * len(head)]
    for side in SIDES:
        s = r[side]["ttft_s"]
        lines.append(f"{side:<14} {s['median']:>15.3f} {s['min']:>8.3f} {s['max']:>8.3f} "
                     f"{r['prompt_tokens'] / s['median']:>9.0f}")
    lines.append(f"ratio ours / transformers: {r['ratio_ours_over_transformers']:.3f} "
                 f"({'ours faster' if r['ratio_ours_over_transformers'] < 1 else 'transformers faster'}); "
                 f"{r['prompt_tokens']} prompt tokens, {report['config']['threads']} thread(s) each; "
                 f"logits max abs diff {r['logits_max_abs_diff']:.2e}, same next token: {r['same_next_token']}")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    plt = pyplot()
    r = report["results"]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    colors = ("#4477aa", "#bbbbbb")
    for i, (side, color) in enumerate(zip(SIDES, colors)):
        med = r[side]["ttft_s"]["median"]
        ax.bar(i, med, 0.6, color=color)
        s = [x["ttft_s"] for x in r[side]["samples"]]
        ax.scatter([i] * len(s), s, color="black", s=12, zorder=3)
        ax.text(i + 0.32, med, f"{med:.2f} s", ha="left", va="center", fontsize=9)
    ax.set_xticks(range(len(SIDES)), ["cp_megatron CP1", f"transformers {r['transformers_version']}"])
    ax.set_ylabel("TTFT (s): bars median, dots every repeat")
    ax.set_title(f"{os.path.basename(report['config']['model'])}, {r['prompt_tokens']} prompt tokens, float32, "
                 f"{report['config']['threads']} thread(s)\nratio ours / transformers = "
                 f"{r['ratio_ours_over_transformers']:.2f}", fontsize=9)
    ax.set_xlim(-0.5, len(SIDES) - 0.5 + 0.5)
    ax.margins(y=0.15)
    fig.tight_layout()
    save_figure(fig, path)


def run(opts: BenchOptions) -> dict:
    """Run the suite, write ``peers.json`` / ``peers.png`` (``peers-Nthreads.*`` with
    ``--threads N``); return the report."""
    import torch

    from cp_megatron.config import load_config
    from cp_megatron.preflight import prepare

    log = Log("peers")
    _check_extras()
    if not os.path.isfile(opts.config):
        raise BenchError(f"--config {opts.config}: no such file (run from the repository root or pass --config)")
    knobs = dict(QUICK if opts.quick else FULL)
    if opts.repeats is not None:
        knobs["repeats"] = opts.repeats
    cfg = load_config(opts.config, ["parallel.cp=1", "parallel.tp=1", "parallel.pp=1",
                                    f"runtime.threads_per_rank={opts.threads}"])
    source = _source(cfg)
    prep = prepare(cfg)
    ids = prep.first_turn[: knobs["prompt_tokens"]] if knobs["prompt_tokens"] else prep.first_turn
    load_before = log.load_check()
    log(f"{prep.model_config.name}: {len(ids)} prompt tokens, {opts.threads} thread(s), ours vs "
        f"transformers interleaved, {knobs['repeats']} repeats")
    jobs = [Job(_ours_job, 1, (cfg, prep, ids, knobs["repeats"]), threads_per_rank=opts.threads, name="ours"),
            Job(_transformers_job, 1, (source, ids, knobs["repeats"]), threads_per_rank=opts.threads,
                backend=None, name="transformers")]
    (ours,), (theirs,) = run_interleaved(jobs, schedule(knobs["repeats"]), opts.timeout_s)
    a, b = torch.tensor(ours["logits"]), torch.tensor(theirs["logits"])
    results = {
        "prompt_tokens": len(ids),
        "ours": {"ttft_s": summary([s["ttft_s"] for s in ours["samples"]]), "samples": ours["samples"],
                 "threads": ours["threads"]},
        "transformers": {"ttft_s": summary([s["ttft_s"] for s in theirs["samples"]]),
                         "samples": theirs["samples"], "threads": theirs["threads"],
                         "attn_implementation": theirs["attn_implementation"]},
        "transformers_version": theirs["transformers"],
        "logits_max_abs_diff": (a - b).abs().max().item(),
        "same_next_token": int(a.argmax()) == int(b.argmax()),
    }
    results["ratio_ours_over_transformers"] = (results["ours"]["ttft_s"]["median"]
                                               / results["transformers"]["ttft_s"]["median"])
    config = {"run_config": os.path.abspath(opts.config), "model": prep.model_config.name,
              "checkpoint": source, "dtype": cfg.model.dtype, "threads": opts.threads,
              "cp": 1, "attention_strategy": cfg.attention.strategy, **knobs,
              "prompt_tokens": len(ids), "token_ids": ids}
    return finish_report(
        opts, log, suite="peers", stem=stem(opts.threads), cfg=config, load_before=load_before,
        results=results, plot=plot, versions={"transformers": theirs["transformers"]}, notes=[
            "ours: RoundMetrics.time_s of the prefill round (engine.forward at CP1, logits of the last "
            "token only); transformers: wall time of model(input_ids, use_cache=True, logits_to_keep=1) "
            "under torch.inference_mode (what generate() runs for its prefill).",
            "Each side loads its model once in its own process; the sides take turns, one warm-up "
            "each, then the timed repeats in the order ours, transformers, transformers, ours, ... "
            "Loading is not timed.",
            "ratio_ours_over_transformers = median ours / median transformers (< 1: ours faster).",
        ])
