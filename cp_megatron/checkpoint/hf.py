"""Reader for Hugging Face Llama checkpoints: ``config.json`` + safetensors (single or sharded).

Tensors are read through ``safetensors.safe_open(...).get_slice`` (memory-mapped), so a TP
slice reads only its own bytes.  Headers of every file are checked when the reader opens:
a missing shard file, a missing tensor or a tensor whose shape disagrees with the config
fails at once, naming the file and the tensor.

Source: transformers ``LlamaConfig`` (config.json keys, v4 ``rope_theta``/``rope_scaling``
and v5 ``rope_parameters``); safetensors format and ``model.safetensors.index.json``
``weight_map``.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from cp_megatron.checkpoint.base import CheckpointError, CheckpointReader
from cp_megatron.model.config import ModelConfig, RopeScaling

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _ids(value) -> tuple:
    """A token id or list of ids from a config -> tuple of ints (None -> ())."""
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def config_from_hf(cfg: dict, where: str, generation: dict | None = None) -> ModelConfig:
    """Build a ModelConfig from a HF Llama ``config.json`` dict.

    Args:
        cfg: the parsed config.json.
        where: path for messages and ``ModelConfig.name``.
        generation: the parsed generation_config.json, if any; its eos ids are added.

    Raises:
        CheckpointError: not a Llama config, a missing key, biases / activation / RoPE
            scaling this package does not implement.
    """
    if cfg.get("model_type") != "llama":
        raise CheckpointError(f"{where}: model_type {cfg.get('model_type')!r} is not 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or params
        rope_theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
        elif rope_type == "default":
            rope_scaling = None
        else:
            raise CheckpointError(f"{where}: rope_type {rope_type!r} is not supported (default, llama3)")
        eos = _ids(cfg.get("eos_token_id"))
        eos += tuple(i for i in _ids((generation or {}).get("eos_token_id")) if i not in eos)
        return ModelConfig(
            name=where, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), rope_theta=rope_theta,
            rope_scaling=rope_scaling, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
            eos_token_ids=eos)
    except CheckpointError:
        raise
    except KeyError as err:
        raise CheckpointError(f"{where}: missing key {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:  # ModelConfig's own checks, non-numeric values
        raise CheckpointError(f"{where}: {err}") from None


class HFReader(CheckpointReader):
    """A Hugging Face Llama folder: ``config.json`` and ``model.safetensors`` or an index + shards.

    Raises (on construction):
        CheckpointError: no config.json / weights, a shard file the index names is missing,
            an unparsable (e.g. truncated) safetensors file, a tensor missing or of the wrong shape.
    """

    fmt = "hf"

    def __init__(self, folder: str) -> None:
        folder = str(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: not a folder (hf checkpoints are folders with config.json)")
        generation_path = os.path.join(folder, "generation_config.json")
        generation = _load_json(generation_path) if os.path.exists(generation_path) else None
        config_path = os.path.join(folder, "config.json")
        super().__init__(folder, config_from_hf(_load_json(config_path), config_path, generation)
                         .with_(name=folder))
        self._handles: dict[str, object] = {}
        self._keys: dict[str, set] = {}
        self._file_of: dict[str, str] = {}

        index_path = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index_path):
            weight_map = _load_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map'")
            for name in self.names():
                if name not in weight_map:
                    raise CheckpointError(f"{index_path}: no entry for tensor {name}")
                self._file_of[name] = os.path.join(folder, weight_map[name])
        elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
            self._file_of = {name: os.path.join(folder, SINGLE_FILE) for name in self.names()}
        else:
            raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

        for name in self.names():  # headers only: cheap even for hundreds of shards
            path = self._file_of[name]
            handle = self._open(path, name)
            if name not in self._keys.setdefault(path, set(handle.keys())):
                raise CheckpointError(f"{path}: tensor {name} not found in file")
            self._check_shape(name, handle.get_slice(name).get_shape(), path)

    def release(self) -> None:
        """Drop the open safetensors maps (reopened lazily by the next read)."""
        self._handles.clear()

    def _open(self, path: str, name: str):
        if path not in self._handles:
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: shard file missing (holds tensor {name})")
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: cannot parse safetensors file (tensor {name}): {err}") from None
        return self._handles[path]

    def _read_stored(self, name, rows, cols):
        path = self._file_of[name]
        part = self._open(path, name).get_slice(name)
        try:
            view = part[rows[0]:rows[1]] if cols is None else part[rows[0]:rows[1], cols[0]:cols[1]]
            return view.clone(memory_format=torch.contiguous_format)  # get_slice returns views of the map
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: tensor {name}: cannot read ({err})") from None

    def tokenizer(self):
        """Tokenizer from ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``chat_template.jinja``).

        Raises:
            CheckpointError: no tokenizer.json in the folder.
        """
        from cp_megatron.tokenizer import Tokenizer

        return Tokenizer.from_hf_folder(self.path, bos_id=self.config.bos_token_id,
                                        eos_ids=self.config.eos_token_ids)

