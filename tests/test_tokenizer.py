"""Tokenizers against transformers, the oracle.

* Meta Llama 3 ``tokenizer.model`` (tiktoken): a small BPE vocabulary trained here is
  compared with transformers' ``TikTokenConverter`` (how HF builds Llama 3's tokenizer.json),
  with the same vocabulary rebuilt as a GGUF-style byte-level BPE ("llama-bpe"), and with
  the special-token ids of Meta's Llama 3.1 layout (128000 = <|begin_of_text|> ...).
* SmolLM2's GGUF vocabulary against ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``,
  and the same tokenizer saved as tokenizer.json (the HF path).
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import TikTokenConverter

from cp_megatron.chat_template import LLAMA3_TEMPLATE
from cp_megatron.checkpoint import CheckpointError, open_checkpoint
from cp_megatron.checkpoint.gguf_vocab import build_byte_level_bpe, pre_tokenizer_for, tokenizer_from_gguf
from cp_megatron.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, Tokenizer

CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away into the forest. "
    "In 2024 there were 1,234,567 foxes and 89 dogs. Isn't that something? They'll say it's what we've seen. "
    "def main():\n    return the_answer(42)\n\n"
) * 3

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 1234567 foxes! Isn't it? They'LL see what we've DONE.\n\n\tTabs\r\nand CRLF   spaces  ",
    "naïve café — 日本語のテキスト, emoji 🙂👍🏽 and ümlauts.",
    "def main():\n    return the_answer(42)  # comment\n\n\n",
    "   leading and trailing   ",
    "",
]

SMOL_PARAGRAPHS = [
    "Context parallelism splits a long prompt across many GPUs. Each rank holds a shard of the "
    "sequence, computes attention for its queries, and passes key/value blocks around a ring.",
    "On 16 nodes (128 H100s) the paper prefills 1M tokens in 77 s — that's 502 TF/s per GPU, "
    "or about 93% parallelization efficiency! Isn't it great? We've measured it twice.\n\n"
    "```python\nfor step in range(N):\n    kv = ring.send_recv(kv)  # overlap\n```",
    "Ünïcödé, 中文字符, emoji 🚀🔥 and <|im_start|>user\nspecial markers<|im_end|> in the text.",
    "  Multiple   spaces,\ttabs,\r\nCRLF line ends and trailing whitespace   \n",
]


def train_bpe_ranks(corpus: str, n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks (256 single bytes, then merges by frequency) -- a tiny tokenizer.model."""
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", corpus))
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += count
        if not pairs:  # every word is a single token
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return ranks


@pytest.fixture(scope="module")
def llama3_model_file(tmp_path_factory):
    ranks = train_bpe_ranks(CORPUS + "".join(TEXTS), 150)
    path = tmp_path_factory.mktemp("llama3tok") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path, len(ranks)


@pytest.fixture(scope="module")
def llama3_oracle(llama3_model_file, monkeypatch_module):
    """transformers' TikTokenConverter tokenizer for the same file (Llama 3's tokenizer.json recipe)."""
    monkeypatch_module.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken caches files by path otherwise
    return TikTokenConverter(vocab_file=str(llama3_model_file[0]), pattern=LLAMA3_PATTERN,
                             extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS)).converted()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.unit
def test_llama3_tiktoken_matches_transformers_tiktoken_converter(llama3_model_file, llama3_oracle):
    tok = Tokenizer.from_tiktoken_file(str(llama3_model_file[0]))
    for text in TEXTS + [CORPUS]:
        ids = tok.encode(text)
        assert ids == llama3_oracle.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    assert len(tok.encode(CORPUS)) < len(CORPUS.encode()) / 2  # the merges are used


@pytest.mark.unit
def test_llama3_gguf_style_vocab_matches_tiktoken(llama3_model_file, llama3_oracle):
    """A Llama 3 GGUF (byte-level tokens + merges, pre 'llama-bpe') encodes like tokenizer.model."""
    vocab, merges = TikTokenConverter(vocab_file=str(llama3_model_file[0])).extract_vocab_merges_from_model(
        str(llama3_model_file[0]))
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    gguf_tok = build_byte_level_bpe(tokens, [f"{a} {b}" for a, b in merges], [1] * len(tokens), "llama-bpe", "x")
    tok = Tokenizer.from_tiktoken_file(str(llama3_model_file[0]))
    for text in TEXTS:
        assert gguf_tok.encode(text, add_special_tokens=False).ids == tok.encode(text), text


@pytest.mark.unit
def test_llama3_special_tokens_follow_meta_layout(llama3_model_file):
    tok = Tokenizer.from_tiktoken_file(str(llama3_model_file[0]))
    n = llama3_model_file[1]  # ranks; Llama 3.1 has 128000, so <|begin_of_text|> = 128000
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (n, (n + 1, n + 8, n + 9), n + 256)
    named = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|start_header_id|>": 6, "<|end_header_id|>": 7,
             "<|eom_id|>": 8, "<|eot_id|>": 9, "<|python_tag|>": 10, "<|reserved_special_token_247|>": 255}
    assert {t: tok.token_to_id(t) - n for t in named} == named
    assert tok.token_to_id("not a token at all") is None
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    ids = tok.encode(text)
    assert ids[:2] == [n, n + 6] and ids[-1] == n + 9
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\n\nHi!"
    assert tok.encode("Hi", add_bos=True) == [n] + tok.encode("Hi") and tok.add_bos_default


@pytest.mark.unit
def test_llama3_long_runs_are_chunked_like_meta(llama3_model_file):
    tok = Tokenizer.from_tiktoken_file(str(llama3_model_file[0]))
    text = "x" * 30_000 + " the fox " + " " * 26_000 + "dog"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.unit
def test_llama3_builtin_chat_template_is_llama3_instruct_format(llama3_model_file):
    tok = Tokenizer.from_tiktoken_file(str(llama3_model_file[0]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there \n"}]
    assert tok.apply_chat_template(messages) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.apply_chat_template(messages[1:], add_generation_prompt=False).endswith("Hi there<|eot_id|>")
    with pytest.raises(ValueError, match="chat message 0 must be a dict with 'role' and 'content'"):
        tok.apply_chat_template([{"role": "user"}])


@pytest.mark.unit
def test_llama3_tokenizer_json_folder_matches_autotokenizer(llama3_model_file, llama3_oracle, tmp_path):
    """HF path: tokenizer.json + tokenizer_config.json (bos/eos/chat_template) as Llama 3 ships them."""
    from tokenizers import processors

    n = llama3_model_file[1]
    llama3_oracle.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", n)])
    llama3_oracle.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    tok, ref = Tokenizer.from_hf_folder(str(tmp_path)), AutoTokenizer.from_pretrained(tmp_path)
    assert tok.bos_id == n and tok.eos_ids[0] == n + 9 and set(tok.eos_ids) == {n + 1, n + 8, n + 9}
    assert tok.add_bos_default
    for text in TEXTS:
        assert tok.encode(text, add_bos=True) == ref.encode(text), text
    messages = [{"role": "user", "content": "What is CP?"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)


# --------------------------------------------------------------------------- SmolLM2 (GGUF)
@pytest.fixture(scope="module")
def smollm2_autotokenizer(smollm2_gguf):
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.mark.integration
def test_smollm2_gguf_vocab_encodes_like_transformers(smollm2_reader, smollm2_autotokenizer):
    tok = smollm2_reader.tokenizer()
    for text in SMOL_PARAGRAPHS + TEXTS:
        ids = tok.encode(text)
        assert ids == smollm2_autotokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.encode(SMOL_PARAGRAPHS[2]).count(2) == 1  # <|im_end|> in text -> its special id


@pytest.mark.integration
def test_smollm2_gguf_special_ids_and_chat_template(smollm2_reader, smollm2_autotokenizer):
    tok, ref = smollm2_reader.tokenizer(), smollm2_autotokenizer
    assert (tok.bos_id, tok.vocab_size, tok.add_bos_default) == (ref.bos_token_id, 49152, False)
    assert tok.eos_ids[0] == ref.eos_token_id == tok.token_to_id("<|im_end|>") == 2
    assert tok.chat_template == ref.chat_template
    for messages in ([{"role": "user", "content": "Hi!"}],
                     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]):
        for gen in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.integration
def test_smollm2_saved_tokenizer_json_through_hf_reader(smollm2_reader, smollm2_autotokenizer, tmp_path):
    """HF reader path: a checkpoint folder with tokenizer.json/_config.json/chat_template.jinja."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(tmp_path)
    smollm2_autotokenizer.save_pretrained(tmp_path)
    tok, gguf_tok = open_checkpoint("hf", tmp_path).tokenizer(), smollm2_reader.tokenizer()
    assert (tok.bos_id, tok.eos_ids, tok.chat_template) == (gguf_tok.bos_id, gguf_tok.eos_ids, gguf_tok.chat_template)
    for text in SMOL_PARAGRAPHS:
        assert tok.encode(text) == gguf_tok.encode(text)


# --------------------------------------------------------------------------- errors
class _FakeGGUF:
    """Just the metadata surface tokenizer_from_gguf uses."""

    path = "fake.gguf"

    def __init__(self, **meta):
        self.meta = meta
        self.config = None

    def metadata(self, key, default=None):
        return self.meta.get(key, default)


@pytest.mark.unit
def test_gguf_tokenizer_errors():
    with pytest.raises(CheckpointError, match="fake.gguf: tokenizer.ggml.model 'llama' is not supported"):
        tokenizer_from_gguf(_FakeGGUF(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(CheckpointError, match="fake.gguf: tokenizer.ggml.model None is not supported"):
        tokenizer_from_gguf(_FakeGGUF())
    with pytest.raises(CheckpointError, match="x.gguf: tokenizer.ggml.pre 'qwen2' is not supported"):
        pre_tokenizer_for("qwen2", "x.gguf")


@pytest.mark.unit
def test_missing_tokenizer_files(tmp_path):
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"tokenizer.json: no tokenizer.json in this checkpoint"):
        open_checkpoint("hf", tmp_path).tokenizer()


@pytest.mark.unit
def test_no_chat_template_raises(llama3_oracle, tmp_path):
    bare = Tokenizer.from_tokenizers(llama3_oracle.__class__.from_str(
        '{"version":"1.0","model":{"type":"BPE","vocab":{"a":0},"merges":[]}}'), "bare")
    with pytest.raises(ValueError, match="bare: no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
