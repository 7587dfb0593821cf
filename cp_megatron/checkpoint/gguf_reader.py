"""Reader for llama.cpp GGUF files (architecture ``llama``), quantized or not.

``gguf.GGUFReader`` memory-maps the file; a tensor (or TP slice) is cut from the map as
raw rows and dequantized with ``gguf.quants.dequantize`` (block quants pack along the row,
so a row range is always cheap; a column range is cut from the bytes when it falls on
block boundaries and otherwise dequantized in bounded row chunks).  llama.cpp stores
q/k rows Meta-interleaved per head; the base class permutes them back to HF order.
``output.weight`` absent means tied embeddings.  Llama 3.1 files carry the RoPE scaling as
a ``rope_freqs.weight`` tensor of per-frequency factors; the llama3 scaling parameters are
recovered from it and checked.

Source: GGUF spec (ggml docs/gguf.md: ``general.architecture``, ``llama.*`` keys,
``tokenizer.ggml.*``); llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel.permute``,
``rope_freqs`` generation); gguf-py ``GGUFReader``, ``quants.dequantize``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader as _GGUFFile, GGUFValueType
from gguf.quants import dequantize

from cp_megatron.checkpoint import keys
from cp_megatron.checkpoint.base import CheckpointError, CheckpointReader
from cp_megatron.model.config import ModelConfig, RopeScaling

if TYPE_CHECKING:  # torch is imported where a tensor is read: pre-flight reads only the header
    import torch

_CHUNK_ELEMENTS = 1 << 24  # dequantize at most this many float32 values at a time (64 MiB)
_MISSING = object()


def field_value(field):
    """A GGUF metadata value as a Python int / float / bool / str / list.

    Source: gguf-py ``ReaderField`` (parts / data / types layout).
    """
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def llama3_rope_factors(head_dim: int, rope_theta: float, scaling: RopeScaling) -> list[float]:
    """Per-frequency divisors llama.cpp writes as ``rope_freqs.weight`` for llama3 scaling.

    Returns:
        ``head_dim // 2`` factors (1 for high frequencies, ``scaling.factor`` for low ones).
    """
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope_theta ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(scaling.factor)
        else:
            smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            out.append(1.0 / ((1 - smooth) / scaling.factor + smooth))
    return out


def _to_torch(array: np.ndarray) -> torch.Tensor:
    """float32 torch tensor owning its memory (read-only memmap views are copied)."""
    import torch

    array = array.astype(np.float32, copy=False)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class GGUFCheckpoint(CheckpointReader):
    """One ``.gguf`` file of a llama-architecture model.

    Raises (on construction):
        CheckpointError: unparsable (e.g. truncated) file, ``general.architecture`` other than
            llama, missing metadata, a tensor missing or of the wrong shape, RoPE scaling this
            package does not implement.
    """

    fmt = "gguf"
    interleaved_qk = True

    def __init__(self, path: str) -> None:
        path = str(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: GGUF file not found")
        self.path = path
        try:
            self._file = _GGUFFile(path, "r")
        except (ValueError, OSError, IndexError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: cannot parse GGUF file (truncated or corrupt): {err}") from None
        self._tensors = {t.name: t for t in self._file.tensors}
        super().__init__(path, self._build_config(path))
        for name in self.names():
            tensor = self._tensors.get(keys.gguf_name(name))
            if tensor is None:
                raise CheckpointError(f"{path}: tensor {name} (GGUF {keys.gguf_name(name)}) not found")
            self._check_shape(name, tuple(int(n) for n in reversed(tensor.shape.tolist())), path)

    # -- metadata -------------------------------------------------------------------------
    def metadata(self, key: str, default=_MISSING):
        """Value of GGUF metadata ``key`` (``default`` when absent).

        Raises:
            CheckpointError: ``key`` absent and no default given.
        """
        field = self._file.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: metadata key {key!r} missing")
            return default
        try:
            return field_value(field)
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is not valid UTF-8 ({err})") from None

    def _build_config(self, path: str) -> ModelConfig:
        arch = self.metadata("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{path}: unknown GGUF architecture {arch!r} (only 'llama' is supported)")
        if self.metadata("llama.expert_count", 0):
            raise CheckpointError(f"{path}: mixture-of-experts llama GGUF is not supported")
        hidden = int(self.metadata("llama.embedding_length"))
        heads = int(self.metadata("llama.attention.head_count"))
        head_dim = int(self.metadata("llama.attention.key_length", hidden // heads))
        rotary = int(self.metadata("llama.rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise CheckpointError(f"{path}: partial rotary (rope.dimension_count {rotary} != head dim "
                                  f"{head_dim}) is not supported")
        scaling_type = self.metadata("llama.rope.scaling.type", "none")
        if scaling_type != "none":
            raise CheckpointError(f"{path}: rope.scaling.type {scaling_type!r} is not supported")
        rope_theta = float(self.metadata("llama.rope.freq_base", 10000.0))
        vocab = self.metadata("llama.vocab_size", None)
        if vocab is None:
            vocab = len(self.metadata("tokenizer.ggml.tokens"))
        eos = []
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            value = self.metadata(key, None)
            if value is not None and int(value) not in eos:
                eos.append(int(value))
        bos = self.metadata("tokenizer.ggml.bos_token_id", None)
        try:
            return ModelConfig(
                name=path, vocab_size=int(vocab), hidden_size=hidden,
                intermediate_size=int(self.metadata("llama.feed_forward_length")),
                num_layers=int(self.metadata("llama.block_count")), num_heads=heads,
                num_kv_heads=int(self.metadata("llama.attention.head_count_kv", heads)), head_dim=head_dim,
                rope_theta=rope_theta, rope_scaling=self._rope_scaling(head_dim, rope_theta),
                rms_norm_eps=float(self.metadata("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                max_position_embeddings=int(self.metadata("llama.context_length")),
                tie_word_embeddings=keys.GGUF_GLOBAL[keys.LM_HEAD] not in self._tensors,
                bos_token_id=None if bos is None else int(bos), eos_token_ids=tuple(eos))
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None

    def _rope_scaling(self, head_dim: int, rope_theta: float) -> RopeScaling | None:
        """Recover Llama 3.1 scaling from ``rope_freqs.weight`` (None when the file has none)."""
        tensor = self._tensors.get("rope_freqs.weight")
        if tensor is None:
            return None
        factors = dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float64).reshape(-1)
        candidate = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
        want = np.array(llama3_rope_factors(head_dim, rope_theta, candidate))
        if factors.shape != want.shape or not np.allclose(factors, want, rtol=1e-4, atol=0):
            raise CheckpointError(f"{self.path}: tensor rope_freqs.weight does not match llama3 RoPE scaling "
                                  f"(factor {candidate.factor}, low 1, high 4, original context 8192)")
        return candidate

    # -- tensors --------------------------------------------------------------------------
    def _read_stored(self, name, rows, cols):
        tensor = self._tensors[keys.gguf_name(name)]
        qtype, data = tensor.tensor_type, tensor.data
        try:
            if cols is None:
                return _to_torch(dequantize(np.ascontiguousarray(data[rows[0]:rows[1]]), qtype).reshape(-1))
            block, type_size = GGML_QUANT_SIZES[qtype]
            raw = data[rows[0]:rows[1]]
            if data.dtype != np.uint8:  # typed (F32/F16/...): plain column slice
                out = dequantize(np.ascontiguousarray(raw[:, cols[0]:cols[1]]), qtype)
            elif cols[0] % block == 0 and cols[1] % block == 0:  # whole quant blocks: slice bytes
                out = dequantize(np.ascontiguousarray(
                    raw[:, cols[0] // block * type_size:cols[1] // block * type_size]), qtype)
            else:  # columns cut quant blocks: dequantize whole rows in bounded chunks
                width = data.shape[1] // type_size * block
                step = max(1, _CHUNK_ELEMENTS // width)
                out = np.concatenate([dequantize(np.ascontiguousarray(raw[i:i + step]), qtype)[:, cols[0]:cols[1]]
                                      for i in range(0, raw.shape[0], step)], axis=0)
        except (ValueError, NotImplementedError) as err:
            raise CheckpointError(f"{self.path}: tensor {name}: cannot dequantize {qtype.name}: {err}") from None
        return _to_torch(out)

    def tokenizer(self):
        """Byte-level BPE tokenizer from the vocabulary embedded in the file.

        Raises:
            CheckpointError: no vocabulary, or a tokenizer model / pre-tokenizer not supported.
        """
        from cp_megatron.checkpoint.gguf_vocab import tokenizer_from_gguf

        return tokenizer_from_gguf(self)
