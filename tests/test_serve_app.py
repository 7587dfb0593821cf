"""The OpenAI app's answers that need no engine (in-process, fastapi's TestClient): a model
without a tokenizer (dummy weights, or a checkpoint that ships none) refuses text."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cp_megatron.serve.app import create_app
from cp_megatron.serve.metrics import ServeMetrics

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
