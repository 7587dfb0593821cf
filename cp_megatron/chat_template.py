"""Chat templates: render a checkpoint's own jinja template, or a built-in one.

Rendering follows transformers' ``apply_chat_template``: a sandboxed jinja2 environment
with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson``
filter, and the globals ``raise_exception`` and ``strftime_now``; the template sees
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and any extra keyword.

Source: transformers ``utils/chat_template_utils.py`` (``_compile_jinja_template``);
Llama 3 Instruct prompt format (Meta model card); ChatML (SmolLM2-Instruct).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Meta-Llama-3-8B-Instruct tokenizer_config.json template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Plain ChatML (SmolLM2's template without its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Marker token -> built-in template used when a vocabulary has it and no template of its own.
BUILTIN_TEMPLATES = (("<|start_header_id|>", LLAMA3_TEMPLATE), ("<|im_start|>", CHATML_TEMPLATE))


def builtin_template(has_token) -> str | None:
    """The built-in template for a vocabulary, or None.

    Args:
        has_token: callable ``str -> bool``, True when the vocabulary has that token.
    """
    for marker, template in BUILTIN_TEMPLATES:
        if has_token(marker):
            return template
    return None


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render ``template`` for ``messages`` (each a dict with ``role`` and ``content``).

    Raises:
        ValueError: a message without role/content, or the template raised / failed to parse.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r}")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"chat template failed: {err}") from None
