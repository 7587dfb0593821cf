"""Token sampling (greedy, temperature + top-p with a seed) and stop conditions."""

from __future__ import annotations

import pytest
import torch

from cp_megatron.engine import (Generation, RoundMetrics, SamplingParams, draw_seed, generate, sample_next,
                                sample_rows)

pytestmark = pytest.mark.unit


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample_next(logits, SamplingParams(temperature=0.0), torch.Generator()) == [1, 0]


def test_top_p_keeps_only_the_nucleus_and_seed_repeats():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.8)
    draws = [sample_next(logits, params, torch.Generator().manual_seed(s))[0] for s in range(200)]
    assert set(draws) == {0, 1}                       # 0.6 + 0.3 covers 0.8; the tail is cut
    again = [sample_next(logits, params, torch.Generator().manual_seed(s))[0] for s in range(200)]
    assert draws == again                             # same seed, same tokens (ranks agree)
    share = draws.count(0) / len(draws)
    assert 0.5 < share < 0.8                          # renormalised 0.6 / 0.9 = 0.67


class _ScriptedEngine:
    """Returns logits that make greedy decoding emit a fixed script."""

    def __init__(self, script):
        self.script, self.rounds = script, 0

    def step(self, feed, sampling, draws):
        token = self.script[min(self.rounds, len(self.script) - 1)]
        self.rounds += 1
        logits = torch.zeros(len(feed), 10)
        logits[:, token] = 1.0
        params = [sampling[s] for s in feed]
        ids = sample_rows(logits, params, [draws[s] for s in feed]).tolist()
        return ids, RoundMetrics("decode", len(feed), 1, 0.5, "pass-q", {})


def test_generate_stops_on_eos_stop_string_and_length():
    gens, rounds = generate(_ScriptedEngine([3, 4, 9, 5]), {0: [1, 2]}, SamplingParams(max_new_tokens=10),
                            eos_ids=(9,))
    assert gens[0].token_ids == [3, 4, 9] and gens[0].finish_reason == "eos" and len(rounds) == 3
    text = {3: "a", 4: "b", 5: "STOP"}
    gens, _ = generate(_ScriptedEngine([3, 5, 4]), {0: [1]}, SamplingParams(max_new_tokens=10, stop=("STOP",)),
                       decode_text=lambda ids: "".join(text[i] for i in ids))
    assert gens[0].token_ids == [3, 5] and gens[0].finish_reason == "stop"
    gens, _ = generate(_ScriptedEngine([3]), {0: [1]}, SamplingParams(max_new_tokens=4))
    assert gens[0].token_ids == [3, 3, 3, 3] and gens[0].finish_reason == "length"
    assert isinstance(gens[0], Generation)


def test_sample_rows_mixes_greedy_and_seeded_rows_independently_of_the_batch():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4]]))
    greedy, nucleus = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    ids = sample_rows(logits, [greedy, nucleus, nucleus], [0, 3, 5])
    assert ids[0].item() == 2                                  # argmax
    # A sampled row depends only on its own logits, seed and draw index, not on the batch.
    for row, draw in ((1, 3), (2, 5)):
        alone = sample_next(logits[row:row + 1], nucleus, torch.Generator().manual_seed(draw_seed(7, draw)))
        assert ids[row].item() == alone[0]
        assert sample_rows(logits[row:row + 1], [nucleus], [draw]).item() == alone[0]
