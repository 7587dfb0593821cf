"""Rebuild a byte-level BPE tokenizer from the vocabulary embedded in a GGUF file.

A GGUF has no tokenizer.json: it stores ``tokenizer.ggml.tokens`` (already spelled in
GPT-2's byte-to-unicode alphabet), ``merges`` ("a b" strings, best first), ``token_type``
(3 = control, 4 = user-defined) and a pre-tokenizer name ``tokenizer.ggml.pre`` that picks
the split regex.  This builds the equivalent ``tokenizers.Tokenizer``: BPE model, the
pre-tokenizer llama.cpp uses for that name, ByteLevel decoder, control tokens as special
added tokens and user-defined ones as plain added tokens.

Source: llama.cpp ``src/llama-vocab.cpp`` (``LLAMA_VOCAB_PRE_TYPE_*`` and their regexes);
GGUF spec ``tokenizer.ggml.*`` keys; SmolLM2 / StarCoder ``tokenizer.json`` pre-tokenizer
(Digits(individual) + ByteLevel).
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from cp_megatron.checkpoint.base import CheckpointError
from cp_megatron.tokenizer import LLAMA3_PATTERN, Tokenizer

CONTROL, USER_DEFINED = 3, 4

_GPT2 = ("default", "gpt-2", "gpt2")
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")


def pre_tokenizer_for(pre: str, where: str):
    """The ``tokenizers`` pre-tokenizer for llama.cpp pre-tokenizer name ``pre``.

    Raises:
        CheckpointError: a name not in the supported families (gpt-2, llama3, smollm-like).
    """
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    raise CheckpointError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported "
                          f"(known: {', '.join(_GPT2 + _LLAMA3 + _DIGITS_THEN_GPT2)})")


def build_byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str,
                         where: str) -> RustTokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's BPE vocabulary.

    Args:
        tokens: token strings, index = id, in byte-level spelling.
        merges: ``"left right"`` merge rules, highest priority first.
        token_types: llama.cpp token types per id (3 control -> special, 4 user-defined -> added).
        pre: ``tokenizer.ggml.pre`` name.
        where: path for error messages.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer_for(pre, where)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == CONTROL]
    added = [AddedToken(t, special=False, normalized=False)
             for t, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if added:
        tok.add_tokens(added)
    return tok


def tokenizer_from_gguf(ckpt) -> Tokenizer:
    """The :class:`~cp_megatron.tokenizer.Tokenizer` described by a GGUF file's metadata.

    Args:
        ckpt: an open :class:`cp_megatron.checkpoint.gguf_reader.GGUFCheckpoint`.

    Raises:
        CheckpointError: no vocabulary, a tokenizer model other than ``gpt2`` (byte-level
            BPE), or an unsupported pre-tokenizer.
    """
    model = ckpt.metadata("tokenizer.ggml.model", None)
    if model != "gpt2":
        raise CheckpointError(f"{ckpt.path}: tokenizer.ggml.model {model!r} is not supported "
                              f"(only 'gpt2' byte-level BPE)")
    tokens = ckpt.metadata("tokenizer.ggml.tokens")
    tok = build_byte_level_bpe(
        tokens, ckpt.metadata("tokenizer.ggml.merges"),
        ckpt.metadata("tokenizer.ggml.token_type", [1] * len(tokens)),
        ckpt.metadata("tokenizer.ggml.pre", "default"), ckpt.path)
    return Tokenizer.from_tokenizers(
        tok, ckpt.path, bos_id=ckpt.config.bos_token_id, eos_ids=ckpt.config.eos_token_ids,
        chat_template_str=ckpt.metadata("tokenizer.chat_template", None),
        add_bos_default=bool(ckpt.metadata("tokenizer.ggml.add_bos_token", False)))
