"""Load benchmark of ``cp-megatron serve``: prefix-cache TTFT and concurrent throughput.

Starts a real server (``cp-megatron serve CONFIG``, CP from the config) on 127.0.0.1 and
measures through HTTP, as a client sees it:

1. **TTFT vs miss rate.**  The prompt is the config's document + question in the chat
   template (``prompt.file`` + ``prompt.question``; ~4K tokens with configs/default.yaml)
   or ``--doc-tokens`` random ids for a dummy model.  For each cached fraction f in
   ``--cached`` the prefix cache is reset, the first f of the prompt is sent (max_tokens
   1) so the server caches it, then the whole prompt is sent streaming and the time to
   its first token is taken.  f = 0 is the cold request; f = 0.99.. is a follow-up
   question on a cached document.  The server's miss rate is (1 - f); the paper's model
   (§3.5, Alg. 1) predicts TTFT roughly linear in it.
2. **Throughput.**  ``--clients`` concurrency levels; each client sends
   ``--requests-per-client`` greedy requests one after the other (distinct random
   ``--prompt-tokens``-token prompts, ``--max-tokens`` each); tokens/s = completion tokens
   of all clients / wall time.  Mean TTFT and time between tokens are reported too.

Output: a table on stdout and a JSON file (``--output``, written atomically) with the
machine's 1/5/15-minute load averages before and after (the figures are wall times).

Run (from the repository root)::

    python -m benchmarks.serve_load configs/default.yaml --output docs/bench/serve_load.json

Source: arXiv 2411.01783 §4.3 (persistent KV, TTFT vs miss rate), Alg. 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]


def prompt_ids(cfg, doc_tokens: int) -> tuple[list[int], str, int]:
    """(token ids of the document + question in the chat template -- or random ids for a
    dummy model --, where they come from, the model's vocabulary size)."""
    from cp_megatron.preflight import check_model

    reader, tok = check_model(cfg)
    p = cfg.prompt
    if tok is None or p is None or p.file is None:
        ids = torch.randint(0, reader.config.vocab_size, (doc_tokens,),
                            generator=torch.Generator().manual_seed(0)).tolist()
        return ids, f"{doc_tokens} random token ids", reader.config.vocab_size
    document = Path(cfg.resolve_path(p.file)).read_text(encoding="utf-8")
    messages = ([{"role": "system", "content": p.system}] if p.system else []) + [
        {"role": "user", "content": document + ("\n\n" + p.question if p.question else "")}]
    ids = tok.encode(tok.apply_chat_template(messages), add_bos=False)
    return ids, f"{p.file} + question", reader.config.vocab_size


def stream(base: str, model: str, prompt: list[int], max_tokens: int, timeout: float) -> dict:
    """One streaming greedy completion: ttft_s, gaps between tokens (s), tokens, cached."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens, usage = [], 0, None
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0].get("token_ids"):
                stamps.append(time.perf_counter())
                tokens += len(chunk["choices"][0]["token_ids"])
    return {"ttft_s": stamps[0] - start, "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens,
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "end": time.perf_counter()}


def ttft_vs_miss_rate(server, model, prompt, fractions, repeats, timeout) -> list[dict]:
    rows = []
    for f in fractions:
        runs = []
        for _ in range(repeats):
            server.post("/reset_prefix_cache")
            n = int(f * len(prompt))
            if n:
                r = server.post("/v1/completions", timeout=timeout,
                                json={"model": model, "prompt": prompt[:n], "max_tokens": 1, "temperature": 0})
                r.raise_for_status()
            runs.append(stream(server.base_url, model, prompt, 1, timeout))
        cached = runs[-1]["cached_tokens"]
        rows.append({"cached_fraction": f, "cached_tokens": cached, "new_tokens": len(prompt) - cached,
                     "miss_rate": (len(prompt) - cached) / len(prompt),
                     "ttft_s": statistics.median(r["ttft_s"] for r in runs),
                     "ttft_runs_s": [r["ttft_s"] for r in runs]})
        print(f"  cached {cached:>6} of {len(prompt)} tokens (miss rate {rows[-1]['miss_rate']:.3f}): "
              f"TTFT {rows[-1]['ttft_s']:.3f} s", flush=True)
    return rows


def throughput(server, model, vocab, clients, per_client, prompt_tokens, max_tokens, timeout) -> dict:
    server.post("/reset_prefix_cache")
    g = torch.Generator().manual_seed(clients)
    prompts = [[torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(per_client)]
               for _ in range(clients)]
    barrier = threading.Barrier(clients, timeout=timeout)

    def client(ps):
        barrier.wait()
        return [stream(server.base_url, model, p, max_tokens, timeout) for p in ps]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, prompts, timeout=timeout * per_client) for r in rs]
    wall = max(r["end"] for r in results) - start
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps_s"]]
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "mean_ttft_s": statistics.mean(r["ttft_s"] for r in results),
            "median_ttit_s": statistics.median(gaps) if gaps else None}


def main(argv=None) -> int:
    from cp_megatron.bench.common import write_json
    from cp_megatron.config import load_config
    from tests.serve_helpers import Server   # the tests' server process (run from the repo root: python -m)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default=str(REPO / "configs/default.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--cached", default="0,0.25,0.5,0.75,0.99", help="cached fractions of the prompt")
    ap.add_argument("--doc-tokens", type=int, default=4096, help="prompt length for a dummy model")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600.0, help="per request (s)")
    ap.add_argument("--output", type=Path, help="JSON results")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    cfg = load_config(args.config, args.overrides)
    prompt, source, vocab = prompt_ids(cfg, args.doc_tokens)
    server = Server(Path(args.config), args.overrides, start_timeout_s=600)
    try:
        model = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        print(f"serve: {model} at cp={cfg.parallel.cp}; prompt {len(prompt)} tokens ({source})", flush=True)
        fractions = [float(x) for x in args.cached.split(",")]
        ttft = ttft_vs_miss_rate(server, model, prompt, fractions, args.repeats, args.timeout)
        tput = []
        for c in [int(x) for x in args.clients.split(",")]:
            tput.append(throughput(server, model, vocab, c, args.requests_per_client, args.prompt_tokens,
                                   args.max_tokens, args.timeout))
            t = tput[-1]
            print(f"  {c:>2} clients: {t['completion_tokens']} tokens in {t['wall_s']:.2f} s = "
                  f"{t['tokens_per_s']:.1f} tok/s (mean TTFT {t['mean_ttft_s']:.2f} s, median TTIT "
                  f"{t['median_ttit_s'] or 0:.3f} s)", flush=True)
        rounds = [line for line in server.lines if line.startswith("[serve] round")]
        assert server.terminate() == 0, "".join(server.lines[-20:])
    finally:
        server.kill()
    report = {"config": args.config, "overrides": args.overrides, "cp": cfg.parallel.cp, "model": model,
              "prompt_tokens": len(prompt), "prompt_source": source, "ttft_vs_miss_rate": ttft,
              "throughput": tput, "rounds_logged": len(rounds),
              "machine": {"cpus": os.cpu_count(), "load_average_before": load_before,
                          "load_average_after": os.getloadavg()}}
    if args.output:
        write_json(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
