"""Run, replayed: a streamed CUDA call captured once as a CUDA graph and replayed at every later call of
the same input signature (`stream(..., cuda_graphs=True)`).

A model whose kernels are small spends its time on the host: Python, the module hooks that put weights
in place, and one launch per kernel and per copy. A graph replays the whole call (kernels, the copies on
the copy stream and the events between them) with one launch, so the call runs at the device's pace.

What a graph holds, and the budget: its private memory pool (the call's activations and its outputs),
the static inputs it reads, and the outputs cloned at each replay are all taken within the room the plan
leaves beside the arena (budget - arena - fixed bytes), under the allocator cap, during capture and the
first replay; a graph that does not fit is given up and that input runs eagerly. At most one graph is
held at a time: an eager call of any signature (a trace, another input, a profile) drops it first, so
its pool never sits beside another call's activations.

A graph is captured at the second call of a signature after its plan is made. The first runs eagerly in
PyTorch's sync debug mode: it shows the call leaves the traced order nowhere and never syncs with the host
(an `.item()`, a copy from pageable host memory, host reads of split embeddings), since a capture that
fails on a sync leaves CUDA's random generator bound to the broken graph and later captures in the
process fail. A signature is given up for good where that call synced, where its capture fails anyway,
where its inputs hold objects other than tensors and Python scalars, or where its graph did not fit;
`refused` says why.
Like `torch.compile(mode="reduce-overhead")`, a replay runs the kernels of the capture: a forward whose
work depends on Python state other than its arguments needs eager mode.

Constants made from Python data on the device (`torch.tensor(x, device="cuda")`, `torch.as_tensor`,
`Tensor.new_tensor`: GPT-Neo's attention mask value, diffusers' timestep given as a number) are copies from
pageable host memory, which sync and cannot be captured. While probing and capturing they are made from
pinned memory that the runner holds until it closes, so each replay copies the same values again: the data
is the call's own (a Python scalar argument is part of the input signature) or a constant of the model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import GraphWarning
from .run_cuda import cap_allocator, lift_allocator_cap, unreleasable_bytes
from .store import page_aligned_bytes
from .trace import input_signature
from .units import fmt_bytes

EAGER = object()  # GraphRunner.call's answer where the call should run eagerly
PROBE = object()  # GraphRunner.call's answer where the call runs eagerly under `GraphRunner.probe`
SYNC_WARNING = "called a synchronizing CUDA operation"  # PyTorch's text in sync debug mode "warn"
HOST_SLAB_BYTES = 256 * 2**10  # pinned host memory for constants and output copies, taken in slabs of this size
GRAPH_SMALL_SEGMENT = 2 * 2**20  # a private pool's first small block takes a segment of this size
CAPTURES_PER_SIGNATURE = 3  # a signature whose graph is dropped and captured again this often stays eager


@dataclass
class _Graph:
    key: tuple
    executor: object
    graph: torch.cuda.CUDAGraph
    static_leaves: list  # the inputs the graph reads (tensors) and the call's other leaves
    out: Any  # the graph's outputs, in its pool, overwritten by each replay
    pending: tuple  # the capture's (peak bytes, streamed bytes), for the mover's stats
    marked: list[int]  # ops whose waits the capture timed
    load_marks: list
    held_bytes: int = 0  # reserved memory the graph holds: its pool, the static inputs
    host_out: bool = False  # some outputs are host tensors that the graph's copies fill: sync before reading


def copy_out(obj):
    """A copy of a call's output whose tensors are clones (tensors, tuples, lists, dicts and the dataclass
    dicts of transformers' ModelOutput and diffusers' BaseOutput); anything else cannot be copied out."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if obj is None or isinstance(obj, (int, float, bool, str)):
        return obj
    if isinstance(obj, dict):
        items = {k: copy_out(v) for k, v in obj.items()}
        return type(obj)(**items) if dataclasses.is_dataclass(obj) else type(obj)(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(copy_out(v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(copy_out(v) for v in obj)
    raise _Refused(f"its output holds a {type(obj).__qualname__}, which a replay cannot copy out (a KV cache? "
                   f"call with use_cache=False)")


def tensor_bytes(obj) -> int:
    """Bytes of the device tensors in a call's inputs or output, reached as `copy_out` reaches them (an output
    copied to the host as it is made, a Workload's, takes no room on the device)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() if obj.device.type != "cpu" else 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def input_bytes(obj) -> int:
    """Bytes of every tensor in a call's inputs, wherever it is: a capture holds a device copy of each."""
    return sum(t.numel() * t.element_size() for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor))


def graph_reserve_bytes(io_bytes: int, activation_bytes: int) -> int:
    """What a graph needs beside the eager call's activations: its static inputs and the copies of its outputs
    (`io_bytes`, both measured at the trace), two segments of small blocks (the private pool's own, and one
    spare), and a sixteenth of the activations, since a capture reuses freed blocks less than an eager call
    does (ViT-L: a 28 MiB graph beside 26 MiB of eager activations on an H200)."""
    return io_bytes + 2 * GRAPH_SMALL_SEGMENT + activation_bytes // 16


def _uncapturable(leaves: list) -> str | None:
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.requires_grad and torch.is_grad_enabled():
                return "an input requires grad (graphs here replay inference calls)"
        elif not isinstance(leaf, (int, float, bool, str, type(None))):
            return (f"an input holds a {type(leaf).__qualname__}, which a replay cannot refresh (only tensors "
                    f"and Python scalars)")
    return None


def _python_data(x) -> bool:
    """Numbers, or (nested) lists and tuples of them: what `torch.tensor` copies from pageable memory."""
    if isinstance(x, (bool, int, float, complex)):
        return True
    return isinstance(x, (list, tuple)) and all(_python_data(v) for v in x)


class HostSlabs:
    """Pinned host memory (registered anonymous mappings, so PyTorch sees every view as pinned) handed out in
    pieces that stay valid until `release`: what a captured graph copies from or into at every replay."""

    def __init__(self):
        self._slabs: list[torch.Tensor] = []
        self._used = 0
        self.taken_bytes = 0  # handed out so far, with each piece's alignment
        self.frozen = False  # while capturing: registering memory would end the capture, so none is made

    @staticmethod
    def _piece(used: int, nbytes: int) -> tuple[int, int]:
        start = -(-used // 64) * 64
        return start, start + max(nbytes, 1)

    def reserve(self, nbytes: int) -> None:
        """Make sure `nbytes` can be handed out without registering memory (before a capture)."""
        if not self._slabs or self._used + nbytes > self._slabs[-1].numel():
            self._add(nbytes)

    def _add(self, nbytes: int) -> None:
        slab = page_aligned_bytes(max(nbytes, HOST_SLAB_BYTES))
        err = torch.cuda.cudart().cudaHostRegister(slab.data_ptr(), slab.numel(), 0)
        if int(err) != 0:
            raise _Refused(f"pinning {fmt_bytes(slab.numel())} of host memory failed (cudaHostRegister error "
                           f"{int(err)})")
        self._slabs.append(slab)
        self._used = 0

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        start, end = self._piece(self._used, nbytes)
        if not self._slabs or end > self._slabs[-1].numel():
            if self.frozen:
                raise _Refused(f"the capture needs more pinned host memory than its eager call did "
                               f"({fmt_bytes(nbytes)} more)")
            self._add(nbytes)
            start, end = self._piece(0, nbytes)
        self.taken_bytes += end - self._used
        self._used = end
        return self._slabs[-1][start:start + nbytes].view(dtype).view(shape)

    def copy_to(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host` on `device`, copied without a sync from a pinned piece holding its bytes."""
        pinned = self.empty(host.shape, host.dtype)
        pinned.copy_(host)
        return pinned.to(device, non_blocking=True)

    def release(self) -> None:
        """After every copy that reads or fills the slabs has ended (the caller synchronizes)."""
        slabs, self._slabs, self._used = self._slabs, [], 0
        for slab in slabs:
            torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())


_PROBING_THREADS: dict[int, int] = {}  # thread -> how many `seen_as_capture` it is within
_capture_query = None  # torch.cuda.is_current_stream_capturing as PyTorch defines it


def _is_current_stream_capturing() -> bool:
    """`torch.cuda.is_current_stream_capturing`, True for a thread within `GraphRunner.probe`."""
    return threading.get_ident() in _PROBING_THREADS or _capture_query()


@contextlib.contextmanager
def seen_as_capture():
    """Within it, `torch.cuda.is_current_stream_capturing()` answers True on this thread (the query is wrapped
    from the first use on): code that skips its data-dependent checks while a graph is captured
    (transformers' packed-sequence and mask checks, which read a value on the host) takes in an eager probe
    the path it will take in the capture. flashmem's CUDA mover asks too: a probed call ends joined with its
    copy stream, as a captured one must."""
    global _capture_query
    if _capture_query is None:
        _capture_query = torch.cuda.is_current_stream_capturing
        torch.cuda.is_current_stream_capturing = _is_current_stream_capturing
    me = threading.get_ident()
    _PROBING_THREADS[me] = _PROBING_THREADS.get(me, 0) + 1
    try:
        yield
    finally:
        _PROBING_THREADS[me] -= 1
        if not _PROBING_THREADS[me]:
            del _PROBING_THREADS[me]


class _HostConstants(TorchFunctionMode):
    """While probing and capturing: device tensors made from Python data are copied from pinned memory (see
    the module's docstring)."""

    def __init__(self, slabs: HostSlabs):
        super().__init__()
        self.slabs = slabs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor or func is torch.as_tensor or func is torch.Tensor.new_tensor:
            made = self._from_pinned(func, args, kwargs)
            if made is not None:
                return made
        return func(*args, **kwargs)

    def _from_pinned(self, func, args, kwargs):
        if func is torch.Tensor.new_tensor:
            if len(args) < 2:
                return None
            like, data = args[0], args[1]
            device = torch.device(kwargs.get("device") or like.device)
            dtype = kwargs.get("dtype") or like.dtype
        else:
            data = args[0] if args else kwargs.get("data")
            device = kwargs.get("device")
            device = torch.device(device) if device is not None else None
            dtype = kwargs.get("dtype")
        if device is None or device.type != "cuda" or not _python_data(data):
            return None
        out = self.slabs.copy_to(torch.tensor(data, dtype=dtype), device)
        if kwargs.get("requires_grad"):
            out.requires_grad_(True)
        return out


class GraphRunner:
    """Captures and replays one StreamedModel's calls (see the module's docstring)."""

    def __init__(self, sm, stream: torch.cuda.Stream):
        self.sm = sm
        self.graph: _Graph | None = None
        self.refused: dict[str, str] = {}  # input signature -> why it runs eagerly
        self.captures: dict[tuple, int] = {}  # (call key, executor id) -> captures made
        self.capturing = False
        self.stream = stream  # every call and capture runs on it; its math workspace was made before the trace
        self.replays = 0  # calls answered by a replay
        self.probed: set[str] = set()  # signatures whose eager call ran under `probe` and did not sync
        self.probe_signature = ""  # the signature of the call `call` last answered PROBE
        self.probing = False  # within `probe`
        self.host = HostSlabs()  # pinned memory the probes' and graphs' host copies use, held until `close`
        self.host_copies = 0  # outputs `to_host` copied into it
        self.probe_host_bytes: dict[str, int] = {}  # signature -> pinned bytes its probe took (its capture's)

    def probe(self):
        """A context for the eager call before a capture: a call that syncs with the host is refused here, since
        a capture that fails leaves CUDA's random generator bound to the broken graph, and later captures in
        the process (of any model) then fail."""
        return _Probe(self, self.probe_signature)

    # -- the StreamedModel's entry points ----------------------------------------------------------------
    def call(self, args: tuple, kwargs: dict):
        """The call's output from a graph, or EAGER where the call runs through the hooks instead."""
        sm = self.sm
        # Inputs stay where they are: a replay copies them into the graph's static ones, and a capture clones
        # them onto the device (device copies made here and dropped would stay cached on the caller's stream).
        signature = input_signature(args, kwargs)
        if signature in self.refused or signature not in sm._plans:
            return EAGER
        leaves, spec = tree_flatten((args, kwargs))
        reason = _uncapturable(leaves)
        if reason is not None:
            self._refuse(signature, reason)
            return EAGER
        if signature != sm._signature:
            self.drop()  # the arena may change for that plan: no pool may sit beside it
        with sm._exclusive():
            sm._prepare(args, kwargs)
            executor = sm._executor
            mover = executor.mover
            key = (signature, executor.profiling, mover.serial, mover.record_loads)
            entry = self.graph
            if entry is not None and entry.key == key and entry.executor is executor:
                return self._replay(entry, leaves)
            if executor.ever_diverged:
                return EAGER
            if executor.completed_calls < 1 or signature not in self.probed:
                self.probe_signature = signature
                return PROBE
            # Counted per plan and mode: a profile's graph, or a graph of a new plan, is not a re-capture.
            if self.captures.get((key, id(executor)), 0) >= CAPTURES_PER_SIGNATURE:
                self._refuse(signature, f"its graph was dropped and captured {CAPTURES_PER_SIGNATURE} times (calls "
                                        f"of other inputs in between drop it); it runs eagerly from now on")
                return EAGER
            self.drop()
            return self._capture(signature, key, executor, leaves, spec)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` copied to the host without a sync where the call is probed or captured (into pinned memory; the
        copy has ended once the caller's stream is synchronized, as a replay's caller is), else `t.cpu()`."""
        if not (self.probing or self.capturing) or t.device.type == "cpu":
            return t.cpu()
        out = self.host.empty(t.shape, t.dtype)
        out.copy_(t, non_blocking=True)
        self.host_copies += 1
        return out

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the device; from the host without a sync where the call is probed (through pinned memory:
        a capture reads the static device copies instead, and meets no host tensor)."""
        if t.device.type != "cpu" or not self.probing:
            return self.sm._to_device(t)
        return self.host.copy_to(t, self.sm.device)

    def close(self) -> None:
        """Drop the graph and give the pinned host memory back."""
        self.drop()
        torch.cuda.synchronize(self.sm.device)
        self.host.release()

    def drop(self) -> None:
        """Give the graph and its pool back (before an eager call, or at close)."""
        if self.graph is None or self.capturing:
            return
        entry, self.graph = self.graph, None
        entry.graph.reset()
        del entry
        torch.cuda.empty_cache()

    # -- capture and replay ------------------------------------------------------------------------------
    def _refuse(self, signature: str, reason: str) -> None:
        if signature not in self.refused:
            self.refused[signature] = reason
            warnings.warn(GraphWarning(f"cuda_graphs: input {signature} runs eagerly: {reason}"), stacklevel=4)

    def _capture(self, signature: str, key: tuple, executor, leaves: list, spec):
        sm, dev = self.sm, self.sm.device
        plan = executor.plan
        self.captures[key, id(executor)] = self.captures.get((key, id(executor)), 0) + 1
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        room = plan.budget_bytes - plan.arena_bytes - plan.fixed_bytes
        before = torch.cuda.memory_reserved(dev)
        saved = cap_allocator(dev, unreleasable_bytes(dev) + max(room, 0))
        entry = graph = out = static = static_args = static_kwargs = None
        try:
            static = [x.to(sm.device, copy=True) if isinstance(x, torch.Tensor) else x for x in leaves]
            static_args, static_kwargs = tree_unflatten(static, spec)
            graph = torch.cuda.CUDAGraph()
            copies_before = self.host_copies
            self.host.reserve(self.probe_host_bytes.get(signature, 0) + 64)  # + the first piece's alignment
            self.host.frozen = self.capturing = True
            try:
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"), \
                        _HostConstants(self.host):
                    out = sm._run_eager(static_args, static_kwargs)
            finally:
                self.host.frozen = self.capturing = False
            if executor.ever_diverged:
                raise _Refused("the captured call left the traced order")
            copy_out(out)  # refuses an output it cannot copy (before the first replay)
            mover = executor.mover
            entry = _Graph(key, executor, graph, static, out, mover._pending, list(mover.marked),
                           list(mover.load_marks))
            entry.host_out = self.host_copies > copies_before
            result = self._replay(entry, leaves, fresh=True)
            torch.cuda.synchronize(dev)
        except Exception as err:  # noqa: BLE001 - any capture failure: the call runs eagerly (and fails there if it must)
            if graph is not None:
                try:  # a capture that raised leaves its generator and pool registered until reset
                    graph.reset()
                except Exception:  # noqa: BLE001 - a graph that never began has nothing to reset
                    pass
            entry = graph = out = static = static_args = static_kwargs = None  # the pool goes with them
            torch.cuda.synchronize(dev)
            lift_allocator_cap(dev, saved)
            saved = None
            torch.cuda.empty_cache()
            why = str(err) if isinstance(err, _Refused) else (
                f"its capture failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
            if isinstance(err, torch.OutOfMemoryError):
                why = (f"its graph (pool, static inputs and outputs) needs more than the {fmt_bytes(room)} the "
                       f"budget leaves beside the arena; raise the budget by the graph's pool to replay it")
            self._refuse(signature, why)
            sm._reset_after_capture()
            return EAGER
        finally:
            lift_allocator_cap(dev, saved)
        entry.held_bytes = torch.cuda.memory_reserved(dev) - before
        self.graph = entry
        return result

    def _replay(self, entry: _Graph, leaves: list, fresh: bool = False):
        if not fresh:
            for dst, src in zip(entry.static_leaves, leaves):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)
        mover = entry.executor.mover
        mover._stats, mover._pending = None, entry.pending
        mover.marked, mover.load_marks = list(entry.marked), list(entry.load_marks)
        entry.graph.replay()
        self.replays += 1
        if entry.host_out:
            torch.cuda.current_stream(self.sm.device).synchronize()
        return copy_out(entry.out)


class _Probe:
    def __init__(self, runner: GraphRunner, signature: str):
        self.runner, self.signature = runner, signature

    def __enter__(self):
        self.previous = torch.cuda.get_sync_debug_mode()
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        self.constants = _HostConstants(self.runner.host)
        self.constants.__enter__()
        self.runner.probing = True
        self.host_before = self.runner.host.taken_bytes
        self.as_capture = seen_as_capture()
        self.as_capture.__enter__()
        return self

    def __exit__(self, kind, value, tb):
        self.as_capture.__exit__(kind, value, tb)
        self.runner.probing = False
        self.runner.probe_host_bytes[self.signature] = self.runner.host.taken_bytes - self.host_before
        self.constants.__exit__(kind, value, tb)
        torch.cuda.set_sync_debug_mode(self.previous)
        self.caught.__exit__(kind, value, tb)
        syncs = 0
        for record in self.records:
            if SYNC_WARNING in str(record.message):
                syncs += 1
            else:  # the call's own warnings go on as they would have
                warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
        if kind is not None:
            return False
        if syncs:
            self.runner._refuse(self.signature, f"its call synchronizes with the host {syncs} times (an .item(), a "
                                                f"copy to or from pageable host memory, a data-dependent shape), "
                                                f"which a CUDA graph cannot capture")
        else:
            self.runner.probed.add(self.signature)
        return False


class _Refused(Exception):
    """A capture that worked but cannot be replayed."""
