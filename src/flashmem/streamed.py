"""`StreamedModel`: a model streamed under a budget (made by `flashmem.stream` and `from_pretrained`, see
`build.py`), with its traces, plans, store and hooks.

The StreamedModel owns the model from then on: its parameters move into flashmem's store (pinned host
memory for CUDA, a safetensors file for the CPU) and module hooks put them in place op by op during
each call, following the plan. Calling the StreamedModel, or the model itself (`generate`, say), streams.
An input of a new shape or dtype is traced and planned again; plans are cached by input signature.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .check import check_plan
from .errors import ControlFlowWarning, FlashmemError
from .graphs import EAGER, PROBE, graph_reserve_bytes, input_bytes, tensor_bytes
from .plan import Plan, minimum_budget, simple_plan, with_staging
from .run import CallStats, DebugOptions, Executor, arena_views, build_steps
from .run_cpu import CpuMover, MapMover
from .run_cuda import CudaMover, StagedCudaMover
from .split import Split, row_embeddings
from .store import HOST_ALIGNMENT, HostStore, MappedFiles, StagedStore, as_bytes
from .trace import (MappedLoader, ModelWeights, Program, ScratchLoader, Tracer, input_signature,
                    module_names, placeholder, set_slots, typed_view)
from .units import align_up, fmt_bytes

CUDA_ALIGNMENT = 512  # bytes; like PyTorch's allocator, so kernels see the same alignment as resident
CPU_ALIGNMENT = 64
CUDA_GRANULARITY = 2 * 2**20  # the caching allocator rounds large blocks to 2 MiB
CUDA_LARGE_SEGMENT = 10 * 2**20  # from this size on, a block's segment is the block (rounded to 2 MiB)
MAX_PLANS = 8
OVERLAP = ("this StreamedModel is running a call in another thread; calls on one StreamedModel must not overlap: "
           "serialise them, or stream one per thread")
CPU_READS = ("auto", "map", "copy")
MAP_PAGE_OVERHEAD = 0.01  # "auto" maps the files unless rounding weights to pages costs more than this


def trace_scratch_bytes(max_working_bytes: int) -> int:
    """The size of the trace's scratch buffer on CUDA: the caching allocator gives a request of 1 to 10 MiB
    a 20 MiB segment, whose free tail would then hold the traced activations, which a streamed call (the
    scratch gone) must find room for elsewhere: the reserve would be measured short. A request of at least
    CUDA_LARGE_SEGMENT, in whole 2 MiB blocks, gets a segment of exactly its size."""
    return max(align_up(max_working_bytes, CUDA_GRANULARITY), CUDA_LARGE_SEGMENT)


def activation_reserve(measured_bytes: int) -> int:
    """Device bytes kept for activations: the traced peak (of allocated memory, or of the reserved memory
    the caching allocator needed for it from an empty cache, whichever is larger), to its 2 MiB blocks."""
    if measured_bytes <= 0:
        return 0
    return align_up(measured_bytes, CUDA_GRANULARITY)


class StreamedModel:
    """A model whose weights stream into a fixed device arena during each call, within a budget."""

    def __init__(self, model: nn.Module, mw: ModelWeights, make_store, originals: list[torch.Tensor],
                 device: torch.device, budget_bytes: int, fixed_bytes: int, cpu_reads: str = "auto"):
        self.model = model
        self.device = device
        self.budget_bytes = budget_bytes
        self._mw = mw
        # The store is made once the first plan is known good; until then the trace reads the model's own
        # tensors, so a budget the planner rejects leaves the model as it was.
        self._store = None
        self._make_store = make_store
        self._originals = originals
        self._fixed_bytes = fixed_bytes
        self._host_budget_bytes: int | None = None  # CUDA: weights streamed from storage through a ring
        self._alignment = CUDA_ALIGNMENT if device.type == "cuda" else CPU_ALIGNMENT
        # the unit an arena is sized in: on CUDA the caching allocator's block
        self._granularity = CUDA_GRANULARITY if device.type == "cuda" else self._alignment
        self._placeholders = {w.index: placeholder(w) for w in mw.weights}
        self._plans: OrderedDict[str, tuple[Program, Plan]] = OrderedDict()
        self._arena: torch.Tensor | None = None
        self._arena_residents: tuple | None = None  # the residents the arena holds now
        self._resident_views: dict[int, torch.Tensor] = {}
        self._executor: Executor | None = None
        self._executors: dict[str, Executor] = {}  # per input signature, for the arena as it is
        self._signature: str | None = None
        self._tracer: Tracer | None = None
        self._on_demand: Tracer | None = None  # the rest of a call that left the traced order
        self._evicted: tuple[int, ...] = ()  # residents whose bytes that call reuses
        self._names = module_names(model)
        self._active = False
        self._active_thread: int | None = None
        self._state_lock = threading.Lock()
        self._hooks: list = []
        self.costs = None  # the cost model of the last use_solver()
        self.split: Split | None = None  # what split_bytes split (split.py), or None
        self.debug = DebugOptions()
        self.cpu_reads = cpu_reads  # as asked; "auto" is settled by the first plan
        # For a Workload: compose(args, kwargs, signature) may return the program of a call without a trace;
        # traced(program) sees (and may amend) each traced program before it is planned.
        self.compose = None
        self.traced = None
        # Host tensors among a call's inputs are copied to the device as the call begins; a Workload moves
        # each of its calls' inputs as that call begins instead (so only one call's are on the device at once).
        self.move_inputs = True
        self._files: MappedFiles | None = None
        self._graphs = None  # a graphs.GraphRunner with cuda_graphs=True
        self._graph_thread: int | None = None  # the thread replaying (or capturing) a graph
        self._trace_input_bytes = 0
        self._graph_io_bytes = 0  # with graphs: the last trace's input and output bytes (its graph's static ones)
        self._set_all(lambda w: self._placeholders[w])

    @property
    def _mapped(self) -> bool:
        """Weights are used in place in the mapped files (the CPU's default; the debug poison needs copies)."""
        return self.device.type == "cpu" and self.cpu_reads in ("auto", "map") and not self.debug.poison

    # -- set-up ----------------------------------------------------------------------------------------
    def _set_all(self, value_for) -> None:
        for w in self._mw.weights:
            set_slots(self.model, w, value_for(w.index))

    def _install_hooks(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._call_begin, with_kwargs=True))
        for name in self._mw.owned:
            module = self.model.get_submodule(name)
            self._hooks.append(module.register_forward_pre_hook(self._op_enter))
            self._hooks.append(module.register_forward_hook(self._op_exit, always_call=True))
        self._hooks.append(self.model.register_forward_hook(self._call_end, always_call=True))

    def _read(self, weight: int, dst: torch.Tensor) -> None:
        if self._store is not None:
            self._store.read_into(weight, dst)
        else:
            dst.copy_(as_bytes(self._originals[weight].detach().contiguous()))

    def _start_trace(self, signature: str) -> None:
        """Make this call a traced one: weights load on demand, into a scratch buffer the first time (on
        the CPU the arena itself, at the budget's size, so RAM never holds both), into the arena's ring
        afterwards (resident weights stay where they are). On mapped files nothing is copied: an op's
        weights are views of the files, their pages held while it runs."""
        cap = {}
        if self._mapped and self._store is not None:
            if self._files is None:
                self._files = MappedFiles(self._store)
            loader = MappedLoader(self.model, self._mw, self._files, self._resident_views)
        else:
            if self._arena_residents is None:  # nothing in place yet
                if self.device.type == "cpu":
                    self._arena = torch.zeros(self.budget_bytes // self._alignment * self._alignment,
                                              dtype=torch.uint8)
                    scratch = self._arena
                else:
                    scratch = torch.zeros(trace_scratch_bytes(self._mw.max_working_bytes), dtype=torch.uint8,
                                          device=self.device)
                resident: dict[int, torch.Tensor] = {}
            else:
                resident = self._resident_views
                if self._arena is not None:
                    scratch = self._arena[self.plan.resident_bytes:]
                else:  # residents held in mapped files (the debug poison asked for copies since)
                    scratch = torch.zeros((self.budget_bytes - self.plan.resident_bytes) // self._alignment
                                          * self._alignment, dtype=torch.uint8)
            loader = ScratchLoader(self.model, self._mw, self._read, scratch, self._alignment, resident)
            if self.device.type == "cuda":  # the trace may not take the device past the budget
                held = self._arena.numel() if self._arena is not None else scratch.numel()
                cap = dict(budget_bytes=self.budget_bytes, held_bytes=align_up(held, CUDA_GRANULARITY) + self._fixed_bytes)
        self._tracer = Tracer(self._mw, loader, self._placeholders, self.device, self._fixed_bytes, signature,
                              **cap)
        self._tracer.start()

    def _finish_trace(self, failed: bool) -> None:
        tracer, self._tracer = self._tracer, None
        if failed:
            tracer.explain_failure(sys.exc_info()[1])
            tracer.abort()
            return
        program = tracer.finish()
        del tracer
        if self.traced:
            program = self.traced(program)
        program = self._footprints(program)
        self._remember(program, self._plan(program))

    def _remember(self, program: Program, plan: Plan) -> None:
        self._plans[program.signature] = (program, plan)
        if len(self._plans) > MAX_PLANS:
            self._plans.popitem(last=False)
        self._activate(program, plan)

    def _ensure_store(self) -> None:
        if self._store is None:
            self._store = self._make_store()
            self._make_store = None

    def _footprints(self, program: Program) -> Program:
        """On mapped files a weight costs the pages it touches: the program the plan budgets. Settles
        "auto": mapped unless pages would cost more than MAP_PAGE_OVERHEAD of the weights' bytes (a model
        of small tensors, which copying serves as well)."""
        if not self._mapped:
            return program
        self._ensure_store()
        if self._files is None:
            self._files = MappedFiles(self._store)
        spans = [self._files.span_bytes(w.index) for w in program.weights]
        if self.cpu_reads == "auto":
            total = sum(w.nbytes for w in program.weights)
            self.cpu_reads = "map" if sum(spans) <= total * (1 + MAP_PAGE_OVERHEAD) else "copy"
            if self.cpu_reads == "copy":
                self._files = None
                return program
        if all(s == w.nbytes for s, w in zip(spans, program.weights)):
            return program
        weights = tuple(replace(w, nbytes=s) for w, s in zip(program.weights, spans))
        return replace(program, weights=weights)

    def _plan(self, program: Program) -> Plan:
        cuda = self.device.type == "cuda"
        extra = graph_reserve_bytes(self._graph_io_bytes, program.activation_bytes) if self._graphs else 0
        plan = simple_plan(program, budget_bytes=self.budget_bytes, device=str(self.device),
                           alignment=self._alignment,
                           activation_bytes=activation_reserve(program.activation_bytes + extra) if cuda else 0,
                           granularity=self._granularity)
        if self._host_budget_bytes is not None:  # the storage link: loads pass through the host's ring
            plan = with_staging(plan, self._host_budget_bytes, HOST_ALIGNMENT)
        check_plan(plan, program)
        return plan

    def _close_executors(self) -> None:
        for executor in self._executors.values():
            close = getattr(executor.mover, "close", None)
            if close:
                close()
        self._executors.clear()
        self._executor = None

    def _activate(self, program: Program, plan: Plan) -> None:
        """Make `plan` the one in use: arena of its size, its residents in place, its executor (kept per
        input signature while the arena's layout of residents stays the same)."""
        cached = self._executors.get(program.signature)
        arena_ok = self._mapped or (self._arena is not None and self._arena.numel() == plan.arena_bytes)
        if cached is not None and cached.plan is plan and self._arena_residents == plan.residents and arena_ok:
            self._executor, self._signature, self._current = cached, program.signature, (program, plan)
            return
        if self._graphs is not None:
            self._graphs.drop()  # its pool may not sit beside an arena made anew
        self._ensure_store()
        self._originals = None
        if isinstance(self._store, HostStore):
            self._store.wait_all()  # the movers copy from the pinned buffer without asking
        if self._mapped:
            self._activate_mapped(program, plan)
            return
        arena_fits = self._arena is not None and self._arena.numel() == plan.arena_bytes
        same_residents = arena_fits and self._arena_residents == plan.residents
        if not same_residents:
            self._close_executors()  # their views point into the arena as it was
            self._set_all(lambda w: self._placeholders[w])
            self._resident_views = {}
            if not arena_fits:
                if self.device.type == "cpu" and self._arena is not None and self._arena.numel() > plan.arena_bytes:
                    self._arena = self._arena[:plan.arena_bytes]  # no second allocation
                elif self.device.type == "cuda":
                    self._arena = None
                    torch.cuda.empty_cache()
                    self._arena = torch.empty(plan.arena_bytes, dtype=torch.uint8, device=self.device)
                else:
                    self._arena = None
                    self._arena = torch.zeros(plan.arena_bytes, dtype=torch.uint8)  # touched: RSS shows it
            if self.debug.poison:
                self._arena[plan.resident_bytes:].fill_(255)
            for r in plan.residents:
                self._store.read_into(r.weight, self._arena[r.offset_bytes:r.offset_bytes + r.nbytes])
            self._arena_residents = plan.residents
        load_views, resident_views = arena_views(self._arena, program, plan)
        if not same_residents:
            self._resident_views = resident_views
            self._set_all(lambda w: self._resident_views.get(w, self._placeholders[w]))
        if self.device.type == "cuda":
            kind = StagedCudaMover if isinstance(self._store, StagedStore) else CudaMover
            mover = kind(plan, self._store, self._arena, self.device, debug=self.debug)
        else:
            mover = CpuMover(plan, self._store, self._arena, debug=self.debug)
        self._install_executor(program, plan, load_views, mover)

    def _activate_mapped(self, program: Program, plan: Plan) -> None:
        """`_activate` on mapped files: residents are held (their pages stay), loads are views of the files."""
        files = self._files
        weights = self._mw.weights
        if self._arena_residents != plan.residents:
            self._close_executors()
            self._set_all(lambda w: self._placeholders[w])
            for r in self._arena_residents or ():
                files.unhold(r.weight)
            self._arena = None  # the trace's scratch
            self._arena_residents = None
            for r in plan.residents:
                files.hold(r.weight)
            self._arena_residents = plan.residents
            self._resident_views = {r.weight: typed_view(files.view(r.weight), weights[r.weight])
                                    for r in plan.residents}
            self._set_all(lambda w: self._resident_views.get(w, self._placeholders[w]))
        load_views = [typed_view(files.view(load.weight), weights[load.weight]) for load in plan.loads]
        self._install_executor(program, plan, load_views, MapMover(plan, files, debug=self.debug))

    def _install_executor(self, program: Program, plan: Plan, load_views: list[torch.Tensor], mover) -> None:
        steps = build_steps(self.model, program, plan, load_views, self._placeholders)
        old = self._executors.pop(program.signature, None)
        if old is not None and getattr(old.mover, "close", None):
            old.mover.close()
        self._executor = Executor(self.model, program, plan, mover, steps)
        self._executor.on_diverge = self._diverge
        self._executors[program.signature] = self._executor
        while len(self._executors) > MAX_PLANS:
            first = next(iter(self._executors))
            evicted = self._executors.pop(first)
            if getattr(evicted.mover, "close", None):
                evicted.mover.close()
        self._signature = program.signature
        self._current = (program, plan)

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        """Switch to this input signature's plan, or make this call the trace that plans it."""
        signature = input_signature(args, kwargs)
        if signature == self._signature:
            return
        cached = self._plans.get(signature)
        composed = self.compose(args, kwargs, signature) if cached is None and self.compose else None
        if composed is not None:  # a program made from traced parts (a Workload's sequence of calls)
            program = self._footprints(composed)
            self._remember(program, self._plan(program))
        elif cached is None:
            self._start_trace(signature)
        else:
            self._plans.move_to_end(signature)
            self._activate(*cached)

    # -- a call that leaves the traced order ------------------------------------------------------------
    def _diverge(self, op: int, module) -> None:
        """The model called `module` where the plan has op `op` (None: its forward ended there). The
        executor has stopped the pipeline; the rest of the call loads each op's weights on demand, in stack
        order, into the bytes of the budget that neither the residents nor the running ops hold."""
        program, plan = self._current
        expected = program.ops[op].module if op < len(program.ops) else "the end of the forward"
        called = "the end of the forward" if module is None else repr(self._names.get(id(module), "?"))
        rest = ("" if module is None else "; the rest of this call loads its weights on demand, without "
                "prefetching, so it runs slower")
        warnings.warn(ControlFlowWarning(
            f"op {op} of {len(program.ops)}: the model reached {called} where the trace has {expected!r} (its "
            f"control flow depends on the input's values){rest}. Outputs stay exact."), stacklevel=2)
        if module is None:
            return
        scratch, evicted = self._make_room(program, plan)
        for w in evicted:  # their bytes are reused: an op that needs one loads it like any other weight
            set_slots(self.model, self._mw.weights[w], self._placeholders[w])
        self._evicted = evicted
        kept = {w: v for w, v in self._resident_views.items() if w not in evicted}
        loader = ScratchLoader(self.model, self._mw, self._read, scratch, self._alignment, kept,
                               fix="the budget's free bytes cannot hold it while the call is off the traced "
                                   "order; raise the budget, or trace with an input that takes this path")
        self._on_demand = Tracer(self._mw, loader, self._placeholders, self.device, self._fixed_bytes, "on-demand")
        self._on_demand.watch_foreign_uses()
        self._on_demand.enter(self._names[id(module)])

    def _make_room(self, program: Program, plan: Plan) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """Scratch buffers for on-demand loads, within the budget, and the residents given up for them: all
        but what the running ops hold (their loads and the residents they use) may be reused (the largest
        such gap of the arena, and the budget beyond the arena); the residents are put back at the end."""
        executor = self._executor
        held = executor.held_loads()
        in_use = {w for i in executor.entered for w in program.ops[i].weights}
        if self._arena is None:  # mapped files: drop the residents' pages; RAM then holds only what is in use
            evicted = tuple(r.weight for r in plan.residents if r.weight not in in_use)
            for w in evicted:
                self._files.unhold(w)
            used = sum(r.nbytes for r in plan.residents if r.weight in in_use) + sum(plan.loads[j].nbytes
                                                                                    for j in held)
            free = max(self.budget_bytes - used, 0) // self._alignment * self._alignment
            return [torch.empty(free, dtype=torch.uint8)], evicted
        busy = [(plan.loads[j].offset_bytes, plan.loads[j].offset_bytes + align_up(plan.loads[j].nbytes,
                                                                                     plan.alignment)) for j in held]
        busy += [(r.offset_bytes, r.offset_bytes + align_up(r.nbytes, plan.alignment))
                 for r in plan.residents if r.weight in in_use]
        size, offset, start = 0, 0, 0
        for begin, end in sorted(busy) + [(plan.arena_bytes, plan.arena_bytes)]:
            if begin - start > size:
                size, offset = begin - start, start
            start = max(start, end)
        beyond = self.budget_bytes - plan.activation_bytes - plan.fixed_bytes - plan.arena_bytes
        beyond = max(beyond, 0) // self._alignment * self._alignment
        evicted = tuple(r.weight for r in plan.residents
                        if r.offset_bytes < offset + size and offset < r.offset_bytes + r.nbytes)
        buffers = [self._arena[offset:offset + size]]
        if beyond > 0:
            buffers.append(torch.empty(beyond, dtype=torch.uint8, device=self.device))
        return buffers, evicted

    def _end_on_demand(self) -> None:
        tracer, self._on_demand = self._on_demand, None
        if tracer is None:
            return
        tracer.abort()  # leaves the function mode, unloads what a failed call left entered
        del tracer
        plan = self.plan
        offsets = {r.weight: r.offset_bytes for r in plan.residents}
        for w in self._evicted:
            if self._arena is None:
                self._files.hold(w)
            else:
                n = self._mw.weights[w].nbytes
                self._store.read_into(w, self._arena[offsets[w]:offsets[w] + n])
            set_slots(self.model, self._mw.weights[w], self._resident_views[w])
        self._evicted = ()

    # -- hooks ---------------------------------------------------------------------------------------
    def _to_device(self, x: Any) -> Any:
        """`x` on the device. A host tensor goes to CUDA through a pinned copy of it: a copy from pageable
        memory waits for the work already queued on the stream, so the host could not queue a call's kernels
        ahead of the GPU. The copy is flashmem's own (the caching host allocator keeps its block until the
        device copy is done), so the caller may change `x` as soon as the call returns, pinned or not."""
        if not isinstance(x, torch.Tensor) or x.device == self.device:
            return x
        if (self.device.type == "cuda" and x.device.type == "cpu"
                and not torch.cuda.is_current_stream_capturing()):
            staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            staged.copy_(x)
            return staged.to(self.device, non_blocking=True)
        return x.to(self.device)

    def _call_begin(self, module, args, kwargs):
        me = threading.get_ident()
        with self._state_lock:
            if (self._active and self._active_thread != me) or self._graph_thread not in (None, me):
                raise FlashmemError(OVERLAP)
            stale = self._active  # same thread: a call cut off by KeyboardInterrupt left its state behind
            self._active, self._active_thread = True, me
        try:
            if stale:
                self._end_on_demand()
                self._executor.end(failed=True)
            if self._tracer is not None:
                self._finish_trace(failed=True)
            if self._graphs is not None and not self._graphs.capturing:
                self._graphs.drop()  # an eager call: no graph's pool beside its activations
            if self.move_inputs:
                args, kwargs = tree_map(self._to_device, (args, kwargs))
            self._prepare(args, kwargs)
            if self._graphs is not None and self._tracer is not None:
                self._trace_input_bytes = input_bytes((args, kwargs))
            if self._tracer is None:
                self._executor.begin()
        except BaseException:
            self._active = False
            raise
        return args, kwargs

    def _call_end(self, module, args, result):
        if not self._active or self._active_thread != threading.get_ident():
            return None  # not our call: e.g. the end of a call refused because another thread runs one
        if self._graphs is not None and self._tracer is not None and result is not None:
            # The plan of a graphed input reserves its static inputs and output copies beside the activations.
            self._graph_io_bytes = self._trace_input_bytes + tensor_bytes(result)
        self._active = False
        self._finish_call(failed=result is None and sys.exc_info()[1] is not None)
        return None

    def _finish_call(self, failed: bool) -> None:
        """The end of the active call (already marked inactive): its trace, or its executor's run."""
        if self._tracer is not None:
            self._finish_trace(failed)
        else:
            self._end_on_demand()
            self._executor.end(failed)

    def _op_enter(self, module, args):
        if not self._active:
            raise FlashmemError("a submodule of a streamed model was called on its own; call the whole "
                                "model (or the StreamedModel), whose hooks put the weights in place")
        if self._tracer is not None:
            self._tracer.enter(self._names[id(module)])
        elif self._on_demand is not None:
            self._on_demand.enter(self._names[id(module)])
        else:
            self._executor.pre_hook(module, args)
        return None

    def _op_exit(self, module, args, result):
        if not self._active or self._active_thread != threading.get_ident():
            return None
        if self._tracer is not None:
            if self._tracer.stack:
                self._tracer.exit(self._names[id(module)])
        elif self._on_demand is not None and self._on_demand.stack:
            self._on_demand.exit(self._names[id(module)])
        else:
            self._executor.post_hook(module, args, result)
        return None

    # -- public --------------------------------------------------------------------------------------
    def use_solver(self, args: tuple, kwargs: dict, settings=None, cache_dir: str | Path | None = None,
                   costs=None) -> Plan:
        """Profile this input's steps on the device, plan with the CP-SAT solver and switch to its plan
        (the solver keeps the simple plan where it predicts no gain). With `cache_dir`, a plan cached
        there for the same weights, budget, device and input is reused, and a new one is saved. `costs`
        (a `costs.CostModel` for this input's program, e.g. `predict.predicted_costs`) replaces the
        profile: a plan made from predicted op times, before the model ran on the device."""
        from .cache import PlanCache, cache_key
        from .costs import profile
        from .solve import SolverSettings, solve_plan

        if self._host_budget_bytes is not None:
            raise FlashmemError("the solver does not model the storage link yet; a model streamed under a "
                                "host_budget keeps the simple plan")
        if self.move_inputs:  # (a Workload's calls move their own inputs, one call at a time)
            args, kwargs = tree_map(self._to_device, (args, kwargs))
        self(*args, **kwargs)  # plans this input's signature with the simple planner if needed
        program, simple = self._current
        settings = settings or SolverSettings()
        # other settings (lambda, min_gain, limits, seed) make other plans: they are part of the key
        planner = "solver " + json.dumps(dataclasses.asdict(settings), sort_keys=True)
        if costs is not None:
            if costs.signature != program.signature or len(costs.steps) != len(program.ops):
                raise FlashmemError(f"the costs given are for another program ({len(costs.steps)} steps, input "
                                    f"{costs.signature}) than this input's ({len(program.ops)} ops, input "
                                    f"{program.signature}); make them from this input's program")
            planner += ", costs " + hashlib.sha256(costs.to_json().encode()).hexdigest()[:16]
        cache = PlanCache(cache_dir) if cache_dir is not None else None
        key = cache_key(program, self.budget_bytes, simple.device, planner, simple.activation_bytes)
        cached = cache.load(key, program) if cache else None
        if cached is not None:
            plan, self.costs = cached
        else:
            costs = costs if costs is not None else profile(self, args, kwargs)
            plan = solve_plan(program, costs, budget_bytes=self.budget_bytes, device=simple.device,
                              alignment=simple.alignment, activation_bytes=simple.activation_bytes,
                              granularity=self._granularity, settings=settings)
            self.costs = costs
            if cache:
                cache.save(key, program, plan, costs)
        check_plan(plan, program)
        self._plans[program.signature] = (program, plan)
        self._activate(program, plan)
        return plan

    def __call__(self, *args, **kwargs):
        if self._graphs is not None:
            out = self._graphs.call(args, kwargs)
            if out is PROBE:
                # Host inputs move to the device before the probe: a capture reads device copies of them (a
                # replay's caller copies them in), so their copies are not the call's syncs. They are made on
                # flashmem's stream, as the call's own would be: blocks freed on the caller's stream stay
                # cached there, beside the budget. (A Workload's calls copy theirs through pinned memory.)
                if self.move_inputs:
                    with torch.cuda.stream(self._graphs.stream):
                        args, kwargs = tree_map(self._to_device, (args, kwargs))
                with self._graphs.probe():
                    return self._guarded(self.model, args, kwargs)
            if out is not EAGER:
                return out
        return self._guarded(self.model, args, kwargs)

    def _run_eager(self, args: tuple, kwargs: dict):
        return self._guarded(self.model, args, kwargs)

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold this StreamedModel for a graph's replay or capture: no other thread's call overlaps it."""
        me = threading.get_ident()
        with self._state_lock:
            if (self._active and self._active_thread != me) or self._graph_thread not in (None, me):
                raise FlashmemError(OVERLAP)
            self._graph_thread = me
        try:
            yield
        finally:
            self._graph_thread = None

    def _reset_after_capture(self) -> None:
        """A failed capture may have left its call half done (hooks skipped by a capture error)."""
        with self._state_lock:
            active, self._active = self._active, False
        if active:
            self._finish_call(failed=True)

    @property
    def graph_refusals(self) -> dict[str, str]:
        """With cuda_graphs=True: per input signature that runs eagerly, why (empty: every input replays)."""
        return dict(self._graphs.refused) if self._graphs is not None else {}

    def _guarded(self, fn, args: tuple, kwargs: dict):
        """Call `fn`, ending at once a call of the model that a KeyboardInterrupt cuts off. With graphs, on
        flashmem's stream (the one graphs are captured on, whose math workspace the plan counts), ordered
        after the caller's stream's work and before its later work."""
        try:
            if self._graphs is None or self._graphs.capturing:
                return fn(*args, **kwargs)
            own, caller = self._graphs.stream, torch.cuda.current_stream(self.device)
            own.wait_stream(caller)
            try:
                with torch.cuda.stream(own):
                    return fn(*args, **kwargs)
            finally:
                caller.wait_stream(own)
        except BaseException:
            self._end_cut_off_call()
            raise

    def __getattr__(self, name: str):
        # Everything else (generate, config, ...) is the model's; its calls stream through the hooks.
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self.model, name)
        if not inspect.ismethod(attr):
            return attr
        return functools.wraps(attr)(lambda *args, **kwargs: self._guarded(attr, args, kwargs))

    def _end_cut_off_call(self) -> None:
        """End a call that a KeyboardInterrupt (or another BaseException that is not an Exception) cut off:
        PyTorch skips the always-call hooks for those, so what the call held (the allocator cap on CUDA,
        the IO thread's loads) is given back here, at once, and the model takes calls from any thread."""
        with self._state_lock:
            if not (self._active and self._active_thread == threading.get_ident()):
                return
            self._active = False
        self._finish_call(failed=True)

    @property
    def plan(self) -> Plan:
        """The plan in use (for the last call's input signature)."""
        return self._current[1]

    @property
    def program(self) -> Program:
        return self._current[0]

    @property
    def minimum_budget_bytes(self) -> int:
        """The smallest budget the current input signature plans in (`flashmem.plan.minimum_budget`), with
        the plan's activation reserve (on CUDA measured by this signature's trace) and fixed bytes."""
        return minimum_budget(self.program, activation_bytes=self.plan.activation_bytes, alignment=self._alignment,
                              granularity=self._granularity)

    @property
    def stats(self) -> CallStats | None:
        """The last call's peak_bytes, streamed_bytes, wall_s and stall_s (None before any call)."""
        return self._executor.stats() if self._executor else None

    def close(self) -> None:
        """Remove the hooks and free the arena and the store. The model's weights went to flashmem's store
        and go with it: a later call of the model raises a FlashmemError that says so."""
        if self._graphs is not None:
            self._graphs.close()
            self._graphs = None
        for h in self._hooks:
            h.remove()
        # A model whose tensors went to the store (not one given its own tensors back) is left guarded.
        self._hooks = [self.model.register_forward_pre_hook(_closed)] if self._originals is None else []
        if self._originals is None:  # the model is guarded from now on: its row tables' files can go too
            for _, emb in row_embeddings(self.model):
                emb.close()
        self._close_executors()
        self._arena = None
        if self._files is not None:
            self._files.release_all()
            self._files = None
        if self._store is not None:
            self._store.close()

    def __repr__(self) -> str:
        return f"StreamedModel({type(self.model).__name__}, budget={fmt_bytes(self.budget_bytes)}, device={self.device})"


def _closed(module, args):
    raise FlashmemError(f"this {type(module).__name__} was streamed by flashmem and its StreamedModel was closed: "
                        f"its weights went with flashmem's store; load the model again (or stream it again from "
                        f"its folder with flashmem.from_pretrained)")
