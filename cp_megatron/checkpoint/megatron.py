"""Reader for a megatron-core Llama ``GPTModel`` state dict saved at TP 1, PP 1.

Accepted files (``torch.save``):

* ``model.state_dict()`` of a megatron-core ``GPTModel`` (local or Transformer Engine spec),
  or ``{"model": state_dict, ...}`` as Megatron-LM's ``model_optim_rng.pt`` stores it
  (``--ckpt-format torch``; save with ``--no-save-optim``: the file is opened with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects; importing
  megatron-core registers numpy's array types as safe, so Megatron-LM's ``rng_state`` loads,
  and it is ignored);
* ``path`` is the ``.pt`` file, or a folder holding ``model_optim_rng.pt`` or Megatron-LM's
  ``latest_checkpointed_iteration.txt`` + ``iter_NNNNNNN/mp_rank_00/model_optim_rng.pt``.

The model's dimensions come from a Hugging Face ``config.json`` in the file's folder or in
``path`` (it also names the tokenizer files), else from Megatron-LM's ``args`` in the file.
TP > 1 or PP > 1 checkpoints (``mp_rank_01``, ``args.tensor_model_parallel_size > 1``) are
refused: merge them to TP 1 with Megatron-LM's checkpoint converter first.  A
``torch_dist`` save (``.metadata``, ``*.distcp``) is refused with how to convert it.

Every model tensor of the file must be one the config accounts for (layers, tied or untied
LM head): a config.json / args that disagree with the file are refused, not run as another
model.  megatron-core's bookkeeping entries (``*._extra_state``, RoPE ``inv_freq``) are ignored.

Tensors come out under HF names and in HF layout: ``linear_qkv`` is split per query group
into q / k / v, ``linear_fc1`` into gate / up (:mod:`cp_megatron.checkpoint.mcore_keys`).

Source: megatron-core ``GPTModel.state_dict`` keys (0.16); Megatron-LM
``megatron/training/checkpointing.py`` (``get_checkpoint_name``, tracker file, ``args``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile

import torch

from cp_megatron.checkpoint.base import CheckpointError, CheckpointReader
from cp_megatron.checkpoint.hf import _load_json, config_from_hf
from cp_megatron.checkpoint.mcore_keys import FC1, QKV, TE_NORM_NAMES, mcore_source, split_fc1
from cp_megatron.model.config import ModelConfig, RopeScaling

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
# state-dict entries that are not weights: Transformer Engine / FP8 metadata, RoPE frequencies
_BOOKKEEPING_SUFFIXES = ("_extra_state", "inv_freq")
_SHOWN_KEYS = 4   # unexpected tensors named in the error


def _safe_globals() -> list:
    """What a Megatron-LM ``args`` may hold besides builtins and torch dtypes: the Namespace
    itself and megatron-core's enums (e.g. ``attention_backend: AttnBackend``)."""
    import enum
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer import enums as mc_enums
    found = [v for v in vars(mc_enums).values() if isinstance(v, type) and issubclass(v, enum.Enum)
             and v.__module__ == mc_enums.__name__]
    return [argparse.Namespace, *found]


def _refuse_torch_dist(folder: str) -> None:
    """Refuse a Megatron-LM ``torch_dist`` save folder (``.metadata`` + ``__0_0.distcp`` ...,
    ``common.pt``, ``metadata.json``): sharded tensors of torch.distributed.checkpoint."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if ".metadata" in names or any(n.endswith(".distcp") for n in names):
        raise CheckpointError(f"{folder}: a Megatron-LM torch_dist checkpoint (.metadata, *.distcp), which is not "
                              "read here: convert it to Megatron-LM's torch format first (load it with Megatron-LM "
                              "and save with --ckpt-format torch, e.g. --ckpt-convert-format torch "
                              "--ckpt-convert-save DIR, or tools/checkpoint/convert.py)")


def find_file(path: str) -> str:
    """The ``.pt`` file of a megatron checkpoint path (file, folder, or Megatron-LM save dir).

    Raises:
        CheckpointError: nothing found, a tracker file that holds neither an iteration nor
            ``release``, a TP/PP-sharded save (``mp_rank_01...``), or a ``torch_dist`` save.
    """
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, FILE)):
        return os.path.join(path, FILE)
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as f:
            it = f.read().strip()
        if it != "release" and not (it.isascii() and it.isdigit()):
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {it[:40]!r}")
        folder = os.path.join(path, "release" if it == "release" else f"iter_{int(it):07d}")
        _refuse_torch_dist(folder)
        ranks = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        if ranks != ["mp_rank_00"]:
            raise CheckpointError(f"{folder}: expected one TP 1 PP 1 folder mp_rank_00, found {ranks or 'none'} "
                                  "(merge to TP 1 PP 1 with Megatron-LM's checkpoint converter)")
        return os.path.join(folder, "mp_rank_00", FILE)
    _refuse_torch_dist(path)
    raise CheckpointError(f"{path}: no megatron checkpoint ({FILE}, {TRACKER} or a .pt file)")


# Megatron-LM arguments whose default is Llama's and whose other values build another model
# (biases, norms, RoPE variant, MoE / MLA blocks); megatron/training/arguments.py.
_LLAMA_DEFAULTS = {"add_qkv_bias": False, "qk_layernorm": False, "apply_layernorm_1p": False,
                   "apply_residual_connection_post_layernorm": False, "rotary_interleaved": False,
                   "rotary_percent": 1.0, "num_experts": None, "multi_latent_attention": False,
                   "squared_relu": False}


def config_from_args(args, where: str) -> ModelConfig:
    """ModelConfig from Megatron-LM's ``args`` (argparse.Namespace) of a Llama-style GPT.

    Raises:
        CheckpointError: not a Llama-style model (no RoPE / SwiGLU / RMSNorm, biases, QK
            norm, interleaved or partial RoPE, MoE, MLA) or a TP / PP size above 1.
    """
    a = vars(args)
    tp, pp = a.get("tensor_model_parallel_size", 1), a.get("pipeline_model_parallel_size", 1)
    if tp != 1 or pp != 1:
        raise CheckpointError(f"{where}: saved at TP {tp} PP {pp}; only TP 1 PP 1 is read "
                              "(merge with Megatron-LM's checkpoint converter)")
    checks = {"position_embedding_type": "rope", "normalization": "RMSNorm", "swiglu": True,
              "add_bias_linear": False}
    for key, want in checks.items():
        if a.get(key) != want:
            raise CheckpointError(f"{where}: args.{key}={a.get(key)!r}, a Llama model needs {want!r}")
    for key, want in _LLAMA_DEFAULTS.items():   # absent in older args = Megatron-LM's default (Llama's)
        if a.get(key, want) != want:
            raise CheckpointError(f"{where}: args.{key}={a.get(key)!r}, a Llama model needs {want!r}")
    try:
        heads = int(a["num_attention_heads"])
        scaling = (RopeScaling(factor=float(a.get("rope_scaling_factor", 8.0)))
                   if a.get("use_rope_scaling") else None)
        return ModelConfig(
            name=where, vocab_size=int(a["padded_vocab_size"]), hidden_size=int(a["hidden_size"]),
            intermediate_size=int(a["ffn_hidden_size"]), num_layers=int(a["num_layers"]),
            num_heads=heads,
            num_kv_heads=int(a["num_query_groups"]) if a.get("group_query_attention") else heads,
            head_dim=int(a.get("kv_channels") or int(a["hidden_size"]) // heads),
            rope_theta=float(a.get("rotary_base", 10000)), rope_scaling=scaling,
            rms_norm_eps=float(a.get("norm_epsilon", 1e-5)),
            max_position_embeddings=int(a["max_position_embeddings"]),
            tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", False))
    except KeyError as err:
        raise CheckpointError(f"{where}: args has no {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None


class MegatronReader(CheckpointReader):
    """A megatron-core GPTModel state dict (TP 1, PP 1) under HF tensor names.

    Raises (on construction):
        CheckpointError: no file, not a torch zip file, a file with pickled objects beyond
            tensors, containers, ``argparse.Namespace``, megatron-core's enums and the numpy
            types megatron-core registers as safe, no config (config.json or args), a missing
            tensor, a non-tensor at a weight key, a tensor whose shape disagrees with the
            config, or a model tensor the config does not account for.
    """

    fmt = "megatron"

    def __init__(self, path: str) -> None:
        path = str(path)
        file = find_file(path)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: no such file (expected Megatron-LM's {FILE} there)")
        if not zipfile.is_zipfile(file):   # torch.save's format since torch 1.6 (mmap needs it)
            raise CheckpointError(f"{file}: not a torch zip checkpoint as torch.save writes it (empty, truncated, "
                                  "another format, or saved with _use_new_zipfile_serialization=False)")
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                obj = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError) as err:
            lines = str(err).splitlines()
            why = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
            raise CheckpointError(f"{file}: cannot load with torch.load(weights_only=True): {why} (save "
                                  "tensors only, e.g. Megatron-LM --no-save-optim)") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{file}: expected a state dict or {{'model': state dict}}, got {type(obj).__name__}")
        state = obj.get("model", obj)
        if not isinstance(state, dict) or "embedding.word_embeddings.weight" not in state:
            raise CheckpointError(f"{file}: no megatron-core GPTModel state dict "
                                  "(embedding.word_embeddings.weight missing)")
        self._state, self._file = state, file
        self._folder = next((d for d in (os.path.dirname(file), path) if os.path.isfile(os.path.join(d, "config.json"))),
                            None)
        if self._folder is not None:
            cfg_path = os.path.join(self._folder, "config.json")
            config = config_from_hf(_load_json(cfg_path), cfg_path)
        elif isinstance(obj.get("args"), argparse.Namespace):
            config = config_from_args(obj["args"], file)
        else:
            raise CheckpointError(f"{file}: no config.json next to it and no Megatron-LM args inside: "
                                  "the model's dimensions are unknown")
        super().__init__(path, config.with_(name=path))
        for name in self.names():
            self._check_shape(name, self._part_shape(name), file)
        self._check_all_used(file, cfg_path if self._folder is not None else "the file's args")

    def _check_all_used(self, file: str, config_source: str) -> None:
        """Refuse tensors of the file that the config does not account for (another model)."""
        used = {self._source(name) for name in self.names()}
        extra = [k for k in self._state if k not in used and not str(k).endswith(_BOOKKEEPING_SUFFIXES)]
        if extra:
            shown = ", ".join(map(str, extra[:_SHOWN_KEYS])) + (f" (+{len(extra) - _SHOWN_KEYS} more)"
                                                                if len(extra) > _SHOWN_KEYS else "")
            c = self.config
            raise CheckpointError(f"{file}: {len(extra)} tensor(s) that the model of {config_source} "
                                  f"(num_layers={c.num_layers}, tie_word_embeddings={c.tie_word_embeddings}) "
                                  f"does not use: {shown}: {config_source} and the file disagree")

    def _source(self, hf_name: str) -> str:
        """The state-dict key holding HF tensor ``hf_name`` (local or Transformer Engine norm name)."""
        source, _part = mcore_source(hf_name)
        for local, te in TE_NORM_NAMES.items():   # a Transformer Engine spec's fused norm
            if source not in self._state and source.endswith("." + local):
                source = source[: -len(local)] + te
        return source

    def _fused(self, hf_name: str) -> tuple[torch.Tensor, int | None]:
        """(the state-dict tensor holding HF tensor ``hf_name``, a view of the mapped file; its
        part: None = all of it, 0/1/2 = q/k/v of ``linear_qkv``, 0/1 = gate/up of ``linear_fc1``)."""
        source, part = self._source(hf_name), mcore_source(hf_name)[1]
        if source not in self._state:
            raise CheckpointError(f"{self.path}: tensor {source} (for {hf_name}) not in the state dict")
        t = self._state[source]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{self._file}: {source} holds a {type(t).__name__}, expected a tensor")
        assert part is None or source.endswith((QKV, FC1)), source
        return t, part

    def _qkv_rows(self, t: torch.Tensor, part: int) -> tuple[int, int]:
        """(rows of the part in each of the G groups of ``linear_qkv``, its offset in a group)."""
        groups, dh = self.config.num_kv_heads, self.config.head_dim
        per_group = t.shape[0] // groups
        q_rows = per_group - 2 * dh
        return ((q_rows, 0), (dh, q_rows), (dh, q_rows + dh))[part]

    def _part_shape(self, hf_name: str) -> tuple[int, ...]:
        """Shape of HF tensor ``hf_name`` without materialising it."""
        t, part = self._fused(hf_name)
        if part is None:
            return tuple(t.shape)
        if self._source(hf_name).endswith(QKV):
            if t.dim() != 2 or t.shape[0] % self.config.num_kv_heads:
                return tuple(t.shape)      # refused by the shape check that follows
            rows, _ = self._qkv_rows(t, part)
            return (rows * self.config.num_kv_heads, t.shape[1])
        return tuple(split_fc1(t)[part].shape)

    def _read_stored(self, name, rows, cols):
        """Rows ``rows`` (columns ``cols``) of HF tensor ``name``: only that block is copied out of
        the mapped file, also for q / k / v, whose rows interleave over the groups of the fused
        ``linear_qkv`` (the part's row r is group r // rows-per-group)."""
        t, part = self._fused(name)
        if part is not None and self._source(name).endswith(QKV):
            per, offset = self._qkv_rows(t, part)
            r = torch.arange(rows[0], rows[1])
            if cols is not None:
                t = t[:, cols[0]:cols[1]]
            return t.index_select(0, (r // per) * (t.shape[0] // self.config.num_kv_heads) + offset + r % per)
        if part is not None:
            t = split_fc1(t)[part]
        t = t[rows[0]:rows[1]] if cols is None else t[rows[0]:rows[1], cols[0]:cols[1]]
        return t.clone(memory_format=torch.contiguous_format)

    def tokenizer(self):
        """The tokenizer of the ``config.json`` folder (``tokenizer.json``).

        Raises:
            CheckpointError: no config.json folder or no tokenizer.json in it.
        """
        from cp_megatron.tokenizer import Tokenizer

        if self._folder is None:
            raise CheckpointError(f"{self.path}: no tokenizer (put tokenizer.json and config.json next to the file)")
        return Tokenizer.from_hf_folder(self._folder, bos_id=self.config.bos_token_id,
                                        eos_ids=self.config.eos_token_ids)
