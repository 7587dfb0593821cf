"""Issue #24's breakers against a real ``cp-megatron serve`` (SmolLM2-135M, CP2, 127.0.0.1):
one request never takes the server down, /health stays fast while a 1 MB body is
tokenised and while a long prefill runs, a non-streaming client that hangs up is
cancelled within a round, and logprobs are consistent with the greedy token."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time

import httpx
import pytest

from serve_helpers import Server, wait_for

pytestmark = pytest.mark.integration

CONFIG = "parallel: {cp: 2}\nruntime: {timeout_s: 300}\nserve: {max_request_bytes: 1500000}\n"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("breakers") / "serve.yaml"
    cfg.write_text(CONFIG)
    server = Server(cfg)
    server.model = server.get("/v1/models").json()["data"][0]["id"]
    yield server
    server.kill()


def _body(smol, chat: bool, stream: bool, **kw) -> dict:
    base = {"model": smol.model, "max_tokens": 3, "stream": stream, **kw}
    if chat:
        return {**base, "messages": [{"role": "user", "content": "Name a colour."}]}
    return {**base, "prompt": "The sky is"}


def _sse(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.timeout(500)
def test_extreme_temperature_and_top_p_never_take_the_server_down(smol):
    """1e-38, 1e-45, 5e-324 as temperature and 1e-46 as top_p, on both endpoints, streaming
    and not, while another stream runs: each a valid answer or a 4xx; the other stream ends
    with [DONE]; /health stays 200."""
    background = {}

    def long_stream():
        with httpx.stream("POST", smol.base_url + "/v1/completions", timeout=300,
                          json={"model": smol.model, "prompt": "Once upon a time", "max_tokens": 120,
                                "ignore_eos": True, "temperature": 0, "stream": True}) as r:
            background["status"] = r.status_code
            background["events"] = _sse(r)
            background["done_at"] = time.monotonic()

    t = threading.Thread(target=long_stream)
    t.start()
    assert wait_for(lambda: smol.metric("cp_megatron_requests_running") >= 1, timeout=60)
    cases = [{"temperature": v} for v in (1e-38, 1e-45, 5e-324)] + [{"temperature": 1.0, "top_p": 1e-46}]
    for kw in cases:
        for chat in (True, False):
            route = "/v1/chat/completions" if chat else "/v1/completions"
            r = smol.post(route, json=_body(smol, chat, False, seed=3, **kw), timeout=120)
            assert r.status_code == 200 or 400 <= r.status_code < 500, (kw, r.text)
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                assert choice["finish_reason"] in ("length", "stop") and r.json()["usage"]["completion_tokens"] >= 1
            with httpx.stream("POST", smol.base_url + route, json=_body(smol, chat, True, **kw), timeout=120) as s:
                events = _sse(s)
            assert s.status_code == 200, (kw, events)
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), (kw, events[-3:])
            assert smol.get("/health").status_code == 200
    breakers_done = time.monotonic()
    t.join(300)
    assert background["status"] == 200 and background["events"][-1] == "[DONE]", background.get("events", [])[-3:]
    assert not any('"error"' in e for e in background["events"])
    tokens = sum(1 for e in background["events"][:-1] if json.loads(e)["choices"] and json.loads(e)["choices"][0]["text"])
    assert tokens > 60      # the breakers take ~1/3 of its 120 rounds (6.8 of 21 s at 200)
    assert background["done_at"] > breakers_done, "the other stream was not running throughout"
    assert smol.get("/health").json() == {"status": "ok"}


def _poll_latencies(smol, stop: threading.Event, out: list, path="/health"):
    with httpx.Client(base_url=smol.base_url, timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            r = client.get(path)
            out.append((time.perf_counter() - start, r.status_code))
            time.sleep(0.02)


@pytest.mark.timeout(300)
def test_health_and_metrics_answer_within_100ms_while_a_1mb_prompt_is_tokenised(smol):
    text = ("The quick brown fox jumps over the lazy dog, again and again. " * 17000)[:1_000_000]
    stop, health, metrics = threading.Event(), [], []
    pollers = [threading.Thread(target=_poll_latencies, args=(smol, stop, health)),
               threading.Thread(target=_poll_latencies, args=(smol, stop, metrics, "/metrics"))]
    for p in pollers:
        p.start()
    time.sleep(0.3)
    start = time.monotonic()
    r = smol.post("/v1/completions", json={"model": smol.model, "prompt": text, "max_tokens": 1}, timeout=120)
    elapsed = time.monotonic() - start
    stop.set()
    for p in pollers:
        p.join()
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    during = len(health)
    assert elapsed > 0.3 and during >= 5, (elapsed, during)     # the tokenisation took a while
    assert all(code == 200 for _, code in health + metrics)
    worst = max(s for s, _ in health + metrics)
    assert worst < 0.1, f"/health or /metrics took {worst * 1000:.0f} ms while a 1 MB prompt was tokenised"


@pytest.mark.timeout(300)
def test_health_answers_within_100ms_during_a_long_prefill(smol):
    smol.post("/reset_prefix_cache")
    prompt = " ".join(f"word{i % 97}" for i in range(1000))      # about 3000 tokens
    stop, health = threading.Event(), []
    poller = threading.Thread(target=_poll_latencies, args=(smol, stop, health))
    poller.start()
    mark = len(smol.lines)
    r = smol.post("/v1/completions", json={"model": smol.model, "prompt": prompt, "max_tokens": 1,
                                           "temperature": 0}, timeout=200)
    stop.set()
    poller.join()
    assert r.status_code == 200, r.text[:300]
    prefill_s = max(float(s) for s in re.findall(r"prefill: .* in ([\d.]+) s", smol.log_since(mark)))
    assert prefill_s > 0.5, smol.log_since(mark)
    worst = max(s for s, _ in health)
    assert worst < 0.1, f"/health took {worst * 1000:.0f} ms during a {prefill_s:.1f} s prefill"


@pytest.mark.timeout(300)
def test_non_streaming_client_that_disconnects_is_cancelled_within_a_round(smol):
    body = json.dumps({"model": smol.model, "prompt": "Count to a thousand:", "max_tokens": 4000,
                       "ignore_eos": True, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", smol.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert wait_for(lambda: smol.metric("cp_megatron_requests_running") == 1, timeout=60)
    time.sleep(1.5)                                         # mid-generation
    before = smol.metric("cp_megatron_ttit_seconds_count")
    assert before > 3
    mark = len(smol.lines)
    sock.close()
    closed = time.monotonic()
    assert wait_for(lambda: smol.metric("cp_megatron_requests_running") == 0, timeout=10, interval=0.01)
    dropped_s = time.monotonic() - closed
    time.sleep(0.5)
    decode_rounds = re.findall(r"round \d+ decode: seqs=1 .* in ([\d.]+) s", smol.log_since(mark))
    assert len(decode_rounds) <= 2, (dropped_s, decode_rounds)  # the round in flight, at most one more
    assert dropped_s < 1.0, dropped_s
    assert smol.metric("cp_megatron_requests_in_flight") == 0


@pytest.mark.timeout(200)
def test_over_the_limit_is_413_and_bad_text_is_400_and_the_server_answers_after(smol):
    r = smol.post("/v1/completions", content=b'{"model": "x", "prompt": "' + b"a" * 1_600_000 + b'"}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    for raw in (b'{"model": "MODEL", "prompt": "a\\ud800"}', b'{"model": "\\ud800", "prompt": "a"}'):
        r = smol.post("/v1/completions", content=raw.replace(b"MODEL", smol.model.encode()),
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid", r.text
    r = smol.post("/v1/completions", json={"model": smol.model, "prompt": "Hi", "max_tokens": "5"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = smol.post("/v1/completions", json=_body(smol, False, False, temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


@pytest.mark.timeout(200)
def test_greedy_logprobs_are_the_top_alternative_on_both_endpoints(smol):
    r = smol.post("/v1/completions", json={**_body(smol, False, False, temperature=0, max_tokens=4), "logprobs": 3,
                                            "return_token_ids": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 4 == len(r["choices"][0]["token_ids"])
    for chosen, top, tok in zip(lp["token_logprobs"], lp["top_logprobs"], lp["tokens"]):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6) and top[tok] == chosen
        assert chosen <= 0 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
    chat = smol.post("/v1/chat/completions", json={**_body(smol, True, False, temperature=0), "logprobs": True,
                                                    "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert "".join(c["token"] for c in content).startswith(chat["choices"][0]["message"]["content"])
    for c in content:
        assert c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"], abs=1e-6)


@pytest.mark.timeout(200)
def test_repetition_penalty_and_min_tokens_change_greedy_output_as_vllm_defines_them(smol):
    prompt = "one two one two one two one two one two"
    plain = smol.post("/v1/completions", json={"model": smol.model, "prompt": prompt, "max_tokens": 12,
                                                "temperature": 0, "return_token_ids": True}).json()
    penalised = smol.post("/v1/completions", json={"model": smol.model, "prompt": prompt, "max_tokens": 12,
                                                    "temperature": 0, "repetition_penalty": 100.0,
                                                    "return_token_ids": True}).json()
    ids = penalised["choices"][0]["token_ids"]
    prompt_ids = set(penalised["prompt_token_ids"])
    assert ids != plain["choices"][0]["token_ids"]
    assert len(set(ids)) == len(ids) and not prompt_ids & set(ids), (ids, prompt_ids)   # nothing seen twice
    # min_tokens: a chat answer that ends early runs to at least min_tokens, the same tokens up to
    # where EOS was (only EOS is masked)
    ask = {"model": smol.model, "max_tokens": 40, "temperature": 0, "return_token_ids": True,
           "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    short = smol.post("/v1/chat/completions", json=ask).json()
    n = short["usage"]["completion_tokens"]
    assert short["choices"][0]["finish_reason"] == "stop" and n < 40
    held = smol.post("/v1/chat/completions", json={**ask, "min_tokens": n + 3}).json()
    assert held["usage"]["completion_tokens"] >= n + 3
    assert held["choices"][0]["token_ids"][:n - 1] == short["choices"][0]["token_ids"][:n - 1]
    assert held["choices"][0]["token_ids"][n - 1] != short["choices"][0]["token_ids"][n - 1]
