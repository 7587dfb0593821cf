"""One-command GPU check: CUDA kernel tests, attention TF/s, a decode step on a 64K cache,
and a single-rank NCCL prefill + 8 decode tokens.  Writes one JSON.

    python -m benchmarks.gpu_check --output gpu_check.json     # repo root, a machine with one GPU

Sections (each timed with CUDA events, median of ``--repeats`` after a warm-up):

* ``tests``: ``pytest tests/test_cuda.py`` (every block kind and decode against the float64
  reference in bf16 / fp16 / fp32 with NH 16, NKV 1, DH 128; a single-rank NCCL engine run
  against CPU gloo): exit code and the summary line.
* ``attention``: a square causal block through :func:`attention_with_lse` at 4K-32K tokens,
  bf16, NH 16 / NKV 1 / DH 128; TF/s counted as the planner does (4·NH·DH·T²/2).
* ``decode``: one query against a 64K-token cache through the round plan
  (:func:`planned_attention`, CP 1) and the achieved HBM bandwidth (K and V bytes / time).
* ``engine``: a dummy ``tiny-long`` model in bf16 on one GPU over NCCL: TTFT of an 8K-token
  prefill and the median TTIT of 8 decode tokens.
* ``decode_static``: the static decode step's attention (#22): aten's varlen flash kernel for
  16 gathered rows (all-gather-Q at CP 16) against a 64K-slot view with per-row lengths.
* ``decode_graphs``: the same ``tiny-long`` bf16 engine decoding 32 tokens after a 4K-token
  prompt, eager against ``cuda_graphs`` (the static step captured once, then replayed): median
  ms per token of each and whether the greedy tokens agree.

It must finish in well under 8 minutes on one H100/H200; no section needs the network.

Source: issue "A GPU-ready hot path" (device check); docs/design.md §5, §9.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cp_megatron.atomic import write_json

REPO = Path(__file__).resolve().parents[1]
NH, NKV, DH = 16, 1, 128


def _cuda_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` on the current stream (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def run_tests() -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=420)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"exit_code": proc.returncode, "summary": lines[-1] if lines else "",
            "tail": lines[-30:], "seconds": time.perf_counter() - t0}


def attention_rates(lengths: list[int], repeats: int) -> dict:
    from cp_megatron.attention.kernels import attention_with_lse, kernel_name

    out = {"kernel": kernel_name("cuda", torch.bfloat16, DH), "shape": [NH, NKV, DH], "by_tokens": {}}
    for t in lengths:
        q = torch.randn(t, NH, DH, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(t, NKV, DH, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(t, NKV, DH, device="cuda", dtype=torch.bfloat16)
        seconds = _cuda_time(lambda: attention_with_lse(q, k, v, scale=DH ** -0.5, is_causal=True), repeats)
        flops = 4 * NH * DH * t * t / 2
        out["by_tokens"][str(t)] = {"seconds": seconds, "tflops_per_s": flops / seconds / 1e12}
    return out


def decode_step(cache_tokens: int, repeats: int) -> dict:
    from cp_megatron.attention.api import planned_attention
    from cp_megatron.attention.plan import build_plan

    q_pos, q_seq = torch.tensor([cache_tokens - 1]), torch.zeros(1, dtype=torch.long)
    kv_pos, kv_seq = torch.arange(cache_tokens), torch.zeros(cache_tokens, dtype=torch.long)
    plan = build_plan("pass-q", 0, [(q_pos, q_seq)], [(kv_pos, kv_seq)]).to("cuda")
    q = torch.randn(1, NH, DH, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(cache_tokens, NKV, DH, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    seconds = _cuda_time(lambda: planned_attention(q, k, v, plan), repeats)
    kv_bytes = 2 * k.numel() * k.element_size()
    return {"cache_tokens": cache_tokens, "seconds": seconds, "kv_bytes": kv_bytes,
            "achieved_gb_per_s": kv_bytes / seconds / 1e9, "blocks": plan.num_blocks()}


def decode_static(cache_tokens: int, rows: int, repeats: int) -> dict:
    from cp_megatron.attention.kernels import varlen_decode_attention

    q = torch.randn(rows, NH, DH, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(cache_tokens, NKV, DH, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu_q = torch.arange(rows + 1, dtype=torch.int32, device="cuda")
    cu_k = torch.zeros(rows + 1, dtype=torch.int32, device="cuda")
    lengths = torch.full((rows,), 1, dtype=torch.int32, device="cuda")
    lengths[0] = cache_tokens - 100                            # one real row (batch 1), padding rows see 1 slot
    seconds = _cuda_time(lambda: varlen_decode_attention(q, k, v, cu_q, cu_k, lengths, scale=DH ** -0.5), repeats)
    kv_bytes = 2 * (cache_tokens - 100) * NKV * DH * 2
    return {"cache_tokens": cache_tokens, "rows": rows, "seconds": seconds, "kv_bytes": kv_bytes,
            "achieved_gb_per_s": kv_bytes / seconds / 1e9}


def _tiny_long_stage():
    """In a rank: the ``tiny-long`` dummy model in bf16 on this GPU, CP 1: (topology, config, stage)."""
    from cp_megatron import parallel_state
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.llama import LlamaStage, StageLayout
    from cp_megatron.model.weights import DummyReader, load_weights

    topo = parallel_state.initialize(1, 1, 1)
    config = get_preset("tiny-long")
    device = torch.device("cuda", torch.cuda.current_device())
    stage = LlamaStage(config, StageLayout(), dtype=torch.bfloat16, device=device)
    load_weights(stage, DummyReader(config, seed=0))
    return topo, config, stage


def _graphs_job(prompt_tokens: int, decode_tokens: int) -> dict:
    from cp_megatron.engine import InferenceEngine, SamplingParams, generate
    from cp_megatron.sharding import kv_slots_per_rank

    topo, config, stage = _tiny_long_stage()
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {"model": config.name, "dtype": "bfloat16", "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens}
    tokens = {}
    for round_no in range(2):                  # interleaved: eager, graphs, eager, graphs
        for graphs in (False, True):
            engine = InferenceEngine(stage, topo, kv_capacity=kv_slots_per_rank(prompt_tokens, decode_tokens, 1),
                                     cuda_graphs=graphs)
            gens, rounds = generate(engine, {0: prompt}, SamplingParams(max_new_tokens=decode_tokens))
            name = "graphs" if graphs else "eager"
            times = [r.time_s for r in rounds[2:]]     # after the first decode round (the capture)
            out.setdefault(f"{name}_ms_per_token", []).append(1000 * statistics.median(times))
            tokens.setdefault(name, gens[0].token_ids)
            if graphs:
                out["graphs_captures_replays"] = [engine.graphs.captures, engine.graphs.replays]
    out["eager_ms_per_token_median"] = statistics.median(out["eager_ms_per_token"])
    out["graphs_ms_per_token_median"] = statistics.median(out["graphs_ms_per_token"])
    out["same_tokens"] = tokens["eager"] == tokens["graphs"]
    return out


def decode_graphs(prompt_tokens: int, decode_tokens: int) -> dict:
    from cp_megatron.launcher import spawn

    return spawn(_graphs_job, 1, (prompt_tokens, decode_tokens), backend="nccl", timeout_s=240)[0]


def _engine_job(prompt_tokens: int, decode_tokens: int) -> dict:
    from cp_megatron.engine import InferenceEngine, SamplingParams, generate
    from cp_megatron.sharding import kv_slots_per_rank

    topo, config, stage = _tiny_long_stage()
    engine = InferenceEngine(stage, topo, kv_capacity=kv_slots_per_rank(prompt_tokens, decode_tokens, 1))
    prompt = torch.randint(0, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    generate(engine, {0: prompt[:256].tolist()}, SamplingParams(max_new_tokens=2))      # warm-up
    engine.reset()
    gens, rounds = generate(engine, {0: prompt.tolist()}, SamplingParams(max_new_tokens=decode_tokens))
    return {"model": config.name, "dtype": "bfloat16", "prompt_tokens": prompt_tokens,
            "ttft_s": rounds[0].time_s, "ttit_s_median": statistics.median(r.time_s for r in rounds[1:]),
            "decode_tokens": len(gens[0].token_ids), "kv_cache_allocations": engine.kv_cache.allocations,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def engine_run(prompt_tokens: int, decode_tokens: int) -> dict:
    from cp_megatron.launcher import spawn

    t0 = time.perf_counter()
    result = spawn(_engine_job, 1, (prompt_tokens, decode_tokens), backend="nccl", timeout_s=240)[0]
    result["seconds_with_startup"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"),
                        help="JSON file to write (default: $OUT/gpu_check.json or ./gpu_check.json)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-tests", action="store_true", help="skip the pytest section")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import flash_attn  # type: ignore
        report["flash_attn"] = flash_attn.__version__
    except Exception:
        report["flash_attn"] = None
    sections = [("attention", lambda: attention_rates(args.lengths, args.repeats)),
                ("decode", lambda: decode_step(65536, args.repeats * 4)),
                ("engine", lambda: engine_run(8192, 8)),
                ("decode_static", lambda: decode_static(65536, 16, args.repeats * 4)),
                ("decode_graphs", lambda: decode_graphs(4096, 32))]
    if not args.skip_tests:
        sections.insert(0, ("tests", run_tests))
    failed = False
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # record and go on: one JSON with everything that ran
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s: "
              f"{json.dumps(report[name], default=str)[:400]}", flush=True)
    failed = failed or report.get("tests", {}).get("exit_code", 0) != 0
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, json.loads(json.dumps(report, default=str)))
    print(f"[gpu_check] wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
