"""Pre-flight of a run config, in one process before any rank starts: the checkpoint's
metadata, TP against the model (:mod:`cp_megatron.model.tp_rule`), the tokenizer, the prompt's
token ids against the model's context, and the heuristic's hardware constants.  Every
failure is one :class:`~cp_megatron.config.ConfigError` line naming the key.

Shared by ``cp-megatron run`` (:mod:`cp_megatron.job`) and the benchmark suites; every
rank reopens the checkpoint with :func:`open_reader` (from the index pre-flight parsed,
:attr:`Prepared.checkpoint_index`: a GGUF header is parsed once per job) and builds its
engine with :func:`cp_megatron.factory.build_engine`.  Pre-flight imports neither
megatron-core nor the runtime (tests/test_preflight.py checks): that is the ranks' cost.

Source: arXiv 2411.01783 §3 (the job), §3.6 (C and BW of the heuristic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cp_megatron.config import ConfigError, RunConfig


@dataclass
class Prepared:
    """What pre-flight hands to every rank (picklable)."""

    model_config: object            # ModelConfig
    first_turn: list[int]           # token ids of the first (or only) prompt
    turn_texts: list[str]           # user turns after the first (prompt.turns)
    messages: Optional[list[dict]]  # chat so far (None for raw text / random prompts)
    hardware: object = None         # HardwareProfile for the heuristic (None: by device)
    max_context: int = 0            # tokens a sequence may reach (model.max_context or the model's)
    checkpoint_index: object = None  # the checkpoint reader's index (GGUF: its parsed header), so
                                     # that no rank parses the file again (open_reader(cfg, index))


# -- model and tokenizer --------------------------------------------------------------------
def open_reader(cfg: RunConfig, index=None):
    """The checkpoint reader of ``cfg.model`` (``DummyReader`` for format dummy).

    Args:
        index: the ``reader.index`` pre-flight's reader of the same checkpoint had
            (:attr:`Prepared.checkpoint_index`), so the file is not parsed again; None: parse it.

    Raises:
        ConfigError: missing file, unreadable checkpoint (or one changed since ``index``), unknown preset.
    """
    from cp_megatron.checkpoint import CheckpointError, open_checkpoint
    from cp_megatron.model.config import get_preset

    m = cfg.model
    try:
        if m.format == "dummy":
            from cp_megatron.model.weights import DummyReader   # torch: only a dummy model needs it here

            return DummyReader(get_preset(m.preset), seed=cfg.runtime.seed)
        path = cfg.resolve_path(m.path)
        if not os.path.exists(path):
            raise ConfigError(f"model.path: {path} does not exist")
        return open_checkpoint(m.format, path, index)
    except (CheckpointError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"model: {exc}") from None


def open_tokenizer(cfg: RunConfig, reader):
    """The checkpoint's tokenizer; None for a dummy model, or for a checkpoint without one
    when the prompt is ``random_tokens`` (then no EOS and no text, only token ids).

    Raises:
        ConfigError: the checkpoint has no usable tokenizer and the prompt needs one.
    """
    from cp_megatron.checkpoint import CheckpointError

    if cfg.model.format == "dummy":
        return None
    try:
        return reader.tokenizer()
    except CheckpointError as exc:
        if cfg.prompt is None or cfg.prompt.random_tokens is not None:  # a server takes token ids
            return None
        raise ConfigError(f"model.path: {str(exc).splitlines()[0]} (a text prompt needs the tokenizer; "
                          "prompt.random_tokens does not)") from None


def _chat(cfg: RunConfig, first_user: str) -> list[dict]:
    messages = [{"role": "system", "content": cfg.prompt.system}] if cfg.prompt.system else []
    return messages + [{"role": "user", "content": first_user}]


def check_model(cfg: RunConfig, world_size: Optional[int] = None):
    """Pre-flight of the model and the grid: (checkpoint reader, tokenizer or None).

    Raises:
        ConfigError: ``runtime.device: cuda`` without a CUDA device, world size vs the
            launcher's, TP vs the model (the one TP rule), PP vs layers, missing or unreadable
            files, FP8 weights on a dtype / device without an FP8 path.
    """
    from cp_megatron.model.tp_rule import tp_problem

    # torch is imported only by the checks that need it: a GGUF job's pre-flight runs without
    # it (the ranks' fork server imports it meanwhile, launcher.start_fork_server).
    par = cfg.parallel
    if world_size is not None and world_size != par.world_size:
        raise ConfigError(f"parallel: tp*cp*pp = {par.tp}*{par.cp}*{par.pp} = {par.world_size} does not "
                          f"match the launcher's WORLD_SIZE={world_size}")
    if cfg.model.weights == "fp8-rowwise":
        import torch

        from cp_megatron.model.fp8 import check_supported

        try:
            check_supported(cfg.runtime.device, getattr(torch, cfg.model.dtype))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    # The config's own consistency first (above), then this machine (a config meant for a GPU
    # node is still checked on a CPU box up to here).
    if cfg.runtime.device == "cuda":
        import torch

        from cp_megatron import device as devices

        if not devices.is_available():
            raise ConfigError("runtime.device: cuda, but this torch build has no CUDA device "
                              f"(torch {torch.__version__} sees no CUDA device)")
    reader = open_reader(cfg)
    config = reader.config
    problem = tp_problem(config, par.tp)
    if problem:
        raise ConfigError(f"parallel.tp: {problem}")
    if par.pp > config.num_layers:
        raise ConfigError(f"parallel.pp={par.pp} exceeds the model's {config.num_layers} layers")
    return reader, open_tokenizer(cfg, reader)


def prepare(cfg: RunConfig, world_size: Optional[int] = None) -> Prepared:
    """Pre-flight checks (:func:`check_model`) and the first turn's token ids.

    A ``model.max_context`` beyond the checkpoint's max_position_embeddings is allowed with
    a warning on stderr (RoPE is computed at any position; the paper's 1M-token runs are
    performance runs on a 128K model, arXiv 2411.01783 §4).

    Raises:
        ConfigError: one line naming the key: :func:`check_model`'s, a missing prompt, or
            a prompt (plus max_new_tokens) longer than the allowed context.
    """
    reader, tok = check_model(cfg, world_size)
    config = reader.config
    max_context = context_limit(cfg, config)
    p = cfg.prompt
    if p is None:
        raise ConfigError("prompt: missing (give one of text, file, messages, turns, random_tokens)")
    messages, turns = None, list(p.turns or [])
    if p.random_tokens is not None:
        ids = random_prompt(p.random_tokens, config.vocab_size, cfg.runtime.seed)
    else:
        if tok is None:
            raise ConfigError("prompt: a dummy model has no tokenizer; use prompt.random_tokens")
        if p.text is not None:
            ids = tok.encode(p.text, add_bos=tok.add_bos_default)
        else:
            if p.file is not None:  # the document (+ question) is the first turn; turns follow it
                path = cfg.resolve_path(p.file)
                try:
                    document = Path(path).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"prompt.file: cannot read {path}: {exc}") from None
                messages = _chat(cfg, document + ("\n\n" + p.question if p.question else ""))
            elif p.messages is not None:
                messages = [m.model_dump() for m in p.messages]
            else:
                messages, turns = _chat(cfg, turns[0]), turns[1:]
            ids = tok.encode(tok.apply_chat_template(messages), add_bos=False)
    if not ids:
        raise ConfigError("prompt: the prompt tokenizes to no tokens")
    need = len(ids) + cfg.generation.max_new_tokens
    if need > max_context:
        limit = ("model.max_context" if cfg.model.max_context else
                 "model's context (max_position_embeddings; model.max_context allows more)")
        raise ConfigError(f"prompt: {len(ids)} tokens + generation.max_new_tokens "
                          f"{cfg.generation.max_new_tokens} exceed the {limit} of {max_context} tokens")
    return Prepared(config, ids, turns, messages, heuristic_hardware(cfg), max_context, reader.index)


def context_limit(cfg: RunConfig, config) -> int:
    """Tokens a sequence may reach: ``model.max_context``, else the checkpoint's
    max_position_embeddings.  A limit past the trained length warns once on stderr."""
    import sys

    limit = cfg.model.max_context or config.max_position_embeddings
    if limit > config.max_position_embeddings:
        print(f"[cp-megatron] warning: model.max_context {limit} exceeds {config.name}'s trained length "
              f"(max_position_embeddings {config.max_position_embeddings}); positions beyond it run, but "
              f"output quality there is not guaranteed", file=sys.stderr, flush=True)
    return limit


def random_prompt(num_tokens: int, vocab_size: int, seed: int) -> list[int]:
    """Seeded random token ids in ``[0, vocab_size)`` (the same on every rank and job)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=g).tolist()


def heuristic_hardware(cfg: RunConfig):
    """C and BW for the heuristic: ``attention.hardware`` (a profile name or a profile
    .json), then the ``attn_flops_per_s`` / ``bandwidth_bytes_per_s`` overrides on top of
    it (or of the device's default profile).  None when nothing is configured.

    Raises:
        ConfigError: an unknown profile or an unusable profile file (names the key).
    """
    from dataclasses import replace

    from cp_megatron.hardware import ProfileError, default_hardware, load_profile

    att = cfg.attention
    if not (att.hardware or att.attn_flops_per_s or att.bandwidth_bytes_per_s):
        return None
    try:
        if att.hardware is None:
            hw = default_hardware(cfg.runtime.device)
        elif att.hardware.lower().endswith(".json"):  # a file: relative to the config like other paths
            hw = load_profile(cfg.resolve_path(att.hardware))
        else:
            hw = load_profile(att.hardware)
    except (ProfileError, ConfigError) as exc:
        raise ConfigError(f"attention.hardware: {exc}") from None
    return replace(hw, attn_flops_per_s=att.attn_flops_per_s or hw.attn_flops_per_s,
                   cp_bandwidth_bytes_per_s=att.bandwidth_bytes_per_s or hw.cp_bandwidth_bytes_per_s)


