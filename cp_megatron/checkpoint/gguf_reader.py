"""Reader for llama.cpp GGUF files (architecture ``llama``), quantized or not.

``gguf.GGUFReader`` parses the header once into a :class:`GGUFIndex` (every metadata value as
a Python value, every tensor's type, offset and stored shape; picklable, so pre-flight hands it
to the ranks and no rank parses the file again: parsing SmolLM2's 49K-token vocabulary takes
seconds).  The reader memory-maps the file; a tensor (or TP slice) is cut from the map as
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


class _GGUFHeaderReader(_GGUFFile):
    """gguf-py's ``GGUFReader``, walking the header on a plain ndarray view of its memory map.

    The stock reader cuts every value from an ``np.memmap`` (each of a 49K-token vocabulary's
    strings twice: length, then bytes), and every cut runs memmap's Python-level
    ``__getitem__`` / ``__array_finalize__``: ~3 s of SmolLM2's ~4.6 s parse.  ``_get`` below is
    gguf-py's own on ``self.data.view(np.ndarray)`` (the same bytes, offsets, dtypes and byte
    order), so fields and tensors come out as the stock reader makes them
    (tests/test_checkpoint.py compares the two).

    Source: gguf-py 0.19 ``GGUFReader._get``; llama.cpp PR #10159 / #13378 (the same cost).
    """

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        itemsize = int(np.empty([], dtype=dtype).itemsize)
        arr = plain[offset:offset + itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


class _Undecodable:
    """A metadata string that is not UTF-8 (an error only when the key is read)."""

    def __init__(self, error: str) -> None:
        self.error = error


@dataclass(frozen=True)
class GGUFTensorEntry:
    """Where one tensor lies in a GGUF file and how it is stored.

    Attributes:
        qtype: its ``GGMLQuantizationType`` value.
        dims: GGUF dims, innermost first (``ne[0]`` = columns of a 2-D tensor).
        offset: byte offset of its data from the start of the file.
        dtype: numpy dtype of the stored array (``uint8`` for block quants).
        array_shape: the stored array's shape (rows, bytes per row for block quants), as
            gguf-py's ``ReaderTensor.data`` has it.
    """

    qtype: int
    dims: tuple
    offset: int
    dtype: str
    array_shape: tuple

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * math.prod(self.array_shape))


@dataclass(frozen=True)
class GGUFIndex:
    """A GGUF file's parsed header: metadata and tensor placement, picklable.

    Built once (:meth:`parse`, gguf-py's ``GGUFReader``), then handed to every process that
    opens the same file (``GGUFCheckpoint(path, index=...)``), which only memory-maps it.
    ``stat`` (device, inode, size, mtime in ns) identifies the file the index was parsed from.

    Source: GGUF spec (ggml docs/gguf.md: header, metadata key/values, tensor infos, aligned
    tensor data); gguf-py ``GGUFReader``.
    """

    stat: tuple
    metadata: dict
    tensors: dict

    @staticmethod
    def file_stat(path: str) -> tuple:
        st = os.stat(path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def parse(cls, path: str) -> "GGUFIndex":
        """Parse ``path``'s header with gguf-py.

        Raises:
            CheckpointError: the file cannot be parsed (truncated or corrupt).
        """
        stat = cls.file_stat(path)
        try:
            gguf_file = _GGUFHeaderReader(path, "r")
        except (ValueError, OSError, IndexError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: cannot parse GGUF file (truncated or corrupt): {err}") from None
        metadata = {}
        for key, field in gguf_file.fields.items():
            try:
                metadata[key] = field_value(field)
            except UnicodeDecodeError as err:
                metadata[key] = _Undecodable(str(err))
        tensors = {t.name: GGUFTensorEntry(int(t.tensor_type), tuple(int(n) for n in t.shape.tolist()),
                                           int(t.data_offset), t.data.dtype.str, tuple(t.data.shape))
                   for t in gguf_file.tensors}
        return cls(stat, metadata, tensors)


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

    def __init__(self, path: str, index: GGUFIndex | None = None) -> None:
        """Open ``path``; ``index``: its :class:`GGUFIndex` parsed elsewhere (pre-flight),
        else the header is parsed here.

        Raises:
            CheckpointError: also when ``index`` was parsed from another file or from this
                one before it changed.
        """
        path = str(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: GGUF file not found")
        self.path = path
        if index is None:
            index = GGUFIndex.parse(path)
        elif index.stat != GGUFIndex.file_stat(path):
            raise CheckpointError(f"{path}: the GGUF file changed since its header was parsed (pre-flight); "
                                  f"start the job again")
        self.index = index
        self._tensors = index.tensors
        self._map = np.memmap(path, mode="r")   # the index's tensors fit in it: same size as parsed
        super().__init__(path, self._build_config(path))
        for name in self.names():
            tensor = self._tensors.get(keys.gguf_name(name))
            if tensor is None:
                raise CheckpointError(f"{path}: tensor {name} (GGUF {keys.gguf_name(name)}) not found")
            self._check_shape(name, tuple(reversed(tensor.dims)), path)

    # -- metadata -------------------------------------------------------------------------
    def metadata(self, key: str, default=_MISSING):
        """Value of GGUF metadata ``key`` (``default`` when absent).

        Raises:
            CheckpointError: ``key`` absent and no default given.
        """
        value = self.index.metadata.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: metadata key {key!r} missing")
            return default
        if isinstance(value, _Undecodable):
            raise CheckpointError(f"{self.path}: metadata key {key!r} is not valid UTF-8 ({value.error})")
        return value

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
        if "rope_freqs.weight" not in self._tensors:
            return None
        qtype, data = self._stored("rope_freqs.weight")
        factors = dequantize(np.asarray(data), qtype).astype(np.float64).reshape(-1)
        candidate = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
        want = np.array(llama3_rope_factors(head_dim, rope_theta, candidate))
        if factors.shape != want.shape or not np.allclose(factors, want, rtol=1e-4, atol=0):
            raise CheckpointError(f"{self.path}: tensor rope_freqs.weight does not match llama3 RoPE scaling "
                                  f"(factor {candidate.factor}, low 1, high 4, original context 8192)")
        return candidate

    # -- tensors --------------------------------------------------------------------------
    def _stored(self, gguf_name: str) -> tuple[GGMLQuantizationType, np.ndarray]:
        """(quant type, the stored array: a view of the memory map) of GGUF tensor ``gguf_name``."""
        t = self._tensors[gguf_name]
        data = self._map[t.offset:t.offset + t.nbytes].view(np.dtype(t.dtype)).reshape(t.array_shape)
        return GGMLQuantizationType(t.qtype), data

    def _read_stored(self, name, rows, cols):
        qtype, data = self._stored(keys.gguf_name(name))
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
