"""Benchmark suites of ``cp-megatron bench`` (the command line is :mod:`cp_megatron.cli.bench`).

One module per suite -- scaling, miss_rate, overlap, peers, hardware, convert_memory -- each with
``run(BenchOptions) -> report`` and ``table(report) -> str``, all on the shared template in
:mod:`cp_megatron.bench.common`: machine facts and load, taking turns between concurrent
jobs, and :func:`~cp_megatron.bench.common.finish_report`, which assembles, writes and
plots every report the same way.  Every suite records the machine (cores, versions, load
average before and after), its config, every raw sample and the medians.  docs/performance.md
explains the figures.

Source: arXiv 2411.01783 §4 (what is measured).
"""
