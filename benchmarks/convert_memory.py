"""Peak memory of ``cp-megatron convert``: it must stay far below the checkpoint's size.

Writes a ~2 GB float32 HF checkpoint of random weights (itself streamed tensor by tensor
with the converter's writer, from the seeded ``DummyReader``), then runs under
``/usr/bin/time -v``, each in a fresh process:

* ``convert --from hf SRC --to sharded DST --tp 2``      (HF -> TP-sharded)
* ``convert --from sharded DST --to hf BACK``             (and back to HF)
* ``python -c 'import cp_megatron.cli; build_parser()'`` (the interpreter + torch baseline)

and records each one's peak resident set size (``Maximum resident set size``: anonymous
memory plus mapped file pages), wall time and the converter's own throughput line.  The
criterion is peak RSS < 25 % of the checkpoint's size.  All generated files are deleted at
the end.  Results go to ``docs/bench/convert_memory.json`` (written atomically).

Run (from the repository root)::

    python -m benchmarks.convert_memory              # --layers 8: 2.15 GB
    python -m benchmarks.convert_memory --help

Source: docs/convert.md (streaming, dropped source maps); GNU time ``-v`` output fields.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LIMIT_FRACTION = 0.25


def model_config(layers: int):
    """Llama-shaped: D 2048, FFN 8192, NH 16, NKV 8, vocab 8192; 63M parameters a layer."""
    from cp_megatron.model.config import ModelConfig

    return ModelConfig(name=f"bench-{layers}l", vocab_size=8192, hidden_size=2048, intermediate_size=8192,
                       num_layers=layers, num_heads=16, num_kv_heads=8, head_dim=128)


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; peak RSS (bytes), wall seconds, last stdout line."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    lines = proc.stdout.strip().splitlines()
    return {"command": " ".join(cmd[2:] if cmd[1] == "-m" else cmd), "peak_rss_bytes": rss_kb * 1024,
            "wall_s": seconds, "summary": lines[-1] if lines else ""}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (8 -> 2.15 GB float32)")
    parser.add_argument("--tp", type=int, default=2, help="TP size of the sharded output")
    parser.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: /tmp)")
    parser.add_argument("--output", default=str(REPO_ROOT / "docs" / "bench" / "convert_memory.json"))
    args = parser.parse_args(argv)

    import torch

    from cp_megatron.checkpoint.convert import convert_reader
    from cp_megatron.model.weights import DummyReader

    config = model_config(args.layers)
    work = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=args.workdir))
    try:
        src, sharded, back = work / "hf", work / "sharded", work / "back"
        reader = DummyReader(config, seed=0)
        convert_reader(reader, "hf", src, max_shard_bytes=500 * 10**6, progress=False)
        ckpt_bytes = folder_bytes(src)
        largest = max(torch.Size(reader.shape(n)).numel() * 4 for n in reader.names())
        cli = [sys.executable, "-m", "cp_megatron.cli", "convert"]
        runs = {
            "baseline_import": timed([sys.executable, "-c", "import cp_megatron.cli as c; c.build_parser()"]),
            "hf_to_sharded": timed(cli + ["--from", "hf", str(src), "--to", "sharded", str(sharded),
                                          "--tp", str(args.tp), "--no-progress"]),
            "sharded_to_hf": timed(cli + ["--from", "sharded", str(sharded), "--to", "hf", str(back),
                                          "--no-progress"]),
        }
        runs["hf_to_sharded"]["output_bytes"] = folder_bytes(sharded)
        runs["sharded_to_hf"]["output_bytes"] = folder_bytes(back)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for name in ("hf_to_sharded", "sharded_to_hf"):
        runs[name]["peak_rss_fraction_of_checkpoint"] = runs[name]["peak_rss_bytes"] / ckpt_bytes
        runs[name]["passes"] = runs[name]["peak_rss_fraction_of_checkpoint"] < LIMIT_FRACTION
    result = {
        "benchmark": "convert_memory", "criterion": f"peak RSS < {LIMIT_FRACTION:.0%} of the checkpoint size",
        "model": config.to_dict(), "dtype": "float32", "tp": args.tp, "checkpoint_bytes": ckpt_bytes,
        "largest_tensor_bytes": largest, "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "notes": "peak RSS counts mapped source-file pages; baseline_import is the interpreter with torch, "
                 "numpy, safetensors and the CLI imported, before any tensor is read",
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"checkpoint {ckpt_bytes / 1e9:.2f} GB (largest tensor {largest / 1e6:.0f} MB, float32)")
    for name, run in runs.items():
        frac = run.get("peak_rss_fraction_of_checkpoint")
        print(f"{name:16s} peak RSS {run['peak_rss_bytes'] / 2**20:7.0f} MiB"
              + (f" = {frac:.1%} of the checkpoint" if frac is not None else "")
              + f", wall {run['wall_s']:.1f} s  {run['summary']}")
    return 0 if all(runs[n]["passes"] for n in ("hf_to_sharded", "sharded_to_hf")) else 1


if __name__ == "__main__":
    sys.exit(main())
