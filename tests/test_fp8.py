"""FP8 row-wise weights (model.weights: fp8-rowwise) against float32 / float64 oracles on the
same weights, across CP and TP sizes, through the sharded checkpoint, and as config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cp_megatron import parallel_state
from cp_megatron.checkpoint import CheckpointError, open_checkpoint
from cp_megatron.checkpoint.convert import convert_reader
from cp_megatron.engine import InferenceEngine
from cp_megatron.launcher import spawn
from cp_megatron.model import fp8
from cp_megatron.model.config import get_preset
from cp_megatron.model.llama import LlamaStage, StageLayout
from cp_megatron.model.weights import DummyReader, load_weights

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cp_megatron.cli"]
JOB_TIMEOUT_S = 300
# float8_e4m3fn keeps 3 mantissa bits: rounding to nearest moves a normal value by at most half
# an ulp, 2^-4 of its magnitude; below 2^-6 * scale (subnormals) the step is 2^-9 * scale, so
# the error is at most 2^-10 * scale.
E4M3_REL = 2.0 ** -4
E4M3_SUBNORMAL_ABS = 2.0 ** -10
# One FP8 linear vs float32 on the same input: each operand is rounded once with a relative
# error of at most 2^-4 and random sign, so the output's RMS relative error is about
# sqrt(2) * 2^-4 / sqrt(3) ~ 5% (measured 3.6% on the tiny preset, 4.8% on SmolLM2's real
# weights).  2^-4 is a bound that a wrong scale or a transposed scale broadcast exceeds by far.
LINEAR_REL_ERR = 2.0 ** -4
# Last-token logits of the whole tiny model (2 layers, 4 FP8 linears each: qkv, o, gate/up, down) vs float32:
# measured 2.1% (bf16 weights give 0.55%); bound 5%.
LOGITS_REL_ERR = 0.05
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # the stage's linears (fused)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- quantisation and the matmul (unit) ------------------------------------------------------------
@pytest.mark.unit
def test_quantize_rowwise_within_half_ulp_of_e4m3():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    x[3] = 0.0                                           # an all-zero row: zeros, no NaN
    x[5, 7] = 1e4                                        # one outlier sets its row's scale
    q, scale = fp8.quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (64,)
    assert torch.equal(scale, x.abs().amax(1).clamp(min=fp8.SCALE_EPS) / 448)
    back = fp8.dequantize_rowwise(q, scale)
    assert torch.isfinite(back).all() and torch.equal(back[3], torch.zeros(96))
    bound = E4M3_REL * x.abs() + E4M3_SUBNORMAL_ABS * scale[:, None]
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    assert (back.abs().amax(1) - x.abs().amax(1)).abs().max() <= 1e-6 * x.abs().max()  # amax is exact


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantiser_is_the_weight_quantiser_up_to_float8_ties(dtype):
    """The activations' three-launch quantiser against the weights' (the oracle): a scale within
    one float32 ulp of the float64 amax / 448, zeros for an all-zero row, and the same float8
    values except where x / scale sits at a rounding midpoint (one float8 step at most)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(256, 512, generator=g) * torch.logspace(-4, 4, 256)[:, None]).to(dtype)
    x[3] = 0.0
    q, scale = fp8.quantize_activation_rows(x)
    want_q, _ = fp8.quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (256,)
    exact = x.double().abs().amax(1) / 448
    nonzero = exact > 0
    # fl(amax * fl(1/448)): two roundings of 2^-24 each (the weights' fl(amax / 448): one)
    assert ((scale.double() - exact).abs()[nonzero] <= 2.0 ** -23 * exact[nonzero]).all()
    assert scale[3] == fp8.ACT_SCALE_FLOOR and torch.equal(q[3].float(), torch.zeros(512))
    back = fp8.dequantize_rowwise(q, scale)
    bound = E4M3_REL * x.float().abs() + E4M3_SUBNORMAL_ABS * scale[:, None]
    assert torch.isfinite(back).all() and ((back - x.float()).abs() <= bound * (1 + 1e-6)).all()
    codes, want = q.view(torch.uint8).int(), want_q.view(torch.uint8).int()
    # codes of one sign are ordered by magnitude: a midpoint rounded the other way is one code apart
    assert (codes - want).abs().max() <= 1
    # measured 0.055% (bf16: ratios to the amax are often exact midpoints) and 2.4e-7 (float32)
    assert ((codes != want).float().mean() <= (2e-3 if dtype == torch.bfloat16 else 1e-5))


def _error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Element-wise bound on |fp8_linear(x, W) - x @ W.T| from the two roundings (float64)."""
    x, w = x.double(), w.double()
    sx = x.abs().amax(1, keepdim=True) / 448
    sw = w.abs().amax(1, keepdim=True) / 448
    dx = E4M3_REL * x.abs() + E4M3_SUBNORMAL_ABS * sx
    dw = E4M3_REL * w.abs() + E4M3_SUBNORMAL_ABS * sw
    # |x^ w^ - x w| <= dx (|w| + dw) + |x| dw; plus float32 accumulation (K * 2^-24 relative)
    return dx @ (w.abs() + dw).T + x.abs() @ dw.T + 1e-5 * (x.abs() @ w.abs().T)


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["scaled_mm", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_within_rounding_bound_of_float64(backend, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 80, generator=g).to(dtype)       # M, K, N not multiples of 16
    w = torch.randn(50, 80, generator=g) * 0.02
    q, scale = fp8.quantize_rowwise(w)
    y = fp8.fp8_linear(x, q, scale, backend)
    assert y.dtype == dtype and y.shape == (37, 50)
    exact = x.double() @ w.double().T
    # bf16 output adds one rounding of the result (2^-9 relative)
    out_round = 2.0 ** -9 * exact.abs() if dtype == torch.bfloat16 else 0.0
    assert ((y.double() - exact).abs() <= _error_bound(x, w) + out_round).all()


@pytest.mark.unit
def test_cpu_scaled_mm_matches_float64_product_of_quantised_operands():
    """torch 2.13's CPU _scaled_mm (row-wise scales, float32 out) is the exact product of the
    dequantised operands up to float32 accumulation; the emulated path computes the same."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(33, 64, generator=g), torch.randn(48, 64, generator=g)
    wq, sw = fp8.quantize_rowwise(w)
    xq, sx = fp8.quantize_activation_rows(x)           # what fp8_linear quantises x with
    oracle = fp8.dequantize_rowwise(xq, sx, torch.float64) @ fp8.dequantize_rowwise(wq, sw, torch.float64).T
    fast, emulated = fp8.fp8_linear(x, wq, sw, "scaled_mm"), fp8.fp8_linear(x, wq, sw, "emulated")
    # float32 accumulation of K=64 exact products: relative 1e-6 of the magnitudes is ample
    torch.testing.assert_close(fast.double(), oracle, rtol=1e-6, atol=1e-6 * oracle.abs().max().item())
    torch.testing.assert_close(fast, emulated, rtol=1e-6, atol=1e-6 * oracle.abs().max().item())
    assert fp8.fp8_linear(x[:0], wq, sw).shape == (0, 48)  # a CP rank without tokens


@pytest.mark.unit
def test_chunked_activation_quantisation_equals_one_pass(monkeypatch):
    x = torch.randn(1000, 3, 16, generator=torch.Generator().manual_seed(5))
    q1, s1 = fp8.quantize_activation_rows(x)
    monkeypatch.setattr(fp8, "QUANT_CHUNK_BYTES", 4 * 48 * 7)   # 7 rows a chunk, a ragged last one
    q2, s2 = fp8.quantize_activations(x)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


@pytest.mark.unit
@pytest.mark.parametrize("backend", ["scaled_mm", "emulated"])
def test_blocked_activation_scales_equal_the_sum_over_tp_shards(backend):
    """A row-parallel layer at TP 1 with 4 activation blocks computes what 2 or 4 TP ranks
    compute on their shards (1 or 2 blocks each) and all-reduce: the FP8 operands are the same."""
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(9, 128, generator=g), torch.randn(24, 128, generator=g) * 0.02
    q, scale = fp8.quantize_rowwise(w)
    whole = fp8.fp8_linear(x, q, scale, backend, act_blocks=4)
    for tp in (2, 4):
        shards = [fp8.fp8_linear(xs, qs, scale, backend, act_blocks=4 // tp)
                  for xs, qs in zip(x.chunk(tp, 1), q.chunk(tp, 1))]
        torch.testing.assert_close(sum(shards), whole, rtol=1e-6, atol=1e-7)  # float32 summation order
    per_token = fp8.fp8_linear(x, q, scale, backend)
    assert not torch.equal(per_token, whole)  # the blocks do change the quantisation


@pytest.mark.unit
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="the row-wise torch._scaled_mm kernels need a CUDA GPU of compute capability >= 8.9")
@pytest.mark.parametrize("act_blocks", [1, 2])
def test_cuda_scaled_mm_matches_emulated_with_padding(act_blocks):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(37, 160, generator=g).to(torch.bfloat16).cuda()   # K/2 = 80, N = 50: padded
    q, scale = fp8.quantize_rowwise(torch.randn(50, 160, generator=g).cuda() * 0.02)
    fast = fp8.fp8_linear(x, q, scale, "scaled_mm", act_blocks)
    slow = fp8.fp8_linear(x, q, scale, "emulated", act_blocks)
    assert fast.dtype == torch.bfloat16 and fast.shape == (37, 50)
    # both accumulate exact FP8 products in float32; the kernel rounds each block's result to bf16
    torch.testing.assert_close(fast.float(), slow.float(), rtol=2 ** -7, atol=1e-3)


@pytest.mark.unit
def test_pad_to_multiple_of_16_appends_zeros_for_the_cuda_kernel():
    q, _ = fp8.quantize_rowwise(torch.randn(20, 40))
    padded = fp8._pad_to(fp8._pad_to(q, 1, 16), 0, 16)
    assert padded.shape == (32, 48) and padded.dtype == torch.float8_e4m3fn
    assert torch.equal(padded[:20, :40].view(torch.uint8), q.view(torch.uint8))
    assert padded[20:].float().abs().sum() == 0 and padded[:, 40:].float().abs().sum() == 0
    assert fp8._pad_to(q, 0, 4) is q


# -- the model against float32 on the same weights (spawned world 1) ------------------------------
def _error_job(preset: str, tokens: list[int]):
    topo = parallel_state.initialize(1, 1, 1)
    reader = DummyReader(get_preset(preset), seed=0)
    stages = {}
    for key, dtype, weights in (("fp32", torch.float32, "dtype"), ("fp8", torch.float32, "fp8-rowwise"),
                                ("bf16", torch.bfloat16, "dtype"), ("fp8-bf16", torch.bfloat16, "fp8-rowwise")):
        stages[key] = LlamaStage(reader.config, StageLayout(), dtype=dtype, weights=weights)
        load_weights(stages[key], reader)
    inputs = {}
    for name, module in stages["fp32"].named_modules():
        if name.endswith(PROJECTIONS):
            module.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
    logits = {k: InferenceEngine(s, topo).forward({0: tokens})[0][-1] for k, s in stages.items()}
    linear_errors = {}
    with torch.no_grad():  # each FP8 linear on the float32 model's own input to that linear
        for name, x in inputs.items():
            linear_errors[name] = _rel(stages["fp8"].get_submodule(name)(x)[0],
                                       stages["fp32"].get_submodule(name)(x)[0])
    return linear_errors, logits


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_fp8_per_linear_and_last_token_logits_error_vs_float32_tiny():
    tokens = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    errors, logits = spawn(_error_job, 1, ("tiny", tokens), timeout_s=JOB_TIMEOUT_S)[0]
    assert len(errors) == 2 * len(PROJECTIONS)
    assert max(errors.values()) <= LINEAR_REL_ERR, errors
    assert min(errors.values()) > 1e-3  # FP8 did run: float32 would agree to ~1e-7
    ref = logits["fp32"]
    for key in ("fp8", "fp8-bf16"):
        assert _rel(logits[key], ref) <= LOGITS_REL_ERR
        # The greedy token: FP8's pick is float32's, or (where float32's top logits tie within
        # FP8's error, as 0.4827 vs 0.4820 for these dummy weights) one of those tied tokens.
        err = (logits[key] - ref).abs().max()
        tied = (ref >= ref.max() - 2 * err).nonzero().flatten().tolist()
        assert logits[key].argmax().item() in tied and len(tied) <= 3, (key, tied, float(err))
    assert _rel(logits["bf16"], ref) < _rel(logits["fp8"], ref)  # FP8 costs more than bf16


def _logits_job(tp: int, cp: int, tokens: list[int]):
    topo = parallel_state.initialize(tp, cp, 1)
    reader = DummyReader(get_preset("tiny"), seed=0)
    stage = LlamaStage(reader.config, StageLayout(tp, topo.tp_rank), weights="fp8-rowwise")
    load_weights(stage, reader)
    engine = InferenceEngine(stage, topo)
    full, _ = engine.forward({0: tokens[:-3]}, all_logits=True)
    steps = [engine.forward({0: [t]})[0] for t in tokens[-3:]]  # decode rounds (pass-Q at CP > 1)
    return torch.cat([full] + steps) if topo.rank == 0 else None


@pytest.mark.integration
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
def test_fp8_same_logits_across_cp_1_2_4_and_tp_1_2():
    """Prefill and three decode rounds of the tiny preset with FP8 weights (TP x CP mixes are
    covered without FP8 by test_model.py; FP8 adds nothing CP-specific)."""
    tokens = torch.randint(0, 512, (157,), generator=torch.Generator().manual_seed(3)).tolist()
    runs = {(tp, cp): spawn(_logits_job, tp * cp, (tp, cp, tokens), timeout_s=JOB_TIMEOUT_S)[0]
            for tp, cp in ((1, 1), (1, 2), (1, 4), (2, 1))}
    ref = runs[(1, 1)]
    scale = ref.abs().max().item()
    for (tp, cp), logits in runs.items():
        # CP moves tokens, TP splits features at KV-head-group boundaries: the FP8 weights (whole-row
        # scales) and activation blocks (K / NKV) are the same numbers at every size, so only
        # float32 summation order differs (attention merges, the TP all-reduce).
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5 * scale)
        assert torch.equal(logits.argmax(-1), ref.argmax(-1)), (tp, cp)


# -- the sharded checkpoint --------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp8") / "tiny-fp8-tp2"
    convert_reader(DummyReader(get_preset("tiny"), seed=0), "sharded", folder, tp=2, weights="fp8-rowwise",
                   progress=False)
    return folder


@pytest.mark.unit
def test_sharded_fp8_reads_back_stored_values_at_any_tp_without_requantising(fp8_checkpoint):
    meta = json.loads((fp8_checkpoint / "cp_megatron_checkpoint.json").read_text())
    assert meta["format_version"] == 2 and meta["weights"] == "fp8-rowwise"
    up = meta["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert up["dtype"] == "float8_e4m3fn" and up["scale"] == "model.layers.0.mlp.up_proj.weight_scale"
    assert meta["tensors"]["model.embed_tokens.weight"]["dtype"] == "float32"  # not quantised
    reader, dummy = open_checkpoint("sharded", fp8_checkpoint), DummyReader(get_preset("tiny"), seed=0)
    reader.read = None  # read_fp8 must not go through the dequantising read()
    for name, dim in (("model.layers.1.self_attn.o_proj.weight", 1), ("model.layers.0.mlp.up_proj.weight", 0)):
        for tp in (1, 2, 4):
            for rank in range(tp):
                q, scale = reader.read_fp8(name, shard_dim=dim, tp_rank=rank, tp_size=tp)
                want_q, want_scale = fp8.read_quantized(dummy, name, dim, rank, tp)
                assert q.dtype == torch.float8_e4m3fn
                assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
                assert torch.equal(scale, want_scale)
    del reader.read
    deq = reader.read("model.layers.0.mlp.up_proj.weight", dtype=torch.float32)
    assert torch.equal(deq, fp8.dequantize_rowwise(*fp8.quantize_rowwise(dummy.read("model.layers.0.mlp.up_proj.weight"))))


@pytest.mark.unit
def test_resharding_an_fp8_checkpoint_copies_values_and_scales_exactly(fp8_checkpoint, tmp_path):
    from cp_megatron.checkpoint.convert import convert

    convert("sharded", fp8_checkpoint, "sharded", tmp_path / "tp1", tp=1, weights="fp8-rowwise", progress=False)
    src, dst = open_checkpoint("sharded", fp8_checkpoint), open_checkpoint("sharded", tmp_path / "tp1")
    assert dst.tp_size == 1
    for name in src.names():
        a, b = src.read_fp8(name), dst.read_fp8(name)
        if a is None:
            assert b is None and torch.equal(src.read(name), dst.read(name))
        else:
            assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def _break_metadata(folder: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(folder, dst)
    path = dst / "cp_megatron_checkpoint.json"
    meta = json.loads(path.read_text())
    edit(meta["tensors"])
    path.write_text(json.dumps(meta))
    return dst


@pytest.mark.unit
def test_sharded_fp8_without_scales_names_the_file_and_tensor(fp8_checkpoint, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    no_entry = _break_metadata(fp8_checkpoint, tmp_path / "a", lambda t: t[name].pop("scale"))
    with pytest.raises(CheckpointError, match=rf"cp_megatron_checkpoint.json: tensor {name}: .*row scales"):
        open_checkpoint("sharded", no_entry)
    wrong = _break_metadata(fp8_checkpoint, tmp_path / "b", lambda t: t[name + "_scale"].update(split_dim=0))
    with pytest.raises(CheckpointError, match=rf"tensor {name}_scale: expected"):
        open_checkpoint("sharded", wrong)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_run_on_fp8_checkpoint_without_scales_is_one_line_exit_2(fp8_checkpoint, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight"
    broken = _break_metadata(fp8_checkpoint, tmp_path / "broken", lambda t: t[name].pop("scale"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{format: sharded, path: {broken}, weights: fp8-rowwise}}\n"
                   "parallel: {tp: 2}\nprompt: {random_tokens: 8}\n")
    proc = subprocess.run(CLI + ["run", str(cfg)], capture_output=True, text=True, timeout=100, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cp-megatron:")]
    assert len(lines) == 1 and name in lines[0] and "cp_megatron_checkpoint.json" in lines[0], proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("args,key", [
    (["--set", "model.weights=fp8-rowwise", "--set", "runtime.device=cuda"], "model.dtype bfloat16"),
    (["--set", "model.weights=fp8"], "model.weights"),
    (["--set", "prompt.file=null", "--set", "prompt.question=null", "--set", "prompt.random_tokens=9000"],
     "model.max_context"),
])
def test_fp8_and_context_config_errors_are_one_line_exit_2(args, key):
    proc = subprocess.run(CLI + ["run", "configs/default.yaml"] + args, capture_output=True, text=True,
                          timeout=100, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cp-megatron:")]
    assert len(lines) == 1 and key in lines[0], proc.stderr[-2000:]


@pytest.mark.unit
def test_convert_fp8_to_hf_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="fp8-rowwise needs --to sharded"):
        convert_reader(DummyReader(get_preset("tiny")), "hf", tmp_path / "x", weights="fp8-rowwise",
                       progress=False)
    assert not os.path.exists(tmp_path / "x")


# -- contexts beyond the trained length ----------------------------------------------------------
@pytest.mark.unit
def test_max_context_allows_prompts_past_the_trained_length_with_a_warning(capsys):
    from cp_megatron.config import ConfigError, load_config
    from cp_megatron.preflight import prepare

    text = ("model: {format: dummy, preset: tiny-64k}\nprompt: {random_tokens: 70000}\n"
            "generation: {max_new_tokens: 4}\n")
    with pytest.raises(ConfigError, match="model.max_context allows more"):
        prepare(load_config(None, text=text))
    prep = prepare(load_config(None, ["model.max_context=131072"], text=text))
    assert prep.max_context == 131072 and len(prep.first_turn) == 70000
    assert "exceeds tiny-64k's trained length (max_position_embeddings 65536)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="exceed the model.max_context of 70000"):
        prepare(load_config(None, ["model.max_context=70000"], text=text))


# -- the real model -------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_fp8_default_job_smollm2_answer_still_names_the_company(tmp_path):
    """configs/default.yaml (SmolLM2-135M, CP 2, the GPL-2 question) with FP8 row-wise weights:
    the greedy answer still names Yoyodyne (float32 answers "... is Yoyodyne, Inc.")."""
    out = tmp_path / "fp8.json"
    proc = subprocess.run(CLI + ["run", "configs/default.yaml", "--set", "model.weights=fp8-rowwise",
                                 "--output", str(out)], capture_output=True, text=True, timeout=850, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rounds"][0]["new_tokens"] > 4000 and result["parallel"]["cp"] == 2
    assert "Yoyodyne" in result["text"], result["text"]


# -- memory: the planner's report against the runtime -------------------------------------------------
WEIGHT_LAYOUTS = (("dtype", torch.bfloat16, "bf16"), ("fp8-rowwise", torch.bfloat16, "fp8"),
                  ("dtype", torch.float32, "fp32"))


def _stage_bytes_job(preset: str, tp: int):
    """Bytes of this rank's parameters and buffers (weights and FP8 scales) per layout."""
    topo = parallel_state.initialize(tp, 1, 1)
    sizes = []
    for weights, dtype, _ in WEIGHT_LAYOUTS:
        stage = LlamaStage(get_preset(preset), StageLayout(tp, topo.tp_rank), dtype=dtype, weights=weights)
        sizes.append(sum(t.numel() * t.element_size() for t in [*stage.parameters(), *stage.buffers()]))
        del stage
    return sizes


@pytest.mark.integration
@pytest.mark.timeout(JOB_TIMEOUT_S)
def test_planner_weight_bytes_equal_the_runtime_stage_bytes_per_rank():
    from cp_megatron.planner import loaded_weight_bytes

    for preset, tp in (("smollm2-135m", 1), ("tiny", 2)):
        per_rank = spawn(_stage_bytes_job, tp, (preset, tp), timeout_s=JOB_TIMEOUT_S)
        want = [loaded_weight_bytes(get_preset(preset), tp, name) for _, _, name in WEIGHT_LAYOUTS]
        assert per_rank == [want] * tp, (preset, tp)


@pytest.mark.unit
def test_405b_tp8_fp8_weights_51gb_per_gpu_and_1m_tokens_at_cp16_fit_one_h100_node():
    from cp_megatron.planner import memory_report, plan

    cfg = get_preset("llama3.1-405b")
    h, f, v, layers = 16384, 53248, 128256, 126
    per_block = (2 * h * h + 2 * h * 1024 + 3 * h * f) // 8 + 4 * ((h + 2 * 1024 + 2 * f) // 8 + 2 * h) + 2 * h * 2
    assert memory_report(cfg, 8, 16, 10**6, 10**6, 1, "fp8").weight_bytes == pytest.approx(
        layers * per_block + 2 * v // 8 * h * 2 + h * 2)
    m = plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=10**6).memory
    assert m["weights"] == "fp8-rowwise" and 50e9 < m["weight_bytes"] < 52e9
    assert m["kv_cache_bytes"] == 2 * layers * 1 * 128 * 2 * 62500           # one KV head per GPU
    assert m["fits"] == {"h100-rdma": True, "h200": True}
    bf16 = plan("llama3.1-405b", "h100-rdma", tp=8, cp=16, context_tokens=10**6, dtype="bf16").memory
    assert 100e9 < bf16["weight_bytes"] and bf16["fits"] == {"h100-rdma": False, "h200": True}


@pytest.mark.unit
def test_prefill_activation_bytes_hand_checked_tiny():
    """The phase model (planner.activation_phases with fused projections, a fused F.rms_norm,
    the gate/up and q/k/v outputs and the layer input held: ``CODE``) counted by hand; replaces
    the old single-sum formula, which missed the held residual and the FP8 quantiser's float32
    temporaries (issue #21)."""
    from cp_megatron.planner import LayerCode, activation_phases, comm_buffer_bytes, prefill_activation_bytes

    CODE = LayerCode(gate_up_held=True, qkv_held=True, rms_norm_composite=False)

    cfg = get_preset("tiny")   # H 64, F 128, NH 4, NKV 2, DH 16, V 512
    t = 50                     # 100 tokens at CP 2; tp 2: q = 32, k = 16, f = 64, nh = 2
    x, base = t * 64 * 2, t * 64 * 2 + 2 * t * 16 * 4
    phases = activation_phases(cfg, 2, 2, 100, 100, 1, "bf16", CODE)
    assert phases["down"] == base + x + x + 2 * t * 64 * 2 + t * 64 * 2 + t * 64 * 2
    attn_live = x + t * 64 * 2 + t * 32 * 2 + t * 16 * 2           # h, qkv, rotated q and k
    tb = t                     # CP rank N-1: one block of all its rows (the most loaded rank)
    ring = base + attn_live + t * 32 * 4 + t * 2 * 4 + tb * 32 * 2 + tb * 2 * 4 + 2 * tb * 32 * 4
    assert phases["ring"] == ring == prefill_activation_bytes(cfg, 2, 2, 100, 100, 1, "bf16", code=CODE)
    assert phases["logits"] == x + 512 * 4 * 3
    fp8_down = activation_phases(cfg, 2, 2, 100, 100, 1, "fp8", CODE)["down"]
    # the product quantised in one piece: its float32 quotient and 1-byte cast (t*f*4 + t*f)
    # beat q8 + output; t*4 its row scales
    assert fp8_down == base + 2 * x + 2 * t * 64 * 2 + t * 64 * 2 + t * 4 + t * 64 * 4 + t * 64
    assert comm_buffer_bytes(cfg, 2, 2, 100, 100, 1, "bf16", "pass-kv") == 4 * 51 * 16 * 2


