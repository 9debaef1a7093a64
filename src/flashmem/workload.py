"""`flashmem.Workload`: several models called one after another, under one device budget, on one plan.

The models become children of one module whose forward makes a sequence of calls; that module is streamed
like any model, so a sequence of calls is one program and gets one plan: resident sets are chosen across
the models, one ring serves them all, and the next model's first weights load while the current one
finishes. A sequence is traced once; a later sequence whose calls (model and input signature) were all
traced before is composed from those traced parts and planned without running anything. `use_solver`
profiles a sequence and plans it with the solver instead of the simple planner.

    wl = flashmem.Workload({"vit": vit, "gpt": gpt}, budget="1.5GB", device="cuda",
                           examples={"vit": ((pixels,), {}), "gpt": ((ids,), {})})
    results = wl.run([("gpt", (ids,), {}), ("vit", (pixels,), {}), ("gpt", (ids,), {})])

On CUDA each call's output is moved to the host as the call ends, so device memory holds no earlier output
(objects in it other than tensors, such as a KV cache, are dropped); `keep_on_device=True` keeps outputs
where they are (their bytes then count as activations of the calls after them). A call that fails (a storage error, an exception in the model) gives its exception as its
result; the calls after it run on a plan for the rest of the sequence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .errors import FlashmemError
from .graphs import input_bytes
from .run_cuda import timing_event
from .build import build, _store_from_tensors
from .streamed import StreamedModel
from .trace import Op, Program, input_signature

Call = tuple[str, tuple, dict]  # (model name, args, kwargs)


@dataclass(frozen=True)
class CallPart:
    """The ops of one traced call of one model, relative to the call's first op."""
    ops: tuple[Op, ...]
    activation_bytes: int


@dataclass(frozen=True)
class CallResult:
    """One call of a sequence: its output (None if it failed), its error, and when it ran."""
    name: str
    output: Any
    error: BaseException | None
    start_s: float
    end_s: float


class _Queue(nn.Module):
    """The models as children, and a forward that makes a sequence of calls."""

    def __init__(self, models: dict[str, nn.Module]):
        super().__init__()
        # children are named m0, m1, ... (a model's name may hold characters a module name may not)
        self.keys = {name: f"m{i}" for i, name in enumerate(models)}
        self.members = nn.ModuleDict({self.keys[name]: m for name, m in models.items()})
        self.marks: list[int] = []  # op count of the trace at each call's start (while tracing)
        self.on_boundary = None  # called before each call and after the last, with the call's index
        self.to_device = None  # moves a call's input tensor to the device as the call begins
        self.to_host = None  # CUDA: moves each call's output to the host as the call ends
        self.results: list = []
        # Called when the model changes (CUDA: empty the allocator's cache, so that one model's cached
        # activation blocks do not stay reserved beside the next model's: each call's activations were
        # measured from an empty cache). The call before has ended with its output copied to the host, so
        # the synchronisation this costs is already there.
        self.between_models = None

    def forward(self, calls: tuple[Call, ...]):
        self.results = []  # this call's (a capture that failed is called again eagerly)
        for k, (name, args, kwargs) in enumerate(calls):
            if self.on_boundary:
                self.on_boundary(k)
            if k and self.between_models and name != calls[k - 1][0]:
                self.between_models()
            if self.to_device:  # one call's inputs on the device at a time, counted in its activations
                args, kwargs = tree_map(lambda x: self.to_device(x) if isinstance(x, torch.Tensor) else x,
                                        (args, kwargs))
            out = self.members[self.keys[name]](*args, **kwargs)
            if self.to_host:
                out = self.to_host(out)
            self.results.append(out)
        if self.on_boundary:
            self.on_boundary(len(calls))
        return self.results


def _to_host(out: Any, move=torch.Tensor.cpu) -> Any:
    """A call's output with its tensors on the host (each moved by `move`). Other objects in it (a KV cache
    of a transformers model) are dropped: they hold device memory that no budget counts once the call has
    ended."""
    if isinstance(out, torch.Tensor):
        return move(out)
    if isinstance(out, dict):  # transformers' ModelOutput is an ordered dict
        moved = {k: _to_host(v, move) for k, v in out.items()}
        try:
            return type(out)(**moved)
        except TypeError:
            return moved
    if isinstance(out, (tuple, list)):
        return type(out)(_to_host(v, move) for v in out)
    if isinstance(out, (int, float, bool, str, type(None))):
        return out
    return None


class Workload:
    """Models called in sequences, under one `budget` on one `device`, each sequence on one plan.

    models: name -> nn.Module (parameters on the CPU). examples: name -> (args, kwargs), one call of each
    model, traced together as the first sequence. cpu_reads and host_budget (CUDA: what the host may hold
    of the weights, a staging ring that each sequence reads them through from storage) and split_bytes
    (every model's large linear layers in blocks, embedding tables read by rows) as for `flashmem.stream`.

    cuda_graphs (CUDA): from the second run of a sequence on, replay the whole sequence, every call of every
    model with its loads, as one CUDA graph (see `flashmem.graphs`); each output is copied to the host
    inside the graph, and the calls' times come from events recorded in it. A sequence whose calls cannot
    all be captured runs eagerly; `graph_refusals` says why.
    """

    def __init__(self, models: dict[str, nn.Module], budget, device: str = "cpu",
                 examples: dict[str, tuple[tuple, dict]] | None = None, cpu_reads: str = "auto",
                 keep_on_device: bool = False, debug=None, host_budget=None, split_bytes=None,
                 cuda_graphs: bool = False):
        if not models:
            raise FlashmemError("a Workload needs at least one model")
        missing = sorted(set(models) - set(examples or {}))
        if missing:
            raise FlashmemError(f"examples lacks {', '.join(map(repr, missing))}: give one call of each model, "
                                f"as examples={{name: (args, kwargs)}}")
        self.names = list(models)
        self.queue = _Queue(models)
        self.queue.on_boundary = self._boundary
        if torch.device(device).type == "cuda" and not keep_on_device:  # the trace's outputs too
            self.queue.to_host = _to_host
        self.parts: dict[tuple[str, str], CallPart] = {}  # (model name, input signature) -> traced ops
        self._segment_peaks: list[int] = []
        self._tracing_calls: tuple[Call, ...] | None = None
        first = tuple((name, tuple(args), dict(kwargs)) for name, (args, kwargs) in examples.items())
        self._tracing_calls = first
        self.streamed: StreamedModel = build(self.queue, budget, device, (first,), None,
                                             source=_store_from_tensors, debug=debug, cpu_reads=cpu_reads,
                                             hooks=self._hook_up, host_budget=host_budget,
                                             split_bytes=split_bytes, cuda_graphs=cuda_graphs)
        self._tracing_calls = None
        runner = self.streamed._graphs
        if runner is not None:  # a probe copies inputs through pinned memory (no sync)
            self.queue.to_device = runner.to_device
        if self.streamed.device.type == "cuda" and not keep_on_device:
            self.queue.between_models = torch.cuda.empty_cache
            if runner is not None:  # a capture keeps its pool; emptying the cache syncs, which a probe refuses
                self.queue.between_models = lambda: runner.capturing or runner.probing or torch.cuda.empty_cache()
                self.queue.to_host = lambda out: _to_host(out, runner.to_host)
        self._graph_events: tuple = (None, [])  # (the graph, the events its capture recorded at each boundary)
        self.last: list[CallResult] = []

    def _hook_up(self, sm: StreamedModel) -> None:
        self.streamed = sm
        sm.compose = self._compose
        sm.traced = self._harvest
        sm.move_inputs = False
        self.queue.to_device = sm._to_device

    # -- tracing and composing ---------------------------------------------------------------------------
    def _boundary(self, k: int) -> None:
        """Before call k of a sequence (and after the last): while tracing, mark where the call's ops begin
        and measure the activations of the call just ended."""
        sm = self.streamed
        tracer = sm._tracer
        if tracer is None:
            return
        self.queue.marks.append(len(tracer.ops))
        device = sm.device
        if device.type == "cuda":
            # Each call's peak over what the device held when the trace began (not when the call began:
            # what an earlier call left allocated for good, a cuBLAS workspace say, counts for every call),
            # its reserved memory grown from an empty cache, as the streamed calls will find it.
            torch.cuda.synchronize(device)
            if k == 0:
                self._alloc0, self._reserved0 = tracer.allocated0, tracer.reserved0
            else:
                peak = max(torch.cuda.max_memory_allocated(device) - self._alloc0,
                           torch.cuda.max_memory_reserved(device) - self._reserved0)
                self._segment_peaks.append(max(peak, 0))
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        elif k > 0:
            self._segment_peaks.append(0)

    def _harvest(self, program: Program) -> Program:
        """Split a traced sequence into its calls' parts; its activations are those of its largest call."""
        calls = self._tracing_calls
        marks = self.queue.marks
        if calls is None or len(marks) != len(calls) + 1:
            raise FlashmemError("internal: a Workload sequence was traced without its call marks")
        peaks = self._segment_peaks or [program.activation_bytes] * len(calls)
        for k, (name, args, kwargs) in enumerate(calls):
            begin, end = marks[k], marks[k + 1]
            ops = tuple(Op(op.index - begin, op.module, op.weights, op.end_index - begin)
                        for op in program.ops[begin:end])
            key = self.queue.keys[name]
            if any(not op.module.startswith(f"members.{key}.") and op.module != f"members.{key}" for op in ops):
                raise FlashmemError(f"call {k} of the sequence ({name!r}) ran ops of another model")
            self.parts[(name, input_signature(args, kwargs))] = CallPart(ops, peaks[k])
        self.queue.marks = []
        self._segment_peaks = []
        return replace(program, activation_bytes=max(peaks) if peaks else 0)

    def _compose(self, args: tuple, kwargs: dict, signature: str) -> Program | None:
        """The program of a sequence whose every call was traced before, or None (then it is traced)."""
        (calls,) = args
        parts = []
        for name, cargs, ckwargs in calls:
            part = self.parts.get((name, input_signature(cargs, ckwargs)))
            if part is None:
                self._tracing_calls = tuple(calls)
                self.queue.marks, self._segment_peaks = [], []
                return None
            parts.append(part)
        ops, base = [], 0
        for part in parts:
            ops.extend(Op(op.index + base, op.module, op.weights, op.end_index + base) for op in part.ops)
            base += len(part.ops)
        weights = self.streamed._mw.weights
        # A capture of the sequence holds a device copy of every call's inputs (its static inputs).
        self.streamed._graph_io_bytes = input_bytes(args)
        return Program(weights=weights, ops=tuple(ops), activation_bytes=max(p.activation_bytes for p in parts),
                       fixed_bytes=self.streamed._fixed_bytes, signature=signature)

    # -- running -----------------------------------------------------------------------------------------
    def _checked(self, calls: list[Call]) -> list[Call]:
        calls = [(name, tuple(args), dict(kwargs)) for name, args, kwargs in calls]
        unknown = sorted({name for name, _, _ in calls} - set(self.names))
        if unknown:
            raise FlashmemError(f"no model named {', '.join(map(repr, unknown))} in this Workload "
                                f"(it has {', '.join(map(repr, self.names))})")
        return calls

    def use_solver(self, calls: list[Call], settings=None, cache_dir=None):
        """Profile the sequence `calls` on the device and plan it with the solver (`StreamedModel.use_solver`):
        the resident set, the ring's size and each load's start chosen across the models by predicted
        latency; later runs of the same sequence (the same models and input signatures in the same order)
        run on that plan, which the solver keeps only where it beats the simple plan. The sequence runs a
        few times for the profile; a call that fails there fails this method. Returns the plan."""
        calls = self._checked(calls)
        with torch.no_grad():
            return self.streamed.use_solver((tuple(calls),), {}, settings=settings, cache_dir=cache_dir)

    def run(self, calls: list[Call]) -> list[CallResult]:
        """Run `calls` in order; one result per call. A failed call's result holds its exception, and the
        calls after it still run."""
        calls = self._checked(calls)
        results: list[CallResult] = []
        runner = self.streamed._graphs
        done = 0
        while done < len(calls):
            rest = tuple(calls[done:])
            self.queue.results = []
            times = [time.perf_counter()]
            events: list = []
            self.queue.on_boundary = lambda k, times=times, events=events: self._stamp(k, times, events)
            replays = runner.replays if runner is not None else 0
            returned = None
            try:
                with torch.no_grad():
                    returned = self.streamed(rest)
                error = None
            except Exception as err:  # the call that failed gets it; the rest runs on its own plan
                error = err
            finally:
                self.queue.on_boundary = self._boundary
                self._tracing_calls = None
            outs = self.queue.results
            stamps = times[1:]
            if runner is not None:
                torch.cuda.synchronize(self.streamed.device)  # a probed call's host copies have landed
                if events:
                    self._graph_events = (runner.graph, events)
                if error is None and runner.replays > replays:  # the sequence was a graph's replay
                    outs, stamps = returned, self._replayed_stamps(runner, times[0], len(rest))
            for k, out in enumerate(outs):
                results.append(CallResult(rest[k][0], out, None, stamps[k], stamps[k + 1]))
            done += len(outs)
            if error is not None:
                name = rest[len(outs)][0]
                start = stamps[len(outs)] if len(stamps) > len(outs) else times[0]
                results.append(CallResult(name, None, error, start, time.perf_counter()))
                done += 1
        self.last = results
        return results

    def _stamp(self, k: int, times: list, events: list) -> None:
        """The boundary before call k (and after the last): its host time; in a capture, an event too."""
        self._boundary(k)
        times.append(time.perf_counter())
        runner = self.streamed._graphs
        if runner is not None and runner.capturing:
            event = timing_event()
            event.record()
            events.append(event)

    def _replayed_stamps(self, runner, start_s: float, calls: int) -> list[float]:
        """The boundaries of a replayed sequence, from the events its capture recorded (the replay recorded
        them again), counted from `start_s`."""
        graph, events = self._graph_events
        if graph is not runner.graph or len(events) != calls + 1:
            raise FlashmemError("internal: a replayed Workload sequence has no boundary events of its capture")
        return [start_s + events[0].elapsed_time(e) / 1e3 for e in events]

    @property
    def graph_refusals(self) -> dict[str, str]:
        """With cuda_graphs=True: per sequence signature that runs eagerly, why."""
        return self.streamed.graph_refusals

    @property
    def plan(self):
        """The plan of the last sequence run."""
        return self.streamed.plan

    @property
    def stats(self):
        return self.streamed.stats

    def close(self) -> None:
        self.streamed.close()
        from .streamed import _closed

        for m in self.queue.members.values():  # their weights went with the store, as the queue's did
            m.register_forward_pre_hook(_closed)
