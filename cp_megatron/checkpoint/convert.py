"""Checkpoint conversion: HF / Meta / GGUF / sharded checkpoints -> TP-sharded or HF safetensors.

    convert("hf", SRC, "sharded", DST, tp=2)   # what `cp-megatron convert` (cli/convert.py) calls

``weights="fp8-rowwise"`` (sharded output) stores the attention and MLP weights as float8_e4m3fn
with one float32 scale per output row (:mod:`cp_megatron.model.fp8`), quantised from whole rows
so any TP size reads them back without re-quantising.

Streaming: one tensor (or one TP slice) is read and written at a time, through
:class:`~cp_megatron.checkpoint.sharded.SafetensorsWriter`, so peak memory is near the
largest single tensor whatever the checkpoint's size.  The source's memory maps are dropped
as the conversion moves on (their pages would otherwise count in this process's resident set).

Safe writes: everything goes to ``DST.tmp-<random>`` next to DST and is renamed into place at
the end; any error, Ctrl-C or SIGTERM removes the temporary folder.  The metadata file
(``cp_megatron_checkpoint.json``, or HF ``config.json``) is written last, so a SIGKILLed
conversion leaves only a ``.tmp-*`` folder that no reader accepts.  See docs/convert.md.

Source: safetensors format; HF ``model.safetensors.index.json`` and ``config.json``
(transformers ``LlamaConfig``); megatron-core TP partitioning (via model/weights.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import torch

from cp_megatron.checkpoint import CheckpointError, check_tp, open_checkpoint
from cp_megatron.checkpoint.base import CheckpointReader
from cp_megatron.dtypes import torch_dtype
from cp_megatron.checkpoint.sharded import (
    DTYPE_NAME, METADATA_FILE, SAFETENSORS_DTYPE, SafetensorsWriter, TensorPlan, build_metadata, write_shards)
from cp_megatron.checkpoint.options import DTYPE_NAMES, TO_FORMATS, VERIFY_ATOL, WEIGHTS
from cp_megatron.model import fp8

DTYPES = {name: torch_dtype(name) for name in DTYPE_NAMES}  # --dtype choices
# Copied from the source folder when present (GGUF: tokenizer.json is exported from the vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")
REOPEN_BYTES = 1 << 30               # Meta / GGUF sources: reopen (drop the maps) after this much
DIGEST_FULL_BYTES = 16 << 20         # source digest: files up to this size are hashed whole,
DIGEST_HEAD_BYTES = 1 << 20          # bigger (weight) files by name, size and their first MiB


# verify(src_fmt, src, dst_fmt, converted_folder, {tensor name: stored dtype}) -> max |logit diff|
Verifier = Callable[[str, str, str, str, dict], float]


class VerifyError(RuntimeError):
    """--verify found logits of the converted checkpoint that differ from the source's."""


@dataclass
class ConvertResult:
    """What a conversion wrote: folder, bytes of all files, wall seconds (without --verify)."""

    dst: str
    fmt: str
    files: list
    nbytes: int
    seconds: float
    verify_max_abs_diff: float | None = None

    def summary(self) -> str:
        mb_s = self.nbytes / 1e6 / max(self.seconds, 1e-9)
        return (f"wrote {self.fmt} checkpoint {self.dst}: {self.nbytes / 1e9:.3f} GB in {self.seconds:.1f} s "
                f"({mb_s:.1f} MB/s)")


def split_dim(name: str, config) -> int | None:
    """TP split dim of canonical tensor ``name`` as :func:`cp_megatron.model.weights.load_weights` reads it."""
    from cp_megatron.model.weights import checkpoint_name

    return checkpoint_name(name.removeprefix("model."), config)[1]


class _Source:
    """The source reader; drops its memory maps as the conversion moves on.

    HF and sharded readers reopen a file's map cheaply, so maps go after every read;
    Meta / GGUF readers are reopened after every ``REOPEN_BYTES`` read.
    """

    def __init__(self, reader, reopen=None) -> None:
        self.reader, self._reopen, self._since = reader, reopen, 0

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype ``name`` is stored in (float32 for quantized GGUF or a non-file reader)."""
        if not isinstance(self.reader, CheckpointReader):
            return torch.float32
        stored = self.reader.stored_dtype(name)
        self._release(0)
        return stored if stored in SAFETENSORS_DTYPE else torch.float32

    def read(self, name: str, dtype: torch.dtype, **slice_args) -> torch.Tensor:
        tensor = self.reader.read(name, dtype=dtype, **slice_args)
        self._release(tensor.numel() * tensor.element_size())
        return tensor

    def _release(self, nbytes: int) -> None:
        if hasattr(self.reader, "release"):  # HF / sharded: maps reopened lazily by the reader
            self.reader.release()
        elif self._reopen is not None:
            self._since += nbytes
            if self._since >= REOPEN_BYTES:
                self.reader, self._since = self._reopen(), 0


def plan_tensors(source: _Source, dst_fmt: str, tp: int, dtype: torch.dtype | None,
                 weights: str = "dtype") -> list[TensorPlan]:
    """Every tensor to write, in canonical order; checks that ``tp`` splits every split dim.
    With ``weights="fp8-rowwise"`` each attention / MLP weight is planned float8_e4m3fn and
    followed by its float32 row scales (``NAME_scale [rows]``, split like the rows).

    Raises:
        CheckpointError: ``tp`` does not divide the heads or a split dimension.
    """
    reader, config = source.reader, source.reader.config
    if dst_fmt == "sharded":
        check_tp(config, tp)
    plan = []
    for name in reader.names():
        shape = tuple(reader.shape(name))
        dim = split_dim(name, config) if dst_fmt == "sharded" else None
        if dim is not None and shape[dim] % tp:
            raise CheckpointError(f"{getattr(reader, 'path', config.name)}: --tp {tp} does not divide tensor "
                                  f"{name} along dim {dim} (size {shape[dim]})")
        if weights == "fp8-rowwise" and fp8.is_quantized(name):
            plan.append(TensorPlan(name, shape, dim, fp8.FP8_DTYPE))
            plan.append(TensorPlan(fp8.scale_name(name), shape[:1], 0 if dim == 0 else None, torch.float32))
        else:
            plan.append(TensorPlan(name, shape, dim, dtype or source.stored_dtype(name)))
    return plan


class _Quantizer:
    """``read`` for :func:`write_shards` that quantises FP8-planned weights from whole rows
    (once per tensor: the last one is kept for its TP slices and its scale)."""

    def __init__(self, source: _Source, plan: list[TensorPlan]) -> None:
        self.source = source
        self._weight_of = {fp8.scale_name(t.name): t.name for t in plan if t.dtype == fp8.FP8_DTYPE}
        self._last: tuple = (None, None, None)

    def _quantized(self, name: str):
        if self._last[0] != name:  # an FP8 source (re-sharding) hands its values over as stored
            self._last = (None, None, None)  # drop the previous tensor before reading the next
            q, scale = fp8.read_quantized(self.source.reader, name, None, 0, 1)
            self.source._release(q.numel())
            self._last = (name, q, scale)
        return self._last[1], self._last[2]

    def read(self, name: str, dtype: torch.dtype, shard_dim=None, tp_rank: int = 0, tp_size: int = 1):
        if dtype != fp8.FP8_DTYPE and name not in self._weight_of:
            kwargs = {} if shard_dim is None else dict(shard_dim=shard_dim, tp_rank=tp_rank, tp_size=tp_size)
            return self.source.read(name, dtype, **kwargs)
        q, scale = self._quantized(self._weight_of.get(name, name))
        whole = scale if name in self._weight_of else q
        return whole if shard_dim is None else whole.chunk(tp_size, dim=shard_dim)[tp_rank].contiguous()


# -- writers -----------------------------------------------------------------------------------
def _write_hf(source: _Source, plan: list[TensorPlan], folder: str, max_shard_bytes: int, bar) -> list[dict]:
    """HF safetensors files of at most ``max_shard_bytes`` (a bigger tensor gets a file of its own)."""
    groups, size = [[]], 0
    for t in plan:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    out = []
    for file, group in zip(files, groups):
        writer = SafetensorsWriter(os.path.join(folder, file), [(t.name, t.dtype, t.shape) for t in group],
                                   {"format": "pt"})
        try:
            for t in group:
                bar.set_postfix_str(t.name, refresh=False)
                bar.update(writer.write(t.name, source.read(t.name, t.dtype)))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        out.append({"file": file, "bytes": writer.nbytes})
    if n > 1:
        weight_map = {t.name: file for file, group in zip(files, groups) for t in group}
        _write_json(os.path.join(folder, "model.safetensors.index.json"),
                    {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map})
    return out


def hf_config(config, dtype: torch.dtype) -> dict:
    """A transformers ``LlamaConfig`` ``config.json`` for ``config`` (v4 key names, read by v4 and v5)."""
    rs, eos = config.rope_scaling, list(config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if rs is None else {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings},
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": (eos[0] if len(eos) == 1 else eos) or None,
        "torch_dtype": DTYPE_NAME[dtype]}


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# -- tokenizer and provenance --------------------------------------------------------------------
def _export_tokenizer(src_fmt: str, reader, folder: str) -> dict:
    """Copy the source's tokenizer files into ``folder`` (GGUF: write its vocabulary as tokenizer.json)."""
    if src_fmt != "gguf":
        root = reader.path if os.path.isdir(reader.path) else os.path.dirname(reader.path)
        files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(root, f))]
        for f in files:
            shutil.copyfile(os.path.join(root, f), os.path.join(folder, f))
        return {"files": files, "from": "copied from the source"}
    if reader.metadata("tokenizer.ggml.tokens", None) is None:
        return {"files": [], "from": "none: the GGUF file has no vocabulary"}
    from tokenizers import processors

    from cp_megatron.checkpoint.gguf_vocab import build_byte_level_bpe

    model = reader.metadata("tokenizer.ggml.model", None)
    if model != "gpt2":
        raise CheckpointError(f"{reader.path}: tokenizer.ggml.model {model!r} cannot be exported "
                              f"(only 'gpt2' byte-level BPE)")
    tokens, config = reader.metadata("tokenizer.ggml.tokens"), reader.config
    tok = build_byte_level_bpe(tokens, reader.metadata("tokenizer.ggml.merges"),
                               reader.metadata("tokenizer.ggml.token_type", [1] * len(tokens)),
                               reader.metadata("tokenizer.ggml.pre", "default"), reader.path)
    bos = None if config.bos_token_id is None else tokens[config.bos_token_id]
    add_bos = bool(reader.metadata("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:  # Tokenizer.from_hf_folder infers add_bos_default from this post-processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, config.bos_token_id)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "bos_token": bos,
                  "eos_token": tokens[config.eos_token_ids[0]] if config.eos_token_ids else None,
                  "model_max_length": config.max_position_embeddings}
    template = reader.metadata("tokenizer.chat_template", None)
    if template:
        tok_config["chat_template"] = template
    _write_json(os.path.join(folder, "tokenizer_config.json"), tok_config)
    return {"files": ["tokenizer.json", "tokenizer_config.json"], "from": "GGUF vocabulary and chat template"}


def source_digest(path: str) -> dict:
    """sha256 over the source's files (sorted; top level of a folder): each file's name, size and
    content -- whole up to DIGEST_FULL_BYTES (configs, indexes, tokenizers), else its first
    DIGEST_HEAD_BYTES (a safetensors / GGUF header or a .pth's pickle), never the whole weights."""
    root, names = ((os.path.dirname(path), [os.path.basename(path)]) if os.path.isfile(path) else
                   (path, sorted(f for f in os.listdir(path) if not f.startswith(".")
                                 and os.path.isfile(os.path.join(path, f)))))
    h, files = hashlib.sha256(), []
    for name in names:
        size = os.path.getsize(os.path.join(root, name))
        h.update(f"{name}\0{size}\0".encode())
        with open(os.path.join(root, name), "rb") as f:
            h.update(f.read(size if size <= DIGEST_FULL_BYTES else DIGEST_HEAD_BYTES))
        files.append({"name": name, "bytes": size})
    return {"sha256": h.hexdigest(), "covers": f"name, size and content of each file (files over "
            f"{DIGEST_FULL_BYTES >> 20} MiB: their first {DIGEST_HEAD_BYTES >> 20} MiB)", "files": files}


# -- the conversion ------------------------------------------------------------------------------
def _check_destination(dst: str, overwrite: bool, src: str | None) -> None:
    if src is not None and os.path.realpath(dst) == os.path.realpath(src):
        raise CheckpointError(f"{dst}: destination is the source")
    if not os.path.lexists(dst):
        return
    if not overwrite:
        raise CheckpointError(f"{dst}: already exists (pass --overwrite to replace it)")
    if not os.path.isdir(dst) or (os.listdir(dst) and not any(
            os.path.exists(os.path.join(dst, f)) for f in (METADATA_FILE, "config.json"))):
        raise CheckpointError(f"{dst}: --overwrite replaces checkpoint folders only; this is not one "
                              f"(no {METADATA_FILE} or config.json)")


def _move_into_place(tmp: str, dst: str) -> None:
    if os.path.lexists(dst):  # --overwrite, checked before: the old folder goes only now
        old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dst)


def convert(src_fmt: str, src, dst_fmt: str, dst, *, tp: int = 1, dtype: torch.dtype | None = None,
            overwrite: bool = False, verify: Verifier | None = None, max_shard_bytes: int = 5 * 10**9,
            progress: bool = True, weights: str = "dtype") -> ConvertResult:
    """Convert checkpoint ``src`` (format ``src_fmt``) into ``dst`` (format ``dst_fmt``).

    Args:
        src_fmt: "hf", "meta", "gguf" or "sharded"; src: its folder or file.
        dst_fmt: "sharded" (TP-sharded, ``tp`` files) or "hf"; dst: folder to create.
        tp: TP size of a sharded output (divides the KV heads and every split dim).
        dtype: output dtype; None keeps each tensor's stored dtype (quantized GGUF -> float32).
        overwrite: replace an existing checkpoint folder at ``dst``.
        verify: before moving into place, ``verify(src_fmt, src, dst_fmt, written_folder,
            dtypes)`` returns the max |logit difference| of source and output (the CLI
            passes :func:`cp_megatron.cli.convert.verify_logits`, which runs the engine);
            above VERIFY_ATOL the conversion is refused.
        max_shard_bytes: HF output: bytes per safetensors file.
        progress: tqdm bar on stderr.
        weights: "dtype" (every tensor in ``dtype``) or "fp8-rowwise" (sharded output only:
            attention / MLP weights float8_e4m3fn with row scales, the rest in ``dtype``).

    Returns:
        ConvertResult (bytes written, seconds, ``verify_max_abs_diff``).

    Raises:
        CheckpointError: unknown format, unreadable source, existing ``dst``, bad ``tp``,
            fp8-rowwise weights asked for an HF output.
        VerifyError: --verify found a difference above VERIFY_ATOL (nothing is left at ``dst``).
        OSError: writing failed.  On any error or interrupt the temporary folder is removed.
    """
    if dst_fmt not in TO_FORMATS:
        raise CheckpointError(f"{dst}: unknown output format {dst_fmt!r}; known: {', '.join(TO_FORMATS)}")
    reader = open_checkpoint(src_fmt, src)
    return convert_reader(reader, dst_fmt, dst, tp=tp, dtype=dtype, overwrite=overwrite, verify=verify,
                          max_shard_bytes=max_shard_bytes, progress=progress, source=(src_fmt, str(src)),
                          weights=weights)


def convert_reader(reader, dst_fmt: str, dst, *, tp: int = 1, dtype: torch.dtype | None = None,
                   overwrite: bool = False, verify: Verifier | None = None, max_shard_bytes: int = 5 * 10**9,
                   progress: bool = True, source: tuple[str, str] | None = None,
                   weights: str = "dtype") -> ConvertResult:
    """:func:`convert` from an open reader (``source`` = (format, path) of a file checkpoint, or
    None for a reader with no files, e.g. ``DummyReader``: no tokenizer, digest or verify)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    dst = os.path.abspath(str(dst))
    if dst_fmt not in TO_FORMATS:
        raise CheckpointError(f"{dst}: unknown output format {dst_fmt!r}; known: {', '.join(TO_FORMATS)}")
    if weights not in WEIGHTS or (weights == "fp8-rowwise" and dst_fmt != "sharded"):
        raise CheckpointError(f"{dst}: --weights {weights}: expected one of {', '.join(WEIGHTS)}; "
                              f"fp8-rowwise needs --to sharded")
    _check_destination(dst, overwrite, source[1] if source else None)
    index = getattr(reader, "index", None)   # a GGUF reopen maps the file again, never re-parses it
    src = _Source(reader, (lambda: open_checkpoint(*source, index=index)) if source else None)
    plan = plan_tensors(src, dst_fmt, tp, dtype, weights)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=os.path.dirname(dst))
    try:
        total = sum(t.nbytes for t in plan)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"convert -> {dst_fmt}", disable=not progress,
                  file=sys.stderr, mininterval=0.5) as bar:
            if dst_fmt == "sharded":
                files = write_shards(plan, _Quantizer(src, plan).read, tmp, tp, bar)
            else:
                files = _write_hf(src, plan, tmp, max_shard_bytes, bar)
        tokenizer = _export_tokenizer(source[0], src.reader, tmp) if source else {"files": [], "from": "none"}
        if dst_fmt == "sharded":  # the metadata file last: its presence marks a complete checkpoint
            _write_json(os.path.join(tmp, METADATA_FILE), build_metadata(
                reader.config, tp, plan, files, tokenizer, _version(),
                None if source is None else {"format": source[0], "path": os.path.abspath(source[1]),
                                             "digest": source_digest(source[1])}))
        else:
            emb = next(t.dtype for t in plan if t.name == "model.embed_tokens.weight")
            _write_json(os.path.join(tmp, "config.json"), hf_config(reader.config, emb))
        nbytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        result = ConvertResult(dst, dst_fmt, sorted(os.listdir(tmp)), nbytes, time.perf_counter() - t0)
        if verify is not None:
            if source is None:
                raise CheckpointError(f"{dst}: --verify needs a source checkpoint on disk")
            diff = verify(source[0], source[1], dst_fmt, tmp, {t.name: t.dtype for t in plan})
            result.verify_max_abs_diff = diff
            if not diff <= VERIFY_ATOL:  # also catches NaN
                raise VerifyError(f"{dst}: --verify: max |logits(source) - logits(converted)| = {diff:.3e} "
                                  f"exceeds {VERIFY_ATOL:g}; nothing written")
        _move_into_place(tmp, dst)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _version() -> str:
    from cp_megatron import __version__

    return __version__
