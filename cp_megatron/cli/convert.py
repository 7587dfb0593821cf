"""``cp-megatron convert``: flags, the ``--verify`` check on the engine, exit codes.

    cp-megatron convert --from hf|meta|gguf|sharded SRC --to sharded|hf DST
                        [--tp N] [--dtype bf16|fp32] [--weights fp8-rowwise] [--verify] [--overwrite]

The conversion itself (streaming, safe writes) is :mod:`cp_megatron.checkpoint.convert`;
``--verify`` runs both checkpoints through the engine (:func:`cp_megatron.factory.build_engine`)
in one spawned process and compares float32 logits.  See docs/convert.md.

Source: safetensors format; HF ``save_pretrained`` shard sizes (decimal units).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from cp_megatron.checkpoint.options import DEFAULT_MAX_SHARD, DTYPE_NAMES, VERIFY_ATOL, WEIGHTS
from cp_megatron.errors import CheckpointError

VERIFY_TOKENS = 32
_PROG = "cp-megatron convert"


# -- --verify: the converted checkpoint must give the source's logits -----------------------------
class _CastReader:
    """A reader whose tensors are first rounded to the converted dtypes, then returned as asked
    (FP8 weights: quantised on whole rows and dequantised, as the converted checkpoint reads)."""

    def __init__(self, reader, dtypes: dict) -> None:
        self.config, self._reader, self._dtypes = reader.config, reader, dtypes

    def read(self, name, shard_dim=None, tp_rank=0, tp_size=1, dtype=None):
        import torch

        from cp_megatron.model import fp8

        dtype = dtype or torch.float32
        stored = self._dtypes.get(name, dtype)
        if stored == fp8.FP8_DTYPE:
            whole = fp8.dequantize_rowwise(*fp8.quantize_rowwise(self._reader.read(name, dtype=torch.float32)))
            part = whole if shard_dim is None else whole.chunk(tp_size, dim=shard_dim)[tp_rank]
            return part.to(dtype).contiguous()
        return self._reader.read(name, shard_dim=shard_dim, tp_rank=tp_rank, tp_size=tp_size, dtype=stored).to(dtype)


def _verify_job(src_fmt, src, dst_fmt, dst, dtypes, num_tokens):
    """World-1 rank: float32 logits of the same token ids through both checkpoints; max |diff|."""
    import torch

    from cp_megatron import parallel_state
    from cp_megatron.checkpoint import open_checkpoint
    from cp_megatron.checkpoint.convert import VerifyError
    from cp_megatron.factory import build_engine

    topo = parallel_state.initialize(1, 1, 1)
    source, converted = _CastReader(open_checkpoint(src_fmt, src), dtypes), open_checkpoint(dst_fmt, dst)
    if source.config.with_(name="") != converted.config.with_(name=""):
        raise VerifyError(f"{dst}: model config differs from the source's: {converted.config} vs {source.config}")
    tokens = torch.randint(0, source.config.vocab_size, (num_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    logits = []
    for reader in (source, converted):
        engine = build_engine(reader, topo, dtype=torch.float32)
        logits.append(engine.forward({0: tokens}, all_logits=True)[0])
        del engine
    return (logits[0] - logits[1]).abs().max().item()


def verify_logits(src_fmt: str, src: str, dst_fmt: str, dst: str, dtypes: dict,
                  num_tokens: int = VERIFY_TOKENS, timeout_s: float = 3600.0) -> float:
    """Max |logit difference| of source and converted checkpoints on ``num_tokens`` seeded random
    ids, float32, one process (world 1; both models are loaded whole, one after the other).
    The source's weights are rounded to the converted dtypes first, so a faithful conversion gives 0.
    """
    from cp_megatron.launcher import spawn

    return spawn(_verify_job, 1, (src_fmt, str(src), dst_fmt, str(dst), dtypes, num_tokens),
                 timeout_s=timeout_s)[0]



# -- command line --------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"20KB"`` / ``"1000"`` -> bytes (decimal units, as save_pretrained)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB)")
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[(match.group(2) or "B").upper()]
    return int(float(match.group(1)) * unit)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cp-megatron convert`` (sets ``func=run_convert``)."""
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint to the TP-sharded format (or back to HF)",
        description="Convert HF / Meta / GGUF / sharded checkpoints to a TP-sharded checkpoint that "
                    "every TP rank loads from its own file (model.format: sharded), or to HF "
                    "safetensors. Streams one tensor at a time; see docs/convert.md.")
    p.add_argument("--from", dest="src_format", required=True, metavar="{hf,meta,gguf,sharded,megatron}",
                   help="source format")
    p.add_argument("src", metavar="SRC", help="source folder (hf, meta, sharded, megatron) or .gguf / megatron .pt file")
    p.add_argument("--to", dest="dst_format", required=True, metavar="{sharded,hf}", help="output format")
    p.add_argument("dst", metavar="DST", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, default=None, help="TP size of a sharded output (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="output dtype (default: each tensor's stored dtype; quantized GGUF -> fp32)")
    p.add_argument("--weights", choices=WEIGHTS, default="dtype",
                   help="fp8-rowwise: attention and MLP weights as float8_e4m3fn with a float32 scale "
                        "per output row (sharded output; model.weights: fp8-rowwise reads them as stored)")
    p.add_argument("--verify", action="store_true",
                   help="compare float32 logits of source and output on 32 tokens before finishing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder DST")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD, metavar="SIZE",
                   help=f"--to hf: bytes per safetensors file (default {DEFAULT_MAX_SHARD})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    """Run ``cp-megatron convert``; exit code 0, 2 (bad input: one line), 1 (write/verify
    failed), 128+N (signal N: the partial output is removed first)."""
    # imported here, not at the top: megatron-core (via model.fp8) costs ~3 s of every
    # subcommand's start-up otherwise (build_parser imports this module)
    from cp_megatron.checkpoint.convert import DTYPES, VerifyError, convert
    from cp_megatron.launcher import Interrupted, RankFailure

    if args.tp is not None and (args.dst_format != "sharded" or args.tp < 1):
        print(f"{_PROG}: error: --tp {args.tp}: needs --to sharded and a value >= 1", file=sys.stderr)
        return 2
    parent, base = os.path.split(os.path.abspath(args.dst))
    stale = sorted(f for f in os.listdir(parent) if f.startswith(base + ".tmp-")) if os.path.isdir(parent) else []
    if stale:
        print(f"{_PROG}: note: {', '.join(stale)} left by an interrupted conversion; safe to delete",
              file=sys.stderr)
    try:  # SIGTERM / SIGINT arrive as Interrupted (cp_megatron.cli.main's stop_on_signals)
        result = convert(args.src_format, args.src, args.dst_format, args.dst, tp=args.tp or 1,
                         dtype=DTYPES.get(args.dtype), overwrite=args.overwrite,
                         verify=verify_logits if args.verify else None, weights=args.weights,
                         max_shard_bytes=args.max_shard_size, progress=not args.no_progress)
    except CheckpointError as exc:
        print(f"{_PROG}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except (VerifyError, RankFailure) as exc:
        print(f"{_PROG}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. disk full: the temporary folder is gone already
        print(f"{_PROG}: {exc.filename or args.dst}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"{_PROG}: interrupted; the partial output was removed", file=sys.stderr)
        return exc.exit_code if isinstance(exc, Interrupted) else 130
    if result.verify_max_abs_diff is not None:
        print(f"verify: max |logits(source) - logits(converted)| = {result.verify_max_abs_diff:.3e} over "
              f"{VERIFY_TOKENS} tokens (float32, world 1; tolerance {VERIFY_ATOL:g})")
    print(result.summary())
    return 0
