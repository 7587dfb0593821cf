"""The main job: ``cp-megatron run CONFIG.yaml`` from a validated config to an answer.

Order of work:
1. *pre-flight* (one process, before any rank starts): open the checkpoint's metadata,
   check TP against the heads, build the tokenizer, tokenize the prompt and check it fits
   the model's context -- every failure is a one-line :class:`ConfigError`;
2. start the ranks (our own spawner on one machine) or join (under torchrun / the
   deepspeed launcher: RANK and WORLD_SIZE are set);
3. on every rank: process groups, this rank's model stage and weight slice, the engine;
   prefill, decode, and for ``prompt.turns`` one partial prefill per later turn;
4. rank 0 prints the summary and returns the result (written as JSON by the CLI).

Source: arXiv 2411.01783 §3 (what runs), DESIGN §2 (groups).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cp_megatron.config import ConfigError, RunConfig


@dataclass
class Prepared:
    """What pre-flight hands to every rank (picklable)."""

    model_config: object            # ModelConfig
    first_turn: list[int]           # token ids of the first (or only) prompt
    turn_texts: list[str]           # user turns after the first (prompt.turns)
    messages: Optional[list[dict]]  # chat so far (None for raw text / random prompts)
    hardware: object = None         # HardwareProfile for the heuristic (None: by device)


# -- model and tokenizer --------------------------------------------------------------------
def open_reader(cfg: RunConfig):
    """The checkpoint reader of ``cfg.model`` (``DummyReader`` for format dummy).

    Raises:
        ConfigError: missing file, unreadable checkpoint, unknown preset.
    """
    from cp_megatron.checkpoint import CheckpointError, open_checkpoint
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    m = cfg.model
    try:
        if m.format == "dummy":
            return DummyReader(get_preset(m.preset), seed=cfg.runtime.seed)
        path = cfg.resolve_path(m.path)
        if not os.path.exists(path):
            raise ConfigError(f"model.path: {path} does not exist")
        return open_checkpoint(m.format, path)
    except (CheckpointError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"model: {exc}") from None


def open_tokenizer(cfg: RunConfig, reader):
    return None if cfg.model.format == "dummy" else reader.tokenizer()


def _chat(cfg: RunConfig, first_user: str) -> list[dict]:
    messages = [{"role": "system", "content": cfg.prompt.system}] if cfg.prompt.system else []
    return messages + [{"role": "user", "content": first_user}]


def prepare(cfg: RunConfig, world_size: Optional[int] = None) -> Prepared:
    """Pre-flight checks and the first turn's token ids.

    Raises:
        ConfigError: one line naming the key: world size, TP vs heads, missing files,
            a prompt (plus max_new_tokens) longer than the model's context.
    """
    from cp_megatron.model.llama import check_tp

    par = cfg.parallel
    if world_size is not None and world_size != par.world_size:
        raise ConfigError(f"parallel: tp*cp*pp = {par.tp}*{par.cp}*{par.pp} = {par.world_size} does not "
                          f"match the launcher's WORLD_SIZE={world_size}")
    reader = open_reader(cfg)
    config = reader.config
    try:
        check_tp(config, par.tp)
    except ValueError as exc:
        raise ConfigError(f"parallel.tp: {exc}") from None
    if par.pp > config.num_layers:
        raise ConfigError(f"parallel.pp={par.pp} exceeds the model's {config.num_layers} layers")
    tok = open_tokenizer(cfg, reader)
    p = cfg.prompt
    messages, turns = None, []
    if p.random_tokens is not None:
        g = torch.Generator().manual_seed(cfg.runtime.seed)
        ids = torch.randint(0, config.vocab_size, (p.random_tokens,), generator=g).tolist()
    else:
        if tok is None:
            raise ConfigError("prompt: a dummy model has no tokenizer; use prompt.random_tokens")
        if p.text is not None:
            ids = tok.encode(p.text, add_bos=tok.add_bos_default)
        else:
            if p.file is not None:
                path = cfg.resolve_path(p.file)
                try:
                    document = Path(path).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"prompt.file: cannot read {path}: {exc}") from None
                messages = _chat(cfg, document + ("\n\n" + p.question if p.question else ""))
            elif p.messages is not None:
                messages = [m.model_dump() for m in p.messages]
            else:
                messages, turns = _chat(cfg, p.turns[0]), list(p.turns[1:])
            ids = tok.encode(tok.apply_chat_template(messages), add_bos=False)
    if not ids:
        raise ConfigError("prompt: the prompt tokenizes to no tokens")
    need = len(ids) + cfg.generation.max_new_tokens
    if need > config.max_position_embeddings:
        raise ConfigError(f"prompt: {len(ids)} tokens + generation.max_new_tokens "
                          f"{cfg.generation.max_new_tokens} exceed the model's context of "
                          f"{config.max_position_embeddings} tokens")
    return Prepared(config, ids, turns, messages, heuristic_hardware(cfg))


def heuristic_hardware(cfg: RunConfig):
    """C and BW for the heuristic: ``attention.hardware`` (a profile name or a profile
    .json), then the ``attn_flops_per_s`` / ``bandwidth_bytes_per_s`` overrides on top of
    it (or of the device's default profile).  None when nothing is configured.

    Raises:
        ConfigError: an unknown profile or an unusable profile file (names the key).
    """
    from dataclasses import replace

    from cp_megatron.attention.api import default_hardware
    from cp_megatron.hardware import ProfileError, load_profile

    att = cfg.attention
    if not (att.hardware or att.attn_flops_per_s or att.bandwidth_bytes_per_s):
        return None
    try:
        if att.hardware is None:
            hw = default_hardware(torch.device(cfg.runtime.device))
        elif att.hardware.lower().endswith(".json"):  # a file: relative to the config like other paths
            hw = load_profile(cfg.resolve_path(att.hardware))
        else:
            hw = load_profile(att.hardware)
    except (ProfileError, ConfigError) as exc:
        raise ConfigError(f"attention.hardware: {exc}") from None
    return replace(hw, attn_flops_per_s=att.attn_flops_per_s or hw.attn_flops_per_s,
                   cp_bandwidth_bytes_per_s=att.bandwidth_bytes_per_s or hw.cp_bandwidth_bytes_per_s)


# -- on every rank ------------------------------------------------------------------------------
def _log(topo, *parts) -> None:
    if topo.rank == 0:
        print(*parts, file=sys.stderr, flush=True)


def rank_main(cfg: RunConfig, prep: Prepared) -> Optional[dict]:
    """Build this rank's stage, run every turn; return the result on global rank 0."""
    from tqdm import tqdm

    from cp_megatron import parallel_state
    from cp_megatron.engine import InferenceEngine, SamplingParams, generate
    from cp_megatron.model.llama import LlamaStage, StageLayout
    from cp_megatron.model.weights import load_weights

    par, rt = cfg.parallel, cfg.runtime
    torch.set_num_threads(rt.threads_per_rank)
    parallel_state.init_distributed(rt.backend or ("nccl" if rt.device == "cuda" else "gloo"), rt.timeout_s)
    topo = parallel_state.initialize(par.tp, par.cp, par.pp, timeout_s=rt.timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if rt.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, cfg.model.dtype)
    reader = open_reader(cfg)
    tok = open_tokenizer(cfg, reader)
    _log(topo, f"[cp-megatron] {prep.model_config.name}: tp={par.tp} cp={par.cp} pp={par.pp}, "
               f"{len(prep.first_turn)} prompt tokens, strategy={cfg.attention.strategy}")
    t0 = time.perf_counter()
    stage = LlamaStage(prep.model_config, StageLayout(par.tp, topo.tp_rank, par.pp, topo.pp_rank),
                       dtype=dtype, device=device)
    load_weights(stage, reader, progress=topo.rank == 0)
    del reader  # drop the checkpoint's memory maps: the stage holds its own copy
    _log(topo, f"[cp-megatron] weights loaded in {time.perf_counter() - t0:.1f} s")

    engine = InferenceEngine(stage, topo, strategy=cfg.attention.strategy, hardware=prep.hardware)
    gen = cfg.generation
    params = SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_p, rt.seed, tuple(gen.stop))
    eos = tok.eos_ids if tok is not None else ()
    decode_text = tok.decode if tok is not None else None

    turns_out = []
    feed, messages = list(prep.first_turn), prep.messages
    # Rank 0 shows the prefill advancing layer by layer (its own pipeline stage's layers).
    progress = {"prefill": None}

    def layer_done(*_) -> None:  # a forward hook must return None (else it replaces the output)
        if progress["prefill"] is not None:
            progress["prefill"].update(1)

    for layer in stage.layers.values():
        layer.register_forward_hook(layer_done)
    for turn in range(1 + len(prep.turn_texts)):
        progress["prefill"] = tqdm(total=stage.num_local_layers, desc=f"turn {turn + 1} prefill layers",
                                   disable=topo.rank != 0, file=sys.stderr, leave=False)
        bar = tqdm(total=gen.max_new_tokens, desc=f"turn {turn + 1} decode", disable=topo.rank != 0,
                   file=sys.stderr, leave=False)

        def on_round(m, bar=bar):
            if progress["prefill"] is not None:
                progress["prefill"].close()
                progress["prefill"] = None
            if m.kind != "decode":
                _log(topo, f"[cp-megatron] {m.kind}: T={m.new_tokens} P={m.cached_tokens} "
                           f"miss_rate={m.miss_rate:.3f} -> {m.strategy} in {m.time_s:.2f} s")
            bar.update(1)

        gens, rounds = generate(engine, {0: feed}, params, eos_ids=eos, decode_text=decode_text,
                                on_round=on_round)
        bar.close()
        g = gens[0]
        text = tok.decode(g.token_ids, skip_special_tokens=True) if tok is not None else ""
        turns_out.append(_turn_summary(turn, feed, g, text, rounds))
        if turn < len(prep.turn_texts):
            feed, messages = _next_turn(tok, messages, text, g, prep.turn_texts[turn])
    if topo.rank != 0:
        return None
    return {"model": prep.model_config.name, "parallel": {"tp": par.tp, "cp": par.cp, "pp": par.pp},
            "text": turns_out[-1]["text"], "token_ids": turns_out[-1]["token_ids"],
            "turns": turns_out, "rounds": [r for t in turns_out for r in t["rounds"]]}


def _next_turn(tok, messages, reply_text, g, user_text) -> tuple[list[int], list[dict]]:
    """Token ids to feed for the next user turn on top of the cached conversation.

    The cache holds the conversation up to the reply's last fed token.  The delta is the
    chat template of the whole conversation minus what is already there; when the reply
    ended with EOS, the template's own end-of-turn token takes its place.
    """
    before = tok.apply_chat_template(messages) + reply_text
    messages = messages + [{"role": "assistant", "content": reply_text},
                           {"role": "user", "content": user_text}]
    full = tok.apply_chat_template(messages)
    if not full.startswith(before):
        raise RuntimeError("chat template does not extend the previous turn's prompt; cannot reuse the cache")
    delta = tok.encode(full[len(before):], add_bos=False)
    pending = [] if g.finish_reason == "eos" else [g.token_ids[-1]]
    return pending + delta, messages


def _turn_summary(turn, feed, g, text, rounds) -> dict:
    decode_times = [r.time_s for r in rounds[1:]]
    round_dicts = []
    for i, r in enumerate(rounds):
        d = r.to_dict()
        d["turn"] = turn + 1
        d["ttft_s"] = r.time_s
        d["ttit_s"] = r.time_s if i > 0 else None
        round_dicts.append(d)
    first = rounds[0]
    return {"turn": turn + 1, "fed_tokens": len(feed), "text": text, "token_ids": g.token_ids,
            "finish_reason": g.finish_reason, "ttft_s": first.time_s,
            "ttit_s": statistics.median(decode_times) if decode_times else None,
            "tokens_per_s": (len(g.token_ids) / sum(r.time_s for r in rounds)),
            "strategy": first.strategy, "miss_rate": first.miss_rate,
            "kv_cache_bytes_rank0": rounds[-1].kv_cache_bytes, "rounds": round_dicts}


# -- entry -------------------------------------------------------------------------------------
def under_launcher() -> bool:
    """True when torchrun / the deepspeed launcher started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(cfg: RunConfig) -> Optional[dict]:
    """Pre-flight, then start or join the ranks; returns the result on rank 0 (else None).

    Raises:
        ConfigError: pre-flight failures (before any rank starts).
        RankFailure: a rank failed or the job timed out (every rank is stopped).
    """
    from cp_megatron.launcher import spawn

    if under_launcher():
        from cp_megatron import parallel_state

        prep = prepare(cfg, world_size=int(os.environ["WORLD_SIZE"]))
        try:
            return rank_main(cfg, prep)
        finally:
            parallel_state.destroy()
    prep = prepare(cfg)
    results = spawn(rank_main, cfg.parallel.world_size, (cfg, prep), timeout_s=cfg.runtime.timeout_s,
                    threads_per_rank=cfg.runtime.threads_per_rank, backend=None)
    return results[0]


def format_summary(result: dict) -> str:
    """The table rank 0 prints at the end."""
    lines = []
    for t in result["turns"]:
        lines.append(f"--- turn {t['turn']} answer ---")
        lines.append(t["text"].strip())
    lines.append("")
    header = f"{'turn':>4} {'T (new)':>8} {'P (cached)':>10} {'miss_rate':>9} {'variant':>8} " \
             f"{'TTFT s':>8} {'TTIT s':>8} {'tok/s':>7} {'KV bytes/rank0':>14}"
    lines.append(header)
    for t in result["turns"]:
        r0 = t["rounds"][0]
        ttit = f"{t['ttit_s']:.4f}" if t["ttit_s"] is not None else "-"
        lines.append(f"{t['turn']:>4} {r0['new_tokens']:>8} {r0['cached_tokens']:>10} {t['miss_rate']:>9.3f} "
                     f"{t['strategy']:>8} {t['ttft_s']:>8.3f} {ttit:>8} {t['tokens_per_s']:>7.2f} "
                     f"{t['kv_cache_bytes_rank0']:>14,}")
    return "\n".join(lines)
