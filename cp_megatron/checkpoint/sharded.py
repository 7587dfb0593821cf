"""The cp_megatron TP-sharded checkpoint: one safetensors file per TP rank + a JSON metadata file.

    DST/model-tp00-of-08.safetensors ... model-tp07-of-08.safetensors
    DST/cp_megatron_checkpoint.json      (written last: its presence marks a complete checkpoint)
    DST/tokenizer.json, tokenizer_config.json | tokenizer.model, generation_config.json (if any)

File ``r`` holds TP rank r's slice of every tensor (canonical HF names, HF layout), cut along
the dim :mod:`cp_megatron.model.weights` splits it (column-parallel dim 0, row-parallel dim 1);
replicated tensors (norms) are stored whole in every file, so a rank of the stored TP size
reads one file only.

FP8 row-wise checkpoints (``convert --weights fp8-rowwise``, format_version 2) store the
attention and MLP weights as ``F8_E4M3`` and, beside each, ``NAME_scale``: float32 ``[rows]``,
one scale per output row of the whole tensor (split like the weight's rows: dim 0 for a
column-parallel weight, replicated for a row-parallel one).  The metadata entry of such a
weight names its scale (``"scale"``).  :meth:`ShardedReader.read_fp8` returns both as stored;
:meth:`~ShardedReader.read` returns ``q * scale`` (dequantised) in the dtype asked for.  :class:`ShardedReader` serves any TP size the heads allow: a slice is
assembled from the stored shards it overlaps, as the Meta reader does for MP shards.

:class:`SafetensorsWriter` writes a safetensors file tensor by tensor (the header, with every
offset, is known before the first byte of data), so a converter holds one tensor at a time;
:func:`write_shards` and :func:`build_metadata` write this format (``cp-megatron convert``).

Source: safetensors format (huggingface.co/docs/safetensors: 8-byte little-endian header
length, JSON header with dtype / shape / data_offsets, raw C-order little-endian bytes);
megatron-core ColumnParallelLinear / RowParallelLinear partitioning.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from safetensors import SafetensorError, safe_open

from cp_megatron.checkpoint import layout
from cp_megatron.checkpoint.base import CheckpointError, CheckpointReader
from cp_megatron.dtypes import BY_SHORT, torch_dtype
from cp_megatron.model.config import ModelConfig

METADATA_FILE = "cp_megatron_checkpoint.json"
FORMAT_NAME = "cp_megatron-sharded"
FORMAT_VERSION = 2            # 2: FP8 weights with scale entries; 1: float weights only

# torch dtype <-> safetensors dtype code <-> name used in the metadata file
_STORED = ("fp32", "bf16", "fp16", "fp8")  # dtypes a sharded checkpoint stores (rows of the one dtype table)
SAFETENSORS_DTYPE = {torch_dtype(s): BY_SHORT[s].safetensors for s in _STORED}
DTYPE_NAME = {torch_dtype(s): BY_SHORT[s].name for s in _STORED}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAME.items()}


def shard_file(tp_rank: int, tp_size: int) -> str:
    """File name of TP rank ``tp_rank``'s shard, e.g. ``model-tp01-of-08.safetensors``."""
    return f"model-tp{tp_rank:02d}-of-{tp_size:02d}.safetensors"


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: canonical name, full HF shape, TP split dim (None: replicated), dtype."""

    name: str
    shape: tuple
    split_dim: int | None
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def local_shape(shape, split_dim: int | None, tp_size: int) -> tuple[int, ...]:
    """Shape of one TP slice of a tensor of ``shape`` split along ``split_dim`` (None: whole)."""
    out = list(shape)
    if split_dim is not None:
        out[split_dim] //= tp_size
    return tuple(out)


class SafetensorsWriter:
    """Write one safetensors file incrementally: header first, then each tensor's bytes in order.

    Args:
        path: file to create.
        entries: ``(name, dtype, shape)`` in the order the tensors will be written.
        metadata: string -> string pairs for the header's ``__metadata__``.

    Raises:
        ValueError: a dtype without a safetensors code.
    """

    def __init__(self, path: str, entries, metadata: dict[str, str] | None = None) -> None:
        assert sys.byteorder == "little", "safetensors stores little-endian bytes"
        self.path = path
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._order, offset = [], 0
        for name, dtype, shape in entries:
            if dtype not in SAFETENSORS_DTYPE:
                raise ValueError(f"{path}: tensor {name}: dtype {dtype} cannot be written")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
        self.nbytes = 8 + len(raw) + offset
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor (it must be the next entry, with its dtype and shape); returns bytes."""
        want_name, dtype, shape, nbytes = self._order[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected tensor {want_name} {dtype} {shape}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        self._file.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)
        self._next += 1
        return nbytes

    def close(self) -> None:
        """Flush to disk (fsync) and close; checks that every entry was written."""
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close without checks (the caller removes the partial file)."""
        self._file.close()


def write_shards(plan: list[TensorPlan], read, folder: str, tp_size: int, bar) -> list[dict]:
    """Write the ``tp_size`` shard files of ``plan`` into ``folder``, one tensor slice at a time.

    All files are open at once: per tensor, slice r is appended to file r (a replicated
    tensor, read once, to every file), so the source is read once, tensor by tensor.

    Args:
        plan: the tensors, in the order they are written.
        read: ``read(name, dtype, shard_dim=, tp_rank=, tp_size=)`` -> tensor (or the whole
            tensor without the slice arguments), e.g. a checkpoint reader's ``read``.
        bar: a tqdm-like progress bar (``update(bytes)``, ``set_postfix_str``).

    Returns:
        ``[{"file", "tp_rank", "bytes"}]`` for the metadata's ``shards``.
    """
    writers = []
    try:
        for r in range(tp_size):
            entries = [(t.name, t.dtype, local_shape(t.shape, t.split_dim, tp_size)) for t in plan]
            writers.append(SafetensorsWriter(os.path.join(folder, shard_file(r, tp_size)), entries,
                                             {"format": "pt", "tp_rank": str(r), "tp_size": str(tp_size)}))
        for t in plan:
            bar.set_postfix_str(t.name, refresh=False)
            whole = read(t.name, t.dtype) if t.split_dim is None else None
            for r, writer in enumerate(writers):
                part = whole if whole is not None else read(
                    t.name, t.dtype, shard_dim=t.split_dim, tp_rank=r, tp_size=tp_size)
                bar.update(writer.write(t.name, part))
                del part
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return [{"file": shard_file(r, tp_size), "tp_rank": r, "bytes": w.nbytes} for r, w in enumerate(writers)]


def build_metadata(config, tp_size: int, plan: list[TensorPlan], shards: list[dict], tokenizer: dict,
                   version: str, source: dict | None) -> dict:
    """The content of ``cp_megatron_checkpoint.json`` (documented in docs/convert.md)."""
    from cp_megatron.model.fp8 import scale_name

    dtypes = {t.dtype for t in plan}
    names = {t.name for t in plan}
    tensors = {}
    for t in plan:
        tensors[t.name] = {"shape": list(t.shape), "split_dim": t.split_dim, "dtype": DTYPE_NAME[t.dtype]}
        if t.dtype == torch.float8_e4m3fn:
            assert scale_name(t.name) in names, f"FP8 tensor {t.name} planned without its scale"
            tensors[t.name]["scale"] = scale_name(t.name)
    fp8 = torch.float8_e4m3fn in dtypes
    return {
        "format": FORMAT_NAME, "format_version": 2 if fp8 else 1,
        "weights": "fp8-rowwise" if fp8 else "dtype",
        "tool": {"name": "cp_megatron", "version": version, "command": "cp-megatron convert"},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": config.to_dict(), "tp_size": tp_size,
        "dtype": DTYPE_NAME[next(iter(dtypes))] if len(dtypes) == 1 else "mixed",
        "replicated_tensors": "stored whole in every shard file",
        "shards": shards,
        "tensors": tensors,
        "tokenizer": tokenizer, "source": source}


def read_metadata(folder: str) -> dict:
    """The parsed metadata file of a sharded checkpoint folder.

    Raises:
        CheckpointError: no metadata file (not a converted checkpoint, or a conversion that
            did not finish), invalid JSON, or another format / a newer format version.
    """
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder (sharded checkpoints are folders with {METADATA_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (not a converted checkpoint, or an "
                              f"unfinished conversion)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read metadata ({err})") from None
    if meta.get("format") != FORMAT_NAME or not isinstance(meta.get("format_version"), int):
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} metadata file")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta['format_version']} is newer than this "
                              f"reader's {FORMAT_VERSION}; upgrade cp_megatron")
    return meta


class ShardedReader(CheckpointReader):
    """A folder written by ``cp-megatron convert --to sharded``.

    Raises (on construction):
        CheckpointError: no or unreadable metadata, a shard file missing, truncated (size
            differs from the metadata) or unparsable, a tensor missing or of the wrong shape,
            an FP8 weight without its scale entry or scale tensor.
    """

    fmt = "sharded"

    def __init__(self, folder: str) -> None:
        folder = str(folder)
        meta = read_metadata(folder)
        where = os.path.join(folder, METADATA_FILE)
        try:
            config = ModelConfig.from_dict(meta["model"]).with_(name=folder)
            self.tp_size = int(meta["tp_size"])
            tensors = meta["tensors"]
            files = [(str(s["file"]), int(s["bytes"])) for s in meta["shards"]]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: bad metadata ({type(err).__name__}: {err})") from None
        super().__init__(folder, config)
        self.metadata = meta
        if len(files) != self.tp_size:
            raise CheckpointError(f"{where}: {len(files)} shard files listed for tp_size {self.tp_size}")
        self._split: dict[str, int | None] = {}
        self._shape: dict[str, tuple] = {}
        self._scale: dict[str, str] = {}  # FP8 weight -> its row-scale tensor
        for name in self.names():
            if name not in tensors:
                raise CheckpointError(f"{where}: no entry for tensor {name}")
            entry = tensors[name]
            if not isinstance(entry, dict) or entry.get("split_dim") not in (None, 0, 1):
                raise CheckpointError(f"{where}: tensor {name}: bad entry {entry!r}")
            self._split[name] = entry["split_dim"]
            self._shape[name] = tuple(layout.expected_shape(config, name))
            if list(entry.get("shape", ())) != list(self._shape[name]):
                raise CheckpointError(f"{where}: tensor {name}: shape {entry.get('shape')} does not "
                                      f"match the model config")
            if entry.get("dtype") == DTYPE_NAME[torch.float8_e4m3fn]:
                self._add_scale(where, name, entry, tensors)
        self._paths = [os.path.join(folder, file) for file, _ in files]
        self._handles: dict[int, object] = {}
        self._used: list[int] = []  # shards read from since the last release (replicas come from these)
        stored_names = list(self.names()) + list(self._scale.values())
        for rank, (path, (_, nbytes)) in enumerate(zip(self._paths, files)):
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size is None:
                raise CheckpointError(f"{path}: shard file missing (TP rank {rank} of {self.tp_size})")
            if size != nbytes:
                raise CheckpointError(f"{path}: {size} bytes, metadata says {nbytes} (truncated or "
                                      f"replaced file)")
            handle = self._open(rank)
            stored = set(handle.keys())
            for name in stored_names:
                if name not in stored:
                    raise CheckpointError(f"{path}: tensor {name} not found in file")
                want = local_shape(self._shape[name], self._split[name], self.tp_size)
                got = tuple(handle.get_slice(name).get_shape())
                if got != want:
                    raise CheckpointError(f"{path}: tensor {name}: shape {got}, expected {want} "
                                          f"(TP slice {rank} of {self.tp_size})")
        self.release()

    def _add_scale(self, where: str, name: str, entry: dict, tensors: dict) -> None:
        """Register the row-scale tensor of FP8 weight ``name`` (checked against the weight)."""
        scale = entry.get("scale")
        if not isinstance(scale, str) or not isinstance(tensors.get(scale), dict):
            raise CheckpointError(f"{where}: tensor {name}: float8_e4m3fn weight without its row scales "
                                  f"(no 'scale' entry naming a listed tensor)")
        rows, split = self._shape[name][0], self._split[name]
        want = {"shape": [rows], "split_dim": 0 if split == 0 else None, "dtype": "float32"}
        got = {k: tensors[scale].get(k) for k in want}
        if got != want:
            raise CheckpointError(f"{where}: tensor {scale}: expected {want}, got {got}")
        self._scale[name], self._split[scale], self._shape[scale] = scale, want["split_dim"], (rows,)

    def _open(self, rank: int):
        if rank not in self._handles:
            try:
                self._handles[rank] = safe_open(self._paths[rank], framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{self._paths[rank]}: cannot parse safetensors file: {err}") from None
        if rank not in self._used:
            self._used.append(rank)
        return self._handles[rank]

    def release(self) -> None:
        """Drop the memory maps of the shard files (pages already copied out leave this
        process's resident set); they are reopened on the next read."""
        self._handles.clear()
        self._used.clear()

    def _block(self, rank: int, name: str, bounds):
        """Rows/cols ``bounds`` of stored shard ``rank``'s tensor ``name`` (a view of the map)."""
        part = self._open(rank).get_slice(name)
        try:
            return part[tuple(slice(a, b) for a, b in bounds)]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self._paths[rank]}: tensor {name}: cannot read ({err})") from None

    def _read_stored(self, name, rows, cols):
        """Stored values; an FP8 weight comes back dequantised (float32 ``q * scale``)."""
        if name in self._scale:
            return self._read_raw(name, rows, cols).float() * self._read_raw(self._scale[name], rows, None)[:, None]
        return self._read_raw(name, rows, cols)

    def read_fp8(self, name: str, shard_dim: int | None = None, tp_rank: int = 0, tp_size: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored FP8 values of weight ``name`` (or their TP slice) and its row scales,
        without re-quantisation; None when ``name`` is not stored as FP8.

        Returns:
            (q float8_e4m3fn ``[rows, cols]``, scale float32 ``[rows]``) of slice ``tp_rank`` of
            ``tp_size`` along ``shard_dim`` (None: whole).

        Raises:
            CheckpointError: bad slice arguments, or a file that cannot be read.
        """
        if name not in self._scale:
            return None
        bounds = [(0, n) for n in self._shape[name]]
        if shard_dim is not None:
            try:
                bounds[shard_dim] = layout.slice_bounds(bounds[shard_dim][1], tp_rank, tp_size)
            except (ValueError, IndexError) as err:
                raise CheckpointError(f"{self.path}: tensor {name}: {err}") from None
        q = self._read_raw(name, bounds[0], bounds[1])
        return q, self._read_raw(self._scale[name], bounds[0], None)

    def _read_raw(self, name, rows, cols):
        split = self._split[name]
        bounds = [rows] if cols is None else [rows, cols]
        if split is None:  # every shard holds it: use one this process has open already
            block = self._block(self._used[0] if self._used else 0, name, bounds)
            return block.clone(memory_format=torch.contiguous_format)
        per = self._shape[name][split] // self.tp_size
        lo, hi = bounds[split]
        parts = []
        for s in range(lo // per, (hi - 1) // per + 1):  # only the shards the slice overlaps
            local = list(bounds)
            local[split] = (max(lo, s * per) - s * per, min(hi, (s + 1) * per) - s * per)
            parts.append(self._block(s, name, local))
        if len(parts) == 1:
            return parts[0].clone(memory_format=torch.contiguous_format)
        return torch.cat(parts, dim=split)

    def tokenizer(self):
        """The tokenizer copied or exported at conversion: ``tokenizer.json`` (+ config), else
        Meta's ``tokenizer.model``.

        Raises:
            CheckpointError: the folder has neither.
        """
        from cp_megatron.tokenizer import Tokenizer

        if os.path.exists(os.path.join(self.path, "tokenizer.json")):
            return Tokenizer.from_hf_folder(self.path, bos_id=self.config.bos_token_id,
                                            eos_ids=self.config.eos_token_ids)
        tiktoken_path = os.path.join(self.path, "tokenizer.model")
        if os.path.exists(tiktoken_path):
            return Tokenizer.from_tiktoken_file(tiktoken_path)
        raise CheckpointError(f"{self.path}: no tokenizer.json or tokenizer.model in this checkpoint")
