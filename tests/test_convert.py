"""``cp-megatron convert`` and the sharded checkpoint format, against their oracles.

Tensors: the transformers state dict of the source model, compared exactly (conversion
copies bytes and slices, it never rounds unless --dtype asks).  Logits: the source
checkpoint through the same model code (float32, max |diff| <= 1e-5).  Tokens: ``cp-megatron
run`` on the source.  Files: ``safetensors.safe_open`` reads what the streaming writer wrote.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cp_megatron import cli, parallel_state
from cp_megatron.checkpoint import CheckpointError, open_checkpoint
from cp_megatron.checkpoint.convert import convert, convert_reader
from cp_megatron.checkpoint.sharded import METADATA_FILE, SafetensorsWriter, shard_file
from cp_megatron.engine import InferenceEngine
from cp_megatron.launcher import spawn
from cp_megatron.model.config import ModelConfig
from cp_megatron.model.llama import LlamaStage, StageLayout
from cp_megatron.model.weights import DummyReader, load_weights
from test_checkpoint import (EXACT, LLAMA31, assert_reads_match, meta_twin_model, tiny_llama, write_meta,
                             write_tiny_gguf)

REPO = Path(__file__).resolve().parents[1]
LOGITS_ATOL = 1e-5  # float32; source and converted weights are bit-identical, only the file differs
JOB_TIMEOUT_S = 300
SPLIT_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1,
             "embed_tokens": 0, "lm_head": 0}


def expected_split(name):
    """TP split dim per megatron-core (column-parallel 0, row-parallel 1, norms replicated)."""
    return next((d for key, d in SPLIT_DIM.items() if f"{key}.weight" in name), None)


def logits_of(specs, tp, tokens):
    """Rank 0: float32 logits of one full prefill of ``tokens`` through each (format, path)."""
    topo = parallel_state.initialize(tp, 1, 1)
    out = []
    for fmt, path in specs:
        reader = open_checkpoint(fmt, path)
        stage = LlamaStage(reader.config, StageLayout(tp, topo.tp_rank, 1, 0))
        load_weights(stage, reader)
        out.append(InferenceEngine(stage, topo).forward({0: tokens}, all_logits=True)[0])
    return out if topo.rank == 0 else None


def run_convert_cli(capsys, *args):
    """``cp-megatron convert ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(["convert", *map(str, args), "--no-progress"])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def no_leftovers(dst):
    return not os.path.exists(dst) and not glob.glob(f"{dst}.tmp-*")


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """Tiny HF checkpoints (save_pretrained, sharded by size): {variant: (folder, state dict, model)}."""
    out = {}
    for seed, (variant, kwargs) in enumerate({"llama31": {"rope_scaling": LLAMA31}, "tied": {"tie": True}}.items()):
        model = tiny_llama(seed=seed, **kwargs).eval()
        folder = tmp_path_factory.mktemp(f"hf_{variant}")
        model.save_pretrained(folder, max_shard_size="20KB")
        out[variant] = (folder, {k: v.clone() for k, v in model.state_dict().items()}, model)
    return out


# --------------------------------------------------------------------------- the writer
@pytest.mark.unit
def test_streaming_writer_output_reads_back_with_safe_open(tmp_path):
    tensors = {"a.weight": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c.weight": torch.randn(2, 3, dtype=torch.float16)}
    path = str(tmp_path / "x.safetensors")
    writer = SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"format": "pt", "k": "v"})
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    assert os.path.getsize(path) == writer.nbytes
    header_len = int.from_bytes(open(path, "rb").read(8), "little")
    assert header_len % 8 == 0  # data 8-byte aligned, as safetensors writes it
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"} and list(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t)
    writer = SafetensorsWriter(str(tmp_path / "y.safetensors"), [("a", torch.float32, (2,))])
    with pytest.raises(ValueError, match=r"expected tensor a torch.float32 \(2,\), got a torch.float32 \(3,\)"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="closed after 0 of 1 tensors"):
        writer.close()
    writer.abort()


# --------------------------------------------------------------------------- HF round trip
@pytest.mark.unit
@pytest.mark.parametrize("variant", ["llama31", "tied"])
def test_hf_to_sharded_tp2_to_hf_is_bit_identical(hf_tiny, tmp_path, variant):
    src, sd, model = hf_tiny[variant]
    sharded, back = tmp_path / "sharded", tmp_path / "back"
    convert("hf", src, "sharded", sharded, tp=2, progress=False)
    assert sorted(os.listdir(sharded)) == sorted([METADATA_FILE, "generation_config.json",
                                                  shard_file(0, 2), shard_file(1, 2)])
    source = open_checkpoint("hf", src)
    meta = json.loads((sharded / METADATA_FILE).read_text())
    assert meta["tp_size"] == 2 and meta["dtype"] == "float32" and meta["source"]["format"] == "hf"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["source"]["digest"]["sha256"])
    assert ModelConfig.from_dict(meta["model"]) == source.config
    for rank in range(2):  # each shard file holds exactly that rank's slices; norms whole in both
        with safe_open(str(sharded / shard_file(rank, 2)), framework="pt") as f:
            assert sorted(f.keys()) == sorted(source.names())
            for name in source.names():
                dim = expected_split(name)
                assert meta["tensors"][name] == {"shape": list(sd[name].shape), "split_dim": dim, "dtype": "float32"}
                want = sd[name] if dim is None else sd[name].chunk(2, dim)[rank]
                torch.testing.assert_close(f.get_tensor(name), want, **EXACT, msg=lambda m: f"{name}: {m}")

    convert("sharded", sharded, "hf", back, max_shard_bytes=60_000, progress=False)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    stored = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(back / file), framework="pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys()})
    original_keys = set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    assert set(stored) == original_keys == set(index["weight_map"])
    for name, tensor in stored.items():
        assert tensor.dtype == sd[name].dtype and torch.equal(tensor, sd[name]), name
    assert open_checkpoint("hf", back).config == source.config.with_(name=str(back))

    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(back).eval()
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, **EXACT)


@pytest.mark.unit
def test_sharded_reader_reslices_stored_tp2_for_tp_1_2_4(tmp_path):
    model = tiny_llama(seed=4, heads=8, kv_heads=4)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "hf")
    convert("hf", tmp_path / "hf", "sharded", tmp_path / "tp2", tp=2, progress=False)
    reader = open_checkpoint("sharded", tmp_path / "tp2")
    assert reader.tp_size == 2
    assert_reads_match(reader, sd, tp_sizes=(1, 2, 4))
    opened = []  # at the stored TP size a rank opens its own file only
    real_open = reader._open
    reader._open = lambda rank: opened.append(rank) or real_open(rank)
    reader.release()
    for name in reader.names():
        dim = expected_split(name)
        if dim is None:
            reader.read(name)
        else:
            reader.read(name, shard_dim=dim, tp_rank=1, tp_size=2)
    assert set(opened) == {1}


@pytest.mark.unit
def test_gguf_source_reopened_every_chunk_is_parsed_once_and_copied_exactly(tmp_path, monkeypatch):
    # the converter drops a GGUF source's map every REOPEN_BYTES; the reopen reuses the parsed header
    from cp_megatron.checkpoint import convert as convert_module, gguf_reader

    model = tiny_llama(seed=7)
    write_tiny_gguf(tmp_path / "s.gguf", model)
    parses, real = [], gguf_reader._GGUFHeaderReader
    monkeypatch.setattr(gguf_reader, "_GGUFHeaderReader", lambda *a: parses.append(a) or real(*a))
    monkeypatch.setattr(convert_module, "REOPEN_BYTES", 1)   # reopen after every tensor
    opened = []
    monkeypatch.setattr(gguf_reader.GGUFCheckpoint, "__init__",
                        lambda self, *a, _init=gguf_reader.GGUFCheckpoint.__init__: opened.append(a) or _init(self, *a))
    convert("gguf", tmp_path / "s.gguf", "sharded", tmp_path / "tp1", progress=False)
    assert len(parses) == 1 and len(opened) > len(model.state_dict()), (len(parses), len(opened))
    assert_reads_match(open_checkpoint("sharded", tmp_path / "tp1"), model.state_dict(), tp_sizes=())


# --------------------------------------------------------------------------- Meta and GGUF logits
@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_meta_mp2_to_sharded_tp4_logits_equal_source(tmp_path):
    model = meta_twin_model()
    meta = tmp_path / "meta"
    write_meta(meta, {k: v.clone() for k, v in model.state_dict().items()}, mp=2, embed_dim=0)
    (meta / "tokenizer.model").write_bytes(  # 256 single-byte ranks (see test_checkpoint)
        b"".join(base64.b64encode(bytes([i])) + b" %d\n" % i for i in range(256)))
    convert("meta", meta, "sharded", tmp_path / "tp4", tp=4, progress=False)
    converted = open_checkpoint("sharded", tmp_path / "tp4")
    assert converted.config == open_checkpoint("meta", meta).config.with_(name=str(tmp_path / "tp4"))
    tok = converted.tokenizer()
    assert (tok.bos_id, tok.eos_ids) == (256, (257, 264, 265))

    tokens = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    src, dst = spawn(logits_of, 4, ([("meta", str(meta)), ("sharded", str(tmp_path / "tp4"))], 4, tokens),
                     timeout_s=JOB_TIMEOUT_S)[0]
    assert (src - dst).abs().max().item() <= LOGITS_ATOL
    with torch.no_grad():  # and the source itself is right (transformers, the model test's bound)
        assert (dst - model(torch.tensor([tokens])).logits[0]).abs().max().item() <= 1e-3


@pytest.fixture(scope="module")
def smollm2_tp1(smollm2_gguf, tmp_path_factory):
    """SmolLM2 GGUF (Q4_1/Q8_0) converted to a TP1 sharded checkpoint (dequantized, float32)."""
    dst = tmp_path_factory.mktemp("smollm2") / "tp1"
    convert("gguf", smollm2_gguf, "sharded", dst, tp=1, progress=False)
    return dst


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_gguf_smollm2_to_sharded_tp1_logits_and_tokenizer_equal_source(smollm2_gguf, smollm2_reader, smollm2_tp1):
    meta = json.loads((smollm2_tp1 / METADATA_FILE).read_text())
    assert meta["dtype"] == "float32" and meta["tokenizer"]["files"] == ["tokenizer.json", "tokenizer_config.json"]
    converted = open_checkpoint("sharded", smollm2_tp1)
    src_tok, dst_tok = smollm2_reader.tokenizer(), converted.tokenizer()
    from test_model import REAL_TEXT

    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert dst_tok.encode(REAL_TEXT) == src_tok.encode(REAL_TEXT)
    assert dst_tok.apply_chat_template(messages) == src_tok.apply_chat_template(messages)
    assert (dst_tok.bos_id, dst_tok.eos_ids, dst_tok.add_bos_default) == \
        (src_tok.bos_id, src_tok.eos_ids, src_tok.add_bos_default)

    tokens = src_tok.encode(REAL_TEXT)[:32]
    src, dst = spawn(logits_of, 1, ([("gguf", str(smollm2_gguf)), ("sharded", str(smollm2_tp1))], 1, tokens),
                     timeout_s=JOB_TIMEOUT_S)[0]
    assert (src - dst).abs().max().item() <= LOGITS_ATOL


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_cli_run_on_converted_smollm2_gives_source_tokens(smollm2_gguf, smollm2_tp1, tmp_path):
    tokens = {}
    for fmt, path in (("gguf", smollm2_gguf), ("sharded", smollm2_tp1)):
        cfg = tmp_path / f"{fmt}.yaml"
        cfg.write_text(f"model: {{format: {fmt}, path: '{path}'}}\nprompt: {{text: 'The capital of France is'}}\n"
                       "generation: {max_new_tokens: 8}\n")
        proc = subprocess.run([sys.executable, "-m", "cp_megatron.cli", "run", str(cfg), "--output",
                               str(tmp_path / f"{fmt}.json")], capture_output=True, text=True, timeout=200, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        tokens[fmt] = json.loads((tmp_path / f"{fmt}.json").read_text())["token_ids"]
    assert len(tokens["gguf"]) == 8 and tokens["sharded"] == tokens["gguf"]


# --------------------------------------------------------------------------- CLI
@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_cli_bf16_verify_prints_zero_diff_and_summary_line(hf_tiny, tmp_path, capsys):
    src, sd, _ = hf_tiny["llama31"]
    code, out, err = run_convert_cli(capsys, "--from", "hf", src, "--to", "sharded", tmp_path / "bf16",
                                     "--tp", 2, "--dtype", "bf16", "--verify")
    assert code == 0, err
    lines = out.strip().splitlines()
    diff = float(re.search(r"verify: max \|logits\(source\) - logits\(converted\)\| = (\S+) over 32 tokens",
                           lines[-2]).group(1))
    assert diff <= LOGITS_ATOL  # source rounded to bf16 vs converted bf16: the same weights
    assert re.fullmatch(r"wrote sharded checkpoint .*bf16: \d+\.\d{3} GB in \d+\.\d s \(\d+\.\d MB/s\)", lines[-1])
    reader = open_checkpoint("sharded", tmp_path / "bf16")
    name = "model.layers.1.mlp.down_proj.weight"
    assert reader.read(name, dtype=torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(reader.read(name, dtype=torch.bfloat16), sd[name].to(torch.bfloat16), **EXACT)


@pytest.mark.unit
def test_errors_are_one_line_exit_2_naming_the_file(hf_tiny, tmp_path, capsys):
    src = hf_tiny["llama31"][0]
    dst = tmp_path / "out"

    def fails(*args, match):
        code, out, err = run_convert_cli(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(match, err), err
        assert no_leftovers(dst)

    broken = Path(shutil.copytree(src, tmp_path / "truncated"))
    victim = sorted(broken.glob("*.safetensors"))[3]
    os.truncate(victim, os.path.getsize(victim) - 100)
    fails("--from", "hf", broken, "--to", "sharded", dst, match=rf"{victim.name}: cannot parse safetensors file")
    missing = Path(shutil.copytree(src, tmp_path / "missing"))
    index = json.loads((missing / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.self_attn.v_proj.weight"]
    (missing / "model.safetensors.index.json").write_text(json.dumps(index))
    fails("--from", "hf", missing, "--to", "sharded", dst,
          match=r"model.safetensors.index.json: no entry for tensor model.layers.0.self_attn.v_proj.weight")
    fails("--from", "onnx", src, "--to", "sharded", dst,
          match=rf"{re.escape(str(src))}: unknown checkpoint format 'onnx'")
    fails("--from", "hf", src, "--to", "gguf", dst, match=rf"{re.escape(str(dst))}: unknown output format 'gguf'")
    fails("--from", "hf", src, "--to", "sharded", dst, "--tp", 4, match=r"tp=4 does not divide num_kv_heads=2")
    fails("--from", "hf", src, "--to", "sharded", dst, "--dtype", "fp8", match=r"--dtype: invalid choice")

    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "not_a_checkpoint" / "notes.txt").write_text("keep me")
    code, _, err = run_convert_cli(capsys, "--from", "hf", src, "--to", "hf", tmp_path / "not_a_checkpoint",
                                   "--overwrite")
    assert code == 2 and "--overwrite replaces checkpoint folders only" in err
    assert (tmp_path / "not_a_checkpoint" / "notes.txt").exists()

    code, _, err = run_convert_cli(capsys, "--from", "hf", src, "--to", "sharded", dst)
    assert code == 0 and open_checkpoint("sharded", dst).tp_size == 1, err
    code, _, err = run_convert_cli(capsys, "--from", "hf", src, "--to", "sharded", dst, "--tp", 2)
    assert code == 2 and err.strip() == f"cp-megatron convert: {dst}: already exists (pass --overwrite to replace it)"
    (tmp_path / "out.tmp-stale").mkdir()  # what a SIGKILLed conversion leaves
    code, _, err = run_convert_cli(capsys, "--from", "hf", src, "--to", "sharded", dst, "--tp", 2, "--overwrite")
    assert code == 0 and "out.tmp-stale left by an interrupted conversion" in err
    assert open_checkpoint("sharded", dst).tp_size == 2 and not glob.glob(f"{dst}.old-*")

    os.truncate(dst / shard_file(1, 2), os.path.getsize(dst / shard_file(1, 2)) - 8)
    with pytest.raises(CheckpointError, match=rf"{shard_file(1, 2)}: \d+ bytes, metadata says \d+ \(truncated"):
        open_checkpoint("sharded", dst)


@pytest.mark.unit
def test_interrupt_mid_conversion_removes_the_temporary_folder(hf_tiny, tmp_path, monkeypatch):
    src = hf_tiny["llama31"][0]
    calls = []

    def interrupted(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_write(self, name, tensor)

    real_write = SafetensorsWriter.write
    monkeypatch.setattr(SafetensorsWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert("hf", src, "sharded", tmp_path / "out", tp=2, progress=False)
    assert len(calls) == 5 and no_leftovers(tmp_path / "out") and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- killed mid-way
BIG = ModelConfig(name="big", vocab_size=16384, hidden_size=1024, intermediate_size=4096, num_layers=2,
                  num_heads=8, num_kv_heads=8, head_dim=128)  # 64M parameters: 256 MB float32


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_killed_conversion_leaves_no_loadable_output(tmp_path):
    src, dst = tmp_path / "big", tmp_path / "out"
    convert_reader(DummyReader(BIG), "hf", src, max_shard_bytes=10**8, progress=False)
    assert sum(os.path.getsize(p) for p in src.iterdir()) > 250e6
    cmd = [sys.executable, "-m", "cp_megatron.cli", "convert", "--from", "hf", str(src), "--to", "sharded",
           str(dst), "--tp", "2", "--dtype", "bf16", "--no-progress"]
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not [p for p in glob.glob(f"{dst}.tmp-*/*.safetensors") if os.path.getsize(p) > 2**20]:
                assert proc.poll() is None and time.monotonic() < deadline, "conversion ended before the kill"
                time.sleep(0.005)
            assert proc.poll() is None
            proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
        assert not dst.exists()
        with pytest.raises(CheckpointError):
            open_checkpoint("sharded", dst)
        leftovers = glob.glob(f"{dst}.tmp-*")
        if sig == signal.SIGKILL:  # only the temporary folder survives, and no reader accepts it
            assert code == -signal.SIGKILL and len(leftovers) == 1
            with pytest.raises(CheckpointError, match=rf"{METADATA_FILE}: file not found"):
                open_checkpoint("sharded", leftovers[0])
            shutil.rmtree(leftovers[0])
        else:  # SIGTERM: the partial output is removed, exit 128 + 15
            assert code == 128 + signal.SIGTERM and leftovers == [], proc.stderr.read()
