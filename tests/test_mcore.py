"""Ring attention as a megatron-core module: a megatron-core GPTModel (local spec, CPU) with
RingCoreAttention against transformers' LlamaForCausalLM on the same weights, against our
LlamaStage (greedy tokens), at CP 1, 2, 4, TP 1, 2 and PP 2; the megatron-core checkpoint reader;
the pure weight maps; megatron-core's RoPE frequencies against transformers'."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

from cp_megatron import parallel_state
from cp_megatron.checkpoint import open_checkpoint
from cp_megatron.checkpoint.mcore_keys import fuse_fc1, fuse_qkv, hf_sources, mcore_source, split_fc1, split_qkv
from cp_megatron.engine import SamplingParams, generate
from cp_megatron.factory import build_engine
from cp_megatron.launcher import spawn
from test_model import LOGITS_ATOL, REAL_TEXT, tiny_hf_model

JOB_TIMEOUT_S = 300
NEW_TOKENS = 4
PROMPT = list(REAL_TEXT.encode()[:80])                   # turn 1 (byte tokens of a real text)
TURN2 = list(REAL_TEXT.encode()[400:430])                 # turn 2 of sequence 0, on its cached KV
OTHER = list(REAL_TEXT.encode()[600:640])                 # sequence 1, fresh, in the same rounds


def engines_job(cases: list, megatron_file: str | None):
    """Per ``(folder, tp, cp, pp)`` case (one spawn, parallel state rebuilt per case)."""
    results = [_engines(folder, tp, cp, pp, megatron_file) for folder, tp, cp, pp in cases]
    return results if parallel_state.topology().rank == 0 else None  # engine.forward: logits on every rank


def _engines(folder: str, tp: int, cp: int, pp: int, megatron_file: str | None):
    """Turn 1 of sequence 0 (prefill then partial prefill: all logits), then a round of
    turn 2 of sequence 0 (cached) with a fresh sequence 1 and greedy decode, on the
    megatron-core path and on LlamaStage; at TP 1 CP 1 also from a megatron-core state dict
    saved by the GPTModel itself (``megatron_file``)."""
    topo = parallel_state.initialize(tp, cp, pp)
    megatron_file = megatron_file if tp * cp * pp == 1 else None
    hf = open_checkpoint("hf", folder)
    runs = [("megatron-core", hf), ("native", hf)]
    if megatron_file is not None:
        mc = build_engine(hf, topo, implementation="megatron-core")
        torch.save({"model": mc.stage.model.state_dict()}, megatron_file)
        runs.append(("megatron-core", open_checkpoint("megatron", megatron_file)))
    out = []
    for implementation, reader in runs:
        engine = build_engine(reader, topo, implementation=implementation)
        full, _ = engine.forward({0: PROMPT[:-5]}, all_logits=True)
        partial, m = engine.forward({0: PROMPT[-5:]}, all_logits=True)
        assert m.kind == "partial-prefill" and m.cached_tokens == len(PROMPT) - 5
        gens, rounds = generate(engine, {0: TURN2, 1: OTHER}, SamplingParams(max_new_tokens=NEW_TOKENS))
        assert rounds[0].cached_tokens == len(PROMPT) and rounds[-1].kind == "decode"
        out.append((implementation, torch.cat([full, partial]), gens[0].token_ids, gens[1].token_ids))
    return out


def _greedy(model, tokens: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (the oracle for our decode rounds)."""
    ids = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(tokens):]


@functools.lru_cache(maxsize=None)
def _reference(root: str, tie: bool):
    model = tiny_hf_model(tie)
    folder = Path(root) / f"tiny-{'tied' if tie else 'untied'}"
    model.save_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    turn2 = _greedy(model, PROMPT + TURN2, NEW_TOKENS)
    other = _greedy(model, OTHER, NEW_TOKENS)
    return str(folder), logits, turn2, other


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mcore"))


# (world size, [(tied embeddings, tp, cp, pp)]): CP 1, 2, 4, TP 1, 2 and PP 2 in two spawns
GRIDS = {"tp1-cp1": (1, [(False, 1, 1, 1)]),
         "world4": (4, [(False, 1, 4, 1), (True, 2, 2, 1), (True, 1, 2, 2)])}


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
@pytest.mark.parametrize("grid", list(GRIDS))
def test_megatron_core_gpt_matches_transformers_and_llama_stage(root, tmp_path, grid):
    world, cases = GRIDS[grid]
    refs = [_reference(root, tie) for tie, *_grid in cases]
    megatron_file = str(tmp_path / "model_optim_rng.pt")
    shutil.copy(Path(refs[0][0]) / "config.json", tmp_path / "config.json")
    results = spawn(engines_job, world, ([(r[0], *grid) for r, (_t, *grid) in zip(refs, cases)], megatron_file),
                    timeout_s=JOB_TIMEOUT_S)[0]
    for (folder, ref, turn2, other), (tie, tp, cp, pp), runs in zip(refs, cases, results):
        case = f"tp={tp} cp={cp} pp={pp} tied={tie}"
        assert [r[0] for r in runs] == ["megatron-core", "native"] + (["megatron-core"] if tp * cp * pp == 1 else [])
        for implementation, logits, tokens0, tokens1 in runs:
            # float32 end to end; the same bound as the LlamaStage tests (test_model.py).
            assert (logits - ref).abs().max().item() <= LOGITS_ATOL, (case, implementation)
            assert torch.equal(logits.argmax(-1), ref.argmax(-1)), (case, implementation)
            assert tokens0 == turn2, f"{case} {implementation}: turn 2 on the cached KV differs from transformers"
            assert tokens1 == other, f"{case} {implementation}: fresh sequence differs from transformers"
        mcore, native = runs[0], runs[1]
        assert mcore[2:] == native[2:], f"{case}: megatron-core path and LlamaStage give different greedy tokens"


@pytest.mark.unit
def test_qkv_and_fc1_maps_are_megatron_group_major_and_invert():
    # 2 groups x (2 q heads + k + v), head_dim 1, hidden 3: rows named by their source
    q = torch.arange(4.0)[:, None].expand(4, 3) + 100          # q heads 0..3 (groups 0,0,1,1)
    k = torch.arange(2.0)[:, None].expand(2, 3) + 200
    v = torch.arange(2.0)[:, None].expand(2, 3) + 300
    fused = fuse_qkv(q, k, v, num_groups=2)
    assert fused[:, 0].tolist() == [100, 101, 200, 300, 102, 103, 201, 301]
    for got, want in zip(split_qkv(fused, num_groups=2, head_dim=1), (q, k, v)):
        assert torch.equal(got, want)
    gate, up = torch.zeros(2, 3), torch.ones(2, 3)
    assert [torch.equal(a, b) for a, b in zip(split_fc1(fuse_fc1(gate, up)), (gate, up))] == [True, True]


@pytest.mark.unit
def test_name_maps_are_inverse():
    from cp_megatron.checkpoint import keys
    from cp_megatron.model.config import get_preset

    config = get_preset("tiny")
    names = keys.canonical_names(config.num_layers, config.tie_word_embeddings)
    for hf in names:
        source, _part = mcore_source(hf)
        assert hf in hf_sources(source, config)[0], (hf, source)
    assert hf_sources("decoder.layers.1.self_attention.linear_qkv.weight", config) == (
        [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"], 0)


@pytest.mark.unit
def test_megatron_core_rope_scaling_matches_transformers_llama3():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from cp_megatron.mcore.stage import megatron_rope_args
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.rope import inv_frequencies

    c = get_preset("llama3.1-8b")
    args = megatron_rope_args(c)
    assert args == {"rope_scaling": True, "rope_scaling_factor": 8.0}
    ours = RotaryEmbedding(kv_channels=c.head_dim, rotary_percent=1.0, rotary_base=c.rope_theta,
                           use_cpu_initialization=True, **args).inv_freq
    hf_cfg = LlamaConfig(hidden_size=c.hidden_size, num_attention_heads=c.num_heads, rope_theta=c.rope_theta,
                         max_position_embeddings=c.max_position_embeddings,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    # The same float32 formula in both; 1 ulp of headroom for a different op order.
    torch.testing.assert_close(ours, hf_inv.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling), rtol=1e-6, atol=0)
    # A scaling megatron-core cannot express (original context 64) is installed from rope.py.
    assert megatron_rope_args(c.with_(rope_scaling=c.rope_scaling.__class__(original_max_position_embeddings=64))) \
        == {"rope_scaling": False}


@pytest.mark.unit
def test_ring_core_attention_refuses_what_the_ring_does_not_compute():
    from megatron.core.transformer.enums import AttnMaskType

    from cp_megatron.mcore import RingCoreAttention, RingRoundParams, transformer_config
    from cp_megatron.model.config import get_preset

    tc = transformer_config(get_preset("tiny"))
    ok = RingCoreAttention(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                           cp_comm_type="p2p")
    assert (ok.num_heads, ok.num_kv_heads, ok.head_dim) == (4, 2, 16)
    with pytest.raises(ValueError, match="causal"):
        RingCoreAttention(config=tc, layer_number=1, attn_mask_type=AttnMaskType.padding, attention_type="self")
    with pytest.raises(ValueError, match="softmax_scale"):
        RingCoreAttention(config=tc, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                          softmax_scale=0.5)
    q = torch.zeros(3, 1, 4, 16)
    with pytest.raises(ValueError, match="RingRoundParams"):
        ok(q, q[:, :, :2], q[:, :, :2], None)
    with pytest.raises(ValueError, match="qkv_format"):
        RingRoundParams(qkv_format="thd")


@pytest.mark.unit
@pytest.mark.parametrize("overrides, key", [
    (["model.implementation=megatron-core", "model.weights=fp8-rowwise"], "model"),
    (["model.implementation=mcore"], "model.implementation"),
])
def test_megatron_core_implementation_refuses_fp8_and_typos_with_exit_2(tmp_path, capsys, overrides, key):
    from cp_megatron.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {format: dummy, preset: tiny}\nprompt: {random_tokens: 8}\ngeneration: {max_new_tokens: 1}\n")
    code = main(["run", str(cfg), *[a for o in overrides for a in ("--set", o)]])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cp-megatron:")]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"cp-megatron: config error: {key}"), lines


def _megatron_state_dict(reader) -> dict:
    """A megatron-core GPTModel state dict (TP 1) of ``reader``'s tensors, built with the maps."""
    from cp_megatron.checkpoint.mcore_keys import FC1, QKV

    config, state = reader.config, {}
    for hf in reader.names():
        source, _part = mcore_source(hf)
        if source in state:
            continue
        parts = [reader.read(name) for name in hf_sources(source, config)[0]]
        state[source] = (fuse_qkv(*parts, num_groups=config.num_kv_heads) if source.endswith(QKV)
                         else fuse_fc1(*parts) if source.endswith(FC1) else parts[0])
    return state


def _llama_args(preset, **overrides):
    """Megatron-LM ``args`` of a Llama model with ``preset``'s dimensions."""
    import argparse

    args = dict(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, position_embedding_type="rope",
        normalization="RMSNorm", swiglu=True, add_bias_linear=False, num_layers=preset.num_layers,
        hidden_size=preset.hidden_size, ffn_hidden_size=preset.intermediate_size,
        num_attention_heads=preset.num_heads, group_query_attention=True, num_query_groups=preset.num_kv_heads,
        kv_channels=preset.head_dim, padded_vocab_size=preset.vocab_size, rotary_base=preset.rope_theta,
        norm_epsilon=preset.rms_norm_eps, max_position_embeddings=preset.max_position_embeddings,
        untie_embeddings_and_output_weights=not preset.tie_word_embeddings, use_rope_scaling=False)
    return argparse.Namespace(**{**args, **overrides})


def _tiny_megatron_file(tmp_path, preset=None, **extra) -> tuple[Path, object]:
    """``model_optim_rng.pt`` of the tiny preset's dummy weights: ``{"model", "args", **extra}``."""
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    preset = preset or get_preset("tiny")
    dummy = DummyReader(preset, seed=3)
    file = tmp_path / "model_optim_rng.pt"
    torch.save({"model": _megatron_state_dict(dummy), "args": _llama_args(preset), **extra}, file)
    return file, dummy


@pytest.mark.unit
def test_megatron_lm_save_folder_with_args_reads_back_every_tensor(tmp_path):
    from cp_megatron.checkpoint.megatron import MegatronReader
    from cp_megatron.model.config import get_preset

    preset = get_preset("tiny")
    folder = tmp_path / "iter_0000020" / "mp_rank_00"
    folder.mkdir(parents=True)
    _file, dummy = _tiny_megatron_file(folder, iteration=20)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20\n")
    reader = MegatronReader(tmp_path)
    assert reader.config == preset.with_(name=str(tmp_path))
    for name in dummy.names():
        assert torch.equal(reader.read(name), dummy.read(name)), name
        if name.endswith("_proj.weight"):   # a TP slice of a fused tensor is that of the HF tensor
            assert torch.equal(reader.read(name, shard_dim=0, tp_rank=1, tp_size=2),
                               dummy.read(name, shard_dim=0, tp_rank=1, tp_size=2)), name
    (tmp_path / "iter_0000020" / "mp_rank_01").mkdir()
    with pytest.raises(ValueError, match="TP 1 PP 1"):
        MegatronReader(tmp_path)


@pytest.mark.unit
def test_megatron_rng_state_and_bookkeeping_entries_load_and_are_ignored(tmp_path):
    import random

    import numpy as np

    from cp_megatron.checkpoint.megatron import MegatronReader

    # Megatron-LM's rng_state (checkpointing.py get_rng_state): python, numpy and torch generators
    rng_state = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                  "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]
    file, dummy = _tiny_megatron_file(tmp_path, rng_state=rng_state, iteration=3)
    obj = torch.load(file, weights_only=False)
    obj["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None   # as Transformer Engine saves
    obj["model"]["rotary_pos_emb.inv_freq"] = torch.ones(8)
    torch.save(obj, file)
    reader = MegatronReader(file)
    for name in dummy.names():
        assert torch.equal(reader.read(name), dummy.read(name)), name


@pytest.mark.unit
def test_megatron_config_that_disagrees_with_the_file_is_refused(tmp_path):
    import json

    from cp_megatron.checkpoint.convert import hf_config
    from cp_megatron.checkpoint.megatron import MegatronReader

    file, dummy = _tiny_megatron_file(tmp_path)
    config = dummy.config
    assert not config.tie_word_embeddings and config.num_layers == 2
    for case, wrong, unused in [("1 layer", config.with_(num_layers=1), "decoder.layers.1."),
                                ("tied", config.with_(tie_word_embeddings=True), "output_layer.weight")]:
        (tmp_path / "config.json").write_text(json.dumps(hf_config(wrong, torch.float32)))
        with pytest.raises(ValueError) as err:
            MegatronReader(file)
        msg = str(err.value)
        assert len(msg.splitlines()) == 1 and unused in msg, (case, msg)
        assert "config.json and the file disagree" in msg, (case, msg)
    (tmp_path / "config.json").unlink()      # the same through Megatron-LM's args
    obj = torch.load(file, weights_only=False)
    obj["args"].num_layers = 1
    torch.save(obj, file)
    with pytest.raises(ValueError, match=r"num_layers=1, .*decoder\.layers\.1\..*args and the file disagree"):
        MegatronReader(file)


@pytest.mark.unit
@pytest.mark.parametrize("flag, value", [("add_qkv_bias", True), ("qk_layernorm", True), ("num_experts", 8),
                                         ("rotary_interleaved", True), ("apply_layernorm_1p", True)])
def test_megatron_args_of_a_non_llama_model_are_refused_by_name(tmp_path, flag, value):
    from cp_megatron.checkpoint.megatron import MegatronReader

    file, _dummy = _tiny_megatron_file(tmp_path)
    obj = torch.load(file, weights_only=False)
    setattr(obj["args"], flag, value)
    torch.save(obj, file)
    with pytest.raises(ValueError, match=rf"^{file}: args\.{flag}={value!r}, a Llama model needs"):
        MegatronReader(file)


@pytest.mark.unit
def test_megatron_bad_files_get_one_line_naming_the_file_or_key(tmp_path):
    from cp_megatron.checkpoint.megatron import MegatronReader

    file, _dummy = _tiny_megatron_file(tmp_path)
    obj = torch.load(file, weights_only=False)
    obj["model"]["decoder.final_layernorm.weight"] = [1.0, 2.0]
    torch.save(obj, file)
    with pytest.raises(ValueError, match=r"decoder\.final_layernorm\.weight holds a list, expected a tensor"):
        MegatronReader(file)
    for content in (b"", b"not a torch file"):
        file.write_bytes(content)
        with pytest.raises(ValueError, match="not a torch zip checkpoint"):
            MegatronReader(file)
    tracker = tmp_path / "save" / "latest_checkpointed_iteration.txt"
    tracker.parent.mkdir()
    tracker.write_text("abc\n")
    with pytest.raises(ValueError, match=rf"^{tracker}: expected an iteration number or 'release', got 'abc'$"):
        MegatronReader(tracker.parent)
    tracker.write_text("20\n")
    it = tracker.parent / "iter_0000020"
    (it / "mp_rank_00").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"mp_rank_00/model_optim_rng\.pt: no such file"):
        MegatronReader(tracker.parent)
    (it / "mp_rank_00").rmdir()     # Megatron-LM's default --ckpt-format torch_dist
    for name in (".metadata", "__0_0.distcp", "common.pt", "metadata.json"):
        (it / name).write_bytes(b"")
    for path in (tracker.parent, it):
        with pytest.raises(ValueError, match="torch_dist checkpoint .*--ckpt-format torch"):
            MegatronReader(path)


@pytest.mark.unit
@pytest.mark.parametrize("defect, first_words", [
    ("1-layer config", "tensor(s) that the model of"),
    ("tracker abc", "expected an iteration number or 'release'"),
])
def test_megatron_reader_refusals_are_one_line_exit_2_before_any_rank(tmp_path, capsys, monkeypatch, defect,
                                                                      first_words):
    import json

    import cp_megatron.launcher
    from cp_megatron.checkpoint.convert import hf_config
    from cp_megatron.cli import main

    file, dummy = _tiny_megatron_file(tmp_path)
    if defect == "1-layer config":
        (tmp_path / "config.json").write_text(json.dumps(hf_config(dummy.config.with_(num_layers=1), torch.float32)))
        path = file
    else:
        path = tmp_path / "save"
        path.mkdir()
        (path / "latest_checkpointed_iteration.txt").write_text("abc")
    monkeypatch.setattr(cp_megatron.launcher, "spawn", lambda *a, **k: pytest.fail("ranks started"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{format: megatron, path: {path}}}\nprompt: {{random_tokens: 8}}\n"
                   "generation: {max_new_tokens: 1}\n")
    code = main(["run", str(cfg)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cp-megatron:")]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("cp-megatron: config error: model: ") and first_words in lines[0], \
        lines
