"""Reader for a megatron-core Llama ``GPTModel`` state dict saved at TP 1, PP 1.

Accepted files (``torch.save``):

* ``model.state_dict()`` of a megatron-core ``GPTModel`` (local or Transformer Engine spec),
  or ``{"model": state_dict, ...}`` as Megatron-LM's ``model_optim_rng.pt`` stores it
  (save with ``--no-save-optim --no-save-rng``: the file is opened with
  ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects);
* ``path`` is the ``.pt`` file, or a folder holding ``model_optim_rng.pt`` or Megatron-LM's
  ``latest_checkpointed_iteration.txt`` + ``iter_NNNNNNN/mp_rank_00/model_optim_rng.pt``.

The model's dimensions come from a Hugging Face ``config.json`` in the file's folder or in
``path`` (it also names the tokenizer files), else from Megatron-LM's ``args`` in the file.
TP > 1 or PP > 1 checkpoints (``mp_rank_01``, ``args.tensor_model_parallel_size > 1``) are
refused: merge them to TP 1 with Megatron-LM's checkpoint converter first.

Tensors come out under HF names and in HF layout: ``linear_qkv`` is split per query group
into q / k / v, ``linear_fc1`` into gate / up (:mod:`cp_megatron.checkpoint.mcore_keys`).

Source: megatron-core ``GPTModel.state_dict`` keys (0.16); Megatron-LM
``megatron/training/checkpointing.py`` (``get_checkpoint_name``, tracker file, ``args``).
"""

from __future__ import annotations

import argparse
import os
import pickle

import torch

from cp_megatron.checkpoint.base import CheckpointError, CheckpointReader
from cp_megatron.checkpoint.hf import _load_json, config_from_hf
from cp_megatron.checkpoint.mcore_keys import FC1, QKV, TE_NORM_NAMES, mcore_source, split_fc1, split_qkv
from cp_megatron.model.config import ModelConfig, RopeScaling

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"


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


def find_file(path: str) -> str:
    """The ``.pt`` file of a megatron checkpoint path (file, folder, or Megatron-LM save dir).

    Raises:
        CheckpointError: nothing found, or a TP/PP-sharded save (``mp_rank_01...``).
    """
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, FILE)):
        return os.path.join(path, FILE)
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as f:
            it = f.read().strip()
        folder = os.path.join(path, "release" if it == "release" else f"iter_{int(it):07d}")
        ranks = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        if ranks != ["mp_rank_00"]:
            raise CheckpointError(f"{folder}: expected one TP 1 PP 1 folder mp_rank_00, found {ranks or 'none'} "
                                  "(merge to TP 1 PP 1 with Megatron-LM's checkpoint converter)")
        return os.path.join(folder, "mp_rank_00", FILE)
    raise CheckpointError(f"{path}: no megatron checkpoint ({FILE}, {TRACKER} or a .pt file)")


def config_from_args(args, where: str) -> ModelConfig:
    """ModelConfig from Megatron-LM's ``args`` (argparse.Namespace) of a Llama-style GPT.

    Raises:
        CheckpointError: not a Llama-style model (no RoPE / SwiGLU / RMSNorm, biases,
            untied-vs-tied unknown) or a TP / PP size above 1.
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
        CheckpointError: no file, a file with pickled objects beyond tensors, containers,
            ``argparse.Namespace`` and megatron-core's enums, no config (config.json or args), a missing tensor or
            one whose shape disagrees with the config.
    """

    fmt = "megatron"

    def __init__(self, path: str) -> None:
        path = str(path)
        file = find_file(path)
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                obj = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError) as err:
            lines = str(err).splitlines()
            why = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
            raise CheckpointError(f"{file}: cannot load with torch.load(weights_only=True): {why} (save "
                                  "tensors only, e.g. Megatron-LM --no-save-optim --no-save-rng)") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{file}: expected a state dict or {{'model': state dict}}, got {type(obj).__name__}")
        state = obj.get("model", obj)
        if not isinstance(state, dict) or "embedding.word_embeddings.weight" not in state:
            raise CheckpointError(f"{file}: no megatron-core GPTModel state dict "
                                  "(embedding.word_embeddings.weight missing)")
        self._state = state
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
            self._check_shape(name, self._tensor(name).shape, file)

    def _tensor(self, hf_name: str) -> torch.Tensor:
        """The full HF-layout tensor (a view of the mapped file)."""
        source, part = mcore_source(hf_name)
        for local, te in TE_NORM_NAMES.items():   # a Transformer Engine spec's fused norm
            if source not in self._state and source.endswith("." + local):
                source = source[: -len(local)] + te
        if source not in self._state:
            raise CheckpointError(f"{self.path}: tensor {source} (for {hf_name}) not in the state dict")
        t = self._state[source]
        if part is None:
            return t
        if source.endswith(QKV):
            return split_qkv(t, self.config.num_kv_heads, self.config.head_dim)[part]
        assert source.endswith(FC1), source
        return split_fc1(t)[part]

    def _read_stored(self, name, rows, cols):
        t = self._tensor(name)
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
