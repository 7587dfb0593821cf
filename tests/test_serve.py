"""``cp-megatron serve`` end to end at CP2 on 127.0.0.1, through the official ``openai`` client.

The tiny dummy model (no tokenizer) is driven with token-id prompts on /v1/completions;
SmolLM2 (real tokenizer and chat template) is compared with ``cp-megatron run``.
Oracles: the same request alone on a cold cache (``/reset_prefix_cache``), and ``run``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from serve_helpers import REPO, Server, wait_for

pytestmark = pytest.mark.integration

TINY = "model: {format: dummy, preset: tiny}\nparallel: {cp: 2}\nruntime: {timeout_s: 120}\n"
IDS = {"return_token_ids": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("serve") / "tiny.yaml"
    cfg.write_text(TINY)
    server = Server(cfg)
    yield server
    server.kill()


def ids_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def complete(client, prompt, max_tokens=4, **kw):
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body=IDS, **kw)
    return r.choices[0].token_ids, r


def stream_tokens(client, prompt, max_tokens=4):
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True, extra_body=IDS))
    return [t for c in chunks for t in (getattr(c.choices[0], "token_ids", None) or [])], chunks


@pytest.mark.timeout(300)
def test_completions_stream_or_not_and_cached_prefix_match_cold(tiny):
    client = tiny.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = ids_prompt(300, 1)
    tiny.post("/reset_prefix_cache")
    cold, r = complete(client, prompt, max_tokens=6)
    assert len(cold) == 6 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 300 and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    streamed, chunks = stream_tokens(client, prompt, max_tokens=6)      # hits the cache
    assert streamed == cold and chunks[-1].choices[0].finish_reason == "length"
    follow = prompt + cold + ids_prompt(20, 2)                          # next "turn" on top of it
    warm, r = complete(client, follow)
    assert r.usage.prompt_tokens_details.cached_tokens >= 300 + 6 - 1
    branch = prompt[:200] + ids_prompt(30, 3)                           # shares 200 tokens: fork
    warm_branch, rb = complete(client, branch)
    assert rb.usage.prompt_tokens_details.cached_tokens == 200
    for request, warm_tokens in ((follow, warm), (branch, warm_branch)):
        tiny.post("/reset_prefix_cache")
        cold_tokens, rc = complete(client, request)
        assert cold_tokens == warm_tokens and rc.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.timeout(400)
def test_16_concurrent_clients_get_their_solo_greedy_outputs(tiny):
    lengths = [1, 2, 5, 17, 60, 130, 250, 400, 560, 700, 900, 1100, 1300, 1550, 1800, 2000]
    prompts = [ids_prompt(n, 100 + i) for i, n in enumerate(lengths)]
    client = tiny.client(timeout=120)
    solo = []
    for p in prompts:
        tiny.post("/reset_prefix_cache")
        solo.append(complete(client, p)[0])
    tiny.post("/reset_prefix_cache")
    mark = len(tiny.lines)
    start = threading.Barrier(len(prompts), timeout=60)

    def one(p):
        start.wait()
        toks, r = complete(tiny.client(timeout=120), p)
        return toks, r.id

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, prompts, timeout=300))
    assert [t for t, _ in results] == solo
    assert len({rid for _, rid in results}) == len(prompts)
    log = tiny.log_since(mark)
    seqs = {kind: [int(n) for n in re.findall(rf"{kind}: seqs=(\d+)", log)]
            for kind in ("prefill", "decode")}
    assert max(seqs["prefill"]) > 1 and max(seqs["decode"]) > 1, log[-3000:]


@pytest.mark.timeout(400)
def test_chunked_prefill_between_decoding_streams_gives_the_unchunked_tokens(tiny, tmp_path):
    """A 450-token prompt on a server with a 100-token step budget is prefilled in chunks
    (partial prefills) that carry the other streams' decode tokens; every output equals the
    unchunked server's (budget 8192) solo greedy output."""
    chats = [ids_prompt(n, 300 + n) for n in (5, 40, 90)]
    doc = ids_prompt(450, 7)
    client = tiny.client(timeout=120)
    solo = []
    for p, n in [(c, 160) for c in chats] + [(doc, 4)]:
        tiny.post("/reset_prefix_cache")
        solo.append(complete(client, p, max_tokens=n)[0])
    cfg = tmp_path / "chunked.yaml"
    cfg.write_text(TINY)
    chunked = Server(cfg, ["serve.max_prefill_tokens=100"])
    try:
        chunk_client = chunked.client(timeout=120)

        started = threading.Barrier(len(chats) + 1, timeout=120)

        def chat(p):
            out = []
            for i, c in enumerate(chunk_client.completions.create(model="tiny", prompt=p, max_tokens=160,
                                                                  temperature=0, stream=True, extra_body=IDS)):
                out += getattr(c.choices[0], "token_ids", None) or []
                if i == 0:
                    started.wait()
            return out

        def one(job):
            p, n = job
            if n == 4:
                started.wait()                     # the document arrives once every chat streams
                return complete(chunk_client, p, max_tokens=n)[0]
            return chat(p)

        jobs = [(c, 160) for c in chats] + [(doc, 4)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs, timeout=300))
        log = "".join(chunked.lines)
    finally:
        chunked.kill()
    assert results == solo
    spans = [(int(a), int(b)) for a, b in re.findall(r"chunk (\d+):(\d+) of 450 prompt tokens", log)]
    assert spans[0][0] == 0 and spans[-1][1] == 450 and len(spans) >= 5, log[-3000:]
    assert all(b - a <= 100 for a, b in spans)
    assert max(int(n) for n in re.findall(r"\+(\d+) decode\)", log)) > 0      # streams decode between chunks


BAD = {
    "malformed JSON": (b'{"model": "tiny", "prompt": [1, 2', "json_invalid"),
    "unknown field": ({"model": "tiny", "prompt": [1], "max_tokens": 2, "best_of_things": 3}, "extra_forbidden"),
    "max_tokens 0": ({"model": "tiny", "prompt": [1], "max_tokens": 0}, "greater_than_equal"),
    "negative temperature": ({"model": "tiny", "prompt": [1], "temperature": -0.5}, "greater_than_equal"),
    "over the context": ({"model": "tiny", "prompt": [1, 2], "max_tokens": 131071}, "context_length_exceeded"),
    "token id out of vocab": ({"model": "tiny", "prompt": [1, 512]}, "invalid_token_id"),
    "text prompt, no tokenizer": ({"model": "tiny", "prompt": "hello"}, None),
    "empty prompt": ({"model": "tiny", "prompt": []}, None),
    "seed out of range": ({"model": "tiny", "prompt": [1], "temperature": 1, "seed": 2 ** 70}, "less_than"),
    "n > 1": ({"model": "tiny", "prompt": [1], "n": 2}, None),
}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_openai_400_and_server_keeps_serving(tiny, case):
    body, code = BAD[case]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = tiny.post("/v1/completions", **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if code is not None:
        assert err["code"] == code, err
    assert len(complete(tiny.client(), [1, 2, 3], max_tokens=2)[0]) == 2


@pytest.mark.timeout(200)
def test_openai_client_sees_typed_errors(tiny):
    client = tiny.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[1], max_tokens=-1)
    assert "max_tokens" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=[1], max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert tiny.get("/health").json() == {"status": "ok"}


@pytest.mark.timeout(200)
def test_client_disconnect_frees_its_sequence(tiny):
    tiny.post("/reset_prefix_cache")
    mark = len(tiny.lines)
    with httpx.stream("POST", tiny.base_url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": ids_prompt(100, 7), "max_tokens": 20000,
                            "temperature": 0, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break                                   # hang up mid-stream
    freed = wait_for(lambda: tiny.metric("cp_megatron_requests_in_flight") == 0
                     and all(tiny.metric("cp_megatron_kv_cache_bytes", f'{{rank="{r}"}}') == 0 for r in (0, 1)),
                     timeout=20)
    assert freed, tiny.log_since(mark)[-2000:]
    assert len(complete(tiny.client(), [4, 5], max_tokens=2)[0]) == 2


@pytest.mark.timeout(200)
def test_metrics_are_prometheus_text(tiny):
    text = tiny.get("/metrics").text
    for name in ("cp_megatron_ttft_seconds_bucket", "cp_megatron_ttit_seconds_count", "cp_megatron_round_miss_rate",
                 "cp_megatron_rounds_total{", "cp_megatron_kv_cache_bytes{", "cp_megatron_requests_in_flight"):
        assert name in text, name
    assert tiny.metric("cp_megatron_ttft_seconds_count") > 0


@pytest.mark.timeout(200)
def test_sigterm_drains_in_flight_requests_and_stops_every_rank(tiny):
    """Runs last on the module's server: it shuts it down."""
    result = {}

    def long_request():
        result["tokens"], result["r"] = complete(tiny.client(), ids_prompt(50, 9), max_tokens=40)

    t = threading.Thread(target=long_request)
    t.start()
    assert wait_for(lambda: tiny.metric("cp_megatron_requests_in_flight") == 1, timeout=20)
    start = time.monotonic()
    tiny.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: tiny.get("/health").status_code == 503, timeout=10)
    assert tiny.post("/v1/completions", json={"model": "tiny", "prompt": [1]}).status_code == 503
    t.join(60)
    assert len(result["tokens"]) == 40 and result["r"].choices[0].finish_reason == "length"
    assert tiny.proc.wait(30) == 0
    assert time.monotonic() - start < 30
    assert wait_for(lambda: not tiny.alive_ranks(), timeout=10), tiny.alive_ranks()
    assert "drained" in "".join(tiny.lines)


@pytest.mark.timeout(300)
def test_killed_rank_gives_503_and_ends_the_server(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    server = Server(cfg)
    try:
        with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 60000,
                                "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            victim = next(p for p in server.rank_pids if p != server.rank0_pid)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            tail = []
            try:
                for line, _ in zip(lines, range(100000)):
                    tail.append(line)
            except httpx.HTTPError:
                pass
        errors = [json.loads(line[6:]) for line in tail if line.startswith('data: {"error"')]
        assert errors and errors[-1]["error"]["type"] == "server_error", (tail[-3:], "".join(server.lines)[-3000:])
        health = server.get("/health")
        assert health.status_code == 503 and "rank failed" in health.json()["error"]["message"]
        code = server.proc.wait(30)
        assert code != 0 and time.monotonic() - killed_at < 30
        assert wait_for(lambda: not server.alive_ranks(), timeout=10), server.alive_ranks()
        assert "rank 1" in "".join(server.lines)
    finally:
        server.kill()


@pytest.mark.timeout(120)
def test_port_in_use_is_a_config_error_before_any_rank(tmp_path):
    import socket

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "cp_megatron.cli", "serve", str(cfg), "--port", str(port)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cp-megatron:")]
    assert len(lines) == 1 and "serve.port" in lines[0] and "weights loaded" not in proc.stderr
