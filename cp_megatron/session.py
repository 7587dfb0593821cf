"""A chat session on one engine: the conversation's messages, the turn-by-turn token feed
(only what the cache does not hold yet), and generation for each turn.

Turn 1 is a full prefill (in chunks, each after the first a partial prefill, when the
turn is longer than ``prefill_chunk_tokens``); every later user turn is a *partial prefill* of the new tokens on
top of the cached conversation (the reply's own tokens are already cached, except the
last sampled one).  Every rank runs the same session in lockstep (the same token ids,
the same sampling generator state).

Source: arXiv 2411.01783 §3.4 (multi-turn prefill with a persistent KV cache), §3.5
(partial prefill chooses pass-KV or pass-Q by Alg. 5).
"""

from __future__ import annotations

from typing import Callable, Optional

from cp_megatron.engine import Generation, InferenceEngine, RoundMetrics, SamplingParams, generate


def next_turn_tokens(tok, messages: list[dict], reply_text: str, reply: Generation,
                     user_text: str) -> tuple[list[int], list[dict]]:
    """Token ids to feed for the next user turn on top of the cached conversation.

    The cache holds the conversation up to the reply's last *fed* token.  The delta is the
    chat template of the whole conversation minus what is already there; when the reply
    ended with EOS, the template's own end-of-turn token takes its place.

    Args:
        tok: the model's :class:`~cp_megatron.tokenizer.Tokenizer`.
        messages: the conversation so far (``[{"role", "content"}]``), up to the last user turn.
        reply_text: the decoded reply to that turn.
        reply: its :class:`~cp_megatron.engine.Generation` (token ids, finish reason).
        user_text: the next user turn.

    Returns:
        (token ids to feed, the conversation with the reply and the new user turn).

    Raises:
        RuntimeError: the chat template does not extend the previous prompt (the cache
            cannot be reused).
    """
    before = tok.apply_chat_template(messages) + reply_text
    messages = messages + [{"role": "assistant", "content": reply_text},
                           {"role": "user", "content": user_text}]
    full = tok.apply_chat_template(messages)
    if not full.startswith(before):
        raise RuntimeError("chat template does not extend the previous turn's prompt; cannot reuse the cache")
    delta = tok.encode(full[len(before):], add_bos=False)
    pending = [] if reply.finish_reason == "eos" else [reply.token_ids[-1]]
    return pending + delta, messages


class ChatSession:
    """One sequence of an engine, turn after turn.

    Args:
        engine: this rank's engine (sequence ``seq_id`` must not be cached yet).
        tok: tokenizer, or None for raw token ids (dummy models: no chat, one turn).
        first_turn: token ids of the first prompt.
        messages: the chat the first prompt encodes (None: a raw prompt, no later turns).
        params: sampling settings of every turn.
        seq_id: the sequence id in the engine's cache.
        prefill_chunk_tokens: prefill a turn longer than this in chunks of at most this many
            tokens (one partial prefill round each, :func:`~cp_megatron.engine.generate`);
            None: one round.
    """

    def __init__(self, engine: InferenceEngine, tok, first_turn: list[int], messages: Optional[list[dict]],
                 params: SamplingParams, seq_id: int = 0, prefill_chunk_tokens: Optional[int] = None) -> None:
        self.engine, self.tok, self.params, self.seq_id = engine, tok, params, seq_id
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.feed, self.messages = list(first_turn), messages
        self.last: Optional[tuple[Generation, str]] = None  # the latest reply and its text

    def reply(self, on_round: Optional[Callable[[RoundMetrics], None]] = None
              ) -> tuple[Generation, str, list[RoundMetrics], int]:
        """Prefill the pending feed and decode the reply.

        Returns:
            (the Generation, its text, [prefill round(s) -- ``Generation.prefill_rounds`` of
            them, one per chunk --, decode rounds...], tokens fed).
        """
        tok = self.tok
        gens, rounds = generate(self.engine, {self.seq_id: self.feed}, self.params,
                                eos_ids=tok.eos_ids if tok is not None else (),
                                decode_text=tok.decode if tok is not None else None, on_round=on_round,
                                prefill_chunk_tokens=self.prefill_chunk_tokens)
        g = gens[self.seq_id]
        text = tok.decode(g.token_ids, skip_special_tokens=True) if tok is not None else ""
        fed, self.last = len(self.feed), (g, text)
        self.feed = []
        return g, text, rounds, fed

    def ask(self, user_text: str) -> None:
        """Queue the next user turn (fed by the next :meth:`reply`).

        Raises:
            ValueError: no tokenizer / chat (a raw or random prompt has no later turns), or
                no reply yet to follow.
        """
        if self.tok is None or self.messages is None or self.last is None:
            raise ValueError("a follow-up turn needs a chat prompt with a tokenizer and a previous reply")
        g, text = self.last
        self.feed, self.messages = next_turn_tokens(self.tok, self.messages, text, g, user_text)
