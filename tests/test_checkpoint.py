"""Checkpoint readers against transformers, the oracle.

HF: tiny random ``LlamaForCausalLM`` saved with ``save_pretrained`` (one file and sharded).
Meta: the same kind of model written in Meta's layout (q/k interleaved with the inverse of
transformers' converter ``permute``, cut over MP shards as fairscale does) + params.json.
GGUF: the real SmolLM2-135M Q4_1 file against ``from_pretrained(..., gguf_file=...)``, and
tiny F32 files written with ``gguf.GGUFWriter`` using llama.cpp's q/k permutation.
Float32 tensors are compared exactly (tolerance 0): reading and slicing never does math.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from cp_megatron.checkpoint import CheckpointError, check_tp, gguf_reader, open_checkpoint
from cp_megatron.checkpoint.hf import config_from_hf
from cp_megatron.model.config import ModelConfig, RopeScaling, get_preset

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
EXACT = {"rtol": 0.0, "atol": 0.0}  # reading/slicing/permuting copies values, never rounds


def tiny_llama(seed=0, heads=4, kv_heads=2, intermediate=96, tie=False, rope_scaling=None):
    """Random tiny Llama (hidden 64, 2 layers, vocab 256); every tensor, norms too, random."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=256,
                      max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, rope_scaling=rope_scaling, bos_token_id=1, eos_token_id=[2, 3])
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def meta_twin_model():
    """The tiny model of the Meta tests (8 heads, 4 KV heads, Meta's FFN, Llama 3.1 RoPE) with
    weights scaled to 0.05: unit-variance weights overflow a stack, trained ones do not."""
    model = tiny_llama(seed=11, heads=8, kv_heads=4, intermediate=META_FFN, rope_scaling=LLAMA31).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(0.05)
    return model


def expected_names(layers, tied):
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    return names + ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])


def assert_reads_match(reader, state_dict, tp_sizes, dtype=torch.float32):
    """Every tensor, whole and as every TP slice along every dim, equals the oracle's."""
    for name in reader.names():
        want = state_dict[name].to(dtype)
        torch.testing.assert_close(reader.read(name, dtype=dtype), want, **EXACT)
        for tp in tp_sizes:
            for dim in range(want.ndim):
                for rank in range(tp):
                    got = reader.read(name, shard_dim=dim, tp_rank=rank, tp_size=tp, dtype=dtype)
                    torch.testing.assert_close(got, want.chunk(tp, dim)[rank], **EXACT,
                                               msg=lambda m: f"{name} dim {dim} tp {rank}/{tp}: {m}")


# --------------------------------------------------------------------------- HF safetensors
HF_VARIANTS = {"plain": {}, "llama31": {"rope_scaling": LLAMA31}, "tied": {"tie": True}}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """{(variant, layout): (folder, transformers state dict)} for single-file and sharded saves."""
    out = {}
    for seed, (variant, kwargs) in enumerate(HF_VARIANTS.items()):
        model = tiny_llama(seed=seed, **kwargs)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        for layout, shard in (("single", "50MB"), ("sharded", "20KB")):
            folder = tmp_path_factory.mktemp(f"hf_{variant}_{layout}")
            model.save_pretrained(folder, max_shard_size=shard)
            out[variant, layout] = (folder, sd)
    assert os.path.exists(out["plain", "sharded"][0] / "model.safetensors.index.json")
    assert os.path.exists(out["plain", "single"][0] / "model.safetensors")
    return out


@pytest.mark.unit
@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_reader_matches_transformers_state_dict(hf_checkpoints, variant, layout):
    folder, sd = hf_checkpoints[variant, layout]
    reader = open_checkpoint("hf", folder)
    assert reader.names() == expected_names(2, tied=variant == "tied")
    assert_reads_match(reader, sd, tp_sizes=(1, 2))


@pytest.mark.unit
def test_hf_config_matches_llama_config(hf_checkpoints):
    folder, _ = hf_checkpoints["llama31", "sharded"]
    assert open_checkpoint("hf", folder).config == ModelConfig(
        name=str(folder), vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
        eos_token_ids=(2, 3))
    tied = open_checkpoint("hf", hf_checkpoints["tied", "single"][0]).config
    assert tied.tie_word_embeddings is True and tied.rope_scaling is None and tied.rope_theta == 500000.0


@pytest.mark.unit
def test_hf_config_v4_keys_like_llama31_config_json():
    # Llama-3.1-8B-Instruct config.json as published (transformers 4.x key names).
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu"}
    assert config_from_hf(cfg, "x") == get_preset("llama3.1-8b").with_(name="x")


@pytest.mark.unit
def test_hf_bf16_checkpoint_reads_in_requested_dtype(tmp_path):
    model = tiny_llama(seed=7).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    reader = open_checkpoint("hf", tmp_path)
    sd = model.state_dict()
    name = "model.layers.1.self_attn.k_proj.weight"
    got = reader.read(name, shard_dim=0, tp_rank=1, tp_size=2, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, sd[name].chunk(2, 0)[1], **EXACT)
    torch.testing.assert_close(reader.read(name), sd[name].float(), **EXACT)  # bf16 -> f32 is exact


# --------------------------------------------------------------------------- Meta .pth
META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 256,
               "ffn_dim_multiplier": 1.3, "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 500000.0,
               "use_scaled_rope": True}
META_FFN = 224  # Meta's formula: int(2*4*64/3)=170 -> int(1.3*170)=221 -> round up to 32 -> 224


def hf_permute(w, n_heads):
    """transformers convert_llama_weights_to_hf.permute (Meta interleaved -> HF rotate-half)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_interleave(w, n_heads):
    """Inverse of hf_permute: HF rotate-half rows -> Meta interleaved rows."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta(folder, sd, mp, embed_dim, dtype=torch.float32):
    """Save ``sd`` (HF names) as Meta consolidated.NN.pth shards + params.json."""
    full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], embed_dim),
            "norm.weight": (sd["model.norm.weight"], None), "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(META_PARAMS["n_layers"]):
        hf = f"model.layers.{i}."
        full.update({
            f"layers.{i}.attention.wq.weight": (meta_interleave(sd[hf + "self_attn.q_proj.weight"], 8), 0),
            f"layers.{i}.attention.wk.weight": (meta_interleave(sd[hf + "self_attn.k_proj.weight"], 4), 0),
            f"layers.{i}.attention.wv.weight": (sd[hf + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[hf + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[hf + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w3.weight": (sd[hf + "mlp.up_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[hf + "mlp.down_proj.weight"], 1),
            f"layers.{i}.attention_norm.weight": (sd[hf + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[hf + "post_attention_layernorm.weight"], None)})
    os.makedirs(folder, exist_ok=True)
    for rank in range(mp):
        shard = {k: (v if d is None else v.chunk(mp, d)[rank]).to(dtype).clone() for k, (v, d) in full.items()}
        torch.save(shard, os.path.join(folder, f"consolidated.{rank:02d}.pth"))
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(META_PARAMS, f)


@pytest.fixture(scope="module")
def meta_model_sd():
    return {k: v.clone() for k, v in tiny_llama(seed=11, heads=8, kv_heads=4, intermediate=META_FFN)
            .state_dict().items()}


@pytest.mark.unit
def test_meta_interleave_is_inverse_of_transformers_permute(meta_model_sd):
    w = meta_model_sd["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(hf_permute(meta_interleave(w, 8), 8), w, **EXACT)
    assert not torch.equal(meta_interleave(w, 8), w)


# (MP, tok_embeddings split dim): Llama 3 VocabParallelEmbedding cuts dim 0, Llama 2's
# ParallelEmbedding dim 1; MP 4 with TP 1/2 makes a TP slice gather rows of several shards.
@pytest.mark.unit
@pytest.mark.parametrize("mp,embed_dim", [(1, 0), (2, 0), (2, 1), (4, 1)])
def test_meta_reader_matches_hf_at_tp_1_2_4(tmp_path, meta_model_sd, mp, embed_dim):
    write_meta(tmp_path, meta_model_sd, mp, embed_dim)
    reader = open_checkpoint("meta", tmp_path)
    assert reader.model_parallel_size == mp
    assert reader.names() == expected_names(2, tied=False)
    assert_reads_match(reader, meta_model_sd, tp_sizes=(1, 2, 4))


@pytest.mark.unit
def test_meta_bf16_shards_read_as_bf16(tmp_path, meta_model_sd):
    write_meta(tmp_path, meta_model_sd, 2, 0, dtype=torch.bfloat16)
    reader = open_checkpoint("meta", tmp_path)
    bf16 = {k: v.to(torch.bfloat16) for k, v in meta_model_sd.items()}
    assert_reads_match(reader, bf16, tp_sizes=(4,), dtype=torch.bfloat16)


@pytest.mark.unit
def test_meta_config_from_params_json(tmp_path, meta_model_sd):
    write_meta(tmp_path, meta_model_sd, 2, 0)
    assert open_checkpoint("meta", tmp_path).config == ModelConfig(
        name=str(tmp_path), vocab_size=256, hidden_size=64, intermediate_size=META_FFN, num_layers=2,
        num_heads=8, num_kv_heads=4, head_dim=8, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False)


@pytest.mark.unit
def test_meta_tokenizer_model_sets_special_ids(tmp_path, meta_model_sd):
    write_meta(tmp_path, meta_model_sd, 1, 0)
    with pytest.raises(CheckpointError, match="no tokenizer.model in this Meta checkpoint"):
        open_checkpoint("meta", tmp_path).tokenizer()
    # 256 single-byte ranks: specials start at 256 (at 128000 in the real 128000-rank file).
    (tmp_path / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(bytes([i])) + b" %d\n" % i for i in range(256)))
    reader = open_checkpoint("meta", tmp_path)
    assert (reader.config.bos_token_id, reader.config.eos_token_ids) == (256, (257, 264, 265))
    tok = reader.tokenizer()
    assert (tok.bos_id, tok.eos_ids) == (256, (257, 264, 265))
    assert tok.decode(tok.encode("héllo<|eot_id|>", add_bos=True)) == "<|begin_of_text|>héllo<|eot_id|>"


@pytest.mark.unit
def test_meta_ffn_formula_gives_llama31_405b_and_8b():
    from cp_megatron.checkpoint.layout import meta_ffn_dim

    assert meta_ffn_dim(16384, 4096, 1.2) == get_preset("llama3.1-405b").intermediate_size
    assert meta_ffn_dim(4096, 1024, 1.3) == get_preset("llama3.1-8b").intermediate_size
    assert meta_ffn_dim(8192, 4096, 1.3) == get_preset("llama3.1-70b").intermediate_size


# --------------------------------------------------------------------------- GGUF
def llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF q/k rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, arch="llama", rope_freqs=None, vocab=False):
    """``vocab``: also a tokenizer's arrays (strings, ints, floats) and a non-ASCII string."""
    cfg, sd = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch)
    if vocab:
        tokens = [f"t{i}" if i % 7 else f"\u0120é{i}" for i in range(cfg.vocab_size)]
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([1 + i % 3 for i in range(cfg.vocab_size)])
        writer.add_token_scores([i / 8 for i in range(cfg.vocab_size)])
        writer.add_token_merges([f"t{i} t{i + 1}" for i in range(1, 40)])
        writer.add_chat_template("{{ messages }} ünïcode")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          llamacpp_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          llamacpp_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for src, dst in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                         ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                         ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            writer.add_tensor(f"blk.{i}.{dst}.weight", sd[f"{p}{src}.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama3_rope_freqs(model):
    """Per-frequency divisors (llama.cpp rope_freqs) derived from transformers' llama3 RoPE init."""
    dh, theta = model.config.head_dim, 500000.0
    default = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    return (default / scaled.double()).float().numpy()


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["llama31", "tied"])
def test_tiny_gguf_matches_transformers_state_dict(tmp_path, variant):
    model = tiny_llama(seed=3, **HF_VARIANTS[variant])
    freqs = llama3_rope_freqs(model) if variant == "llama31" else None
    write_tiny_gguf(tmp_path / "tiny.gguf", model, rope_freqs=freqs)
    reader = open_checkpoint("gguf", tmp_path / "tiny.gguf")
    assert reader.names() == expected_names(2, tied=variant == "tied")
    assert_reads_match(reader, model.state_dict(), tp_sizes=(1, 2))
    assert reader.config == ModelConfig(
        name=str(tmp_path / "tiny.gguf"), vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192) if variant == "llama31" else None,
        rms_norm_eps=pytest.approx(1e-5, rel=1e-6), max_position_embeddings=512,
        tie_word_embeddings=variant == "tied", bos_token_id=1, eos_token_ids=(2,))


@pytest.mark.unit
def test_gguf_header_walk_on_a_plain_array_equals_gguf_py_reader(tmp_path):
    # the faster header walk (gguf_reader._GGUFHeaderReader) must read what gguf-py's reader reads
    model = tiny_llama(seed=6, **HF_VARIANTS["llama31"])
    write_tiny_gguf(tmp_path / "h.gguf", model, rope_freqs=llama3_rope_freqs(model), vocab=True)
    ours, stock = gguf_reader._GGUFHeaderReader(tmp_path / "h.gguf"), gguf.GGUFReader(tmp_path / "h.gguf")
    assert list(ours.fields) == list(stock.fields) and len(ours.fields) > 15
    assert len(gguf_reader.field_value(stock.fields["tokenizer.ggml.tokens"])) == model.config.vocab_size
    for key, field in stock.fields.items():
        assert (ours.fields[key].types, ours.fields[key].data) == (field.types, field.data), key
        assert gguf_reader.field_value(ours.fields[key]) == gguf_reader.field_value(field), key
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.data.dtype, t.data.shape)
            for t in ours.tensors] == [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset, t.data.dtype,
                                        t.data.shape) for t in stock.tensors]
    for a, b in zip(ours.tensors, stock.tensors):
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.unit
def test_gguf_index_reopens_without_parsing_and_refuses_a_changed_file(tmp_path, monkeypatch):
    # pre-flight parses the header once and hands the index to the ranks (pickled by the spawner)
    model = tiny_llama(seed=4, **HF_VARIANTS["llama31"])
    write_tiny_gguf(tmp_path / "i.gguf", model, rope_freqs=llama3_rope_freqs(model))
    parsed = open_checkpoint("gguf", tmp_path / "i.gguf")
    index = pickle.loads(pickle.dumps(parsed.index))

    def no_parse(*_args, **_kwargs):
        raise AssertionError("the GGUF header was parsed again")

    monkeypatch.setattr(gguf_reader, "_GGUFHeaderReader", no_parse)
    reopened = open_checkpoint("gguf", tmp_path / "i.gguf", index=index)
    assert reopened.config == parsed.config and reopened.config.rope_scaling is not None
    assert_reads_match(reopened, model.state_dict(), tp_sizes=(2,))
    with pytest.raises(CheckpointError, match=r"format 'hf' takes no index"):
        open_checkpoint("hf", tmp_path, index=index)
    monkeypatch.undo()
    write_tiny_gguf(tmp_path / "i.gguf", tiny_llama(seed=5))  # rewritten: another file under the same name
    with pytest.raises(CheckpointError, match=r"i.gguf: the GGUF file changed since its header was parsed"):
        open_checkpoint("gguf", tmp_path / "i.gguf", index=index)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_transformers_model):
    """transformers' dequantized float32 SmolLM2 (state dict, config): the GGUF oracle (the
    session's one model, tests/conftest.py)."""
    return smollm2_transformers_model.state_dict(), smollm2_transformers_model.config


@pytest.mark.integration
def test_gguf_smollm2_tensors_match_transformers(smollm2_reader, smollm2_transformers):
    sd, _ = smollm2_transformers
    assert smollm2_reader.names() == expected_names(30, tied=True)
    for name in smollm2_reader.names():
        torch.testing.assert_close(smollm2_reader.read(name), sd[name], **EXACT, msg=lambda m: f"{name}: {m}")


@pytest.mark.integration
@pytest.mark.parametrize("name,shard_dim,tp", [
    ("model.layers.0.self_attn.q_proj.weight", 0, 3),   # un-permuted rows of 3 of 9 heads
    ("model.layers.5.self_attn.k_proj.weight", 0, 3),
    ("model.layers.5.self_attn.o_proj.weight", 1, 3),   # 192 cols = whole Q4_1 blocks
    ("model.layers.2.mlp.gate_proj.weight", 1, 4),      # 144 cols: cuts Q4_1 blocks
    ("model.layers.2.mlp.down_proj.weight", 1, 2),
    ("model.embed_tokens.weight", 0, 2),                # Q8_0
    ("model.embed_tokens.weight", 1, 4),
    ("model.norm.weight", 0, 2),                        # F32
])
def test_gguf_smollm2_tp_slices_match_transformers(smollm2_reader, smollm2_transformers, name, shard_dim, tp):
    want = smollm2_transformers[0][name].chunk(tp, shard_dim)
    for rank in range(tp):
        got = smollm2_reader.read(name, shard_dim=shard_dim, tp_rank=rank, tp_size=tp)
        torch.testing.assert_close(got, want[rank], **EXACT)


@pytest.mark.integration
def test_gguf_smollm2_config_matches_transformers(smollm2_reader, smollm2_transformers):
    cfg, ref = smollm2_reader.config, smollm2_transformers[1]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.num_attention_heads,
        ref.num_key_value_heads, ref.head_dim, ref.max_position_embeddings, ref.tie_word_embeddings)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == ref.rms_norm_eps
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    preset = get_preset("smollm2-135m")  # the preset agrees except for float32 rounding of eps
    assert cfg.with_(name=preset.name, rms_norm_eps=preset.rms_norm_eps) == preset


@pytest.mark.unit
def test_reads_are_copies_not_views_of_the_files(hf_checkpoints, meta_model_sd, tmp_path):
    model = tiny_llama(seed=5)
    write_tiny_gguf(tmp_path / "c.gguf", model)
    write_meta(tmp_path / "meta", meta_model_sd, 2, 0)
    for reader in (open_checkpoint("hf", hf_checkpoints["plain", "single"][0]),
                   open_checkpoint("meta", tmp_path / "meta"), open_checkpoint("gguf", tmp_path / "c.gguf")):
        for name, kwargs in (("model.norm.weight", {}), ("model.layers.0.mlp.down_proj.weight",
                                                         {"shard_dim": 1, "tp_rank": 1, "tp_size": 2})):
            first = reader.read(name, **kwargs)
            before = first.clone()
            first += 1.0
            torch.testing.assert_close(reader.read(name, **kwargs), before, **EXACT)


# --------------------------------------------------------------------------- errors
def _message(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.mark.unit
def test_error_unknown_format(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'onnx'"):
        open_checkpoint("onnx", tmp_path)


@pytest.mark.unit
def test_error_hf_missing_shard_file(hf_checkpoints, tmp_path):
    folder = shutil.copytree(hf_checkpoints["plain", "sharded"][0], tmp_path / "ckpt")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    os.remove(folder / victim)
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint("hf", folder)
    text = _message(excinfo)
    assert victim in text and "shard file missing" in text and "model.layers." in text


@pytest.mark.unit
def test_error_hf_missing_index_entry(hf_checkpoints, tmp_path):
    folder = shutil.copytree(hf_checkpoints["plain", "sharded"][0], tmp_path / "ckpt")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.self_attn.v_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: no entry for tensor "
                                              r"model.layers.0.self_attn.v_proj.weight"):
        open_checkpoint("hf", folder)


@pytest.mark.unit
def test_error_hf_index_points_to_file_without_tensor(hf_checkpoints, tmp_path):
    folder = shutil.copytree(hf_checkpoints["plain", "sharded"][0], tmp_path / "ckpt")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    wm["model.norm.weight"] = wm["model.embed_tokens.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensor model.norm.weight not found in file"):
        open_checkpoint("hf", folder)


@pytest.mark.unit
def test_error_hf_tensor_shape_disagrees_with_config(hf_checkpoints, tmp_path):
    folder = shutil.copytree(hf_checkpoints["plain", "single"][0], tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as excinfo:
        open_checkpoint("hf", folder)
    text = _message(excinfo)
    assert "model.safetensors" in text and "mlp.gate_proj.weight" in text and "(96, 64)" in text


@pytest.mark.unit
def test_error_hf_truncated_safetensors(hf_checkpoints, tmp_path):
    folder = shutil.copytree(hf_checkpoints["plain", "single"][0], tmp_path / "ckpt")
    path = folder / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 1000)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot parse safetensors file"):
        open_checkpoint("hf", folder)


@pytest.mark.unit
def test_error_hf_not_llama(hf_checkpoints, tmp_path):
    folder = shutil.copytree(hf_checkpoints["plain", "single"][0], tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: model_type 'mistral' is not 'llama'"):
        open_checkpoint("hf", folder)


@pytest.mark.unit
def test_error_meta_truncated_pth(tmp_path, meta_model_sd):
    write_meta(tmp_path, meta_model_sd, 2, 0)
    path = tmp_path / "consolidated.01.pth"
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth: cannot parse .pth file"):
        open_checkpoint("meta", tmp_path)


@pytest.mark.unit
def test_error_meta_missing_shard(tmp_path, meta_model_sd):
    write_meta(tmp_path, meta_model_sd, 4, 0)
    os.remove(tmp_path / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.02.pth: shard file missing"):
        open_checkpoint("meta", tmp_path)
    os.remove(tmp_path / "consolidated.03.pth")  # now a plausible MP=2 layout, but shapes say MP=4
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: tensor model.embed_tokens.weight "
                                              r"\(Meta key tok_embeddings.weight\): shard shape \(64, 64\)"):
        open_checkpoint("meta", tmp_path)


@pytest.mark.unit
def test_error_meta_missing_tensor_and_wrong_shape(tmp_path, meta_model_sd):
    write_meta(tmp_path, meta_model_sd, 1, 0)
    shard = torch.load(tmp_path / "consolidated.00.pth")
    del shard["layers.1.feed_forward.w3.weight"]
    torch.save(shard, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: tensor model.layers.1.mlp.up_proj.weight "
                                              r"\(Meta key layers.1.feed_forward.w3.weight\) not found"):
        open_checkpoint("meta", tmp_path)
    params = dict(META_PARAMS, multiple_of=64)  # -> FFN 256, files hold 224
    write_meta(tmp_path / "b", meta_model_sd, 1, 0)
    (tmp_path / "b" / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.mlp.gate_proj.weight .* shard shape "
                                              r"\(224, 64\) does not match the config"):
        open_checkpoint("meta", tmp_path / "b")


@pytest.mark.unit
def test_error_gguf_truncated(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", tiny_llama())
    os.truncate(tmp_path / "t.gguf", os.path.getsize(tmp_path / "t.gguf") - 4096)
    with pytest.raises(CheckpointError, match=r"t.gguf: cannot parse GGUF file"):
        open_checkpoint("gguf", tmp_path / "t.gguf")


@pytest.mark.unit
def test_error_gguf_without_vocabulary_has_no_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "n.gguf", tiny_llama())
    with pytest.raises(CheckpointError, match=r"n.gguf: tokenizer.ggml.model None is not supported"):
        open_checkpoint("gguf", tmp_path / "n.gguf").tokenizer()


@pytest.mark.unit
def test_error_gguf_unknown_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "g.gguf", tiny_llama(), arch="gpt2")
    with pytest.raises(CheckpointError, match=r"g.gguf: unknown GGUF architecture 'gpt2'"):
        open_checkpoint("gguf", tmp_path / "g.gguf")


@pytest.mark.integration
def test_error_tp_must_divide_kv_heads(hf_checkpoints, smollm2_reader):
    reader = open_checkpoint("hf", hf_checkpoints["plain", "single"][0])  # 4 heads, 2 KV heads
    check_tp(reader.config, 2)
    with pytest.raises(CheckpointError, match=r"tp=4 does not divide num_kv_heads=2"):
        check_tp(reader.config, 4)
    with pytest.raises(CheckpointError, match=r"tp=4 does not divide num_kv_heads=2"):
        reader.read("model.layers.0.self_attn.k_proj.weight", shard_dim=0, tp_rank=0, tp_size=4)
    with pytest.raises(CheckpointError, match=r"tp=2 does not divide num_kv_heads=3"):
        smollm2_reader.read("model.layers.0.self_attn.q_proj.weight", shard_dim=0, tp_size=2)


@pytest.mark.unit
def test_error_bad_read_arguments(hf_checkpoints):
    reader = open_checkpoint("hf", hf_checkpoints["tied", "single"][0])
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight' is not in this checkpoint"):
        reader.read("lm_head.weight")
    with pytest.raises(CheckpointError, match=r"model.norm.weight: shard_dim=1 invalid"):
        reader.read("model.norm.weight", shard_dim=1, tp_size=2)
    with pytest.raises(CheckpointError, match=r"mlp.up_proj.weight: tp_size 5 does not divide"):
        reader.read("model.layers.0.mlp.up_proj.weight", shard_dim=0, tp_size=5)
    with pytest.raises(CheckpointError, match=r"tp_rank 2 out of range"):
        reader.read("model.layers.0.mlp.up_proj.weight", shard_dim=0, tp_rank=2, tp_size=2)
