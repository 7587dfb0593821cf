"""guidellm, unmodified, against ``cp-megatron serve``: the load generator vLLM users run.

Starts ``cp-megatron serve CONFIG`` (configs/default.yaml: SmolLM2-135M, CP2) on 127.0.0.1,
exports the checkpoint's tokenizer into a temporary folder (guidellm needs a Hugging Face
tokenizer to build its synthetic prompts; nothing is downloaded), and runs::

    guidellm run --backend kind=openai_http,target=http://127.0.0.1:PORT,model=MODEL \\
        --profile kind=concurrent,streams=4 --constraint kind=max_requests,count=24 \\
        --data kind=synthetic_text,prompt_tokens=256,output_tokens=32 \\
        --tokenizer kind=huggingface_auto,model=TOKENIZER_DIR --output kind=json,path=...

guidellm sends chat completions, streaming, with vLLM's ``ignore_eos: true`` and
``stream_options.continuous_usage_stats: true`` (its way of getting exactly 32 output
tokens).  guidellm lives in its own virtual environment (``--guidellm``, default
/work/venv-guidellm/bin/guidellm; ``python3 -m venv DIR && DIR/bin/pip install guidellm``),
never in the project's.  Its JSON report goes to ``--output``; the script prints a table
of the figures (requests completed / errored, TTFT, ITL, output tokens/s) read from it.

Run (from the repository root)::

    python -m benchmarks.guidellm_serve configs/default.yaml --output docs/bench/guidellm_serve.json

Source: guidellm (vllm-project/guidellm) ``run`` command and report schema; vLLM's
OpenAI-compatible server extensions (``ignore_eos``, ``continuous_usage_stats``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def export_tokenizer(cfg, folder: str) -> dict:
    """The checkpoint's tokenizer as tokenizer.json + tokenizer_config.json in ``folder``
    (the converter's export: a GGUF vocabulary becomes a Hugging Face fast tokenizer)."""
    from cp_megatron.checkpoint.convert import _export_tokenizer
    from cp_megatron.preflight import open_reader

    reader = open_reader(cfg)
    return _export_tokenizer(cfg.model.format, reader, folder)


def _find(obj, *names):
    for name in names:
        if isinstance(obj, dict) and name in obj:
            obj = obj[name]
        else:
            return None
    return obj


def summarise(report: dict) -> list[dict]:
    """One row per guidellm benchmark: counts and latency percentiles (ms), tokens/s."""
    rows = []
    for bench in report.get("benchmarks", []):
        metrics = bench.get("metrics", {})
        totals = _find(metrics, "request_totals") or {}

        def stat(name, key="median"):
            dist = _find(metrics, name, "successful") or {}
            return dist.get(key, (dist.get("percentiles") or {}).get(key))

        rows.append({
            "strategy": _find(bench, "config", "strategy", "type_") or _find(bench, "config", "strategy", "kind"),
            "streams": _find(bench, "config", "strategy", "streams"),
            "successful": totals.get("successful"), "errored": totals.get("errored"),
            "incomplete": totals.get("incomplete"),
            "ttft_ms_median": stat("time_to_first_token_ms"), "ttft_ms_p95": stat("time_to_first_token_ms", "p95"),
            "itl_ms_median": stat("inter_token_latency_ms"), "itl_ms_p95": stat("inter_token_latency_ms", "p95"),
            "request_latency_s_median": stat("request_latency"),
            "output_tokens_per_s_mean": stat("output_tokens_per_second", "mean"),
            "requests_per_s_mean": stat("requests_per_second", "mean"),
            "prompt_tokens_median": stat("prompt_token_count"), "output_tokens_median": stat("output_token_count"),
        })
    return rows


def table(rows: list[dict]) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| streams | ok | errored | incomplete | prompt tok | output tok | TTFT median / p95 (ms) | "
             "ITL median / p95 (ms) | latency median (s) | output tok/s | req/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['streams']} | {r['successful']} | {r['errored']} | {r['incomplete']} | "
                     f"{f(r['prompt_tokens_median'], '{:.0f}')} | {f(r['output_tokens_median'], '{:.0f}')} | "
                     f"{f(r['ttft_ms_median'], '{:.0f}')} / {f(r['ttft_ms_p95'], '{:.0f}')} | "
                     f"{f(r['itl_ms_median'])} / {f(r['itl_ms_p95'])} | {f(r['request_latency_s_median'], '{:.2f}')} | "
                     f"{f(r['output_tokens_per_s_mean'])} | {f(r['requests_per_s_mean'], '{:.2f}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from cp_megatron.bench.common import write_json
    from cp_megatron.config import load_config
    from tests.serve_helpers import Server   # the tests' server process (run from the repo root: python -m)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default=str(REPO / "configs/default.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--guidellm", default="/work/venv-guidellm/bin/guidellm", help="guidellm executable")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--streams", type=int, default=4, help="concurrent streams")
    ap.add_argument("--max-requests", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=1800.0, help="guidellm's whole run (s)")
    ap.add_argument("--output", type=Path, help="guidellm's JSON report, with this script's summary")
    ap.add_argument("--table", type=Path, metavar="JSON", help="only print the table of a saved --output file")
    args = ap.parse_args(argv)
    if args.table:
        print(table(summarise(json.loads(args.table.read_text())["guidellm_report"])))
        return 0

    load_before = os.getloadavg()
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory(prefix="guidellm-") as tmp:
        tok_dir = os.path.join(tmp, "tokenizer")
        os.makedirs(tok_dir)
        exported = export_tokenizer(cfg, tok_dir)
        server = Server(Path(args.config), args.overrides, start_timeout_s=600)
        try:
            model = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
            print(f"serve: {model} at cp={cfg.parallel.cp} on {server.base_url}; tokenizer {exported['files']}",
                  flush=True)
            raw = os.path.join(tmp, "guidellm.json")
            cmd = [args.guidellm, "run",
                   "--backend", f"kind=openai_http,target={server.base_url},model={model}",
                   "--profile", f"kind=concurrent,streams={args.streams}",
                   "--constraint", f"kind=max_requests,count={args.max_requests}",
                   "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                             f"output_tokens={args.output_tokens}",
                   "--tokenizer", f"kind=huggingface_auto,model={tok_dir}",
                   "--output", f"kind=json,path={raw}", "--disable-console-interactive"]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL": "WARNING"}
            env.pop("PYTHONPATH", None)                # guidellm runs in its own venv
            print("$ " + " ".join(cmd), flush=True)
            start = time.monotonic()
            proc = subprocess.run(cmd, env=env, timeout=args.timeout, cwd=tmp, capture_output=True, text=True)
            wall_s = time.monotonic() - start
            sys.stdout.write(proc.stdout[-6000:])
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-6000:])
                raise SystemExit(f"guidellm exited {proc.returncode}")
            report = json.loads(Path(raw).read_text())
            requests_total = server.metric("cp_megatron_requests_total", '{finish_reason="length"}')
            server_errors = [line for line in server.lines if "internal error" in line or "failed" in line]
            assert server.terminate() == 0, "".join(server.lines[-20:])
        finally:
            server.kill()
    rows = summarise(report)
    print(table(rows))
    summary = {"config": args.config, "overrides": args.overrides, "cp": cfg.parallel.cp, "model": model,
               "command": cmd, "guidellm_wall_s": wall_s, "rows": rows,
               "server_requests_finished_length": requests_total, "server_error_lines": server_errors,
               "machine": {"cpus": os.cpu_count(), "load_average_before": load_before,
                           "load_average_after": os.getloadavg()}}
    if args.output:
        write_json(args.output, {"summary": summary, "guidellm_report": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
