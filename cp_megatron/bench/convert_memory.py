"""Suite ``convert-memory``: peak memory of ``cp-megatron convert``, which must stay far below
the checkpoint's size.

Writes a float32 HF checkpoint of seeded random weights (itself streamed tensor by tensor
with the converter's writer; 8 layers = 2.15 GB, ``--quick``: 1 layer), then runs under
``/usr/bin/time -v``, each in a fresh process:

* ``convert --from hf SRC --to sharded DST --tp 2``      (HF -> TP-sharded)
* ``convert --from sharded DST --to hf BACK``             (and back to HF)
* ``python -c 'import cp_megatron.cli; build_parser()'`` (the interpreter + torch baseline)

and records each one's peak resident set size (``Maximum resident set size``: anonymous
memory plus mapped file pages), wall time and the converter's own throughput line.  The
criterion is peak RSS < 25 % of the checkpoint's size.  The checkpoints are deleted at the
end.  Writes ``convert_memory.json`` / ``convert_memory.png``.

Source: docs/convert.md (streaming, dropped source maps); GNU time ``-v`` output fields.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cp_megatron.bench.common import BenchError, BenchOptions, finish_report, pyplot, save_figure, start_suite

LIMIT_FRACTION = 0.25
TIME = "/usr/bin/time"
FULL = {"layers": 8, "tp": 2, "hf_shard_bytes": 500 * 10**6}
QUICK = {**FULL, "layers": 1}


def model_config(layers: int):
    """Llama-shaped: D 2048, FFN 8192, NH 16, NKV 8, vocab 8192; 63M parameters a layer."""
    from cp_megatron.model.config import ModelConfig

    return ModelConfig(name=f"bench-{layers}l", vocab_size=8192, hidden_size=2048, intermediate_size=8192,
                       num_layers=layers, num_heads=16, num_kv_heads=8, head_dim=128)


def timed(cmd: list[str], timeout_s: float) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; peak RSS (bytes), wall seconds, last stdout line.

    Raises:
        RuntimeError: the command failed (its stderr's tail in the message).
    """
    proc = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    lines = proc.stdout.strip().splitlines()
    return {"command": " ".join(cmd[2:] if cmd[1] == "-m" else cmd), "peak_rss_bytes": rss_kb * 1024,
            "wall_s": seconds, "summary": lines[-1] if lines else ""}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def plot(report: dict, path: Path) -> None:
    """Peak RSS of each run against the checkpoint's size and the 25 % criterion."""
    plt = pyplot()
    runs, ckpt = report["results"]["runs"], report["results"]["checkpoint_bytes"]
    names = list(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(names)), [runs[n]["peak_rss_bytes"] / 2**20 for n in names], color="#4477aa")
    ax.axhline(ckpt / 2**20, color="gray", label=f"checkpoint ({ckpt / 1e9:.2f} GB)")
    ax.axhline(LIMIT_FRACTION * ckpt / 2**20, color="#ee6677", linestyle="--", label=f"{LIMIT_FRACTION:.0%} criterion")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title(f"cp-megatron convert, {report['config']['layers']} layers float32, TP{report['config']['tp']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def table(report: dict) -> str:
    """One line per run: peak RSS, its share of the checkpoint, wall time."""
    r = report["results"]
    lines = [f"checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB (largest tensor {r['largest_tensor_bytes'] / 1e6:.0f} MB, "
             "float32)"]
    for name, run in r["runs"].items():
        frac = run.get("peak_rss_fraction_of_checkpoint")
        lines.append(f"{name:16s} peak RSS {run['peak_rss_bytes'] / 2**20:7.0f} MiB"
                     + (f" = {frac:.1%} of the checkpoint" if frac is not None else "")
                     + f", wall {run['wall_s']:.1f} s  {run['summary']}")
    return "\n".join(lines)


def run(opts: BenchOptions) -> dict:
    """Run the suite, write ``convert_memory.json`` / ``convert_memory.png``; return the report.

    Raises:
        BenchError: GNU time (``/usr/bin/time``) is not installed.
    """
    import torch

    from cp_megatron.checkpoint.convert import convert_reader
    from cp_megatron.model.weights import DummyReader

    if not os.access(TIME, os.X_OK):
        raise BenchError(f"{TIME} (GNU time) is needed to measure peak memory; install the 'time' package")
    log, cfg, load_before = start_suite(opts, "convert-memory", FULL, QUICK)
    config = model_config(cfg["layers"])
    work = Path(tempfile.mkdtemp(prefix="cp_megatron_convert_memory_"))
    try:
        src, sharded, back = work / "hf", work / "sharded", work / "back"
        reader = DummyReader(config, seed=0)
        log(f"writing a {cfg['layers']}-layer float32 HF checkpoint of random weights")
        convert_reader(reader, "hf", src, max_shard_bytes=cfg["hf_shard_bytes"], progress=False)
        ckpt_bytes = _folder_bytes(src)
        largest = max(torch.Size(reader.shape(n)).numel() * 4 for n in reader.names())
        cli = [sys.executable, "-m", "cp_megatron.cli", "convert"]
        runs = {}
        for name, cmd in (
                ("baseline_import", [sys.executable, "-c", "import cp_megatron.cli as c; c.build_parser()"]),
                ("hf_to_sharded", cli + ["--from", "hf", str(src), "--to", "sharded", str(sharded),
                                         "--tp", str(cfg["tp"]), "--no-progress"]),
                ("sharded_to_hf", cli + ["--from", "sharded", str(sharded), "--to", "hf", str(back),
                                         "--no-progress"])):
            log(f"{name}: {' '.join(cmd[1:])}")
            runs[name] = timed(cmd, opts.timeout_s)
        runs["hf_to_sharded"]["output_bytes"] = _folder_bytes(sharded)
        runs["sharded_to_hf"]["output_bytes"] = _folder_bytes(back)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in ("hf_to_sharded", "sharded_to_hf"):
        runs[name]["peak_rss_fraction_of_checkpoint"] = runs[name]["peak_rss_bytes"] / ckpt_bytes
        runs[name]["passes"] = runs[name]["peak_rss_fraction_of_checkpoint"] < LIMIT_FRACTION
    results = {"criterion": f"peak RSS < {LIMIT_FRACTION:.0%} of the checkpoint size",
               "model": config.to_dict(), "dtype": "float32", "checkpoint_bytes": ckpt_bytes,
               "largest_tensor_bytes": largest, "runs": runs}
    return finish_report(opts, log, suite="convert-memory", stem="convert_memory", cfg=cfg,
                         load_before=load_before, results=results, plot=plot, notes=[
                             "peak RSS counts mapped source-file pages; baseline_import is the interpreter "
                             "with torch, numpy, safetensors and the CLI imported, before any tensor is read.",
                             "Each conversion runs in a fresh process under /usr/bin/time -v."])
