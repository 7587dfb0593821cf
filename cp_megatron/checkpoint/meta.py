"""Reader for Meta's original Llama 3 checkpoints: ``params.json`` + ``consolidated.NN.pth``.

Meta saves one file per model-parallel (MP) rank.  Each tensor is either replicated
(norms) or cut into MP equal blocks along one dim: wq/wk/wv/w1/w3/output along dim 0,
wo/w2 along dim 1, tok_embeddings along dim 0 in Llama 3 (``VocabParallelEmbedding``) and
dim 1 in Llama 2 (``ParallelEmbedding``).  The split dim is not stored, so it is found from
each shard's shape against the config (which also catches a wrong shape).  Files are opened
with ``torch.load(mmap=True, weights_only=True)``: a TP slice touches only its own pages and
may be assembled from several MP shards (any TP size dividing the heads, whatever MP is).
q/k rows are stored interleaved per head and are permuted to HF rotate-half order.

Source: meta-llama/llama3 ``llama/model.py`` (``ModelArgs``, ``FeedForward``, fairscale
parallel layers); transformers ``convert_llama_weights_to_hf.py`` (``permute``, concat dims).
"""

from __future__ import annotations

import json
import os
import pickle
import re

import torch

from cp_megatron.checkpoint import keys, layout
from cp_megatron.checkpoint.base import CheckpointError, CheckpointReader
from cp_megatron.model.config import ModelConfig, RopeScaling

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
TOKENIZER_FILE = "tokenizer.model"


def config_from_params(params: dict, where: str, tied: bool, num_base_tokens: int | None) -> ModelConfig:
    """Build a ModelConfig from Meta ``params.json``.

    Args:
        params: parsed params.json (dim, n_layers, n_heads, n_kv_heads, vocab_size,
            ffn_dim_multiplier, multiple_of, norm_eps, rope_theta, use_scaled_rope;
            optional rope_scaling_factor, rope_high_freq_factor, max_seq_len).
        where: path for messages and the config name.
        tied: the checkpoint has no ``output.weight``.
        num_base_tokens: BPE ranks in tokenizer.model (special ids follow them), or None.

    Returns:
        ModelConfig; intermediate_size by Meta's formula; max_position_embeddings is
        ``max_seq_len`` if given, else 131072 with ``use_scaled_rope`` (Llama 3.1) and 8192
        without (Llama 3), as transformers' converter sets them.

    Raises:
        CheckpointError: a missing key or vocab_size <= 0.
    """
    try:
        dim, heads = int(params["dim"]), int(params["n_heads"])
        if int(params["vocab_size"]) <= 0:
            raise CheckpointError(f"{where}: vocab_size {params['vocab_size']} must be positive")
        scaled = bool(params.get("use_scaled_rope", False))
        rope_scaling = RopeScaling(
            factor=float(params.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0,
            high_freq_factor=float(params.get("rope_high_freq_factor", 4.0)),
            original_max_position_embeddings=8192) if scaled else None
        bos, eos = None, ()
        if num_base_tokens is not None:  # Llama 3 tokenizer.py: specials follow the ranks
            bos, eos = num_base_tokens, (num_base_tokens + 1, num_base_tokens + 8, num_base_tokens + 9)
        return ModelConfig(
            name=where, vocab_size=int(params["vocab_size"]), hidden_size=dim,
            intermediate_size=layout.meta_ffn_dim(dim, int(params.get("multiple_of", 256)),
                                                  params.get("ffn_dim_multiplier")),
            num_layers=int(params["n_layers"]), num_heads=heads,
            num_kv_heads=int(params.get("n_kv_heads") or heads), head_dim=dim // heads,
            rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=rope_scaling,
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            max_position_embeddings=int(params.get("max_seq_len", 131072 if scaled else 8192)),
            tie_word_embeddings=tied, bos_token_id=bos, eos_token_ids=eos)
    except KeyError as err:
        raise CheckpointError(f"{where}: missing key {err.args[0]!r}") from None


def _load_shard(path: str) -> dict:
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: cannot parse .pth file (truncated or not a torch zip "
                              f"checkpoint): {str(err).splitlines()[0]}") from None


def _narrow(t: torch.Tensor, bounds) -> torch.Tensor:
    for dim, (start, stop) in enumerate(bounds):
        t = t.narrow(dim, start, stop - start)
    return t


class MetaReader(CheckpointReader):
    """A Meta Llama 3 folder: params.json, consolidated.00.pth ... consolidated.{MP-1}.pth,
    optional tokenizer.model.

    Raises (on construction):
        CheckpointError: no params.json or shards, a gap in the shard numbers, a truncated
            shard, a tensor missing from a shard or whose shard shape fits no split of the
            config's shape.
    """

    fmt = "meta"
    interleaved_qk = True

    def __init__(self, folder: str) -> None:
        folder = str(folder)
        params_path = os.path.join(folder, "params.json")
        try:
            with open(params_path, encoding="utf-8") as f:
                params = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{params_path}: cannot read params.json ({err})") from None

        numbers = sorted(int(m.group(1)) for m in map(_SHARD_RE.match, os.listdir(folder)) if m)
        if not numbers:
            raise CheckpointError(f"{folder}: no consolidated.NN.pth files")
        self._paths = [os.path.join(folder, f"consolidated.{i:02d}.pth") for i in range(numbers[-1] + 1)]
        for path in self._paths:
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: shard file missing (model-parallel size {len(self._paths)})")
        self._shards = [_load_shard(path) for path in self._paths]

        tok_path = os.path.join(folder, TOKENIZER_FILE)
        self._tokenizer_path = tok_path if os.path.exists(tok_path) else None
        num_base = None
        if self._tokenizer_path:
            with open(tok_path, "rb") as f:
                num_base = sum(1 for line in f if line.strip())
        tied = keys.META_GLOBAL[keys.LM_HEAD] not in self._shards[0]
        super().__init__(folder, config_from_params(params, params_path, tied, num_base).with_(name=folder))

        self._split: dict[str, int | None] = {}
        for name in self.names():
            self._split[name] = self._find_split(name)

    @property
    def model_parallel_size(self) -> int:
        """MP: number of consolidated.NN.pth files."""
        return len(self._paths)

    def _find_split(self, name: str) -> int | None:
        """The dim this tensor is cut along across MP shards (None: replicated)."""
        key, mp = keys.meta_name(name), len(self._shards)
        full = layout.expected_shape(self.config, name)
        shapes = []
        for path, shard in zip(self._paths, self._shards):
            if key not in shard:
                raise CheckpointError(f"{path}: tensor {name} (Meta key {key}) not found")
            shapes.append(tuple(shard[key].shape))
        if any(s != shapes[0] for s in shapes):
            raise CheckpointError(f"{self.path}: tensor {name} (Meta key {key}): shards disagree on shape: {shapes}")
        got = shapes[0]
        if got == full:
            return None
        for dim in range(len(full)):
            cut = list(full)
            cut[dim] = full[dim] // mp
            if full[dim] % mp == 0 and tuple(cut) == got:
                return dim
        raise CheckpointError(f"{self._paths[0]}: tensor {name} (Meta key {key}): shard shape {got} does not match "
                              f"the config, expected {full} whole or split over {mp} shards "
                              f"(is a consolidated.NN.pth missing?)")

    def _read_stored(self, name, rows, cols):
        key, split = keys.meta_name(name), self._split[name]
        bounds = [rows] if cols is None else [rows, cols]
        if split is None:
            return _narrow(self._shards[0][key], bounds).clone(memory_format=torch.contiguous_format)
        per = layout.expected_shape(self.config, name)[split] // len(self._shards)
        lo, hi = bounds[split]
        parts = []
        for s in range(lo // per, (hi - 1) // per + 1):  # only the shards the slice overlaps
            local = list(bounds)
            local[split] = (max(lo, s * per) - s * per, min(hi, (s + 1) * per) - s * per)
            parts.append(_narrow(self._shards[s][key], local))
        if len(parts) == 1:  # copy out of the map
            return parts[0].clone(memory_format=torch.contiguous_format)
        return torch.cat(parts, dim=split)

    def tokenizer(self):
        """The Llama 3 tiktoken tokenizer from ``tokenizer.model``.

        Raises:
            CheckpointError: the folder has no tokenizer.model.
        """
        if self._tokenizer_path is None:
            raise CheckpointError(f"{self.path}: no {TOKENIZER_FILE} in this Meta checkpoint")
        from cp_megatron.tokenizer import Tokenizer

        return Tokenizer.from_tiktoken_file(self._tokenizer_path)
