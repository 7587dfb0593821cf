"""Request and response bodies of the OpenAI API subset that ``cp-megatron serve`` speaks.

Requests are strict: an unknown field, a wrong type (no string-to-number or bool-to-int
coercion, as OpenAI's) or an out-of-range value is an HTTP 400 with an OpenAI error body
(``{"error": {"message", "type", "param", "code"}}``).  Three kinds of fields:

* implemented: ``model``, ``messages`` / ``prompt``, ``max_tokens`` (chat also
  ``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``,
  ``stream_options`` (``include_usage``, vLLM's ``continuous_usage_stats``), ``n`` (1 only),
  ``user``, ``logprobs`` / ``top_logprobs`` (chat) and ``logprobs`` (completions); and
  vLLM's extensions ``return_token_ids``, ``ignore_eos``, ``min_tokens``, ``top_k``,
  ``min_p``, ``repetition_penalty``;
* accepted and ignored (:data:`IGNORED_FIELDS`: they do not change the tokens; the app
  logs a warning once per field);
* refused unless they have their no-op value (:data:`REFUSED_FIELDS`, with the reason).

Source: OpenAI API reference, "Chat" and "Completions (legacy)" (request bodies,
response and chunk objects, error object); vLLM's OpenAI-compatible server (extra
sampling parameters, ``stream_options.continuous_usage_stats``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cp_megatron.sampling import MAX_LOGPROBS

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

# Fields that cannot change the generated tokens: accepted, ignored, warned about once.
IGNORED_FIELDS = ("metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                  "safety_identifier", "priority", "skip_special_tokens", "spaces_between_special_tokens")

# Fields refused unless they hold their no-op value: field -> (no-op test, reason).
REFUSED_FIELDS = {
    "presence_penalty": (lambda v: v in (None, 0), "not supported (use repetition_penalty)"),
    "frequency_penalty": (lambda v: v in (None, 0), "not supported (use repetition_penalty)"),
    "logit_bias": (lambda v: not v, "not supported"),
    "tools": (lambda v: not v, "tool calling is not supported"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calling is not supported"),
    "response_format": (lambda v: not v or v.get("type") == "text", "structured output is not supported"),
    "echo": (lambda v: not v, "not supported"),
    "best_of": (lambda v: v in (None, 1), "values above 1 are not supported"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
    "stop_token_ids": (lambda v: not v, "not supported (use stop strings)"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM: usage in every chunk (with include_usage)")


def _probability(default: float, gt: bool):
    lim = {"gt": 0} if gt else {"ge": 0}
    return Field(default, le=1, allow_inf_nan=False, **lim)


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False,
                               description="0 (or below 1e-5) = greedy")
    top_p: float = _probability(1.0, gt=True)
    top_k: int = Field(0, ge=-1, le=INT64_MAX, description="vLLM: keep the k most likely tokens; 0 / -1 = all")
    min_p: float = _probability(0.0, gt=False)
    seed: Optional[int] = Field(None, ge=INT64_MIN, lt=2 ** 63, description="sampling seed (int64)")
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Literal[1] = 1
    user: Optional[str] = None
    return_token_ids: bool = Field(False, description="vLLM extension: include token ids")
    ignore_eos: bool = Field(False, description="vLLM: EOS does not end the generation")
    min_tokens: int = Field(0, ge=0, le=INT64_MAX, description="vLLM: no EOS / stop before this many tokens")
    repetition_penalty: float = Field(1.0, gt=0, le=100, allow_inf_nan=False,
                                      description="vLLM / CTRL: > 1 discourages prompt and output tokens")
    # accepted and ignored
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    parallel_tool_calls: Optional[bool] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    priority: Optional[int] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    # refused unless no-op
    presence_penalty: Optional[float] = Field(None, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, allow_inf_nan=False)
    logit_bias: Optional[dict[str, float]] = None
    stop_token_ids: Optional[list[int]] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _no_op_only(self):
        for name, (no_op, reason) in REFUSED_FIELDS.items():
            if name in type(self).model_fields and not no_op(getattr(self, name)):
                raise PydanticCustomError("unsupported_parameter", "{field}: {reason}",
                                          {"field": name, "reason": reason})
        return self

    @property
    def stop_list(self) -> tuple:
        return tuple(self.stop or ())

    @property
    def ignored_fields(self) -> list[str]:
        """The accepted-and-ignored fields this request set."""
        return [f for f in IGNORED_FIELDS if f in self.model_fields_set]

    @property
    def num_logprobs(self) -> Optional[int]:
        """None, or how many alternatives per token the request asks for."""
        raise NotImplementedError


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("value_error", "{field}: needs logprobs: true", {"field": "top_logprobs"})
        return self

    @property
    def num_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("one prompt per request (batched prompts are not supported)")
            v = v[0]
        if len(v) == 0:
            raise ValueError("prompt is empty")
        return v

    @property
    def num_logprobs(self) -> Optional[int]:
        return self.logprobs


# -- responses -------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI error object; ``type`` follows the status as OpenAI's does."""
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
            429: "rate_limit_error",
            503: "server_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
