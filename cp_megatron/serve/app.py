"""The HTTP front end on global rank 0: a FastAPI app speaking the OpenAI API.

    POST /v1/chat/completions   chat (chat template of the checkpoint), stream or not
    POST /v1/completions        text or token-id prompt, stream or not
    GET  /v1/models             the one served model
    GET  /health                200 while serving, 503 when draining or failed
    GET  /metrics               Prometheus text format (see :mod:`cp_megatron.serve.metrics`)
    POST /reset_prefix_cache    evict every idle cached sequence (as vLLM's; tests, benchmarks)

Handlers tokenize, validate and hand a :class:`~cp_megatron.serve.scheduler.Request` to
the scheduler, then wait on an asyncio queue that the scheduler thread fills with
Delta / Finished / Failed events.  A client that disconnects has its request cancelled
(its sequence is freed).  Errors use OpenAI's error body: 400 bad request, 404 unknown
model or path, 429 queue full, 503 draining or a rank failed.

Source: OpenAI API reference (chat / completions objects, streaming as server-sent
events ending with ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cp_megatron.serve.protocol import (ChatCompletionRequest, CompletionRequest, Usage, error_body, new_id,
                                        now)
from cp_megatron.serve.scheduler import AdmissionError, Failed, Finished, GenParams, Request

# How often a waiting handler checks that its client is still connected (s).
DISCONNECT_POLL_S = 0.5


def _error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def create_app(sched, metrics, *, model_name: str, tokenizer, max_context: int, vocab_size: int,
               default_max_tokens: int) -> FastAPI:
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
    """
    app = FastAPI(title="cp-megatron", docs_url=None, redoc_url=None)
    created = now()
    metrics.in_flight.set_function(lambda: sched.in_flight)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if p != "body") or None
        if err["type"] == "json_invalid":
            message = f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        elif err["type"] == "extra_forbidden":
            message = f"unknown field '{param}'"
        else:
            message = f"{param}: {err['msg'].removeprefix('Value error, ')}" if param else err["msg"]
        return _error(400, message, param, err["type"])

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

    def check(body, prompt: list[int], max_tokens: Optional[int], default: int, what: str):
        """(max_tokens, None) or (None, error response)."""
        if body.model != model_name:
            return None, _error(404, f"The model '{body.model}' does not exist (this server serves "
                                     f"'{model_name}')", "model", "model_not_found")
        if body.stop and tokenizer is None:
            return None, _error(400, "stop: this model has no tokenizer, stop strings cannot apply", "stop")
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            return None, _error(400, f"prompt: token id {bad} is outside the vocabulary [0, {vocab_size})",
                                "prompt", "invalid_token_id")
        if max_tokens is None:
            max_tokens = max(1, min(default, max_context - len(prompt)))
        if len(prompt) + max_tokens > max_context:
            return None, _error(400, f"This model's maximum context length is {max_context} tokens. However, "
                                     f"you requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the "
                                     f"{what}, {max_tokens} in the completion). Please reduce the length of "
                                     f"the {what} or completion.", what, "context_length_exceeded")
        return max_tokens, None

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: HTTPRequest):
        if tokenizer is None:
            return _error(400, "messages: this model has no tokenizer: use /v1/completions with token ids "
                               "(prompt as a list of ints)", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False)
        except Exception as exc:   # the checkpoint's jinja template may raise (e.g. role order)
            return _error(400, f"messages: the chat template rejected them: {exc}", "messages")
        max_tokens, err = check(body, prompt, body.max_completion_tokens or body.max_tokens,
                                default_max_tokens, "messages")
        return err or await _generate(request, body, prompt, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        if isinstance(body.prompt, str):
            if tokenizer is None:
                return _error(400, "prompt: this model has no tokenizer: send token ids (prompt as a list of ints)",
                              "prompt")
            prompt = tokenizer.encode(body.prompt, add_bos=tokenizer.add_bos_default)
        else:
            prompt = list(body.prompt)
        max_tokens, err = check(body, prompt, body.max_tokens, 16, "prompt")
        return err or await _generate(request, body, prompt, max_tokens, chat=False)

    async def _generate(request: HTTPRequest, body, prompt: list[int], max_tokens: int, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:   # scheduler thread -> this handler
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:   # the event loop is gone (shutdown)
                pass

        rid = new_id("chatcmpl" if chat else "cmpl")
        req = Request(prompt, GenParams(max_tokens, body.temperature, body.top_p, body.seed, body.stop_list),
                      sink, rid)
        try:
            sched.submit(req)
        except AdmissionError as exc:
            return _error(exc.status, str(exc), code=exc.code)

        async def next_event():
            """The next event, or None when the client went away (request cancelled)."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        sched.cancel(req)
                        return None

        first = await next_event()
        if first is None:
            return Response(status_code=499)
        if isinstance(first, Failed):
            return _error(first.status, first.message, code="server_unavailable")
        extra = {"prompt_token_ids": prompt} if body.return_token_ids or tokenizer is None else {}
        with_ids = bool(extra)
        if not body.stream:
            text, ids, event = [], [], first
            while not isinstance(event, Finished):
                if event is None:
                    return Response(status_code=499)
                if isinstance(event, Failed):
                    return _error(event.status, event.message, code="server_unavailable")
                text.append(event.text)
                ids.extend(event.token_ids)
                event = await next_event()
            choice = {"index": 0, "logprobs": None, "finish_reason": event.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(text)}
            else:
                choice["text"] = "".join(text)
            if with_ids:
                choice["token_ids"] = ids
            usage = Usage.of(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
                    "model": model_name, "choices": [choice], "usage": usage.model_dump(), **extra}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(req, rid, first, next_event, chat, with_ids, include_usage, extra),
                                 media_type="text/event-stream")

    async def _stream(req, rid, first, next_event, chat, with_ids, include_usage, extra):
        created_at = now()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, ids=None, finish=None, role=False, usage=None, first_chunk=False) -> str:
            body = {"id": rid, "object": obj, "created": created_at, "model": model_name}
            if usage is not None:
                body["choices"], body["usage"] = [], usage
            else:
                choice = {"index": 0, "logprobs": None, "finish_reason": finish}
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else {}
                    if text:
                        delta["content"] = text
                    choice["delta"] = delta
                else:
                    choice["text"] = text or ""
                if ids is not None:
                    choice["token_ids"] = ids
                body["choices"] = [choice]
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
                    yield f"data: {json.dumps(error_body(event.status, event.message))}\n\n"
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
                if event.text or with_ids:
                    yield chunk(event.text, event.token_ids if with_ids else None, first_chunk=not first_sent)
                    first_sent = True
                event = await next_event()
        finally:
            if not done:          # the client went away mid-stream (or the server is stopping)
                sched.cancel(req)

    return app
