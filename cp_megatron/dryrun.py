"""Dry run: the real engine of a run config, traced rank by rank on fake tensors on a CPU box.

``cp-megatron dryrun`` builds this rank's engine with :func:`cp_megatron.factory.build_engine`
(the same stage, KV cache, attention, ring and FP8 code as ``run``) under PyTorch's
``FakeTensorMode`` on the config's device, with the fake process group at the config's world
size, and runs the requested rounds.  Nothing is patched: :mod:`cp_megatron.device` answers
for the fake GPU, :func:`cp_megatron.parallel_state.init_distributed` accepts the fake
backend, the stage is built on the meta device and materialised as fake tensors.  A
``TorchDispatchMode`` (:class:`Tracer`) above the fake mode sees every aten and c10d call and
records, per round:

* kernel launches (non-view aten ops that do device work) per layer and source module;
* memory: live bytes of fake storages by category (weights, KV cache, activations,
  communication buffers), the peak and its composition;
* collectives (kind, group, peer, bytes, dtype, all_to_all splits) per layer;
* host syncs (``.item()``, ``.tolist()``, synchronize, event waits) and host-device copies,
  with the ``file:line`` in cp_megatron that made them;
* the attention kernels called, their shapes, dtypes and strides, and whether those satisfy
  the kernel's documented constraints.

Host work (the round plan, the host-side KV layouts) runs on real CPU tensors: an op whose
inputs are all real CPU tensors and that asks for no CUDA device runs for real, below the
fake mode.  So the engine plans exactly as on a GPU node.

On a CPU-only torch build the C++ bindings of indexing and cross-device copies take a CUDA
device guard before dispatch; :func:`ensure_fake_cuda_runtime` registers a no-op CUDA device
guard (a 30-line C++ extension compiled once with ``torch.utils.cpp_extension``; a CUDA build
has its own guard and skips this).

Source: PyTorch ``torch._subclasses.fake_tensor.FakeTensorMode``, ``TorchDispatchMode``,
``torch.testing._internal.distributed.fake_pg`` (torchtitan's "config validation without
GPU"); ``c10/core/impl/DeviceGuardImplInterface.h``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from cp_megatron import device as devices
from cp_megatron.planner import DEFAULT_KV_GROWTH_TOKENS, DEFAULT_KV_MARGIN_TOKENS

aten = torch.ops.aten
PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Frames the tracer looks through: its own, the device shim's, and shm_collectives' wrappers
# (a collective is charged to the attention code that called the wrapper).
_SKIP_FILES = tuple(os.path.join(PKG_DIR, f) for f in ("dryrun.py", "device.py", "shm_collectives.py"))
# Ops that allocate without running a kernel, and ops that only read metadata.
_ALLOC_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
               "_local_scalar_dense"}
CATEGORIES = ("weights", "kv_cache", "activations", "comm_buffers")
_COMM_FILES = ("attention/ring.py", "attention/pass_q.py", "attention/decode.py")

_GUARD_SRC = os.path.join(PKG_DIR, "fake_cuda_guard.cpp")   # a plain shared library, no Python module
_guard_loaded = False


def ensure_fake_cuda_runtime() -> None:
    """Make fake CUDA tensors usable on this torch build (see the module doc).

    Raises:
        RuntimeError: a CPU-only build where the guard extension cannot be compiled (no C++
            compiler), naming the cause.
    """
    global _guard_loaded
    if torch.backends.cuda.is_built() or _guard_loaded:
        return
    from torch.utils.cpp_extension import load

    try:   # loading the library runs its C10_REGISTER_GUARD_IMPL
        load("cp_megatron_fake_cuda_guard_lib", sources=[_GUARD_SRC], is_python_module=False, verbose=False)
        _guard_loaded = True
    except Exception as exc:  # compiler missing or failing: say so, do not fall back
        raise RuntimeError(f"dry run: cannot build the fake CUDA device guard for this CPU-only torch "
                           f"build ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           f"it needs a C++ compiler (g++) and ninja") from None


# -- tracing -----------------------------------------------------------------------------------
def _source() -> tuple[str, int]:
    """(path relative to cp_megatron/, line) of the innermost caller frame inside the package."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(PKG_DIR) and name not in _SKIP_FILES:
            return name[len(PKG_DIR):], f.f_lineno
        f = f.f_back
    return "<outside cp_megatron>", 0


def _tensors(obj, out: list) -> list:
    """The tensors in an op's (nested list / tuple / dict) arguments or outputs."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out)
    return out


def _nbytes_of_storage(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _desc(t) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "stride": list(t.stride())}


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages that ops under the mode allocate, on real tensors (a CPU run):
    a storage counts from the op that made it until the last tensor using it dies (views
    share it; in-place ops add nothing).  ``live`` is the bytes now, ``peak`` the high-water
    mark (reset it to ``live`` to measure a span).  The fake-tensor dry run counts the same
    way (:class:`Tracer`, by category); this one serves the CPU measurements of the planner's
    phase model (tests/test_memory_model.py, benchmarks/activation_phases.py).

    Source: ``torch.utils._python_dispatch.TorchDispatchMode``; what a caching allocator
    holds for op outputs, not kernel workspace.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list] = {}      # storage ptr -> [nbytes, tensors alive]

    def _release(self, ptr: int) -> None:
        entry = self._refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self._refs:                 # a view of a tracked storage: one more user
                self._refs[ptr][1] += 1
            elif ptr in inputs or ptr == 0:       # in place, or a view of something older
                continue
            else:
                self._refs[ptr] = [t.untyped_storage().nbytes(), 1]
                self.live += self._refs[ptr][0]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, ptr)
        return out


@dataclass
class RoundTrace:
    """What one round did on one rank (see :meth:`Tracer.round_report`)."""

    name: str
    launches: dict = field(default_factory=lambda: defaultdict(Counter))   # layer -> source -> n
    ops: dict = field(default_factory=lambda: defaultdict(Counter))        # layer -> aten op -> n
    signature: list = field(default_factory=list)     # (layer, op, input shapes) in order
    collectives: list = field(default_factory=list)
    syncs: list = field(default_factory=list)
    copies: list = field(default_factory=list)
    attention: dict = field(default_factory=dict)     # signature -> record
    scaled_mm: dict = field(default_factory=dict)
    peak_bytes: int = 0
    peak_by_category: dict = field(default_factory=dict)
    max_by_category: dict = field(default_factory=dict)
    end_by_category: dict = field(default_factory=dict)
    activations_at_max: dict = field(default_factory=dict)   # file:line -> bytes when they peaked
    time_s: float = 0.0


class Tracer(TorchDispatchMode):
    """Counts launches, memory, collectives, host syncs and copies above a FakeTensorMode.

    Enter it *inside* the fake mode (``with FakeTensorMode(): with Tracer(): ...``) so that it
    sees every call first.  Host ops on real CPU tensors run for real, below both modes.

    Attributes:
        layer: the layer now running (set by :meth:`watch_layers` hooks; None outside).
        current: the :class:`RoundTrace` being recorded (None: memory only, e.g. while loading).
    """

    def __init__(self, capability: tuple[int, int] = (9, 0)) -> None:
        super().__init__()
        self.capability = capability
        self.layer: Optional[int] = None
        self.current: Optional[RoundTrace] = None
        self.rounds: list[RoundTrace] = []
        self._live: dict[int, list] = {}              # storage cdata -> [weakref, nbytes, category]
        self._by_cat = Counter()
        self._transient: set[int] = set()            # keys that may die (not weights)
        self._kv_keys: set[int] = set()              # the KV cache's among them
        self._group_names: dict = {}
        self.tracking = True                         # off while the stage is built (see trace_rank)

    # -- memory ----------------------------------------------------------------------------
    def _sweep(self, kv: bool = True) -> None:
        """Forget storages that died since the last call (the KV cache's only when ``kv``:
        they die only when the cache regrows, inside kv_cache.py)."""
        dead = [k for k in self._transient if self._live[k][0].expired()]
        if kv:
            dead += [k for k in self._kv_keys if self._live[k][0].expired()]
        for k in dead:
            _, n, cat, _where = self._live.pop(k)
            self._by_cat[cat] -= n
            self._transient.discard(k)
            self._kv_keys.discard(k)

    def _track(self, t: torch.Tensor, category: str, where: str = "") -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        n = st.nbytes()
        self._live[key] = [StorageWeakRef(st), n, category, where]
        self._by_cat[category] += n
        if category == "kv_cache":
            self._kv_keys.add(key)
        elif category != "weights":
            self._transient.add(key)

    def mark_kv_cache(self, kv_cache) -> None:
        """Count the storages of a :class:`~cp_megatron.model.kv_cache.KVCache` as KV cache."""
        for t in kv_cache.k + kv_cache.v:
            self._track(t, "kv_cache")

    def mark_weights(self, module: torch.nn.Module) -> None:
        """Count the storages of ``module``'s parameters and buffers as weights."""
        for t in list(module.parameters()) + list(module.buffers()):
            key = t.untyped_storage()._cdata
            if key in self._live:
                _, n, cat, _where = self._live[key]
                self._by_cat[cat] -= n
                self._by_cat["weights"] += n
                self._live[key][2] = "weights"
                self._transient.discard(key)
                self._kv_keys.discard(key)
            else:
                self._track(t, "weights")

    def _composition(self, category: str) -> dict:
        """Live bytes of ``category`` by the ``file:line`` that allocated them, largest first."""
        out = Counter()
        for _ref, n, cat, where in self._live.values():
            if cat == category:
                out[where] += n
        return dict(out.most_common())

    def live_bytes(self) -> dict:
        self._sweep(kv=True)
        return {c: int(self._by_cat.get(c, 0)) for c in CATEGORIES}

    def _category(self, src: str, func) -> str:
        if src == "model/kv_cache.py":
            return "kv_cache"
        # the ring's receive buffers (ring.py), pass-Q's float32 partials and the all_to_all
        # output they go back in (pass_q.py; decode.py for all-gather-Q: the gathered queries
        # too): what the planner's comm_buffer_bytes costs
        if src in _COMM_FILES or func.namespace == "c10d":
            return "comm_buffers"
        return "activations"

    # -- layers and rounds ---------------------------------------------------------------------
    def watch_layers(self, stage) -> None:
        """Hooks on the stage's decoder layers that set :attr:`layer` while each runs."""
        for i, layer in enumerate(stage.layers.values()):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: setattr(self, "layer", i))
            layer.register_forward_hook(lambda _m, _a, _o: setattr(self, "layer", None))

    def begin_round(self, name: str) -> None:
        self.current = RoundTrace(name)
        live = self.live_bytes()
        self.current.peak_bytes = sum(live.values())
        self.current.peak_by_category = dict(live)
        self.current.max_by_category = dict(live)
        self._t0 = time.perf_counter()
        devices.add_sync_listener(self._on_sync)

    def end_round(self) -> RoundTrace:
        devices.remove_sync_listener(self._on_sync)
        rt, self.current = self.current, None
        rt.time_s = time.perf_counter() - self._t0
        rt.end_by_category = self.live_bytes()
        self.rounds.append(rt)
        return rt

    def _on_sync(self, kind: str, where: str) -> None:
        if self.current is not None:
            rel = where[len(PKG_DIR):] if where.startswith(PKG_DIR) else where
            self.current.syncs.append({"kind": kind, "where": rel, "layer": self.layer})

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(kwargs, _tensors(args, []))
        fake_in = any(isinstance(t, FakeTensor) for t in tensors)
        dev = kwargs.get("device")
        wants_cuda = dev is not None and torch.device(dev).type == "cuda"
        if not fake_in and not wants_cuda:       # host work on real CPU tensors: run it for real
            with _disable_current_modes():
                return func(*args, **kwargs)
        rt = self.current
        name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
        src, line = _source()
        if func in (aten._local_scalar_dense.default, aten.item.default):   # item: as dispatched in inference mode
            # a read of a device tensor blocks the host; of a host tensor (after its copy,
            # which was the sync) it does not
            if rt is not None and args[0].device.type != "cpu":
                rt.syncs.append({"kind": "item/tolist", "where": f"{src}:{line}", "layer": self.layer,
                                 "on": str(args[0].device)})
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        if self.tracking:
            self._sweep(kv=src in ("model/kv_cache.py", "engine.py"))
        if rt is not None and func.namespace == "c10d":
            self._collective(rt, func, args, src, line)
        out = func(*args, **kwargs)
        if rt is not None and func.namespace in ("aten", "prims") and not func.is_view \
                and name not in _ALLOC_ONLY:
            layer = "outside" if self.layer is None else self.layer
            rt.launches[layer][src] += 1
            rt.ops[layer][name] += 1
            rt.signature.append((layer, name, tuple(tuple(t.shape) for t in tensors)))
        if rt is not None:
            self._copies(rt, func, name, args, kwargs, out, src, line)
            if name.startswith("_scaled_dot_product") or name.startswith("_flash_attention"):
                self._attention(rt, name, args, kwargs, src, line)
            elif name == "_scaled_mm":
                self._scaled_mm(rt, args, kwargs, out, src, line)
        if self.tracking and not func.is_view:
            cat = self._category(src, func)
            for o in _tensors(out, []):
                if isinstance(o, FakeTensor) and o.device.type != "meta":
                    self._track(o, cat, f"{src}:{line}")
        peak = sum(self._by_cat.get(c, 0) for c in CATEGORIES)
        if rt is not None:
            for c in CATEGORIES:
                if self._by_cat.get(c, 0) > rt.max_by_category.get(c, 0):
                    rt.max_by_category[c] = int(self._by_cat[c])
                    if c == "activations":
                        rt.activations_at_max = self._composition("activations")
        if rt is not None and peak > rt.peak_bytes:
            rt.peak_bytes = peak
            rt.peak_by_category = {c: int(self._by_cat.get(c, 0)) for c in CATEGORIES}
        return out

    def _copies(self, rt, func, name, args, kwargs, out, src, line) -> None:
        if name in ("_to_copy", "to", "copy_", "copy"):   # "to": as dispatched in inference mode
            if name in ("_to_copy", "to"):
                a, b = args[0].device, out.device
            else:
                b, a = args[0].device, args[1].device
            if a.type != b.type:
                kind = "device-to-host" if b.type == "cpu" else "host-to-device"
                nbytes = args[0].numel() * args[0].element_size() if name in ("_to_copy", "to") else \
                    args[1].numel() * args[1].element_size()
                rt.copies.append({"kind": kind, "where": f"{src}:{line}", "layer": self.layer,
                                  "bytes": int(nbytes)})
                if kind == "device-to-host":
                    rt.syncs.append({"kind": "device-to-host copy (.cpu() / .to('cpu'))",
                                     "where": f"{src}:{line}", "layer": self.layer})

    def _group(self, obj) -> Optional[list]:
        """Global ranks of the process group behind a c10d op's ScriptObject argument (None
        for another ScriptObject, e.g. the reduce op)."""
        import torch.distributed as dist

        key = id(obj)
        if key not in self._group_names:
            try:
                pg = obj if isinstance(obj, dist.ProcessGroup) else dist.ProcessGroup.unbox(obj)
                ranks = dist.get_process_group_ranks(pg)
            except (RuntimeError, ValueError, TypeError):   # not a process group
                ranks = None
            self._group_names[key] = (obj, ranks)
        return self._group_names[key][1]

    def _collective(self, rt, func, args, src, line) -> None:
        import torch.distributed as dist

        name = func.__name__.split(".")[0]
        tensors = _tensors(args, [])
        groups = [self._group(a) for a in args if isinstance(a, (dist.ProcessGroup, torch.ScriptObject))]
        ranks = next((g for g in groups if g is not None), [])
        rec = {"layer": "outside" if self.layer is None else self.layer, "kind": name,
               "group": ranks, "where": f"{src}:{line}",
               "dtype": str(tensors[0].dtype).removeprefix("torch.") if tensors else "",
               "bytes": int(sum(t.numel() * t.element_size() for t in tensors))}
        if name in ("send", "recv_"):
            peer = int(args[2])
            rec["peer"] = ranks[peer] if ranks else peer
            rec["bytes"] = int(sum(t.numel() * t.element_size() for t in args[0]))
        elif name.startswith("alltoall_base"):
            out_t, in_t = args[0], args[1]
            n = len(ranks) or 1
            row = in_t[0].numel() if in_t.dim() else 1
            rec["input_splits"] = list(args[4]) or [in_t.shape[0] // n * row] * n
            rec["output_splits"] = list(args[3]) or [out_t.shape[0] // n * row] * n
            if args[4]:
                rec["input_splits"] = [s * row for s in args[4]]
                rec["output_splits"] = [s * row for s in args[3]]
            rec["bytes"] = int(in_t.numel() * in_t.element_size())
            rec["element_size"] = in_t.element_size()
        rt.collectives.append(rec)

    def _attention(self, rt, name, args, kwargs, src, line) -> None:
        q, k, v = args[0], args[1], args[2]
        if name == "_flash_attention_forward":      # (q, k, v, cu_q, cu_k, max_q, max_k, p, is_causal, ...)
            causal = bool(args[8]) if len(args) > 8 else bool(kwargs.get("is_causal", False))
        else:
            causal = bool(args[4]) if name == "_scaled_dot_product_flash_attention" and len(args) > 4 else \
                bool(kwargs.get("is_causal", args[6] if name == "_scaled_dot_product_efficient_attention"
                                                  and len(args) > 6 else False))
        sig = (name, tuple(q.shape), tuple(k.shape), str(q.dtype), causal)
        if sig in rt.attention:
            rt.attention[sig]["calls"] += 1
            return
        varlen = {}
        if name == "_flash_attention_forward":
            varlen = {"cu_seqlens_q": args[3], "cu_seqlens_k": args[4], "max_q": args[5], "max_k": args[6],
                      "seqused_k": kwargs.get("seqused_k")}
        rt.attention[sig] = {"kernel": f"aten.{name}", "where": f"{src}:{line}", "is_causal": causal,
                             "q": _desc(q), "k": _desc(k), "v": _desc(v), "calls": 1,
                             "layer": self.layer,
                             "constraints": attention_constraints(name, q, k, v, causal, self.capability, **varlen)}

    def _scaled_mm(self, rt, args, kwargs, out, src, line) -> None:
        a, b = args[0], args[1]
        sig = (tuple(a.shape), tuple(b.shape), str(out.dtype))
        if sig in rt.scaled_mm:
            rt.scaled_mm[sig]["calls"] += 1
            return
        sa, sb = kwargs.get("scale_a", args[2] if len(args) > 2 else None), \
            kwargs.get("scale_b", args[3] if len(args) > 3 else None)
        checks = {
            "operands float8": a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and b.dtype == a.dtype,
            "K % 16 == 0": a.shape[1] % 16 == 0, "N % 16 == 0": b.shape[1] % 16 == 0,
            "first operand row-major": a.stride(1) == 1,
            "second operand column-major": b.stride(0) == 1,
            "row-wise scales float32 [M,1] and [1,N]": sa is not None and sb is not None
            and sa.dtype == torch.float32 and sb.dtype == torch.float32
            and tuple(sa.shape) == (a.shape[0], 1) and tuple(sb.shape) == (1, b.shape[1]),
            "row-wise output bfloat16": out.dtype == torch.bfloat16 if a.is_cuda else True,
        }
        rt.scaled_mm[sig] = {"where": f"{src}:{line}", "a": _desc(a), "b": _desc(b),
                             "out_dtype": str(out.dtype).removeprefix("torch."), "calls": 1,
                             "constraints": {"checks": checks, "ok": all(checks.values()),
                                             "source": SCALED_MM_SOURCE}}


FLASH_SOURCE = ("PyTorch aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp (mha_fwd: fp16/bf16, "
                "sm80+, q/k/v same dtype, stride(-1) == 1, head_size <= 256, num_heads % num_heads_k == 0) "
                "and sdp_utils.cpp (check_head_dim_size_flash: head dim a multiple of 8, equal for q/k/v); "
                "causal masks top-left, so only square causal blocks (Tq == Tkv) mean the same in "
                "flash-attn >= 2.1 (bottom-right)")
EFFICIENT_SOURCE = ("PyTorch aten/src/ATen/native/transformers/cuda/attention.cu and sdp_utils.cpp "
                    "(check_head_dim_size_mem_efficient: head dim a multiple of 4 for float32 (8 for half); "
                    "no GQA: equal head counts; stride(-1) == 1)")
VARLEN_SOURCE = ("PyTorch aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp (mha_varlen_fwd: fp16/bf16, "
                 "sm80+, q/k/v [total, heads, head_dim] same dtype with stride(-1) == 1, head_size <= 256 and a "
                 "multiple of 8, num_heads % num_heads_k == 0, cu_seqlens_q/k int32 contiguous [b + 1], "
                 "seqused_k int32 contiguous [b] on the device); torch.nn.attention.varlen (seqused_k for "
                 "KV-cache decoding)")
SCALED_MM_SOURCE = ("PyTorch aten/src/ATen/native/cuda/ScaledBlas.cpp (_scaled_mm row-wise: float8 operands, "
                    "K and N multiples of 16, mat2 column-major, scale_a [M,1] and scale_b [1,N] float32, "
                    "bf16 output)")


def attention_constraints(name: str, q, k, v, causal: bool, capability: tuple[int, int], *,
                          cu_seqlens_q=None, cu_seqlens_k=None, max_q=None, max_k=None, seqused_k=None) -> dict:
    """Whether one attention call's inputs satisfy its kernel's documented constraints.

    Args:
        name: the aten op (``_scaled_dot_product_flash_attention`` ...).
        q, k, v: its ``[B, H, S, D]`` inputs (the varlen ``_flash_attention_forward``: ``[T, H, D]``);
            causal: the is_causal flag.
        capability: the device's compute capability.
        cu_seqlens_q, cu_seqlens_k, max_q, max_k, seqused_k: the varlen call's (None otherwise).

    Returns:
        {"checks": {name: bool}, "ok": all of them, "source": where the constraints are stated}.
    """
    half = (torch.float16, torch.bfloat16)
    if name == "_flash_attention_forward" and cu_seqlens_q is not None:
        b = cu_seqlens_q.numel() - 1

        def int32_vector(t, n):
            return t is not None and t.dtype == torch.int32 and t.dim() == 1 and t.numel() == n \
                and t.is_contiguous() and t.device == q.device

        checks = {
            "3-D [T, H, D] (varlen)": q.dim() == k.dim() == v.dim() == 3,
            "q, k, v same dtype": q.dtype == k.dtype == v.dtype,
            "dtype fp16 or bf16": q.dtype in half,
            "compute capability >= 8.0": tuple(capability) >= (8, 0),
            "head dim equal for q, k, v, <= 256, % 8 == 0": q.shape[-1] == k.shape[-1] == v.shape[-1]
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0,
            "GQA: NH % NKV == 0": q.shape[1] % k.shape[1] == 0,
            "last dim contiguous (stride(-1) == 1)": q.stride(-1) == k.stride(-1) == v.stride(-1) == 1,
            "cu_seqlens_q int32 contiguous [b + 1] on the device": int32_vector(cu_seqlens_q, b + 1),
            "cu_seqlens_k int32 contiguous [b + 1] on the device": int32_vector(cu_seqlens_k, b + 1),
            "seqused_k int32 contiguous [b] on the device (or none)": seqused_k is None or int32_vector(seqused_k, b),
            "max_k <= keys given (seqused_k reads a prefix)": max_k is not None and max_k <= k.shape[0],
            "one query per row (max_q == 1 == T / b)": max_q == 1 and q.shape[0] == b,
            "not causal": not causal,
        }
        return {"checks": checks, "ok": all(checks.values()), "source": VARLEN_SOURCE}
    common = {
        "4-D [B, H, S, D]": q.dim() == k.dim() == v.dim() == 4,
        "q, k, v same dtype": q.dtype == k.dtype == v.dtype,
        "head dim equal for q, k, v": q.shape[-1] == k.shape[-1] == v.shape[-1],
        "last dim contiguous (stride(-1) == 1)": q.stride(-1) == k.stride(-1) == v.stride(-1) == 1,
        "causal only on square blocks": (not causal) or q.shape[2] == k.shape[2],
    }
    if name == "_scaled_dot_product_flash_attention":
        checks = {**common,
                  "dtype fp16 or bf16": q.dtype in half,
                  "compute capability >= 8.0": tuple(capability) >= (8, 0),
                  "head dim <= 256": q.shape[-1] <= 256,
                  "head dim % 8 == 0": q.shape[-1] % 8 == 0,
                  "GQA: NH % NKV == 0": q.shape[1] % k.shape[1] == 0}
        source = FLASH_SOURCE
    elif name == "_scaled_dot_product_efficient_attention":
        checks = {**common,
                  "head dim % 4 == 0 (float32) / 8 (half)": q.shape[-1] % (8 if q.dtype in half else 4) == 0,
                  "equal head counts (no GQA)": q.shape[1] == k.shape[1]}
        source = EFFICIENT_SOURCE
    else:
        checks, source = common, "PyTorch aten/src/ATen/native/transformers/attention.cpp"
    return {"checks": checks, "ok": all(checks.values()), "source": source}


# -- the run -----------------------------------------------------------------------------------
def parse_rounds(text: str) -> list[tuple[str, int]]:
    """``"prefill,partial:2000,decode:2"`` -> [("prefill", 0), ("partial", 2000), ("decode", 2)].

    Raises:
        ValueError: an unknown round kind, a count that is not a positive int, or no prefill first.
    """
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        kind, _, num = part.partition(":")
        if kind not in ("prefill", "partial", "decode"):
            raise ValueError(f"--rounds: unknown round {kind!r} (expected prefill, partial:T, decode:N)")
        if kind == "prefill":
            if num:
                raise ValueError("--rounds: prefill takes no count (its length is the prompt's)")
            out.append((kind, 0))
            continue
        if not num.isdigit() or int(num) < 1:
            raise ValueError(f"--rounds: {part!r}: expected {kind}:N with N >= 1")
        out.append((kind, int(num)))
    if not out or out[0][0] != "prefill":
        raise ValueError("--rounds: the first round must be prefill")
    return out


@dataclass
class DryRunSpec:
    """What to trace: the job (from a run config) and the rounds.

    Attributes:
        model_config: the model (:class:`~cp_megatron.model.config.ModelConfig`, full depth).
        tp, cp, pp: the grid; dtype: torch dtype; weights: "dtype" | "fp8-rowwise".
        strategy: ring variant ("auto" ...); hardware: heuristic profile (None: by device).
        prompt_tokens: T of the first prefill; max_new_tokens: generation budget;
            kv_margin_tokens / kv_growth_tokens: ``runtime.kv_cache_margin_tokens`` /
            ``kv_cache_growth_tokens`` (with the budget, the engine's KV reservation, made as
            ``run`` makes it: :func:`cp_megatron.factory.kv_reservation`).
        rounds: :func:`parse_rounds` output; layers: layers to build (<= the model's).
        device: "cuda" or "cpu"; capability: the fake GPU's compute capability.
    """

    model_config: object
    tp: int
    cp: int
    pp: int
    dtype: torch.dtype
    weights: str
    strategy: str
    hardware: object
    prompt_tokens: int
    max_new_tokens: int
    rounds: list
    layers: int
    device: str = "cuda"
    capability: tuple = (9, 0)
    kv_margin_tokens: int = DEFAULT_KV_MARGIN_TOKENS   # runtime.kv_cache_margin_tokens
    kv_growth_tokens: int = DEFAULT_KV_GROWTH_TOKENS   # runtime.kv_cache_growth_tokens
    kv_capacity: Optional[int] = None   # slots; None: as ``run`` reserves them (factory.kv_reservation)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp


class ShapeReader:
    """A checkpoint reader of shapes only: each ``read`` returns this rank's slice, empty, on
    the dry run's device (a fake tensor under the fake mode).  Its config is the model's."""

    def __init__(self, config, device) -> None:
        self.config, self.device = config, torch.device(device)

    def names(self):
        from cp_megatron.checkpoint import keys

        return keys.canonical_names(self.config.num_layers, self.config.tie_word_embeddings)

    def read(self, name: str, shard_dim=None, tp_rank: int = 0, tp_size: int = 1,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from cp_megatron.checkpoint import keys, layout

        if name == keys.LM_HEAD and self.config.tie_word_embeddings:
            name = keys.EMBED
        shape = list(layout.expected_shape(self.config, name))
        if shard_dim is not None:
            lo, hi = layout.slice_bounds(shape[shard_dim], tp_rank, tp_size)
            shape[shard_dim] = hi - lo
        return torch.empty(shape, dtype=dtype, device=self.device)


def _tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def trace_rank(spec: DryRunSpec, rank: int, progress: Optional[Callable[[str], None]] = None,
               on_engine: Optional[Callable[[object], None]] = None) -> dict:
    """Build rank ``rank``'s engine on fake tensors and run ``spec.rounds``; the rank's report.

    Args:
        spec: the job and rounds.
        rank: global rank in ``[0, spec.world_size)``.
        progress: called with a status line per round and per group of layers.
        on_engine: called with the engine once it is built (e.g. to add module hooks).

    Returns:
        The rank's report (:func:`rank_report`), JSON-serialisable.

    Raises:
        ValueError: a bad rank or spec (the factory's and engine's errors pass through).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cp_megatron import parallel_state
    from cp_megatron.engine import SamplingParams
    from cp_megatron.factory import build_engine, kv_reservation

    if not 0 <= rank < spec.world_size:
        raise ValueError(f"--rank: expected 0..{spec.world_size - 1}, got {rank}")
    say = progress or (lambda _line: None)
    if spec.device == "cuda":
        ensure_fake_cuda_runtime()
    full = spec.model_config
    model = replace(full, num_layers=spec.layers)
    tracer = Tracer(spec.capability)
    t0 = time.perf_counter()
    parallel_state.destroy()
    parallel_state.init_distributed("fake", rank=rank, world_size=spec.world_size)
    try:
        topo = parallel_state.initialize(spec.tp, spec.cp, spec.pp)
        kv = kv_reservation(spec.prompt_tokens, spec.max_new_tokens, spec.cp, spec.kv_margin_tokens,
                            spec.kv_growth_tokens)
        if spec.kv_capacity is not None:
            kv["kv_capacity"] = spec.kv_capacity
        with devices.use_fake_cuda(spec.capability), FakeTensorMode(allow_non_fake_inputs=True), tracer:
            device = devices.current_device() if spec.device == "cuda" else torch.device("cpu")
            tracer.tracking = False   # building: only what the engine keeps counts (below)
            engine = build_engine(ShapeReader(model, device), topo, dtype=spec.dtype, device=device,
                                  strategy=spec.strategy, hardware=spec.hardware, weights=spec.weights, **kv)
            tracer.tracking = True
            tracer.mark_weights(engine.stage)
            tracer.mark_kv_cache(engine.kv_cache)
            say(f"[dryrun] rank {rank}: engine built in {time.perf_counter() - t0:.1f} s")
            tracer.watch_layers(engine.stage)
            if on_engine is not None:
                on_engine(engine)
            n_layers = engine.stage.num_local_layers
            group = max(1, n_layers // 8)
            for i, layer in enumerate(engine.stage.layers.values()):
                if (i + 1) % group == 0 or i + 1 == n_layers:
                    layer.register_forward_hook(lambda *_a, i=i: say(
                        f"[dryrun] rank {rank} {tracer.current.name}: layer {i + 1}/{n_layers}")
                        if tracer.current is not None else None)
            greedy = SamplingParams(max_new_tokens=spec.max_new_tokens)
            vocab = full.vocab_size
            next_id, decode_no = 0, 0
            for kind, num in spec.rounds:
                steps = [("prefill", _tokens(spec.prompt_tokens, vocab))] if kind == "prefill" else \
                    [(f"partial:{num}", _tokens(num, vocab, seed=1))] if kind == "partial" else \
                    [(f"decode#{decode_no + j + 1}", None) for j in range(num)]
                for name, ids in steps:
                    say(f"[dryrun] rank {rank} {name}: {len(ids) if ids else 1} new tokens")
                    tracer.begin_round(name)
                    ids = ids if ids is not None else [next_id]
                    (next_id,), metrics = engine.step({0: ids}, {0: greedy})
                    rt = tracer.end_round()
                    rt.metrics = metrics.to_dict()
                    rt.kv_capacity_bytes = sum(_nbytes_of_storage(t) for t in engine.kv_cache.k + engine.kv_cache.v)
                    rt.kv_used_bytes = engine.kv_cache.nbytes()
                    rt.kv_allocations = engine.kv_cache.allocations
                    key = getattr(engine, "last_step_key", None)
                    rt.static_step = dataclasses.asdict(key) if key is not None and kind == "decode" else None
                    if kind == "decode":
                        decode_no += 1
        report = rank_report(spec, topo, tracer, engine, time.perf_counter() - t0)
    finally:
        parallel_state.destroy()
    return report


def rank_report(spec: DryRunSpec, topo, tracer: Tracer, engine, elapsed_s: float) -> dict:
    """The JSON report of one traced rank (see docs/dryrun.md for every field)."""
    stage = engine.stage
    full_layers = spec.model_config.num_layers
    traced_layers = stage.num_local_layers
    # Weights outside the layers (embedding, final norm, LM head) do not scale with depth.
    per_layer_w = sum(p.numel() * p.element_size() for p in stage.layers.parameters()) + \
        sum(b.numel() * b.element_size() for b in stage.layers.buffers())
    other_w = sum(p.numel() * p.element_size() for p in stage.parameters()) + \
        sum(b.numel() * b.element_size() for b in stage.buffers()) - per_layer_w
    stage_full_layers = (full_layers + spec.pp - 1 - topo.pp_rank) // spec.pp
    factor = stage_full_layers / traced_layers if traced_layers else 1.0
    rounds = []
    for rt in tracer.rounds:
        launches = {str(k): dict(v) for k, v in rt.launches.items()}
        per_layer_total = {str(k): sum(v.values()) for k, v in rt.launches.items() if k != "outside"}
        peak = dict(rt.peak_by_category)
        full_peak = dict(peak)
        full_peak["weights"] = int(other_w + per_layer_w * factor)
        full_peak["kv_cache"] = int(peak["kv_cache"] * factor)
        by_layer_coll = defaultdict(list)
        for c in rt.collectives:
            by_layer_coll[str(c["layer"])].append(c)
        rounds.append({
            "round": rt.name, "time_s": rt.time_s, "metrics": getattr(rt, "metrics", {}),
            "launches_per_layer": {k: v for k, v in per_layer_total.items()},
            "launches_by_layer_and_source": launches,
            "launches_outside_layers": sum(rt.launches.get("outside", {}).values()),
            "ops_per_layer_0": dict(rt.ops.get(0, {})),
            "collectives_by_layer": dict(by_layer_coll),
            "collectives_per_layer": {k: len(v) for k, v in by_layer_coll.items()},
            "host_syncs": rt.syncs,
            "host_syncs_inside_layers": [s for s in rt.syncs if s.get("layer") is not None],
            "host_device_copies": rt.copies,
            "attention_kernels": list(rt.attention.values()),
            "scaled_mm": list(rt.scaled_mm.values()),
            "memory_traced": {"peak_bytes": rt.peak_bytes, "peak_by_category": peak,
                              "max_by_category": {c: rt.max_by_category.get(c, 0) for c in CATEGORIES},
                              "end_by_category": rt.end_by_category,
                              "activations_at_max_by_source": rt.activations_at_max},
            "memory_full_depth": {"peak_bytes": int(sum(full_peak.values())), "peak_by_category": full_peak,
                                  "max_by_category": {**{c: rt.max_by_category.get(c, 0) for c in CATEGORIES},
                                                      "weights": full_peak["weights"],
                                                      "kv_cache": int(rt.max_by_category.get("kv_cache", 0)
                                                                      * factor)}},
            "kv_cache": {"capacity_bytes_traced": getattr(rt, "kv_capacity_bytes", 0),
                         "used_bytes_traced": getattr(rt, "kv_used_bytes", 0),
                         "capacity_bytes_full_depth": int(getattr(rt, "kv_capacity_bytes", 0) * factor),
                         "used_bytes_full_depth": int(getattr(rt, "kv_used_bytes", 0) * factor),
                         "allocations": getattr(rt, "kv_allocations", 0)},
            "static_step": getattr(rt, "static_step", None),
            "_signature": rt.signature,
        })
    decode = [r for r in rounds if r["round"].startswith("decode")]
    replay = graph_replayable(decode)
    for r in rounds:
        r.pop("_signature")
    return {"rank": topo.rank, "tp_rank": topo.tp_rank, "cp_rank": topo.cp_rank, "pp_rank": topo.pp_rank,
            "world_size": topo.world_size, "layers_traced": traced_layers, "layers_full": stage_full_layers,
            "time_s": elapsed_s, "rounds": rounds, "decode_graph_replayable": replay}


def graph_replayable(decode_rounds: list[dict]) -> dict:
    """Do two consecutive decode steps run the identical op sequence with identical shapes
    (what CUDA graph capture and replay need)?  ``{"replayable": bool, "reason": str}``.

    Every traced op of the round counts, inside and outside the layers (the sampling and the
    packing of the inputs too, not only what a graph captures); a round's ``static_step`` (the
    engine's :class:`~cp_megatron.decode_step.StepKey`, when the round was a static decode step)
    is named in the reason."""
    if len(decode_rounds) < 2:
        return {"replayable": None, "reason": "fewer than two decode steps traced"}
    r0, r1 = decode_rounds[0], decode_rounds[1]
    a, b = r0["_signature"], r1["_signature"]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return {"replayable": False,
                    "reason": f"{r0['round']} and {r1['round']} differ at op #{i} "
                              f"(layer {x[0]}): {x[1]}{list(x[2])} vs {y[1]}{list(y[2])}"}
    if len(a) != len(b):
        return {"replayable": False, "reason": f"op counts differ: {len(a)} vs {len(b)}"}
    reason = f"{r0['round']} and {r1['round']} run the same {len(a)} ops with the same shapes"
    key = r1.get("static_step")
    if key:
        reason += (f"; static decode step: {key['rows_per_rank']} query row(s) per rank, {key['num_rows']} "
                   f"gathered, KV view {key['kv_len']:,} slots, mode {key['mode']}, kernel {key['kernel']}")
    return {"replayable": True, "reason": reason}


# -- the all-ranks pattern check -------------------------------------------------------------------
class PatternError(ValueError):
    """The traced ranks' communication does not match up (names ranks, round, layer, call)."""


def check_pattern(ranks: dict[int, dict]) -> dict:
    """Check that the collectives of every traced rank match up.

    Args:
        ranks: global rank -> its report (:func:`trace_rank`), every rank of the job.

    Checks, per round: every send has its receive (same pair, in order) with equal bytes and
    dtype; all_to_all splits agree (what rank i sends to j is what j expects from i); every
    rank of a group issues the same sequence of group collectives (kind, dtype; bytes for
    all-reduce and all-gather).

    Returns:
        {"ranks": n, "sends": n, "group_calls": n} counted.

    Raises:
        PatternError: the first mismatch, naming both ranks, the round, the layer and the call.
    """
    sends = calls = 0
    names = [r["round"] for r in next(iter(ranks.values()))["rounds"]]
    for ri, rname in enumerate(names):
        colls = {g: ranks[g]["rounds"][ri]["_collectives"] for g in ranks}
        # point to point, matched in order per (src, dst)
        out, inn = defaultdict(list), defaultdict(list)
        for g, cs in colls.items():
            for c in cs:
                if c["kind"] == "send":
                    out[(g, c["peer"])].append(c)
                elif c["kind"] == "recv_":
                    inn[(c["peer"], g)].append(c)
        for pair in set(out) | set(inn):
            s, r = out.get(pair, []), inn.get(pair, [])
            src, dst = pair
            for i in range(max(len(s), len(r))):
                if i >= len(s) or i >= len(r):
                    c = (r if i >= len(s) else s)[i]
                    what = "receives from" if i >= len(s) else "sends to"
                    who, other = (dst, src) if i >= len(s) else (src, dst)
                    raise PatternError(f"round {rname}, layer {c['layer']}: rank {who} {what} rank {other} "
                                       f"(call #{i} between them, {c['where']}) with no matching "
                                       f"{'send' if i >= len(s) else 'receive'} on rank {other}")
                a, b = s[i], r[i]
                if a["bytes"] != b["bytes"] or a["dtype"] != b["dtype"]:
                    raise PatternError(f"round {rname}, layer {a['layer']}: rank {src} sends {a['bytes']} bytes "
                                       f"{a['dtype']} to rank {dst} ({a['where']}), rank {dst} receives "
                                       f"{b['bytes']} bytes {b['dtype']} from rank {src} ({b['where']}), "
                                       f"call #{i} between them")
                sends += 1
        # group collectives: same sequence on every member
        seqs = defaultdict(dict)
        for g, cs in colls.items():
            for key, items in _group_calls(cs).items():
                seqs[key][g] = items
        for group, members in seqs.items():
            missing = [m for m in group if m not in members and m in ranks]
            if missing:
                first = next(iter(members))
                c = members[first][0]
                raise PatternError(f"round {rname}, layer {c['layer']}: rank {first} calls {c['kind']} on group "
                                   f"{list(group)} ({c['where']}), rank {missing[0]} never does")
            ref_rank = min(members)
            ref = members[ref_rank]
            for g, items in members.items():
                for i in range(max(len(ref), len(items))):
                    a = ref[i] if i < len(ref) else None
                    b = items[i] if i < len(items) else None
                    if a is None or b is None or _call_key(a) != _call_key(b):
                        c = a or b
                        raise PatternError(
                            f"round {rname}, layer {c['layer']}: group {list(group)} call #{i}: rank {ref_rank} "
                            f"issues {_call_text(a)}, rank {g} issues {_call_text(b)}")
                calls += 1
            a2a = [(g, [c for c in items if c["kind"].startswith("alltoall")]) for g, items in members.items()]
            pos = {m: i for i, m in enumerate(group)}
            for i in range(len(a2a[0][1])):
                for g, items in a2a:
                    c = items[i]
                    for h, other in a2a:
                        d = other[i]
                        if c["input_splits"][pos[h]] != d["output_splits"][pos[g]]:
                            raise PatternError(
                                f"round {rname}, layer {c['layer']}: all_to_all #{i} on group {list(group)}: rank "
                                f"{g} sends {c['input_splits'][pos[h]]} elements to rank {h} ({c['where']}), "
                                f"rank {h} expects {d['output_splits'][pos[g]]} from rank {g}")
    return {"ranks": len(ranks), "sends_matched": sends, "group_calls_matched": calls}


def _group_calls(cs: list[dict]) -> dict:
    out = defaultdict(list)
    for c in cs:
        if c["kind"] not in ("send", "recv_") and c["group"]:
            out[tuple(c["group"])].append(c)
    return out


def _call_key(c: dict) -> tuple:
    sized = not c["kind"].startswith("alltoall")
    return (c["kind"], c["dtype"], c["layer"], c["bytes"] if sized else None)


def _call_text(c: Optional[dict]) -> str:
    if c is None:
        return "nothing"
    return f"{c['kind']} {c['bytes']} bytes {c['dtype']} at layer {c['layer']} ({c['where']})"


def keep_collectives(report: dict) -> dict:
    """Attach the flat list of each round's collectives (``_collectives``) that
    :func:`check_pattern` reads."""
    for r in report["rounds"]:
        r["_collectives"] = [c for cs in r["collectives_by_layer"].values() for c in cs]
    return report
