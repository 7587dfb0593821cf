"""Tokenizer: text <-> token ids, special ids and chat formatting, over two backends.

* ``tokenizers`` (Rust BPE) for a Hugging Face ``tokenizer.json`` or a vocabulary rebuilt
  from a GGUF file (:mod:`cp_megatron.checkpoint.gguf_vocab`);
* ``tiktoken`` for Meta's Llama 3 ``tokenizer.model`` (base64 token + rank per line),
  with the Llama 3 split pattern and 256 special tokens numbered after the ranks.

Special-token strings in the text (``<|eot_id|>``, ``<|im_end|>``...) are encoded as their
special ids, so a rendered chat prompt encodes correctly.  BOS is added only when asked.

Source: meta-llama/llama-models ``llama3/tokenizer.py`` (pattern, 256 special tokens after
the ranks, the 400k-char / 25k-run chunking; reserved-token names as in Llama 3.1's
published tokenizer.json); HF ``tokenizer.json`` + ``tokenizer_config.json``.
"""

from __future__ import annotations

import base64
import json
import os

from cp_megatron import chat_template

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
# Llama 3.1 names (ids = number of BPE ranks + index: 128000 <|begin_of_text|> ... 128255).
_LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + tuple(
    f"<|reserved_special_token_{3 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED)))

# End-of-turn / end-of-text markers of the supported chat formats: all stop generation.
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>")

_TIKTOKEN_MAX_ENCODE_CHARS = 400_000
_TIKTOKEN_MAX_RUN_CHARS = 25_000


def _split_runs(text: str, max_run: int):
    """Cut ``text`` so no piece has more than ``max_run`` consecutive (non-)whitespace chars."""
    run, is_space, start = 0, text[:1].isspace(), 0
    for i, ch in enumerate(text):
        now_space = ch.isspace()
        if now_space != is_space:
            run, is_space = 1, now_space
        else:
            run += 1
            if run > max_run:
                yield text[start:i]
                start, run = i, 1
    yield text[start:]


class _HFBackend:
    def __init__(self, tok) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL (encode does not): other threads run meanwhile.
        return self.tok.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids, skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int):
        return self.tok.id_to_token(token_id)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _TiktokenBackend:
    def __init__(self, enc, special_tokens: dict[str, int]) -> None:
        self.enc, self.special = enc, special_tokens
        self.special_by_id = {i: t for t, i in special_tokens.items()}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i in range(0, len(text), _TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_runs(text[i:i + _TIKTOKEN_MAX_ENCODE_CHARS], _TIKTOKEN_MAX_RUN_CHARS):
                ids.extend(self.enc.encode(piece, allowed_special="all"))
        return ids

    def decode(self, ids, skip_special_tokens: bool) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special_by_id)]
        return self.enc.decode(ids)

    def token_to_id(self, token: str):
        if token in self.special:
            return self.special[token]
        try:
            return self.enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None

    def id_to_token(self, token_id: int):
        if token_id in self.special_by_id:
            return self.special_by_id[token_id]
        try:
            return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
        except KeyError:
            return None

    def vocab_size(self) -> int:
        return self.enc.n_vocab


class Tokenizer:
    """Text <-> ids with the special ids and chat template of one checkpoint.

    Attributes:
        name: where it came from (path).
        bos_id: beginning-of-text id, or None when the vocabulary has none.
        eos_ids: tuple of ids that end generation (declared eos ids, then any of
            ``STOP_TOKENS`` present: <|eot_id|> for Llama 3, <|im_end|> for ChatML).
        add_bos_default: whether this checkpoint's own tokenizer prepends BOS to plain text
            (a hint for callers of :meth:`encode`; Llama 3 True, SmolLM2 False).
        chat_template: the jinja template :meth:`apply_chat_template` renders.
    """

    def __init__(self, backend, name: str, bos_id=None, eos_ids=(), chat_template_str: str | None = None,
                 add_bos_default: bool = False) -> None:
        self._backend = backend
        self.name = name
        self.bos_id = bos_id
        eos = [int(i) for i in eos_ids]
        eos += [i for i in map(backend.token_to_id, STOP_TOKENS) if i is not None and i not in eos]
        self.eos_ids = tuple(eos)
        self.add_bos_default = add_bos_default
        self.chat_template = chat_template_str or chat_template.builtin_template(
            lambda t: backend.token_to_id(t) is not None)

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_tokenizers(cls, tok, name: str, bos_id=None, eos_ids=(), chat_template_str=None,
                        add_bos_default: bool = False) -> "Tokenizer":
        """Wrap a ``tokenizers.Tokenizer``."""
        return cls(_HFBackend(tok), name, bos_id, eos_ids, chat_template_str, add_bos_default)

    @classmethod
    def from_hf_folder(cls, folder: str, bos_id=None, eos_ids=()) -> "Tokenizer":
        """Load ``tokenizer.json``; special tokens and template from ``tokenizer_config.json``
        (``bos_token``, ``eos_token``, ``chat_template``) or ``chat_template.jinja``.

        Args:
            bos_id, eos_ids: ids from config.json, used when tokenizer_config.json has none.

        Raises:
            CheckpointError: no tokenizer.json, or one that does not parse.
        """
        from tokenizers import Tokenizer as RustTokenizer

        from cp_megatron.errors import CheckpointError

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no tokenizer.json in this checkpoint")
        try:
            tok = RustTokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{path}: cannot parse tokenizer.json: {err}") from None
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)

        def special(key):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return None if value is None else tok.token_to_id(value)

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        bos = special("bos_token")
        bos = bos_id if bos is None else bos
        eos = tuple(eos_ids) + tuple(i for i in [special("eos_token")] if i is not None and i not in eos_ids)
        probe = tok.encode("a", add_special_tokens=True).ids
        return cls.from_tokenizers(tok, folder, bos, eos, template,
                                   add_bos_default=bos is not None and probe[:1] == [bos])

    @classmethod
    def from_tiktoken_file(cls, path: str) -> "Tokenizer":
        """Meta's Llama 3 ``tokenizer.model``: one ``base64(token) rank`` line per BPE rank.

        Raises:
            CheckpointError: a line that is not ``base64 int``.
        """
        import tiktoken

        from cp_megatron.errors import CheckpointError

        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise CheckpointError(f"{path}: line {lineno} is not 'base64-token rank'") from None
        special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                                mergeable_ranks=ranks, special_tokens=special)
        bos = special["<|begin_of_text|>"]
        eos = (special["<|end_of_text|>"], special["<|eom_id|>"], special["<|eot_id|>"])
        return cls(_TiktokenBackend(enc, special), path, bos, eos, None, add_bos_default=True)

    # -- API ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, special tokens included (may be < the model's vocab)."""
        return self._backend.vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their special ids.

        Raises:
            ValueError: ``add_bos`` but the vocabulary has no BOS.
        """
        ids = self._backend.encode(text)
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.name}: add_bos=True but this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (special tokens written out unless ``skip_special_tokens``)."""
        return self._backend.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str):
        """Id of the exact token string ``token`` (special or vocabulary spelling), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int):
        """Token string of ``token_id`` (byte-level spelling for BPE vocabularies), or None."""
        return self._backend.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """Render ``messages`` ([{"role", "content"}...]) as a prompt string.

        Uses the checkpoint's own template when it has one, else the built-in Llama 3 or
        ChatML template chosen by the vocabulary.  Encode the result with ``add_bos=False``
        (templates that want BOS write it themselves).

        Raises:
            ValueError: no template available, malformed messages, or the template failed.
        """
        if self.chat_template is None:
            raise ValueError(f"{self.name}: no chat template (none in the checkpoint, and the vocabulary "
                             f"has neither <|start_header_id|> nor <|im_start|>)")
        bos = self.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.id_to_token(self.eos_ids[0]) if self.eos_ids else ""
        variables = {"bos_token": bos, "eos_token": eos, **variables}
        return chat_template.render(self.chat_template, messages, add_generation_prompt, **variables)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids})"
