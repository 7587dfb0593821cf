"""The one place that talks to the accelerator runtime: current device, capability,
synchronize, events, device count, CUDA graphs and side streams.  Every such call in
cp_megatron goes through here.

Three states, one switch:

* CPU: nothing here is called on the hot path (every helper answers for ``device.type ==
  "cpu"`` without touching ``torch.cuda``);
* CUDA: the helpers call ``torch.cuda`` (``current_device``, ``get_device_capability``,
  ``current_stream().synchronize()``, ``Event``);
* fake CUDA (the dry run, :mod:`cp_megatron.dryrun`): :func:`use_fake_cuda` makes the
  helpers answer for a GPU that is not there -- device 0, the given compute capability, a
  synchronize that only reports itself to the registered listeners, events that time
  nothing -- so the same engine code runs on fake CUDA tensors on a CPU machine.

The library never imports the dry run: the dry run switches this module on and listens.

Host <-> device copies of the KV host tier (:mod:`cp_megatron.model.kv_offload`) go through
:func:`host_empty` (page-locked host buffers on CUDA) and :class:`CopyStream` (a side stream
on CUDA; plain synchronous copies on CPU and on the fake device).

Source: PyTorch ``torch.cuda`` API (``current_device``, ``get_device_capability``,
``Stream.synchronize``, ``Event(enable_timing=True)``, ``Stream.wait_stream``,
``Tensor.record_stream``, ``pin_memory``).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from typing import Callable, Iterator, Optional

import torch

_fake: Optional[dict] = None                      # {"capability": (major, minor), "count": n}
_sync_listeners: list[Callable[[str, str], None]] = []


def is_fake() -> bool:
    """True while :func:`use_fake_cuda` is active."""
    return _fake is not None


@contextlib.contextmanager
def use_fake_cuda(capability: tuple[int, int] = (9, 0), device_count: int = 1) -> Iterator[None]:
    """Answer every question about CUDA for a fake GPU (the dry run).

    Args:
        capability: compute capability reported for the fake device (H100: (9, 0)).
        device_count: devices reported.
    """
    global _fake
    saved, _fake = _fake, {"capability": tuple(capability), "count": device_count}
    try:
        yield
    finally:
        _fake = saved


def add_sync_listener(fn: Callable[[str, str], None]) -> None:
    """Call ``fn(kind, where)`` at every host-device synchronize and event wait made through
    this module (``where`` is the caller's ``file:line``)."""
    _sync_listeners.append(fn)


def remove_sync_listener(fn: Callable[[str, str], None]) -> None:
    _sync_listeners.remove(fn)


def _report(kind: str) -> None:
    if _sync_listeners:
        frame = traceback.extract_stack(limit=4)[0]
        where = f"{frame.filename}:{frame.lineno}"
        for fn in list(_sync_listeners):
            fn(kind, where)


def is_available() -> bool:
    """A CUDA device can be used (always True while faking)."""
    return _fake is not None or torch.cuda.is_available()


def device_count() -> int:
    return _fake["count"] if _fake is not None else torch.cuda.device_count()


def current_device() -> torch.device:
    """The current CUDA device, e.g. ``cuda:0``."""
    if _fake is not None:
        return torch.device("cuda", 0)
    return torch.device("cuda", torch.cuda.current_device())


def total_memory(index: int = 0) -> int:
    """Total memory of CUDA device ``index`` in bytes (an 80 GB H100's while faking).

    Source: ``torch.cuda.get_device_properties(index).total_memory``."""
    if _fake is not None:
        return 80 * 10 ** 9
    return torch.cuda.get_device_properties(index).total_memory


def set_device(index: int) -> None:
    """Make CUDA device ``index`` current (a no-op while faking)."""
    if _fake is None:
        torch.cuda.set_device(index)


def capability(device: torch.device | str) -> tuple[int, int]:
    """Compute capability of a CUDA ``device`` as (major, minor).

    Raises:
        ValueError: ``device`` is not a CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"capability: {device} is not a CUDA device")
    if _fake is not None:
        return _fake["capability"]
    return tuple(torch.cuda.get_device_capability(device))


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device``'s current stream (nothing to do on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    _report("synchronize")
    if _fake is None:
        torch.cuda.current_stream(device).synchronize()


class _FakeEvent:
    """A CUDA event of the fake device: records nothing, every interval is 0 ms."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        _report("event.synchronize")

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _Event:
    """``torch.cuda.Event`` whose waits are reported to the sync listeners."""

    def __init__(self, enable_timing: bool) -> None:
        self._event = torch.cuda.Event(enable_timing=enable_timing)

    def record(self, stream=None) -> None:
        self._event.record(stream)

    def synchronize(self) -> None:
        _report("event.synchronize")
        self._event.synchronize()

    def query(self) -> bool:
        """The work recorded before this event is done (never blocks)."""
        return self._event.query()

    def elapsed_time(self, other: "_Event") -> float:
        return self._event.elapsed_time(other._event)


def event(enable_timing: bool = True):
    """A CUDA event on the current stream's device (``record``, ``synchronize``,
    ``elapsed_time`` in ms), or a fake one while faking."""
    if _fake is not None:
        return _FakeEvent()
    return _Event(enable_timing)


# -- CUDA graphs (cp_megatron.cuda_graphs is their one user) -------------------------------------
def cuda_graph():
    """A new, empty ``torch.cuda.CUDAGraph``.

    Raises:
        RuntimeError: while faking (the dry run traces the eager step; a graph needs a real GPU).
    """
    if _fake is not None:
        raise RuntimeError("CUDA graphs need a real GPU: the dry run traces the eager decode step")
    return torch.cuda.CUDAGraph()


def capture_stream():
    """A new side stream for a graph's warm-up and capture (:func:`run_on_side_stream`, then
    :func:`graph_capture` with the same stream).

    Raises:
        RuntimeError: while faking (a graph needs a real GPU).
    """
    if _fake is not None:
        raise RuntimeError("CUDA graphs need a real GPU: the dry run traces the eager decode step")
    return torch.cuda.Stream()


@contextlib.contextmanager
def graph_capture(graph, stream) -> Iterator[None]:
    """Capture the CUDA work issued inside the block into ``graph`` (``torch.cuda.graph``) on
    ``stream``, the stream its warm-up ran on: cuBLAS / cuBLASLt handles and workspaces are
    cached per (device, stream), so a capture on a stream the warm-up did not use would create
    them mid-capture (PyTorch's ``make_graphed_callables`` warms up and captures on one stream
    for that reason).

    ``capture_error_mode="thread_local"``: only this thread's CUDA calls are checked during
    capture, so the NCCL process group's watchdog thread (which queries events) cannot fail the
    capture; megatron-core captures its CUDA graphs the same way.

    Source: PyTorch ``torch.cuda.graph`` (CUDA Graphs notes, "whole-network capture"); NCCL user
    guide, "Using NCCL with CUDA Graphs" (capture modes; P2P captured after an eager P2P call).
    """
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        yield


def run_on_side_stream(fn: Callable[[], object], stream):
    """``fn()`` on ``stream`` (:func:`capture_stream`), which waits for the current stream; the
    current stream then waits for it (the warm-up before a capture, as the CUDA Graphs notes
    ask); returns ``fn``'s result."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return out


def host_empty(shape, dtype: torch.dtype, for_device: torch.device | str) -> torch.Tensor:
    """An uninitialised host tensor for copies to and from ``for_device``: page-locked
    (pinned) when that is a real CUDA device, so the copies are DMA transfers that run
    asynchronously on a :class:`CopyStream`; ordinary memory on CPU and while faking.

    Pinned blocks come from PyTorch's caching host allocator, which does not hand a block
    out again before the copies queued on it are done.

    Source: ``torch.empty(..., pin_memory=True)``; CUDA C guide, page-locked host memory.
    """
    pin = torch.device(for_device).type == "cuda" and _fake is None
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class _HostMark:
    """A point in time on the host: the mark of a :class:`CopyStream` without a stream."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: "_HostMark") -> float:
        return (other.t - self.t) * 1e3


class CopyStream:
    """A side stream for host <-> device copies on ``device``.

    Use: :meth:`after_current` (the copies start after the work already queued on the
    current stream), :meth:`copy` (queued on the side stream), then :meth:`join` (the
    current stream waits for them: a device-side wait, the host does not block) when later
    device work reads what was copied.  :meth:`mark` records an event on the side stream
    (``query``, ``synchronize``, ``elapsed_time`` in ms), e.g. to time the copies.

    On CPU and on the fake device there is no stream: :meth:`copy` is a plain synchronous
    ``copy_``, the waits do nothing and a mark is a host clock reading.

    Source: ``torch.cuda.Stream``, ``Stream.wait_stream``, ``Tensor.record_stream`` (a
    tensor used on a side stream is not reused by the caching allocator before that
    stream's work on it is done).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and _fake is None else None

    @property
    def asynchronous(self) -> bool:
        """True on a real CUDA device (copies overlap later work)."""
        return self._stream is not None

    def after_current(self) -> None:
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` on the side stream (non-blocking; pinned host memory on the
        host side for a true overlap)."""
        if self._stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
        for t in (dst, src):
            if t.is_cuda:
                t.record_stream(self._stream)

    def join(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def mark(self):
        """An event recorded on the side stream now (a host clock reading without one)."""
        if self._stream is None:
            return _HostMark()
        ev = _Event(enable_timing=True)
        ev.record(self._stream)
        return ev

    def synchronize(self) -> None:
        """Block the host until the side stream's copies are done (reported to the sync
        listeners)."""
        if self._stream is not None:
            _report("synchronize")
            self._stream.synchronize()
