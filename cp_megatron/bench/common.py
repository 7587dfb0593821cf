"""What every benchmark suite shares: options, machine facts, atomic output, taking turns.

*Taking turns.*  Suites that compare two setups (CP1 vs CP2, ours vs transformers) start
each setup once, as its own job, and the jobs then run their timed rounds one after the
other in a fixed schedule (A, B, A, B, ...) through marker files in a temporary folder:
a job waits (sleeping) until the previous entry of the schedule is marked done, runs its
round, and marks it done.  Process start-up, imports and weight loading are never timed,
and no timed round shares the cores with another job's work.

Source: docs/design.md §13 (benchmark results with plots live in docs/).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from cp_megatron.preflight import random_prompt  # noqa: F401 -- the suites' prompts
from cp_megatron.atomic import pyplot, save_figure, write_atomic, write_json  # noqa: F401 -- the suites' output

BUSY_LOAD = 2.5  # 1-minute load average above which a run is flagged as disturbed


class BenchError(ValueError):
    """A bad benchmark request (missing extra, missing file): one line, exit code 2."""


@dataclass(frozen=True)
class BenchOptions:
    """What the command line gives a suite.

    Attributes:
        output_dir: folder for ``<suite>.json`` and ``<suite>.png``.
        quick: tiny sizes (smoke test); file names get a ``-quick`` suffix so a quick run
            never overwrites measured results.
        repeats: timed rounds per configuration (None: the suite's default).
        threads: torch threads per rank / per process.
        timeout_s: limit of each job (seconds).
        config: peers, ttit: the run config.
        hardware: ttit: the planner's hardware profile (name or .json).
        command: the command line, recorded in the JSON.
    """

    output_dir: Path
    quick: bool = False
    repeats: Optional[int] = None
    threads: int = 1
    timeout_s: float = 1800.0
    config: str = "configs/default.yaml"
    hardware: str = "cpu-gloo"
    command: str = ""

    def path(self, stem: str, suffix: str) -> Path:
        return self.output_dir / f"{stem}{'-quick' if self.quick else ''}.{suffix}"

    def suite_config(self, full: dict, quick: dict) -> dict:
        """A suite's sizes (``quick`` with --quick, else ``full``) with this command's
        ``repeats`` (when given) and ``threads_per_rank``."""
        cfg = dict(quick if self.quick else full)
        if self.repeats is not None:
            cfg["repeats"] = self.repeats
        cfg["threads_per_rank"] = self.threads
        return cfg


# -- machine and log -------------------------------------------------------------------------
def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(load_before: Sequence[float], **versions: str) -> dict:
    """Platform, cores, versions and load averages before / now (after the run)."""
    import torch

    return {"platform": platform.platform(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, **versions,
            "load_average_before": list(load_before), "load_average_after": load_average()}


class Log:
    """Progress lines on stderr with the elapsed time."""

    def __init__(self, suite: str) -> None:
        self.suite, self.start = suite, time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[bench {self.suite} {time.perf_counter() - self.start:6.1f}s] {message}",
              file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 1)

    def load_check(self) -> list[float]:
        """Log (and return) the load average; warn when the machine is busy."""
        load = load_average()
        note = (f" -- above {BUSY_LOAD}: other work shares the {os.cpu_count()} cores, timings "
                "will be noisy" if load[0] > BUSY_LOAD else "")
        self(f"load average {load[0]:.2f} on {os.cpu_count()} cores{note}")
        return load


def busy_note(machine: dict) -> list[str]:
    """A note for the JSON when the load average was high before or after the run."""
    worst = max(machine["load_average_before"][0], machine["load_average_after"][0])
    if worst <= BUSY_LOAD:
        return []
    return [f"1-minute load average reached {worst:.2f} (> {BUSY_LOAD}) on {machine['cpu_count']} "
            "cores: other work competed for the cores during the run; medians and minima over "
            "the repeats are reported, raw samples are kept."]


# -- the suite template: start_suite ... finish_report ---------------------------------------------
def start_suite(opts: BenchOptions, suite: str, full: dict, quick: dict) -> tuple[Log, dict, list[float]]:
    """The suite template's first step: a log for ``suite``, its sizes (:meth:`BenchOptions.suite_config`)
    and the load average before any work (logged, with a warning on a busy machine)."""
    log = Log(suite)
    return log, opts.suite_config(full, quick), log.load_check()


# -- the report every suite writes -----------------------------------------------------------------
def finish_report(opts: BenchOptions, log: Log, *, suite: str, stem: str, cfg: dict,
                  load_before: Sequence[float], results, notes: Sequence[str], plot: Callable,
                  versions: Optional[dict] = None, **extra) -> dict:
    """The suite template's last step: assemble the report, write ``<stem>.json`` and the
    ``<stem>.png`` that ``plot(report, path)`` draws, log where they went; return the report.

    The report holds ``suite``, ``command``, ``quick``, ``machine`` (with the load average
    before and after; ``versions`` adds library versions), ``config``, ``elapsed_s``,
    ``results``, the suite's ``extra`` fields, and ``notes`` (with a warning when other work
    loaded the machine).
    """
    machine = machine_info(load_before, **(versions or {}))
    report = {"suite": suite, "command": opts.command, "quick": opts.quick, "machine": machine,
              "config": cfg, "elapsed_s": log.elapsed(), "results": results, **extra,
              "notes": list(notes) + busy_note(machine)}
    json_path, png_path = opts.path(stem, "json"), opts.path(stem, "png")
    write_json(json_path, report)
    plot(report, png_path)
    log(f"wrote {json_path} and {png_path}")
    return report


# -- statistics ---------------------------------------------------------------------------------
def summary(samples: Sequence[float]) -> dict:
    """Median, min, max and count of timing samples (seconds)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


# -- output (files through cp_megatron.atomic) -----------------------------------------------
# -- taking turns between concurrent jobs -------------------------------------------------------
@dataclass(frozen=True)
class Turns:
    """A fixed schedule of named rounds shared by concurrent jobs (picklable).

    ``wait(key)`` returns once the schedule's previous entry is marked done (or at once
    for the first entry); ``done(key)`` marks an entry.  An ``ABORT`` file (written by
    :func:`run_interleaved` when a job fails) makes every waiter raise.
    """

    folder: str
    schedule: tuple[str, ...]
    poll_s: float = 0.005

    def _marker(self, key: str) -> str:
        return os.path.join(self.folder, key.replace("/", "__") + ".done")

    def wait(self, key: str) -> None:
        index = self.schedule.index(key)
        if index == 0:
            return
        previous, abort = self._marker(self.schedule[index - 1]), os.path.join(self.folder, "ABORT")
        while not os.path.exists(previous):
            if os.path.exists(abort):
                raise RuntimeError(f"turn {key!r}: another job of this benchmark failed")
            time.sleep(self.poll_s)

    def done(self, key: str) -> None:
        Path(self._marker(key)).touch()


@contextmanager
def turn(turns: Turns, key: str) -> Iterator[None]:
    """Run the body as schedule entry ``key`` on every rank of this job.

    All ranks wait for the turn, meet at a barrier (when torch.distributed is up), run the
    body, meet again, and rank 0 marks the entry done.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    turns.wait(key)
    if distributed:
        dist.barrier()
    yield
    if distributed:
        dist.barrier()
    if not distributed or dist.get_rank() == 0:
        turns.done(key)


@dataclass(frozen=True)
class Job:
    """One setup of an interleaved benchmark: ``fn(turns, *args)`` on ``world_size`` ranks."""

    fn: Callable
    world_size: int
    args: tuple = ()
    threads_per_rank: int = 1
    backend: Optional[str] = "gloo"
    name: str = ""


def run_interleaved(jobs: Sequence[Job], schedule: Sequence[str], timeout_s: float) -> list[list]:
    """Start every job at once (each with :func:`cp_megatron.launcher.spawn`); the jobs
    take turns by ``schedule``.  Returns each job's per-rank results.

    Raises:
        RankFailure: the first failing job's error (the other jobs are stopped).
    """
    from cp_megatron.launcher import spawn

    if len(set(schedule)) != len(schedule):
        raise ValueError("schedule keys must be unique")
    results: list = [None] * len(jobs)
    errors: list = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="cp_megatron_bench_") as folder:
        turns = Turns(folder, tuple(schedule))

        done = [threading.Event() for _ in jobs]

        def target(i: int, job: Job) -> None:
            try:
                results[i] = spawn(job.fn, job.world_size, (turns, *job.args), timeout_s=timeout_s,
                                   threads_per_rank=job.threads_per_rank, backend=job.backend,
                                   orphan_folders=(folder,))
            except BaseException as exc:  # noqa: BLE001 -- re-raised below, after the others stop
                errors[i] = exc
                Path(folder, "ABORT").touch()
            finally:
                done[i].set()

        threads = [threading.Thread(target=target, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:  # after a stop signal each spawn stops its own ranks and removes its folder;
            # wait for that on the events, not with join: a join that the signal handler's
            # exception interrupted leaves that thread marked stopped in CPython 3.11 (is_alive()
            # False while its spawn still cleans up), and a second join returns at once
            for t, finished in zip(threads, done):
                if t.ident is not None:
                    finished.wait()
    failed = [e for e in errors if e is not None]
    if failed:  # the job that failed first, not one that stopped because of the ABORT file
        first = next((e for e in failed if "another job of this benchmark failed" not in str(e)), failed[0])
        raise first
    return results


# -- the dummy long-context model ----------------------------------------------------------------
def dummy_engine(preset, seed: int, topo, *, strategy: str = "auto", kv_capacity: int = 0,
                 profile: bool = True):
    """An :class:`InferenceEngine` over seeded random weights of ``preset`` (a preset name or
    a ``ModelConfig``; this rank's stage); ``profile`` times the ring (``RoundMetrics``)."""
    from cp_megatron.factory import build_engine
    from cp_megatron.model.config import get_preset
    from cp_megatron.model.weights import DummyReader

    config = get_preset(preset) if isinstance(preset, str) else preset
    return build_engine(DummyReader(config, seed=seed), topo, strategy=strategy,
                        kv_capacity=kv_capacity, profile=profile)
