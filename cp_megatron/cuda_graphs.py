"""CUDA graphs of the static decode step: capture once per step key, replay after.

``runtime.cuda_graphs: true`` makes the engine run each decode round of all-gather-Q (or of
CP 1) through :class:`GraphCache`: the first round of a :class:`~cp_megatron.decode_step.StepKey`
runs the step eagerly on a side stream (the warm-up the CUDA Graphs notes ask for: it also
creates cuBLAS workspaces and NCCL communicators and connects all_to_all's P2P channels) and that
run is the round's result; then the step is captured into a graph on that same stream (no
kernel runs during capture, no collective either); every later round of the key loads its
inputs into the step's buffers and replays the graph.  Each round therefore runs its
collectives exactly once on every rank -- eagerly on a rank that captures, replayed on one that
does not -- so ranks need not capture on the same round.

Each graph has its own memory pool (a replay's output lives in it until the next replay of the
same graph, and the engine reads it before that).  At most ``max_graphs`` are kept, least
recently used first out.  Only CUDA: the option is refused on CPU at start-up (config.py), and
every CUDA call goes through :mod:`cp_megatron.device`.

Source: PyTorch CUDA Graphs notes (``CUDAGraph``, ``graph``, warm-up on a side stream, static
inputs and outputs); vLLM and megatron-core decode graphs (one per batch-size bucket).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch

from cp_megatron import device as devices


class GraphCache:
    """Captured decode steps by key, replayed on later rounds.

    Args:
        max_graphs: graphs kept (least recently used dropped first).

    Attributes:
        captures, replays: counts so far (what a test or a benchmark checks).
    """

    def __init__(self, max_graphs: int = 8) -> None:
        if max_graphs < 1:
            raise ValueError(f"GraphCache: max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self._graphs: OrderedDict = OrderedDict()      # key -> (graph, output)
        self.captures = self.replays = 0
        self._stream = None       # one side stream for every warm-up and capture (made on first use)

    def run(self, key: Hashable, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """This round's output of ``fn`` (no arguments; reads only tensors whose storage stays put).

        First time for ``key``: ``fn()`` eagerly on a side stream (the result returned), then a
        capture of ``fn`` into a new graph.  Later: replay, returning the graph's output tensor
        (overwritten by the next replay of the same key)."""
        hit = self._graphs.pop(key, None)
        if hit is not None:
            self._graphs[key] = hit
            graph, output = hit
            graph.replay()
            self.replays += 1
            return output
        if self._stream is None:
            self._stream = devices.capture_stream()
        result = devices.run_on_side_stream(fn, self._stream)
        graph = devices.cuda_graph()
        with devices.graph_capture(graph, self._stream):
            output = fn()
        self._graphs[key] = (graph, output)
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return result

    def drop(self, keep: Callable[[Hashable], bool]) -> None:
        """Forget the graphs whose key ``keep`` rejects (e.g. of an older KV storage)."""
        for key in [k for k in self._graphs if not keep(k)]:
            del self._graphs[key]

    def clear(self) -> None:
        self._graphs.clear()

    def __len__(self) -> int:
        return len(self._graphs)
