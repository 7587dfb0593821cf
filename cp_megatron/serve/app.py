"""The HTTP front end on global rank 0: a FastAPI app speaking the OpenAI API.

    POST /v1/chat/completions   chat (chat template of the checkpoint), stream or not
    POST /v1/completions        text or token-id prompt, stream or not
    GET  /v1/models             the one served model
    GET  /health                200 while serving, 503 when draining or failed
    GET  /metrics               Prometheus text format (see :mod:`cp_megatron.serve.metrics`)
    POST /reset_prefix_cache    evict every idle cached sequence (as vLLM's; tests, benchmarks)

Handlers read the body (at most ``serve.max_request_bytes``, else 413), validate,
render the chat template and tokenize in a worker thread (never on the event loop), and
hand a :class:`~cp_megatron.serve.scheduler.Request` to the scheduler, then wait on an
asyncio queue that the scheduler thread fills with Delta / Finished / Failed events.  A
task watches for the client's disconnect (streaming or not) and cancels the request at
once: the scheduler frees its sequence before its next round.  Every error uses OpenAI's
error body (a catch-all middleware turns any exception into a logged 500): 400 bad
request, 404 unknown model or path, 413 body too large, 429 queue full, 500 this
request's sampling failed or an internal error, 503 draining or a rank failed.

Source: OpenAI API reference (chat / completions objects, streaming as server-sent
events ending with ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import traceback
from typing import Callable, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cp_megatron.serve.protocol import (ChatCompletionRequest, CompletionRequest, Usage, error_body, new_id,
                                        now)
from cp_megatron.serve.scheduler import AdmissionError, Failed, Finished, GenParams, Request

DEFAULT_MAX_REQUEST_BYTES = 16 * 2 ** 20
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


class _JSON(JSONResponse):
    """JSONResponse that cannot fail to render (lone surrogates are escaped, not encoded)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    return _JSON(error_body(status, message, param, code), status_code=status)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _CatchAll:
    """ASGI middleware: an exception escaping a handler is logged (traceback, once) and
    answered with a 500 in the OpenAI error shape (never a plain-text traceback)."""

    def __init__(self, app, log: Callable[[str], None] = _stderr) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:        # noqa: BLE001 -- the one place every request error ends up
            self.log(f"[serve] internal error on {scope.get('method')} {scope.get('path')}:\n"
                     + traceback.format_exc().rstrip())
            if not started:
                await _error(500, f"internal server error ({type(exc).__name__})", code="internal_error")(
                    scope, receive, send)


class _BadRequest(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _validation_error(exc: ValidationError) -> JSONResponse:
    """A pydantic error as OpenAI's 400: the first error, its field as ``param``."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))]
    param = ".".join(str(p) for p in loc) or (err.get("ctx") or {}).get("field")
    kind = err["type"]
    if kind == "json_invalid":
        return _error(400, f"request body is not valid JSON: {(err.get('ctx') or {}).get('error', err['msg'])}",
                      None, kind)
    if kind == "extra_forbidden":
        return _error(400, f"unknown field '{param}'", param, kind)
    if kind == "unsupported_parameter":
        return _error(400, err["msg"], param, kind)
    same = [e for e in errors if [p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))][:1]
            == loc[:1]]
    if len(same) > 1 and any(isinstance(p, str) and _UNION_TAG.match(p) for p in err["loc"]):
        return _error(400, f"{loc[0]}: wrong type ({'; '.join(sorted({e['msg'] for e in same}))})", str(loc[0]),
                      "invalid_type")
    message = err["msg"].removeprefix("Value error, ")
    if param and not message.startswith(f"{param}:"):
        message = f"{param}: {message}"
    return _error(400, message, param, kind)


async def _read_body(request: HTTPRequest, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (else a 413, without reading the rest)."""
    length = request.headers.get("content-length", "")
    too_big = _BadRequest(_error(413, f"request body over serve.max_request_bytes ({limit} bytes)", None,
                                 "request_too_large"))
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(sched, metrics, *, model_name: str, tokenizer, max_context: int, vocab_size: int,
               default_max_tokens: int, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               log: Callable[[str], None] = _stderr) -> FastAPI:
    """The app.

    Args:
        sched: the :class:`~cp_megatron.serve.scheduler.Scheduler` (its loop runs elsewhere).
        metrics: :class:`~cp_megatron.serve.metrics.ServeMetrics`.
        model_name: the id clients must send as ``model``.
        tokenizer: :class:`~cp_megatron.tokenizer.Tokenizer`, or None (a dummy model, or a
            checkpoint without tokenizer files: only token-id prompts on /v1/completions;
            outputs carry token ids, empty text).
        max_context: the model's context (tokens): prompt + max_tokens must fit.
        vocab_size: token ids of a prompt must be below it.
        default_max_tokens: max_tokens of a chat request that sets none (completions: 16,
            as OpenAI's).
        max_request_bytes: larger request bodies get a 413.
        log: ``str -> None`` for warnings and internal errors (stderr).

    Parsing, validation, chat templates and tokenisation run in a worker thread, never on
    the event loop, so ``/health`` and ``/metrics`` answer while a large prompt is handled.
    """
    app = FastAPI(title="cp-megatron", docs_url=None, redoc_url=None)
    app.add_middleware(_CatchAll, log=log)
    created = now()
    metrics.in_flight.set_function(lambda: sched.in_flight)
    metrics.running.set_function(lambda: len(sched.running))
    metrics.waiting.set_function(lambda: len(sched.waiting))
    warned: set[str] = set()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health():
        if sched.failed is not None:
            return _error(503, f"server unavailable: {sched.failed}", code="server_unavailable")
        if sched.draining:
            return _error(503, "server is shutting down", code="server_shutting_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        sched.reset_prefix_cache()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "cp-megatron", "max_model_len": max_context}]}

    def check(body, prompt: list[int], max_tokens: Optional[int], default: int, what: str) -> int:
        """max_tokens; raises _BadRequest."""
        if body.model != model_name:
            raise _BadRequest(_error(404, f"The model '{body.model}' does not exist (this server serves "
                                          f"'{model_name}')", "model", "model_not_found"))
        if body.stop and tokenizer is None:
            raise _BadRequest(_error(400, "stop: this model has no tokenizer, stop strings cannot apply", "stop"))
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _BadRequest(_error(400, f"prompt: token id {bad} is outside the vocabulary [0, {vocab_size})",
                                     "prompt", "invalid_token_id"))
        if max_tokens is None:
            max_tokens = max(1, min(default, max_context - len(prompt)))
        if len(prompt) + max_tokens > max_context:
            raise _BadRequest(_error(400, f"This model's maximum context length is {max_context} tokens. However, "
                                          f"you requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the "
                                          f"{what}, {max_tokens} in the completion). Please reduce the length of "
                                          f"the {what} or completion.", what, "context_length_exceeded"))
        return max_tokens

    def parse(model_cls, raw: bytes):
        try:
            return model_cls.model_validate_json(raw)
        except ValidationError as exc:
            raise _BadRequest(_validation_error(exc)) from None

    def prepare_chat(raw: bytes):
        """Worker thread: body -> (request, prompt ids, max_tokens)."""
        body = parse(ChatCompletionRequest, raw)
        if tokenizer is None:
            raise _BadRequest(_error(400, "messages: this model has no tokenizer: use /v1/completions with token "
                                          "ids (prompt as a list of ints)", "messages"))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False)
        except Exception as exc:   # noqa: BLE001 -- the checkpoint's jinja template may raise (e.g. role order)
            raise _BadRequest(_error(400, f"messages: the chat template rejected them: {exc}", "messages")) from None
        return body, prompt, check(body, prompt, body.max_completion_tokens or body.max_tokens,
                                   default_max_tokens, "messages")

    def prepare_completion(raw: bytes):
        body = parse(CompletionRequest, raw)
        if isinstance(body.prompt, str):
            if tokenizer is None:
                raise _BadRequest(_error(400, "prompt: this model has no tokenizer: send token ids (prompt as a "
                                              "list of ints)", "prompt"))
            prompt = tokenizer.encode(body.prompt, add_bos=tokenizer.add_bos_default)
        else:
            prompt = list(body.prompt)
        return body, prompt, check(body, prompt, body.max_tokens, 16, "prompt")

    async def handle(request: HTTPRequest, prepare, chat: bool):
        try:
            raw = await _read_body(request, max_request_bytes)
            body, prompt, max_tokens = await run_in_threadpool(prepare, raw)
        except _BadRequest as bad:
            return bad.response
        for name in body.ignored_fields:
            if name not in warned:
                warned.add(name)
                log(f"[serve] warning: request field '{name}' is accepted and ignored (it does not change the "
                    f"output); this is logged once")
        return await _generate(request, body, prompt, max_tokens, chat)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await handle(request, prepare_chat, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(request, prepare_completion, chat=False)

    def token_text(token_id: int) -> str:
        if tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(deltas) -> dict:
        """OpenAI chat ``logprobs`` object for the tokens of ``deltas``."""
        content = []
        for d in deltas:
            for _token, lp in zip(d.token_ids, [d.logprobs]):
                if lp is None:
                    continue
                text = token_text(_token)
                content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8", "replace")),
                                "top_logprobs": [{"token": (t := token_text(i)), "logprob": v,
                                                  "bytes": list(t.encode("utf-8", "replace"))} for i, v in lp.top]})
        return {"content": content}

    def completion_logprobs(deltas, offset: int = 0) -> dict:
        """Legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for d in deltas:
            for token, lp in zip(d.token_ids, [d.logprobs]):
                if lp is None:
                    continue
                text = token_text(token)
                out["tokens"].append(text)
                out["token_logprobs"].append(lp.logprob)
                out["top_logprobs"].append({token_text(i): v for i, v in lp.top})
                out["text_offset"].append(offset)
                offset += len(text)
        return out

    async def _generate(request: HTTPRequest, body, prompt: list[int], max_tokens: int, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:   # scheduler thread -> this handler
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:   # the event loop is gone (shutdown)
                pass

        rid = new_id("chatcmpl" if chat else "cmpl")
        params = GenParams(max_tokens, body.temperature, body.top_p, body.seed, body.stop_list, top_k=body.top_k,
                           min_p=body.min_p, ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
                           repetition_penalty=body.repetition_penalty, logprobs=body.num_logprobs)
        req = Request(prompt, params, sink, rid)
        try:
            sched.submit(req)
        except AdmissionError as exc:
            return _error(exc.status, str(exc), code=exc.code)

        async def watch_disconnect():
            """The client hung up (streaming or not): cancel now, wake the handler (None)."""
            while (await request.receive())["type"] != "http.disconnect":
                pass
            sched.cancel(req)
            events.put_nowait(None)

        watcher = asyncio.ensure_future(watch_disconnect())
        streaming = False
        try:
            first = await events.get()
            if first is None:
                return Response(status_code=499)
            if isinstance(first, Failed):
                return _error(first.status, first.message, code=first.code)
            extra = {"prompt_token_ids": prompt} if body.return_token_ids or tokenizer is None else {}
            with_ids = bool(extra)
            if not body.stream:
                deltas, event = [], first
                while not isinstance(event, Finished):
                    if event is None:
                        return Response(status_code=499)
                    if isinstance(event, Failed):
                        return _error(event.status, event.message, code=event.code)
                    deltas.append(event)
                    event = await events.get()
                text = "".join(d.text for d in deltas)
                logprobs = None
                if body.num_logprobs is not None:
                    logprobs = chat_logprobs(deltas) if chat else completion_logprobs(deltas)
                choice = {"index": 0, "logprobs": logprobs, "finish_reason": event.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                if with_ids:
                    choice["token_ids"] = [t for d in deltas for t in d.token_ids]
                usage = Usage.of(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                return _JSON({"id": rid, "object": "chat.completion" if chat else "text_completion",
                              "created": now(), "model": model_name, "choices": [choice],
                              "usage": usage.model_dump(), **extra})
            opts = body.stream_options
            include_usage = bool(opts and opts.include_usage)
            continuous = include_usage and opts.continuous_usage_stats
            streaming = True
            return StreamingResponse(_stream(req, rid, first, events, watcher, chat, with_ids, include_usage,
                                             continuous, body.num_logprobs is not None, extra),
                                     media_type="text/event-stream")
        finally:
            if not streaming:
                watcher.cancel()

    async def _stream(req, rid, first, events, watcher, chat, with_ids, include_usage, continuous, want_logprobs,
                      extra):
        created_at = now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        completion_tokens, text_offset = 0, 0

        def chunk(delta=None, finish=None, role=False, usage=None, first_chunk=False) -> str:
            body = {"id": rid, "object": obj, "created": created_at, "model": model_name}
            if usage is not None:
                body["choices"], body["usage"] = [], usage
            else:
                logprobs = None
                if want_logprobs and delta is not None:
                    logprobs = chat_logprobs([delta]) if chat else completion_logprobs([delta], text_offset)
                choice = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
                text = delta.text if delta is not None else ""
                if chat:
                    message = {"role": "assistant", "content": ""} if role else {}
                    if text:
                        message["content"] = text
                    choice["delta"] = message
                else:
                    choice["text"] = text
                if with_ids and delta is not None:
                    choice["token_ids"] = delta.token_ids
                body["choices"] = [choice]
                if continuous:
                    body["usage"] = {"prompt_tokens": len(req.prompt), "completion_tokens": completion_tokens,
                                     "total_tokens": len(req.prompt) + completion_tokens}
            if first_chunk:
                body.update(extra)
            return f"data: {json.dumps(body)}\n\n"

        done = False
        try:
            if chat:
                yield chunk(role=True, first_chunk=True)
            event, first_sent = first, chat
            while True:
                if event is None:
                    return
                if isinstance(event, Failed):
                    yield f"data: {json.dumps(error_body(event.status, event.message, code=event.code))}\n\n"
                    done = True
                    return
                if isinstance(event, Finished):
                    done = True
                    yield chunk(finish=event.finish_reason)
                    if include_usage:
                        yield chunk(usage=Usage.of(event.prompt_tokens, event.completion_tokens,
                                                   event.cached_tokens).model_dump())
                    yield "data: [DONE]\n\n"
                    return
                completion_tokens += len(event.token_ids)
                if event.text or with_ids or want_logprobs:
                    yield chunk(event, first_chunk=not first_sent)
                    first_sent = True
                    if want_logprobs and not chat:    # offsets in the tokens' own text, as non-streaming
                        text_offset += sum(len(token_text(t)) for t in event.token_ids)
                event = await events.get()
        except Exception as exc:      # noqa: BLE001 -- mid-stream: an error event, logged once
            log(f"[serve] internal error in stream {rid}:\n" + traceback.format_exc().rstrip())
            yield f"data: {json.dumps(error_body(500, f'internal server error ({type(exc).__name__})'))}\n\n"
        finally:
            watcher.cancel()
            if not done:          # the client went away mid-stream (or the server is stopping)
                sched.cancel(req)

    return app
