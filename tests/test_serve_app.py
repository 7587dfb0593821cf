"""The OpenAI app's answers that need no engine (in-process, fastapi's TestClient, or uvicorn
on 127.0.0.1 with a scripted scheduler): a model without a tokenizer refuses text, and
issue #24's breakers at the HTTP layer -- lax types, int64 seeds, lone surrogates, a
handler exception, a request whose sampling failed, bodies over the limit, vLLM's extras,
logprobs shapes, a non-streaming client that hangs up (the real-server cases are in
tests/test_serve_breakers.py)."""

from __future__ import annotations

import json as _json
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from cp_megatron.sampling import TokenLogprobs
from cp_megatron.serve.app import create_app
from cp_megatron.serve.metrics import ServeMetrics
from cp_megatron.serve.scheduler import Delta, Failed, Finished

pytestmark = pytest.mark.unit


class _NoRounds:
    """A scheduler stand-in: these requests must be answered before any is scheduled."""

    in_flight = 0
    failed = None
    draining = False

    def __getattr__(self, name):
        raise AssertionError(f"the request reached the scheduler ({name})")


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"model": "m", "prompt": "hello"}, "prompt"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hello"}]}, "messages"),
])
def test_text_without_a_tokenizer_is_a_400_that_asks_for_token_ids(route, body, param):
    app = create_app(_NoRounds(), ServeMetrics(), model_name="m", tokenizer=None, max_context=64, vocab_size=512,
                     default_max_tokens=4)
    r = TestClient(app).post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert err["message"].startswith(f"{param}: this model has no tokenizer: ") and "list of ints" in err["message"]
    assert "dummy" not in err["message"]


# -- the breakers of issue #24 at the HTTP layer (a scripted scheduler, no ranks) ---------------


class _Tok:
    """A tokenizer stand-in: one id per character (ord % 100), a fixed chat rendering."""

    add_bos_default = False
    eos_ids = (0,)

    def __init__(self, explode: bool = False) -> None:
        self.explode = explode

    def encode(self, text, add_bos=False):
        if self.explode:
            raise TypeError("TextInputSequence must be str")
        return [ord(c) % 100 for c in text]

    def apply_chat_template(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


class _Script:
    """A scheduler stand-in that answers every request with ``tokens`` Delta events, one per
    ``interval_s`` (a thread), then Finished; ``fail_with`` answers Failed instead."""

    failed = None
    draining = False

    def __init__(self, tokens: int = 3, interval_s: float = 0.0, fail_with=None, logprobs: bool = False) -> None:
        self.tokens, self.interval_s, self.fail_with, self.with_logprobs = tokens, interval_s, fail_with, logprobs
        self.running, self.waiting, self.submitted, self.cancelled = [], [], [], {}

    @property
    def in_flight(self):
        return len(self.running)

    def reset_prefix_cache(self):
        pass

    def submit(self, req):
        self.submitted.append(req)
        self.running.append(req)
        threading.Thread(target=self._run, args=(req,), daemon=True).start()

    def cancel(self, req):
        self.cancelled.setdefault(req.request_id, time.monotonic())
        if req in self.running:
            self.running.remove(req)

    def _run(self, req):
        for i in range(min(self.tokens, req.params.max_tokens)):
            if req.request_id in self.cancelled:
                return
            time.sleep(self.interval_s)
            lp = TokenLogprobs(-0.5, [(i, -0.5), (7, -1.5)][:req.params.logprobs]) if req.params.logprobs is not None \
                else None
            req.sink(Delta(chr(97 + i), [i], lp))
        if self.fail_with is not None:
            self.running.remove(req)
            req.sink(self.fail_with)
            return
        if req in self.running:
            self.running.remove(req)
        req.sink(Finished("length", len(req.prompt), min(self.tokens, req.params.max_tokens), 0))


def _app(sched=None, tokenizer=None, **kw):
    lines = []
    app = create_app(sched if sched is not None else _Script(), ServeMetrics(), model_name="m",
                     tokenizer=tokenizer if tokenizer is not None else _Tok(), max_context=4096, vocab_size=100,
                     default_max_tokens=4, log=lines.append, **kw)
    return app, lines


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMP = {"model": "m", "prompt": "hi"}


def _openai_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "5"), ("max_tokens", 5.0), ("max_tokens", True), ("stream", "yes"), ("stream", 1),
    ("temperature", "0.5"), ("temperature", True), ("seed", 2 ** 63), ("seed", -(2 ** 63) - 1), ("seed", "7"),
    ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("min_tokens", -1), ("repetition_penalty", 0),
    ("logprobs", 21), ("n", 2), ("ignore_eos", "true"),
])
def test_lax_types_and_out_of_range_values_are_400_naming_the_field(field, value):
    client = TestClient(_app()[0])
    err = _openai_error(client.post("/v1/completions", json={**COMP, field: value}), 400)
    assert err["param"] == field and err["type"] == "invalid_request_error", err


def test_prompt_of_booleans_is_a_400_and_int64_seeds_pass():
    client = TestClient(_app()[0])
    err = _openai_error(client.post("/v1/completions", json={"model": "m", "prompt": [True, False]}), 400)
    assert err["param"] == "prompt" and "wrong type" in err["message"], err
    for seed in (-(2 ** 63), 2 ** 63 - 1):
        assert client.post("/v1/completions", json={**COMP, "seed": seed}).status_code == 200


@pytest.mark.parametrize("route, raw", [
    ("/v1/completions", b'{"model": "m", "prompt": "a\\ud800b"}'),
    ("/v1/completions", b'{"model": "\\udfff", "prompt": "x"}'),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d"}]}'),
    ("/v1/completions", b'{"model": "m", "prompt": "\xff\xfe"}'),
])
def test_lone_surrogates_and_bad_utf8_are_a_json_400_not_a_500(route, raw):
    r = TestClient(_app()[0]).post(route, content=raw, headers={"content-type": "application/json"})
    err = _openai_error(r, 400)
    assert err["code"] == "json_invalid", err


def test_an_exception_in_a_handler_is_a_logged_openai_500():
    app, lines = _app(tokenizer=_Tok(explode=True))
    client = TestClient(app, raise_server_exceptions=False)
    err = _openai_error(client.post("/v1/completions", json=COMP), 500)
    assert err["type"] == "server_error" and "TypeError" in err["message"] and "Traceback" not in err["message"]
    tracebacks = [line for line in lines if "Traceback" in line]
    assert len(tracebacks) == 1 and "TextInputSequence" in tracebacks[0]
    assert client.get("/health").json() == {"status": "ok"}


def test_a_request_whose_sampling_failed_gets_a_500_alone():
    failed = Failed(500, "sampling failed for this request", "sampling_failed")
    for tokens in (0, 2):
        client = TestClient(_app(_Script(tokens=tokens, fail_with=failed))[0])
        err = _openai_error(client.post("/v1/chat/completions", json=CHAT), 500)
        assert err["code"] == "sampling_failed"
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})     # mid-stream: an error event
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and _json.loads(events[-1][6:])["error"]["code"] == "sampling_failed"
    assert "[DONE]" not in r.text


def test_body_over_the_limit_is_413_in_the_openai_shape_with_or_without_content_length():
    client = TestClient(_app(max_request_bytes=4096)[0])
    big = {"model": "m", "prompt": "x" * 5000}
    err = _openai_error(client.post("/v1/completions", json=big), 413)
    assert err["code"] == "request_too_large" and "max_request_bytes" in err["message"]
    chunked = (part for part in (b'{"model": "m", "prompt": "', b"y" * 5000, b'"}'))
    _openai_error(client.post("/v1/completions", content=chunked, headers={"content-type": "application/json"}),
                  413)
    assert client.post("/v1/completions", json={**COMP, "prompt": "x" * 3000}).status_code == 200


def test_vllm_extras_are_accepted_and_ignored_fields_warned_once():
    app, lines = _app()
    client = TestClient(app)
    body = {**CHAT, "ignore_eos": True, "min_tokens": 2, "repetition_penalty": 1.1, "top_k": 5, "min_p": 0.1,
            "metadata": {"a": "b"}, "presence_penalty": 0, "frequency_penalty": 0.0}
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=body).status_code == 200, body
    warnings = [line for line in lines if "accepted and ignored" in line]
    assert len(warnings) == 1 and "'metadata'" in warnings[0]
    err = _openai_error(client.post("/v1/chat/completions", json={**CHAT, "presence_penalty": 0.5}), 400)
    assert err["param"] == "presence_penalty" and err["code"] == "unsupported_parameter", err
    err = _openai_error(client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs"


def test_sampling_extras_reach_the_scheduler():
    sched = _Script()
    client = TestClient(_app(sched)[0])
    client.post("/v1/completions", json={**COMP, "ignore_eos": True, "min_tokens": 3, "repetition_penalty": 1.3,
                                         "top_k": 4, "min_p": 0.05, "logprobs": 2, "temperature": 1e-38})
    p = sched.submitted[-1].params
    assert (p.ignore_eos, p.min_tokens, p.repetition_penalty, p.top_k, p.min_p, p.logprobs) == \
        (True, 3, 1.3, 4, 0.05, 2)
    assert p.temperature == 1e-38          # passed on: the sampler treats it as greedy


def test_continuous_usage_stats_and_logprobs_in_the_openai_shapes():
    client = TestClient(_app(_Script(tokens=3))[0])
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "logprobs": True, "top_logprobs": 2,
                                                  "stream_options": {"include_usage": True,
                                                                     "continuous_usage_stats": True}})
    chunks = [_json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert r.text.rstrip().endswith("data: [DONE]")
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert [c["usage"]["completion_tokens"] for c in content] == [1, 2, 3]
    assert all(c["usage"]["prompt_tokens"] == len("<user>hi") for c in content)
    lp = content[0]["choices"][0]["logprobs"]["content"][0]
    assert lp["logprob"] == -0.5 and [t["logprob"] for t in lp["top_logprobs"]] == [-0.5, -1.5]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    r = client.post("/v1/completions", json={**COMP, "logprobs": 1, "max_tokens": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-0.5, -0.5] and lp["tokens"] == ["a", "b"] and lp["text_offset"] == [0, 1]
    assert lp["top_logprobs"] == [{"a": -0.5}, {"b": -0.5}]


def _serve(app):
    """The app under a real uvicorn on 127.0.0.1 (a thread); returns (server, port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return server, server.servers[0].sockets[0].getsockname()[1]


def test_a_non_streaming_client_that_disconnects_is_cancelled_before_its_next_token():
    sched = _Script(tokens=1000, interval_s=0.15)          # a token every 0.15 s, as in the issue
    server, port = _serve(_app(sched)[0])
    try:
        body = _json.dumps({**COMP, "max_tokens": 1000}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while not sched.submitted:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.5)                                     # mid-generation
        sock.close()
        closed = time.monotonic()
        while sched.submitted[0].request_id not in sched.cancelled:
            assert time.monotonic() - closed < 5, "never cancelled"
            time.sleep(0.005)
        assert sched.cancelled[sched.submitted[0].request_id] - closed < 0.15   # within one token's round
    finally:
        server.should_exit = True


def test_seen_tokens_follow_feeds_forks_and_frees():
    """The repetition penalty's token sets on every rank, against the token lists themselves."""
    import torch

    from cp_megatron.serve.ranks import SeenTokens

    seen = SeenTokens(vocab_size=20, device="cpu")
    seen.feed({0: [1, 2, 3, 2]})
    assert torch.nonzero(seen.mask(0)).flatten().tolist() == [1, 2, 3]
    seen.feed({0: [7]})                                 # incremental, after the mask exists
    seen.fork(0, 1, 2)                                  # the first 2 tokens: [1, 2]
    seen.feed({1: [19]})
    assert torch.nonzero(seen.mask(0)).flatten().tolist() == [1, 2, 3, 7]
    assert torch.nonzero(seen.mask(1)).flatten().tolist() == [1, 2, 19]
    seen.free(0)
    assert 0 not in seen.tokens and 0 not in seen.masks
    seen.feed({0: [5]})                                 # a new sequence under a reused id
    assert torch.nonzero(seen.mask(0)).flatten().tolist() == [5]


def test_streamed_completion_logprobs_match_the_non_streamed_ones():
    client = TestClient(_app(_Script(tokens=3))[0])
    body = {**COMP, "logprobs": 2, "max_tokens": 3}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    r = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [_json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    joined = {k: [v for p in parts for v in p[k]] for k in whole}
    assert joined == whole and whole["text_offset"] == [0, 1, 2]
