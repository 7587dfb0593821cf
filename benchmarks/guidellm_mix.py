"""guidellm, unmodified, against ``cp-megatron serve``: chat streams with and without one long
document arriving mid-run (#23 item 4).

For each mode (``--chunks``: 0 = unchunked, i.e. ``serve.max_prefill_tokens`` larger than the
document; N = chunked prefill, ``serve.max_prefill_tokens=N``) one server is started on
127.0.0.1 (configs/default.yaml: SmolLM2-135M, CP2, ``model.max_context`` raised to hold the
document) and three guidellm runs go against it, the prefix cache reset before each:

1. **doc alone**: one guidellm process, ``--profile kind=synchronous``, one request of a
   synthetic ``--doc-tokens``-token prompt and ``--doc-output-tokens`` output tokens: the
   document's TTFT with nothing else running (it sizes run 3);
2. **without**: one guidellm process, ``--profile kind=concurrent,streams=--streams``, synthetic
   ``--chat-prompt-tokens`` / ``--chat-output-tokens`` chat requests for ``--without-s`` seconds
   (``--constraint kind=max_duration``);
3. **with**: the same chat run, and ``--doc-delay-s`` seconds after it starts a *second*
   guidellm process sends the document as in 1.  The chat run lasts ``--doc-delay-s`` +
   ``--with-factor`` x the doc-alone TTFT + ``--tail-s``, so it covers the whole prefill.

Every guidellm run writes its own JSON report (kept whole in ``--output``).  Figures, from the
reports: guidellm's own p50 / p99 of the chat requests' TTFT and inter-token latency (ITL;
guidellm's ITL distribution is of each request's mean ITL, weighted by its tokens), with and
without the document; the document's TTFT; the requests completed / errored / incomplete of
every run.  guidellm keeps no per-token times, only each request's start, first and last token
times, so the *with* run's chat requests are also split by time from the per-request data:
those whose decode span (first to last token) overlaps the document's prefill (its request
start to its first token, same clock: both processes run on this machine) against the rest,
and those that *arrived* during the prefill (their TTFT) against the rest.  The server's round
log of every run is kept too (``server_rounds``): the document's rounds (its chunks) and their
times, the decode rounds' p50 / p99 -- the streams' per-round gap, which guidellm cannot see.
The machine's load average is recorded around every run (a shared machine: quote ratios of
one invocation).

Run (from the repository root; guidellm in its own venv, see benchmarks/guidellm_serve.py)::

    python -m benchmarks.guidellm_mix configs/default.yaml --chunks 0 1024 256 \\
        --set model.max_context=20000 \\
        --output docs/bench/guidellm_mix.json --plot docs/bench/guidellm_mix.png
    python -m benchmarks.guidellm_mix --table docs/bench/guidellm_mix.json   # reprint

Source: guidellm (vllm-project/guidellm) 0.8 ``run`` command (profiles ``concurrent`` and
``synchronous``, constraints ``max_duration`` / ``max_requests``, ``synthetic_text`` data) and
its JSON report (``benchmarks[].metrics``, ``benchmarks[].requests``); chunked prefill as in
vLLM / SGLang (docs/serve.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.chunked_prefill import percentile   # nearest-rank, None when empty
from benchmarks.guidellm_serve import export_tokenizer

REPO = Path(__file__).resolve().parents[1]


def guidellm_cmd(args, base_url: str, model: str, tok_dir: str, out: str, *, profile: str,
                 constraint: str, prompt_tokens: int, output_tokens: int, seed: int) -> list[str]:
    return [args.guidellm, "run",
            "--backend", f"kind=openai_http,target={base_url},model={model}",
            "--profile", profile, "--constraint", constraint,
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--tokenizer", f"kind=huggingface_auto,model={tok_dir}",
            "--seed", f"kind=static,value={seed}",
            "--output", f"kind=json,path={out}", "--disable-console-interactive"]


def guidellm_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL": "WARNING"}
    env.pop("PYTHONPATH", None)                        # guidellm runs in its own venv
    return env


def slim(report: dict) -> dict:
    """``report`` without the requests' prompt and output texts (``request_args``, ``output``;
    a 16K-token prompt is ~80 KB) and the per-modality word / character / image ... statistics
    (``metrics.text`` etc.); every timing and token count stays."""
    for bench in report.get("benchmarks", []):
        for modality in ("text", "image", "video", "audio"):
            (bench.get("metrics") or {}).pop(modality, None)
        for reqs in (bench.get("requests") or {}).values():
            for r in reqs or []:
                r.pop("request_args", None)
                r.pop("output", None)
    return report


def run_guidellm(cmd: list[str], out: str, timeout: float, cwd: str, result: dict) -> None:
    """Run one guidellm process; ``result`` gets its report (or the failure) and wall times."""
    result["command"] = cmd
    result["started"] = time.time()
    try:
        proc = subprocess.run(cmd, env=guidellm_env(), timeout=timeout, cwd=cwd, capture_output=True, text=True)
        result["returncode"] = proc.returncode
        result["stdout_tail"] = proc.stdout[-3000:]
        if proc.returncode != 0:
            result["stderr_tail"] = proc.stderr[-3000:]
        else:
            result["report"] = slim(json.loads(Path(out).read_text()))
    except subprocess.TimeoutExpired:
        result["returncode"] = None
        result["error"] = f"guidellm ran past {timeout:.0f} s"
    result["ended"] = time.time()


def bench_of(result: dict) -> dict:
    report = result.get("report")
    if not report:
        raise SystemExit(f"guidellm failed: {result.get('error') or result.get('returncode')}\n"
                         f"{result.get('stderr_tail', '')}{result.get('stdout_tail', '')}")
    return report["benchmarks"][0]


def counts(bench: dict) -> dict:
    t = bench["metrics"]["request_totals"]
    return {"successful": t["successful"], "errored": t["errored"], "incomplete": t["incomplete"]}


def dist(bench: dict, name: str) -> dict:
    d = bench["metrics"][name]["successful"]
    return {"p50": d["percentiles"]["p50"], "p99": d["percentiles"]["p99"], "max": d["max"], "n": d["count"]}


def chat_split(chat: dict, doc_req: dict, itl_idle_ms: float) -> dict:
    """The chat requests of the *with* run split by the document's prefill window
    [its request start, its first token] (guidellm's per-request timings, epoch seconds).

    guidellm keeps no per-token times (it spaces a request's tokens evenly between its first
    and last), so a stall inside a request shows only in that request's mean ITL; its
    ``stall_s`` is its decode span (first to last token) minus (tokens - 1) x
    ``itl_idle_ms`` (the without run's median ITL): the time the stream lost."""
    t0 = doc_req["info"]["timings"]["request_start"]
    t1 = doc_req["info"]["timings"]["first_token_iteration"]
    itl_in, itl_out, ttft_in, ttft_out, stall = [], [], [], [], []
    for r in chat["requests"]["successful"]:
        tm = r["info"]["timings"]
        first, last = tm["first_token_iteration"], tm["last_token_iteration"]
        if first < t1 and last > t0:
            itl_in.append(r["inter_token_latency_ms"])
            stall.append((last - first) - (tm["token_iterations"] - 1) * itl_idle_ms / 1000)
        else:
            itl_out.append(r["inter_token_latency_ms"])
        (ttft_in if t0 <= tm["request_start"] < t1 else ttft_out).append(r["time_to_first_token_ms"])

    def s(xs):
        return {"p50": percentile(xs, 50), "p99": percentile(xs, 99), "max": max(xs) if xs else None,
                "n": len(xs)}
    return {"prefill_window_s": [t0, t1], "itl_ms_overlapping_prefill": s(itl_in), "itl_ms_outside": s(itl_out),
            "ttft_ms_arrived_during_prefill": s(ttft_in), "ttft_ms_arrived_outside": s(ttft_out),
            "stall_s_overlapping_prefill": s(stall)}


ROUND = re.compile(r"\[serve\] round \d+ (\w+)(?: chunk \d+:\d+ of (\d+) prompt tokens)?.*: seqs=(\d+) "
                   r"T=(\d+) P=(\d+) .* in ([0-9.]+) s")


def server_rounds(lines: list[str]) -> list[dict]:
    """The server's round log lines (``[serve] round N KIND[ chunk a:b of N prompt tokens (...)]:
    seqs=S T=T P=P ... in X s``) as dicts; the round time is the engine's, rank 0's."""
    out = []
    for line in lines:
        m = ROUND.search(line)
        if m:
            out.append({"kind": m[1], "chunk_of": int(m[2]) if m[2] else None, "seqs": int(m[3]),
                        "new_tokens": int(m[4]), "cached_tokens": int(m[5]), "time_s": float(m[6])})
    return out


def round_figures(rounds: list[dict], doc_tokens: int) -> dict:
    """Server-side view of a run: the document's prefill rounds (its chunks, or its one round
    unchunked: every chat stream waits that long for a token) against the decode rounds."""
    doc = [r for r in rounds if (r["chunk_of"] or 0) >= doc_tokens
           or (r["kind"] == "prefill" and r["new_tokens"] >= doc_tokens)]
    dec = sorted(r["time_s"] for r in rounds if r["kind"] == "decode")
    return {"doc_rounds": len(doc), "doc_round_s_max": max((r["time_s"] for r in doc), default=None),
            "doc_round_s_median": percentile([r["time_s"] for r in doc], 50),
            "doc_rounds_total_s": sum(r["time_s"] for r in doc),
            "doc_rounds_with_decode_tokens": sum(1 for r in doc if r["seqs"] > 1),
            "decode_rounds": len(dec), "decode_round_s_p50": percentile(dec, 50),
            "decode_round_s_p99": percentile(dec, 99)}


def one_mode(args, chunk: int, model: str, tok_dir: str, tmp: str) -> dict:
    from tests.serve_helpers import Server   # the tests' server process (python -m from the repo root)

    budget = chunk if chunk else args.doc_tokens + 1024
    kv = args.doc_tokens + 256 + args.streams * 2 * (args.chat_prompt_tokens + args.chat_output_tokens + 64) + 4096
    overrides = list(args.overrides) + [f"serve.max_prefill_tokens={budget}", f"serve.kv_cache_tokens={kv}"]
    mode = {"chunk_tokens": chunk, "max_prefill_tokens": budget, "kv_cache_tokens": kv, "runs": {}}
    server = Server(Path(args.config), overrides, start_timeout_s=600)
    try:
        base = server.base_url
        httpx.post(base + "/v1/completions", timeout=300,
                   json={"model": model, "prompt": "Hello", "max_tokens": 2}).raise_for_status()

        def chat_cmd(name, seconds, seed):
            out = os.path.join(tmp, f"{chunk}-{name}.json")
            return guidellm_cmd(args, base, model, tok_dir, out, profile=f"kind=concurrent,streams={args.streams}",
                                constraint=f"kind=max_duration,seconds={seconds:.0f}",
                                prompt_tokens=args.chat_prompt_tokens, output_tokens=args.chat_output_tokens,
                                seed=seed), out

        def doc_cmd(name, seed):
            out = os.path.join(tmp, f"{chunk}-{name}.json")
            return guidellm_cmd(args, base, model, tok_dir, out, profile="kind=synchronous",
                                constraint="kind=max_requests,count=1", prompt_tokens=args.doc_tokens,
                                output_tokens=args.doc_output_tokens, seed=seed), out

        def run(name, cmd_out, timeout):
            httpx.post(base + "/reset_prefix_cache", timeout=30).raise_for_status()
            res = {"load_before": os.getloadavg()}
            mark = len(server.lines)
            run_guidellm(*cmd_out, timeout, tmp, res)
            res["load_after"] = os.getloadavg()
            res["server_rounds"] = server_rounds(server.lines[mark:])
            mode["runs"][name] = res
            return res

        # 1. the document alone
        alone = bench_of(run("doc_alone", doc_cmd("doc_alone", 11), args.timeout))
        doc_alone_s = alone["requests"]["successful"][0]["time_to_first_token_ms"] / 1000
        print(f"  doc alone: TTFT {doc_alone_s:.1f} s", flush=True)
        # 2. chat streams, no document
        run("without", chat_cmd("without", args.without_s, 21), args.without_s + 600)
        print(f"  without: {counts(bench_of(mode['runs']['without']))}", flush=True)
        # 3. chat streams, the document arriving --doc-delay-s into the run
        with_s = args.doc_delay_s + args.with_factor * doc_alone_s + args.tail_s
        httpx.post(base + "/reset_prefix_cache", timeout=30).raise_for_status()
        chat_res, doc_res = {"load_before": os.getloadavg()}, {}
        mark = len(server.lines)
        cmd, out = chat_cmd("with", with_s, 31)
        chat_thread = threading.Thread(target=run_guidellm, args=(cmd, out, with_s + 600, tmp, chat_res))
        chat_thread.start()
        time.sleep(args.doc_delay_s)
        dcmd, dout = doc_cmd("with_doc", 41)
        doc_res["load_before"] = os.getloadavg()
        run_guidellm(dcmd, dout, args.timeout, tmp, doc_res)
        doc_res["load_after"] = os.getloadavg()
        chat_thread.join()
        chat_res["load_after"] = os.getloadavg()
        chat_res["server_rounds"] = server_rounds(server.lines[mark:])
        mode["runs"]["with"], mode["runs"]["with_doc"] = chat_res, doc_res
        mode["server_error_lines"] = [ln for ln in server.lines if "internal error" in ln or "failed" in ln]
        mode["chunk_rounds"] = sum(1 for ln in server.lines if ln.startswith("[serve] round") and " chunk " in ln)
        assert server.terminate() == 0, "".join(server.lines[-20:])
    finally:
        server.kill()
    return summarise_mode(mode)


def summarise_mode(mode: dict) -> dict:
    runs = mode["runs"]
    alone, without, with_, with_doc = (bench_of(runs[k]) for k in ("doc_alone", "without", "with", "with_doc"))
    doc_req = with_doc["requests"]["successful"][0]
    window = chat_split(with_, doc_req, dist(without, "inter_token_latency_ms")["p50"])
    chat_ended = runs["with"]["ended"]
    mode["summary"] = {
        "doc_prompt_tokens": doc_req["prompt_tokens"],
        "doc_ttft_alone_s": alone["requests"]["successful"][0]["time_to_first_token_ms"] / 1000,
        "doc_ttft_with_chats_s": doc_req["time_to_first_token_ms"] / 1000,
        "doc_arrival_into_chat_run_s": doc_req["info"]["timings"]["request_start"] - with_["start_time"],
        "chat_run_covers_prefill": chat_ended > window["prefill_window_s"][1],
        "without": {"ttft_ms": dist(without, "time_to_first_token_ms"), "itl_ms": dist(without, "inter_token_latency_ms"),
                    **counts(without)},
        "with": {"ttft_ms": dist(with_, "time_to_first_token_ms"), "itl_ms": dist(with_, "inter_token_latency_ms"),
                 **counts(with_), **window},
        "doc_counts": {"alone": counts(alone), "with": counts(with_doc)},
        "errored_total": sum(counts(b)["errored"] for b in (alone, without, with_, with_doc)),
        "load_average": {k: [runs[k]["load_before"], runs[k]["load_after"]] for k in runs},
    }
    s = mode["summary"]
    if "server_rounds" in runs["with"]:   # (absent from runs saved before the script kept them)
        s["server_rounds"] = {k: round_figures(runs[k]["server_rounds"], s["doc_prompt_tokens"] - 64)
                              for k in ("without", "with", "doc_alone")}
    for metric in ("itl", "ttft"):
        a, b = s["with"][metric + "_ms"]["p99"], s["without"][metric + "_ms"]["p99"]
        s[f"{metric}_p99_with_over_without"] = a / b if a and b else None
    return mode


def compare(modes: list[dict]) -> None:
    ref = next((m for m in modes if m["chunk_tokens"] == 0), None)
    for m in modes:
        s = m["summary"]
        s["doc_ttft_over_unchunked"] = (s["doc_ttft_with_chats_s"] / ref["summary"]["doc_ttft_with_chats_s"]
                                        if ref else None)


def table(modes: list[dict]) -> str:
    def f(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| mode | chat run | ok / errored / incomplete | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | "
             "doc TTFT (s) |",
             "|---|---|---|---|---|---|"]
    for m in modes:
        s = m["summary"]
        name = f"chunks of {m['chunk_tokens']}" if m["chunk_tokens"] else f"unchunked ({m['max_prefill_tokens']})"
        for key, label in (("without", "without document"), ("with", "with document")):
            r = s[key]
            doc = (f"alone {s['doc_ttft_alone_s']:.1f}" if key == "without" else
                   f"{s['doc_ttft_with_chats_s']:.1f}" + (f" ({s['doc_ttft_over_unchunked']:.2f}x unchunked)"
                                                          if s.get("doc_ttft_over_unchunked") else ""))
            lines.append(f"| {name} | {label} | {r['successful']} / {r['errored']} / {r['incomplete']} | "
                         f"{f(r['ttft_ms']['p50'])} / {f(r['ttft_ms']['p99'])} | "
                         f"{f(r['itl_ms']['p50'])} / {f(r['itl_ms']['p99'])} | {doc} |")
    lines += ["", "| mode | ITL p99 with / without | chat ITL p50 / p99 (ms), requests overlapping the prefill (n) | "
              "... the rest (n) | stall per overlapping request p50 / max (s) | "
              "chat TTFT p50 / p99 (ms), arrived during the prefill (n) | ... the rest (n) |",
              "|---|---|---|---|---|---|---|"]
    for m in modes:
        s = m["summary"]
        w = s["with"]
        name = f"chunks of {m['chunk_tokens']}" if m["chunk_tokens"] else "unchunked"

        def c(d):
            return f"{f(d['p50'])} / {f(d['p99'])} ({d['n']})"
        lines.append(f"| {name} | {f(s['itl_p99_with_over_without'], '{:.2f}')} | {c(w['itl_ms_overlapping_prefill'])} | "
                     f"{c(w['itl_ms_outside'])} | {f(w['stall_s_overlapping_prefill']['p50'], '{:.1f}')} / "
                     f"{f(w['stall_s_overlapping_prefill']['max'], '{:.1f}')} | {c(w['ttft_ms_arrived_during_prefill'])} | "
                     f"{c(w['ttft_ms_arrived_outside'])} |")
    if all("server_rounds" in m["summary"] for m in modes):
        lines += ["", "| mode (server's round log) | document rounds (with decode tokens) | document round max / "
                  "median (s) | decode round p50 / p99, without run (s) | longest round / decode p99 |",
                  "|---|---|---|---|---|"]
        for m in modes:
            w, wo = m["summary"]["server_rounds"]["with"], m["summary"]["server_rounds"]["without"]
            name = f"chunks of {m['chunk_tokens']}" if m["chunk_tokens"] else "unchunked"
            ratio = (w["doc_round_s_max"] / wo["decode_round_s_p99"]
                     if w["doc_round_s_max"] and wo["decode_round_s_p99"] else None)
            lines.append(f"| {name} | {w['doc_rounds']} ({w['doc_rounds_with_decode_tokens']}) | "
                         f"{f(w['doc_round_s_max'], '{:.2f}')} / {f(w['doc_round_s_median'], '{:.2f}')} | "
                         f"{f(wo['decode_round_s_p50'], '{:.3f}')} / {f(wo['decode_round_s_p99'], '{:.3f}')} | "
                         f"{f(ratio, '{:.0f}')} |")
    return "\n".join(lines)


def plot(path: str, modes: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    labels = [f"chunks {m['chunk_tokens']}" if m["chunk_tokens"] else "unchunked" for m in modes]
    x = list(range(len(modes)))
    bars = [("without", "p50", "without doc p50"), ("without", "p99", "without doc p99"),
            ("with", "p50", "with doc p50"), ("with", "p99", "with doc p99")]
    for ax, metric, name in ((axes[0], "itl_ms", "chat ITL (ms)"), (axes[1], "ttft_ms", "chat TTFT (ms)")):
        for i, (run, q, label) in enumerate(bars):
            ax.bar([j + 0.2 * (i - 1.5) for j in x], [m["summary"][run][metric][q] for m in modes], 0.2, label=label)
        ax.set_xticks(x, labels)
        ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
        ax.set_title(name + ", guidellm")
    axes[2].bar([j - 0.2 for j in x], [m["summary"]["doc_ttft_alone_s"] for m in modes], 0.4, label="alone")
    axes[2].bar([j + 0.2 for j in x], [m["summary"]["doc_ttft_with_chats_s"] for m in modes], 0.4,
                label="with chat streams")
    axes[2].set_xticks(x, labels)
    axes[2].set_ylabel("document TTFT (s)")
    axes[2].legend(fontsize=8)
    axes[2].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    from cp_megatron.atomic import write_json
    from cp_megatron.config import load_config
    from cp_megatron.preflight import check_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default=str(REPO / "configs/default.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--guidellm", default="/work/venv-guidellm/bin/guidellm", help="guidellm executable")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 1024],
                    help="serve.max_prefill_tokens per mode; 0 = unchunked (the doc-TTFT reference)")
    ap.add_argument("--streams", type=int, default=4, help="concurrent chat streams")
    ap.add_argument("--chat-prompt-tokens", type=int, default=256)
    ap.add_argument("--chat-output-tokens", type=int, default=64)
    ap.add_argument("--doc-tokens", type=int, default=16384, help="the document's synthetic prompt tokens")
    ap.add_argument("--doc-output-tokens", type=int, default=8)
    ap.add_argument("--without-s", type=float, default=90.0, help="length of the chat run without the document")
    ap.add_argument("--doc-delay-s", type=float, default=20.0, help="the document starts this long into the run")
    ap.add_argument("--with-factor", type=float, default=1.5, help="the with-run lasts delay + this x doc-alone TTFT + tail")
    ap.add_argument("--tail-s", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=2400.0, help="one document run's limit (s)")
    ap.add_argument("--output", type=Path)
    ap.add_argument("--plot")
    ap.add_argument("--table", type=Path, metavar="JSON", help="only print the tables of a saved --output file "
                    "(and, with --plot, draw its plot again)")
    args = ap.parse_args(argv)
    if args.table:   # the summaries are computed again from the saved guidellm reports
        modes = [summarise_mode(m) for m in json.loads(args.table.read_text())["modes"]]
        compare(modes)
        print(table(modes))
        if args.plot:
            plot(args.plot, modes, "document TTFT")
        return 0

    cfg = load_config(args.config, args.overrides)
    if (cfg.model.max_context or 0) < args.doc_tokens + 512:
        raise SystemExit(f"model.max_context: expected at least --doc-tokens + 512 = {args.doc_tokens + 512} "
                         f"(give --set model.max_context=N), got {cfg.model.max_context}")
    modes = []
    with tempfile.TemporaryDirectory(prefix="guidellm-mix-") as tmp:
        tok_dir = os.path.join(tmp, "tokenizer")
        os.makedirs(tok_dir)
        export_tokenizer(cfg, tok_dir)
        reader, _ = check_model(cfg)
        model = cfg.serve.model_name or Path(reader.config.name).name.removesuffix(".gguf")   # as /v1/models
        for chunk in args.chunks:
            print(f"mode {'chunks of %d' % chunk if chunk else 'unchunked'}: load {os.getloadavg()[0]:.1f}", flush=True)
            modes.append(one_mode(args, chunk, model, tok_dir, tmp))
            compare(modes)
            print(table(modes[-1:]), flush=True)
            if args.output:   # after every mode: a stopped run keeps what it measured
                write_json(args.output, {"config": args.config, "overrides": args.overrides, "cp": cfg.parallel.cp,
                                         "model": model, "cpu_count": os.cpu_count(), "args": vars(args) | {
                                             "output": str(args.output), "table": None}, "modes": modes})
            if args.plot:
                plot(args.plot, modes, f"{args.doc_tokens}-token document, {args.streams} streams, "
                                       f"cp={cfg.parallel.cp}")
    print(table(modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
