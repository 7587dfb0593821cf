"""``cp-megatron serve`` with SmolLM2-135M-Instruct at CP2: chat through the ``openai``
client gives ``cp-megatron run``'s greedy tokens; a second turn reuses the cached first
turn and gives the tokens of the same conversation sent cold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from serve_helpers import REPO, Server

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"
CONFIG = "parallel: {cp: 2}\nruntime: {timeout_s: 300}\n"


@pytest.mark.timeout(600)
def test_smollm2_chat_matches_run_and_second_turn_reuses_the_cache(tmp_path):
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(CONFIG + f"prompt: {{messages: [{{role: user, content: '{QUESTION}'}}]}}\n"
                                "generation: {max_new_tokens: 8}\n")
    out = tmp_path / "run.json"
    oracle = subprocess.Popen([sys.executable, "-m", "cp_megatron.cli", "run", str(run_cfg), "--output", str(out)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text(CONFIG)
    server = Server(serve_cfg)
    try:
        _, err = oracle.communicate(timeout=400)
        assert oracle.returncode == 0, err[-2000:]
        expected = json.loads(out.read_text())
        client = server.client(timeout=120)
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": QUESTION}]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"return_token_ids": True})
        answer = r.choices[0].message.content
        assert r.choices[0].token_ids == expected["token_ids"]
        assert answer == expected["text"] and answer
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1

        turn2 = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Germany?"}]
        warm = client.chat.completions.create(model=model, messages=turn2, max_tokens=8, temperature=0,
                                              extra_body={"return_token_ids": True})
        assert warm.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens
        server.post("/reset_prefix_cache")
        cold = client.chat.completions.create(model=model, messages=turn2, max_tokens=8, temperature=0,
                                              extra_body={"return_token_ids": True})
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert cold.choices[0].token_ids == warm.choices[0].token_ids
        assert cold.choices[0].message.content == warm.choices[0].message.content

        text = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                         temperature=0)
        streamed = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                             temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text != ""
        assert server.terminate() == 0
    finally:
        oracle.kill()
        server.kill()
