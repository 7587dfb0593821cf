"""Benchmark (not CI) of chunked prefill in ``cp-megatron serve``: do chat streams keep
their pace while a long document prefills, and what does chunking cost the document?

For each mode (``--chunks``: 0 = unchunked, i.e. ``serve.max_prefill_tokens`` larger than
the document; N = chunks of at most N tokens) a real server is started on 127.0.0.1
(config CP, e.g. SmolLM2 at CP2 with configs/default.yaml), warmed up, and then:

1. ``--streams`` greedy chat streams start (random ``--chat-tokens``-token prompts,
   ``ignore_eos``) and run ``--idle-s`` seconds alone: their gaps between tokens are the
   *idle* inter-token latencies (ITL);
2. a ``--doc-tokens``-token document request arrives (random ids, greedy,
   ``--doc-max-tokens``); the chat gaps that overlap its prefill (from its arrival to its
   first token) are the *during-prefill* ITLs, and that interval is its TTFT;
3. the streams are closed (the server cancels them) once the document is answered.

Figures: p50 / p99 ITL idle and during the prefill, the document's TTFT, per mode, the
ratios asked of #23 (p99 during / p99 idle <= 3; TTFT chunked / unchunked <= 1.3), the
greedy outputs of every mode compared token for token, and the machine's load average
before and after each mode (a shared machine: quote ratios of one run).  Output: a table
on stdout, ``--output`` JSON (atomic) and ``--plot`` PNG.

Run (from the repository root)::

    python -m benchmarks.chunked_prefill configs/default.yaml --chunks 0 512 128 \\
        --output docs/bench/chunked_prefill.json --plot docs/bench/chunked_prefill.png

Source: chunked prefill as in vLLM (``enable_chunked_prefill``, decode-first token budget)
and SGLang (``chunked_prefill_size``); arXiv 2411.01783 §3.5 (partial prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from cp_megatron.atomic import write_json

REPO = Path(__file__).resolve().parents[1]


def percentile(xs: list[float], q: float):
    """Nearest-rank percentile ``q`` (0-100) of ``xs``; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def chat_stream(base: str, model: str, prompt: list[int], stop: threading.Event, out: dict) -> None:
    """Stream a greedy completion until ``stop``; record token arrival times and ids."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    out["stamps"], out["tokens"] = [], []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=900) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"]
            if choice and choice[0].get("token_ids"):
                out["stamps"].append(time.perf_counter())
                out["tokens"] += choice[0]["token_ids"]
            if stop.is_set():
                break                                   # closes the connection: the server cancels


def doc_request(base: str, model: str, doc: list[int], max_tokens: int) -> dict:
    """The document as one streaming greedy request: its TTFT (s) and token ids."""
    body = {"model": model, "prompt": doc, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True}
    t0, first, tokens = time.perf_counter(), None, []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=1800) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"]
                if choice and choice[0].get("token_ids"):
                    first = first or time.perf_counter()
                    tokens += choice[0]["token_ids"]
    return {"t0": t0, "t_first": first, "ttft_s": first - t0, "tokens": tokens}


def one_mode(args, chunk: int, chats: list[list[int]], doc: list[int], model: str) -> dict:
    """Start a server with chunk size ``chunk`` (0: unchunked), run the scenario, stop it."""
    from tests.serve_helpers import Server   # the tests' server process (python -m from the repo root)

    budget = chunk if chunk else len(doc) + 1024
    overrides = list(args.overrides) + [f"serve.max_prefill_tokens={budget}",
                                        f"serve.kv_cache_tokens={len(doc) + len(chats) * 4200 + 8192}"]
    load_before = os.getloadavg()
    server = Server(Path(args.config), overrides, start_timeout_s=600)
    try:
        server.post("/v1/completions", timeout=300,
                    json={"model": model, "prompt": chats[0][:8], "max_tokens": 2, "temperature": 0}).raise_for_status()
        server.post("/reset_prefix_cache")
        stop, outs, threads = threading.Event(), [{} for _ in chats], []
        for p, out in zip(chats, outs):
            t = threading.Thread(target=chat_stream, args=(server.base_url, model, p, stop, out), daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + 600
        while any(len(o.get("stamps", [])) < 2 for o in outs) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(args.idle_s)
        d = doc_request(server.base_url, model, doc, args.doc_max_tokens)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(120)
        rounds = [line.strip() for line in server.lines if line.startswith("[serve] round")]
    finally:
        server.kill()
    idle, during = [], []
    for o in outs:
        st = o["stamps"]
        for a, b in zip(st, st[1:]):
            if b <= d["t0"]:
                idle.append(b - a)
            elif a < d["t_first"] and b > d["t0"]:
                during.append(b - a)
    chat_tokens = [o["tokens"][:min(len(x["tokens"]) for x in outs)] for o in outs]
    return {"chunk_tokens": chunk, "max_prefill_tokens": budget, "ttft_s": d["ttft_s"],
            "doc_tokens": d["tokens"], "chat_tokens": chat_tokens,
            "itl_idle_s": {"p50": percentile(idle, 50), "p99": percentile(idle, 99), "n": len(idle)},
            "itl_during_s": {"p50": percentile(during, 50), "p99": percentile(during, 99), "n": len(during),
                             "max": max(during) if during else None},
            "prefill_rounds": sum(1 for r in rounds if "chunk" in r or f"T={len(doc)}" in r),
            "load_before": load_before, "load_after": os.getloadavg()}


def main(argv=None) -> int:
    from cp_megatron.config import load_config
    from cp_megatron.preflight import check_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 128],
                    help="chunk sizes (tokens); 0 = unchunked; the first 0 is the TTFT reference")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--chat-tokens", type=int, default=64)
    ap.add_argument("--doc-tokens", type=int, default=16384)
    ap.add_argument("--doc-max-tokens", type=int, default=8)
    ap.add_argument("--idle-s", type=float, default=4.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--output")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    cfg = load_config(Path(args.config), args.overrides)
    reader, _ = check_model(cfg)
    vocab = reader.config.vocab_size
    g = torch.Generator().manual_seed(0)
    chats = [torch.randint(100, vocab, (args.chat_tokens,), generator=g).tolist() for _ in range(args.streams)]
    doc = torch.randint(100, vocab, (args.doc_tokens,), generator=g).tolist()
    model = cfg.serve.model_name or Path(reader.config.name).name.removesuffix(".gguf")
    modes = []
    for chunk in args.chunks:
        print(f"mode chunk={chunk or 'unchunked'}: starting the server", flush=True)
        m = one_mode(args, chunk, chats, doc, model)
        modes.append(m)
        print(f"  TTFT {m['ttft_s']:.2f} s; ITL idle p50 {m['itl_idle_s']['p50']:.3f} p99 {m['itl_idle_s']['p99']:.3f}"
              f" s; during p50 {m['itl_during_s']['p50']:.3f} p99 {m['itl_during_s']['p99']:.3f} s "
              f"(n={m['itl_during_s']['n']}); load {m['load_before'][0]:.1f}->{m['load_after'][0]:.1f}", flush=True)
        summarise(modes)
        if args.output:   # after every mode: a long run that is stopped keeps what it measured
            write_json(Path(args.output), result_of(args, cfg, model, modes))
    summarise(modes)
    print_table(modes)
    if args.output:
        write_json(Path(args.output), result_of(args, cfg, model, modes))
    if args.plot:
        plot(args, cfg, modes)
    return 0


def summarise(modes: list[dict]) -> dict:
    """Ratios and output comparisons against the unchunked mode (the first with chunk 0)."""
    ref = next((m for m in modes if m["chunk_tokens"] == 0), modes[0])
    for m in modes:
        m["p99_during_over_idle"] = m["itl_during_s"]["p99"] / m["itl_idle_s"]["p99"]
        m["ttft_over_unchunked"] = m["ttft_s"] / ref["ttft_s"]
        m["doc_tokens_match_unchunked"] = m["doc_tokens"] == ref["doc_tokens"]
        m["chat_tokens_match_unchunked"] = all(a[:len(b)] == b[:len(a)] for a, b in
                                               zip(m["chat_tokens"], ref["chat_tokens"]))
        m["meets_itl_target"] = m["p99_during_over_idle"] <= 3.0
        m["meets_ttft_target"] = m["ttft_over_unchunked"] <= 1.3
    return ref


def result_of(args, cfg, model, modes) -> dict:
    return {"config": args.config, "overrides": args.overrides, "cp": cfg.parallel.cp, "model": model,
            "streams": args.streams, "chat_tokens": args.chat_tokens, "doc_tokens": args.doc_tokens,
            "cpu_count": os.cpu_count(), "modes": [{k: v for k, v in m.items() if k != "chat_tokens"} for m in modes]}


def print_table(modes) -> None:
    print(f"\n{'chunk':>9} {'TTFT s':>8} {'xTTFT':>6} {'idle p50':>9} {'idle p99':>9} {'pre p50':>8} {'pre p99':>8} "
          f"{'p99 ratio':>9} {'same doc':>8} {'same chat':>9}")
    for m in modes:
        print(f"{m['chunk_tokens'] or 'none':>9} {m['ttft_s']:>8.2f} {m['ttft_over_unchunked']:>6.2f} "
              f"{m['itl_idle_s']['p50']:>9.3f} {m['itl_idle_s']['p99']:>9.3f} {m['itl_during_s']['p50']:>8.3f} "
              f"{m['itl_during_s']['p99']:>8.3f} {m['p99_during_over_idle']:>9.2f} "
              f"{str(m['doc_tokens_match_unchunked']):>8} {str(m['chat_tokens_match_unchunked']):>9}")


def plot(args, cfg, modes) -> None:
    if modes:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        labels = [str(m["chunk_tokens"] or "unchunked") for m in modes]
        x = range(len(modes))
        for i, (key, name) in enumerate((("itl_idle_s", "idle"), ("itl_during_s", "during 16K prefill"))):
            a1.bar([j + 0.2 * (2 * i - 1) for j in x], [m[key]["p99"] for m in modes], 0.4, label=f"p99 ITL {name}")
        a1.set_xticks(list(x), labels)
        a1.set_xlabel("chunk tokens")
        a1.set_ylabel("s")
        a1.set_yscale("log")
        a1.legend()
        a1.set_title(f"chat streams ({args.streams}), cp={cfg.parallel.cp}")
        a2.bar(list(x), [m["ttft_s"] for m in modes])
        a2.set_xticks(list(x), labels)
        a2.set_xlabel("chunk tokens")
        a2.set_ylabel("document TTFT (s)")
        a2.set_title(f"{args.doc_tokens}-token document; load {modes[0]['load_before'][0]:.0f}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
