"""Token sampling on the rank that holds a sequence's last token: greedy, or temperature
with top-k / top-p / min-p, repetition penalty, a ``min_tokens`` ban on end tokens, and the
logprobs of the drawn token with the top alternatives.

The sampler cannot raise on finite logits, whatever the settings: a temperature below
:data:`GREEDY_TEMPERATURE_EPS` is greedy (as vLLM's ``_SAMPLING_EPS``), probabilities are
formed in float64 after subtracting the row maximum (the most likely token always has
weight 1, so no overflow to inf and no all-zero row), and top-p / top-k / min-p always
keep that token.  A row whose draw still fails (a NaN row, a broken device) gets
:data:`FAILED_TOKEN` instead of an exception, so one request fails alone and the ranks
stay in lockstep.

Sampled rows draw by inverse CDF with one uniform number from a ``random.Random`` seeded by
:func:`draw_seed` (the sequence's whole int64 seed and how many tokens it has drawn; a
``torch.Generator`` would keep only 32 bits of the seed): the token does not depend on the
batch, on the CP size, on the device or on which rank samples.

Source: vLLM ``SamplingParams`` / ``Sampler`` (temperature epsilon, top-k, top-p, min-p,
``repetition_penalty`` as in CTRL, ``min_tokens``, logprobs of the raw model output);
Holtzman et al. 2019 (nucleus sampling); Keskar et al. 2019 (CTRL, repetition penalty).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): 1 / T would overflow float32.
GREEDY_TEMPERATURE_EPS = 1e-5
# The id of a row whose sampling failed; the caller fails that request alone.
FAILED_TOKEN = -1
# Logprobs are clamped to this (JSON has no -inf; vLLM does the same).
LOGPROB_FLOOR = -9999.0
# Most alternatives a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20

_log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """Decoding settings of one sequence.

    Attributes:
        max_new_tokens: tokens to generate at most (``generate``; the server counts its own).
        temperature: >= 0; below :data:`GREEDY_TEMPERATURE_EPS` greedy.
        top_p: nucleus mass in (0, 1] (the most likely token is always kept).
        seed: sampling seed (any int; reduced modulo 2**64 by :func:`draw_seed`).
        stop: stop strings (``generate``).
        top_k: keep the k most likely tokens; 0 or -1 = all (vLLM).
        min_p: keep tokens with probability >= min_p * the top probability; 0 = off.
        min_tokens: before this many tokens are drawn, ``end_ids`` cannot be drawn.
        end_ids: the token ids ``min_tokens`` bans (EOS, end of turn).
        repetition_penalty: > 0; 1 = off.  Logits of ``seen`` tokens are divided by it
            when positive, multiplied when negative (CTRL / vLLM).
        seen: bool ``[V]`` on the logits' device: tokens of the prompt and output so far
            (set by the caller that tracks the sequence; None = no penalty applied).
        logprobs: None, or how many top alternatives (0..MAX_LOGPROBS) to return with the
            drawn token's logprob.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple = ()
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    end_ids: tuple = ()
    repetition_penalty: float = 1.0
    seen: Optional[torch.Tensor] = None
    logprobs: Optional[int] = None

    @property
    def greedy(self) -> bool:
        """True when the argmax is taken (temperature below the epsilon, or not a number)."""
        return not self.temperature >= GREEDY_TEMPERATURE_EPS


@dataclass
class TokenLogprobs:
    """Logprob (natural log, of the model's raw distribution) of a drawn token, and the
    ``top`` alternatives as ``[(token id, logprob)]``, most likely first."""

    logprob: float
    top: list


def draw_seed(seed: int, draw: int) -> int:
    """Seed of the ``draw``-th sampled token of a sequence with sampling seed ``seed``:
    ``(seed mod 2**64) * 2**64 + draw``, one-to-one on (int64 seed, draw) pairs."""
    return (seed % (2 ** 64)) * (2 ** 64) + draw % (2 ** 64)


def draw_rng(seed: int, draw: int) -> random.Random:
    """The random stream of the ``draw``-th token of a sequence seeded ``seed``."""
    return random.Random(draw_seed(seed, draw))


def _processed(logits: torch.Tensor, params: Sequence[SamplingParams], draws: Sequence[int]) -> torch.Tensor:
    """``logits`` ``[n, V]`` with repetition penalties and ``min_tokens`` bans applied
    (float32, a copy only when some row needs one)."""
    penal = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and p.seen is not None]
    ban = [i for i, (p, d) in enumerate(zip(params, draws)) if d < p.min_tokens and p.end_ids]
    if not penal and not ban:
        return logits
    x = logits.float().clone()
    vocab = x.shape[-1]
    for i in penal:
        pen, row = params[i].repetition_penalty, x[i]
        x[i] = torch.where(params[i].seen.to(row.device), torch.where(row > 0, row / pen, row * pen), row)
    for i in ban:
        ids = [t for t in params[i].end_ids if 0 <= t < vocab]
        if len(ids) < vocab:                                  # never ban every token
            x[i, ids] = float("-inf")
    return x


def draw(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """Next token per row of ``logits`` ``[B, V]`` (float, any device), on that device and
    without a host sync: greedy, or the inverse-CDF draw at ``u`` from the temperature /
    top-k / top-p / min-p distribution.

    Args:
        logits: ``[B, V]`` float logits.
        params: the rows' settings.
        u: float64 ``[B]`` uniform numbers in [0, 1), one per row (from :func:`draw_rng`).

    NaN logits count as -inf; a row with +inf logits draws among those; a row with no
    finite logit draws uniformly.  Top-p keeps the smallest set of tokens whose mass
    reaches ``top_p``, always the most likely one.  Penalties and bans are
    :func:`sample_rows`'s.  The maths runs in float64 on the logits' device (a GPU row is
    never copied to the host).

    Returns:
        int64 ``[B]`` token ids on ``logits``' device.
    """
    x = logits.detach().to(torch.float64)
    x = torch.where(torch.isnan(x), float("-inf"), x)
    top = x.max(dim=-1, keepdim=True).values                        # [B, 1]
    inf_rows = torch.isposinf(top)
    x = torch.where(inf_rows, torch.where(torch.isposinf(x), 0.0, float("-inf")), x)
    empty = torch.isneginf(x.max(dim=-1, keepdim=True).values)
    x = torch.where(empty, 0.0, x)
    if params.greedy:
        return x.argmax(dim=-1)
    z = (x - x.max(dim=-1, keepdim=True).values) / params.temperature   # <= 0, the top token at 0
    weights = torch.exp(z)                                              # in [0, 1], max exactly 1
    sorted_w, order = weights.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_w, dtype=torch.bool)
    if params.top_k > 0:
        keep[:, params.top_k:] = False
    if params.top_p < 1.0:
        probs = sorted_w / sorted_w.sum(dim=-1, keepdim=True)           # sum >= 1: finite
        keep &= probs.cumsum(-1) - probs < params.top_p
    if params.min_p > 0.0:
        keep &= sorted_w >= params.min_p                                # relative to the top (weight 1)
    keep[:, 0] = True
    cdf = (sorted_w * keep).cumsum(-1)                                  # [B, V], last = total >= 1
    u = u.to(device=cdf.device, dtype=torch.float64).reshape(-1, 1)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)      # first index with cdf > u * total
    last = (keep & (sorted_w > 0)).cumsum(-1).argmax(-1, keepdim=True)  # the last kept token of weight > 0
    choice = torch.minimum(choice, last)                                # u * total rounded up to total
    return order.gather(-1, choice).flatten()


def uniforms(rng: random.Random, n: int) -> torch.Tensor:
    """float64 ``[n]`` uniform numbers from ``rng`` (on the host: a tiny copy to the device)."""
    return torch.tensor([rng.random() for _ in range(n)], dtype=torch.float64)


def sample_next(logits: torch.Tensor, params: SamplingParams, rng: random.Random) -> list[int]:
    """:func:`draw` with one ``rng.random()`` per row, read back as host ints (tests, tools;
    the engine's rounds use :func:`sample_rows`, which never reads a row on the host)."""
    return draw(logits, params, uniforms(rng, logits.shape[0])).tolist()


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], draws: Sequence[int]) -> torch.Tensor:
    """Next token for each row of ``logits`` ``[n, V]`` float, each with its own settings.

    Greedy rows take the argmax on the device (after penalties and bans).  Other rows draw
    (:func:`draw`, on the device) at a uniform number from :func:`draw_rng` (seed, draw
    count), so the result does not depend on which rank samples or on the batch; only that
    number crosses from the host, so no row is read back.  A row whose draw raises gets
    :data:`FAILED_TOKEN` (logged), never an exception.

    Returns:
        int64 ``[n]`` token ids on logits' device.
    """
    x = _processed(logits, params, draws)
    ids = x.argmax(dim=-1)
    rows, drawn = [], []
    for i, (p, d) in enumerate(zip(params, draws)):
        if p.greedy:
            continue
        try:
            token = draw(x[i:i + 1], p, uniforms(draw_rng(p.seed, d), 1))
        except Exception:                    # noqa: BLE001 -- fail the request, not the rank
            _log.exception("sampling failed for one row (temperature=%r, top_p=%r, top_k=%r, min_p=%r)",
                           p.temperature, p.top_p, p.top_k, p.min_p)
            token = torch.full((1,), FAILED_TOKEN, dtype=ids.dtype, device=ids.device)
        rows.append(i)
        drawn.append(token)
    if rows:
        ids[torch.tensor(rows, device=ids.device)] = torch.cat(drawn).to(ids.dtype)
    return ids


def logprob_columns(logits: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The logprob of each drawn token and the ``k`` most likely tokens, packed as int64 so
    they travel with the token ids in the same collective (stays on logits' device).

    Args:
        logits: ``[n, V]`` raw model logits (before temperature and penalties, as vLLM's
            default ``raw_logprobs``).
        ids: int64 ``[n]`` drawn ids (FAILED_TOKEN rows give garbage, ignored).
        k: alternatives per row (0..MAX_LOGPROBS).

    Returns:
        int64 ``[n, 1 + 2k]``: float64 bits of the drawn token's logprob, k top ids, float64
        bits of their logprobs (unpacked by :func:`unpack_logprobs`).
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, ids.clamp(min=0).unsqueeze(-1))                # [n, 1]
    top = lp.topk(k, dim=-1)
    vals = torch.cat([chosen, top.values], dim=-1).double()
    vals = torch.nan_to_num(vals, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
    bits = vals.view(torch.long)
    return torch.cat([bits[:, :1], top.indices, bits[:, 1:]], dim=-1)


def unpack_logprobs(columns: torch.Tensor, wanted: Sequence[Optional[int]]) -> list[Optional[TokenLogprobs]]:
    """Host side of :func:`logprob_columns`: ``columns`` int64 ``[n, 1 + 2k]`` (CPU) ->
    per row None (not asked) or :class:`TokenLogprobs` with ``wanted[row]`` alternatives."""
    k = (columns.shape[1] - 1) // 2
    lp = columns[:, :1].contiguous().view(torch.float64).flatten().tolist()
    top_ids = columns[:, 1:1 + k].tolist()
    top_lp = columns[:, 1 + k:].contiguous().view(torch.float64).tolist()
    out = []
    for row, n in enumerate(wanted):
        out.append(None if n is None else TokenLogprobs(lp[row], list(zip(top_ids[row][:n], top_lp[row][:n]))))
    return out
