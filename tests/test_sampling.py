"""Token sampling (greedy, temperature + top-p with a seed), its robustness to extreme
settings and logits, logprobs, and stop conditions."""

from __future__ import annotations

import pytest
import torch

from cp_megatron.engine import (Generation, RoundMetrics, SamplingParams, draw_rng, draw_seed, generate, sample_next,
                                sample_rows)
from cp_megatron.sampling import FAILED_TOKEN, LOGPROB_FLOOR, logprob_columns, unpack_logprobs

pytestmark = pytest.mark.unit


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample_next(logits, SamplingParams(temperature=0.0), draw_rng(0, 0)) == [1, 0]


def test_top_p_keeps_only_the_nucleus_and_seed_repeats():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.8)
    draws = [sample_next(logits, params, draw_rng(s, 0))[0] for s in range(200)]
    assert set(draws) == {0, 1}                       # 0.6 + 0.3 covers 0.8; the tail is cut
    again = [sample_next(logits, params, draw_rng(s, 0))[0] for s in range(200)]
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
        alone = sample_next(logits[row:row + 1], nucleus, draw_rng(7, draw))
        assert ids[row].item() == alone[0]
        assert sample_rows(logits[row:row + 1], [nucleus], [draw]).item() == alone[0]


# -- the sampler never raises on finite logits ---------------------------------------------------
EXTREME_TEMPERATURES = [5e-324, 1e-45, 1e-38, 1e-37, 1e-30, 1e-6, 9.9e-6, 1e-5, 1.1e-5, 1e-3, 0.5, 1.0, 2.0]
EXTREME_TOP_P = [5e-324, 1e-46, 1e-45, 1e-38, 1e-8, 0.3, 0.999999, 1.0]
EXTREME_SEEDS = [-(2 ** 63), -1, 0, 1, 2 ** 31, 2 ** 63 - 1]


def _logit_rows(gen: torch.Generator) -> list[torch.Tensor]:
    """Finite rows of every awkward kind, and rows with -inf entries."""
    v = 50
    big = torch.finfo(torch.float32).max
    rows = [torch.randn(v, generator=gen) * s for s in (1e-30, 1.0, 1e3, 1e30)]
    rows.append(torch.full((v,), big))                              # all at float32's max
    rows.append(torch.where(torch.arange(v) % 2 == 0, big, -big))   # +max and -max: the difference overflows
    rows.append(torch.zeros(v))                                     # uniform
    one_hot = torch.full((v,), -big)
    one_hot[7] = big
    rows.append(one_hot)
    masked = torch.randn(v, generator=gen)
    masked[torch.randperm(v, generator=gen)[:45]] = float("-inf")   # most of the vocabulary masked
    rows.append(masked)
    single = torch.full((v,), float("-inf"))
    single[3] = 0.0
    rows.append(single)
    return rows


def test_sampler_cannot_raise_on_finite_logits_or_minus_inf_whatever_the_settings():
    gen = torch.Generator().manual_seed(0)
    rows = _logit_rows(gen)
    batch = torch.stack(rows)                                        # [R, V]
    finite = torch.isfinite(batch)
    for t in EXTREME_TEMPERATURES:
        for top_p in EXTREME_TOP_P:
            for seed in EXTREME_SEEDS:
                for top_k, min_p in ((0, 0.0), (1, 0.0), (3, 0.5), (-1, 1.0)):
                    p = SamplingParams(temperature=t, top_p=top_p, seed=seed, top_k=top_k, min_p=min_p)
                    ids = sample_rows(batch, [p] * len(rows), list(range(len(rows))))
                    assert ids.dtype == torch.long and ids.shape == (len(rows),)
                    assert (ids >= 0).all() and (ids < batch.shape[1]).all(), (t, top_p, seed, ids)
                    # never a -inf (masked) token, whatever the settings
                    assert finite[torch.arange(len(rows)), ids].all(), (t, top_p, seed, top_k, min_p)
    # the single-survivor and one-hot rows always give their one token
    ids = sample_rows(batch, [SamplingParams(temperature=2.0, top_p=1.0, seed=5)] * len(rows), [0] * len(rows))
    assert ids[7].item() == 7 and ids[9].item() == 3


def test_random_settings_and_logits_never_fail():
    """A randomised sweep (fixed seed: reproducible) over settings and logits scales."""
    rng = torch.Generator().manual_seed(1234)
    for case in range(300):
        v = int(torch.randint(2, 300, (1,), generator=rng))
        scale = 10.0 ** float(torch.randint(-40, 39, (1,), generator=rng))
        logits = (torch.randn(4, v, generator=rng, dtype=torch.float64) * scale).clamp(
            -torch.finfo(torch.float32).max, torch.finfo(torch.float32).max).float()
        logits[torch.rand(4, v, generator=rng) < 0.3] = float("-inf")
        logits[:, 0] = torch.where(torch.isinf(logits[:, 0]), 0.0, logits[:, 0])   # >= 1 finite per row
        t = float(10.0 ** float(torch.empty(1).uniform_(-330, 0.3, generator=rng)))
        top_p = max(float(10.0 ** float(torch.empty(1).uniform_(-330, 0, generator=rng))), 5e-324)
        seed = int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (1,), generator=rng))
        params = SamplingParams(temperature=t, top_p=min(top_p, 1.0), seed=seed,
                                repetition_penalty=float(torch.empty(1).uniform_(0.01, 100, generator=rng)),
                                seen=torch.rand(v, generator=rng) < 0.5)
        ids = sample_rows(logits, [params] * 4, [case, 0, 1, 2 ** 40])
        assert torch.isfinite(logits[torch.arange(4), ids]).all(), (case, t, top_p, seed)


def test_temperature_below_the_epsilon_is_greedy_and_above_it_samples():
    logits = torch.tensor([[0.0, 0.1, 0.0]])
    for t in (5e-324, 1e-38, 9.9e-6):
        assert SamplingParams(temperature=t).greedy
        assert sample_rows(logits, [SamplingParams(temperature=t, seed=3)], [0]).item() == 1
    assert not SamplingParams(temperature=1e-5).greedy
    hot = {sample_rows(logits, [SamplingParams(temperature=2.0, seed=s)], [0]).item() for s in range(60)}
    assert hot == {0, 1, 2}


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    for top_p in (5e-324, 1e-46, 1e-8):
        drawn = {sample_rows(logits, [SamplingParams(temperature=1.0, top_p=top_p, seed=s)], [0]).item()
                 for s in range(40)}
        assert drawn == {1}


def test_seeds_a_full_int64_apart_differ():
    """``s`` and ``s + 2**63`` (here -1 and 2**63 - 1) must not give the same stream."""
    assert draw_seed(-1, 0) != draw_seed(2 ** 63 - 1, 0)
    logits = torch.zeros(1, 1000)
    a = [sample_rows(logits, [SamplingParams(temperature=1.0, seed=-1)], [d]).item() for d in range(20)]
    b = [sample_rows(logits, [SamplingParams(temperature=1.0, seed=2 ** 63 - 1)], [d]).item() for d in range(20)]
    assert a != b


def test_a_failing_row_gets_failed_token_and_the_others_their_tokens(monkeypatch):
    import cp_megatron.sampling as sampling

    real = sampling.draw

    def flaky(logits, params, u):
        if params.top_p == 0.5:
            raise RuntimeError("device lost")
        return real(logits, params, u)

    monkeypatch.setattr(sampling, "draw", flaky)
    logits = torch.log(torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.2, 0.8]]))
    ok = SamplingParams(temperature=1.0, top_p=1e-9, seed=1)
    ids = sample_rows(logits, [SamplingParams(temperature=1.0, top_p=0.5), ok, SamplingParams()], [0, 0, 0])
    assert ids.tolist() == [FAILED_TOKEN, 0, 1]


def test_min_tokens_bans_end_ids_and_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[5.0, 1.0, 0.5]])
    p = SamplingParams(temperature=0.0, min_tokens=2, end_ids=(0,))
    assert sample_rows(logits, [p], [0]).item() == 1       # EOS (0) banned before 2 tokens
    assert sample_rows(logits, [p], [2]).item() == 0       # then allowed
    seen = torch.tensor([True, False, False])
    pen = SamplingParams(temperature=0.0, repetition_penalty=10.0, seen=seen)
    assert sample_rows(logits, [pen], [0]).item() == 1     # 5 / 10 = 0.5 < 1.0
    neg = torch.tensor([[-1.0, -1.5, -9.0]])
    assert sample_rows(neg, [pen], [0]).item() == 1        # -1 * 10 = -10 < -1.5
    assert sample_rows(neg, [SamplingParams(temperature=0.0, repetition_penalty=10.0)], [0]).item() == 0  # no seen


def test_logprob_columns_round_trip_against_log_softmax_float64():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    logits[1, :30] = float("-inf")
    ids = torch.tensor([5, 33, 0])
    cols = logprob_columns(logits, ids, 4)
    assert cols.dtype == torch.long and cols.shape == (3, 9)
    got = unpack_logprobs(cols, [4, 0, None])
    ref = torch.log_softmax(logits.double(), -1)
    assert got[2] is None and got[1].top == []
    assert abs(got[0].logprob - ref[0, 5].item()) < 1e-5
    assert abs(got[1].logprob - ref[1, 33].item()) < 1e-5
    top_ids = [i for i, _ in got[0].top]
    assert top_ids == ref[0].topk(4).indices.tolist()
    for (i, lp) in got[0].top:
        assert abs(lp - ref[0, i].item()) < 1e-5
    # a -inf logprob is clamped to the floor (JSON has no -inf)
    masked = unpack_logprobs(logprob_columns(logits, torch.tensor([0, 0, 0]), 0), [0, 0, 0])
    assert masked[1].logprob == LOGPROB_FLOOR


def test_sample_rows_reads_no_row_on_the_host():
    """A sampled row is drawn on the logits' device: no ``.tolist()`` / ``.cpu()`` /
    ``.item()`` of the row (on a GPU each would be a sync and a 1 MB copy per row per round).
    Fake tensors have no data, so any read of one on the host raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    params = [SamplingParams(temperature=0.7, top_p=0.9, top_k=10, min_p=0.01, seed=s) for s in range(3)]
    params[1] = SamplingParams()                                      # a greedy row among them
    with FakeTensorMode():
        ids = sample_rows(torch.randn(3, 50), params, [4, 4, 4])
    assert ids.shape == (3,) and ids.dtype == torch.int64
