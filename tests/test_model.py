"""The Llama 3 model against Hugging Face transformers on the same weights, and its
invariance across CP x TP x PP layouts (docs/design.md §14)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from cp_megatron import parallel_state
from cp_megatron.checkpoint import open_checkpoint
from cp_megatron.engine import InferenceEngine
from cp_megatron.launcher import spawn
from cp_megatron.model.config import get_preset
from cp_megatron.model.llama import LlamaStage, StageLayout
from cp_megatron.model.weights import load_weights

# float32 end to end; the acceptance bound for logits vs transformers.
LOGITS_ATOL = 1e-3
JOB_TIMEOUT_S = 300
# A real text (the module docstring of this project's attention API), as bytes: the tiny
# random models have a 256-token byte vocabulary.
REAL_TEXT = (Path(__file__).resolve().parents[1] / "cp_megatron" / "attention" / "api.py").read_text()


def logits_job(fmt: str, path: str, tp: int, cp: int, pp: int, tokens: list[int]):
    """All logits of one full prefill (rank 0), a partial prefill of 5 more tokens, then two
    decode rounds of the last two tokens (the static decode step, as on a GPU)."""
    topo = parallel_state.initialize(tp, cp, pp)
    reader = open_checkpoint(fmt, path)
    stage = LlamaStage(reader.config, StageLayout(tp, topo.tp_rank, pp, topo.pp_rank))
    load_weights(stage, reader)
    engine = InferenceEngine(stage, topo, static_decode=True)
    full, _ = engine.forward({0: tokens[:-7]}, all_logits=True)
    partial, metrics = engine.forward({0: tokens[-7:-2]}, all_logits=True)
    assert metrics.kind == "partial-prefill" and metrics.cached_tokens == len(tokens) - 7
    steps = [engine.forward({0: [t]}) for t in tokens[-2:]]
    assert all(m.kind == "decode" for _, m in steps) and engine.last_step_key is not None
    return torch.cat([full, partial] + [x for x, _ in steps]) if topo.rank == 0 else None


def tiny_hf_model(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rope_theta=500000.0, tie_word_embeddings=tie,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return LlamaForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=None)
def _tiny_checkpoint(root: str, sharded: bool, tie: bool):
    model = tiny_hf_model(tie)
    folder = Path(root) / f"tiny-{'sharded' if sharded else 'single'}-{'tied' if tie else 'untied'}"
    model.save_pretrained(folder, max_shard_size="60KB" if sharded else "1GB")
    tokens = list(REAL_TEXT.encode()[:300])
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0]
    return str(folder), tokens, ref


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("model"))


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
@pytest.mark.parametrize("sharded,tie", [(False, False), (True, False), (False, True)])
def test_logits_match_transformers_tiny_hf(ckpt_root, sharded, tie):
    folder, tokens, ref = _tiny_checkpoint(ckpt_root, sharded, tie)
    if sharded:
        assert (Path(folder) / "model.safetensors.index.json").exists()
    logits = spawn(logits_job, 1, ("hf", folder, 1, 1, 1, tokens), timeout_s=JOB_TIMEOUT_S)[0]
    assert (logits - ref).abs().max().item() <= LOGITS_ATOL


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
@pytest.mark.parametrize("tp,cp,pp", [(1, 2, 1), (1, 4, 1), (2, 1, 1), (2, 2, 1), (2, 4, 1),
                                      (1, 1, 2), (2, 2, 2)])
def test_logits_and_greedy_tokens_equal_across_cp_tp_pp(ckpt_root, tp, cp, pp):
    folder, tokens, ref = _tiny_checkpoint(ckpt_root, False, False)
    logits = spawn(logits_job, tp * cp * pp, ("hf", folder, tp, cp, pp, tokens), timeout_s=JOB_TIMEOUT_S)[0]
    assert (logits - ref).abs().max().item() <= LOGITS_ATOL
    assert torch.equal(logits.argmax(-1), ref.argmax(-1)), "greedy next tokens differ"


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_meta_mp2_checkpoint_gives_hf_twin_logits_at_tp_1_2_4(tmp_path):
    from test_checkpoint import meta_twin_model, write_meta

    model = meta_twin_model()
    write_meta(tmp_path, {k: v.clone() for k, v in model.state_dict().items()}, mp=2, embed_dim=0)
    tokens = list(REAL_TEXT.encode()[:300])
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0]
    for tp in (1, 2, 4):
        logits = spawn(logits_job, tp, ("meta", str(tmp_path), tp, 1, 1, tokens), timeout_s=JOB_TIMEOUT_S)[0]
        assert (logits - ref).abs().max().item() <= LOGITS_ATOL, f"tp={tp}"


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_smollm2_gguf_logits_match_transformers(smollm2_gguf, smollm2_reader, smollm2_transformers_model):
    tok = smollm2_reader.tokenizer()
    tokens = tok.encode(REAL_TEXT)[:300]
    assert len(tokens) == 300
    model = smollm2_transformers_model
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0]
    for cp in (1, 2):
        logits = spawn(logits_job, cp, ("gguf", str(smollm2_gguf), 1, cp, 1, tokens), timeout_s=JOB_TIMEOUT_S)[0]
        assert (logits - ref).abs().max().item() <= LOGITS_ATOL, f"cp={cp}"
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.unit
def test_405b_preset_dimensions_and_parameter_count():
    c = get_preset("llama3.1-405b")
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads) == \
        (126, 16384, 53248, 128, 8)
    assert abs(c.num_parameters() - 405.8e9) / 405.8e9 < 0.005


# RoPE applied from the round's tables, each element against float64 on the same table values:
# at most two roundings of the unit roundoff u (2^-8 bf16, 2^-24 float32) of |x_i cos_i| + |x_j sin_i|:
# the elementwise path rounds x*cos and the sum, the matrix path (float32 accumulation) the
# products (exact for bf16 inputs) and the sum.  Measured 1.9 u (elementwise), 1.0 u (matrix, bf16).
ROPE_REL = {torch.bfloat16: 2 * 2.0 ** -8, torch.float32: 2 * 2.0 ** -24}


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matrix_and_elementwise_paths_match_float64_rotate_half(dtype):
    from cp_megatron.model.config import RopeScaling
    from cp_megatron.model.rope import (ROPE_MATRIX_MAX_TOKENS, apply_rope_tables, inv_frequencies,
                                        rope_cos_sin, rope_tables)

    dh, heads = 128, 3
    inv_freq = inv_frequencies(dh, 500000.0, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=8192))
    g = torch.Generator().manual_seed(0)
    for t in (1, 5, ROPE_MATRIX_MAX_TOKENS, ROPE_MATRIX_MAX_TOKENS + 1):
        positions = torch.randint(0, 1 << 20, (t,), generator=g)
        qkv = torch.randn(t, heads + 2, dh, generator=g).to(dtype)
        x = qkv[:, :heads]                                   # a view with qkv's row stride, as the layer's
        tables = rope_tables(positions, inv_freq, dtype)
        assert (tables.rotation is not None) == (t <= ROPE_MATRIX_MAX_TOKENS)
        out = apply_rope_tables(x, tables)
        assert out.dtype == dtype and out.shape == x.shape
        cos, sin = (c.to(dtype).double()[:, None, :] for c in rope_cos_sin(positions, inv_freq))
        x64 = x.double()
        rotated = torch.cat([-x64[..., dh // 2:], x64[..., :dh // 2]], dim=-1)     # HF rotate_half
        ref = x64 * cos + rotated * sin
        bound = ROPE_REL[dtype] * (x64.abs() * cos.abs() + rotated.abs() * sin.abs())
        assert ((out.double() - ref).abs() <= bound + 1e-30).all(), t
