"""Run: executes a checked plan inside the model's own forward, through module hooks.

On entering op i the executor issues the loads the plan starts at step i, makes compute wait for the
loads op i needs, and puts the op's weights in place (views into the arena); on leaving op i it takes
them out again (a stray use then fails on a meta tensor) and releases the loads that end there. How a
load moves bytes and how compute waits is the mover's business (`run_cuda`, `run_cpu`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import DeviceUnavailable, FlashmemError, TraceMismatch
from .plan import Plan
from .trace import Program, owned_tensors, typed_view


@dataclass(frozen=True)
class DebugOptions:
    """Checks for the runtime itself, off by default.

    poison: fill a load's arena bytes with 0xFF (NaN in every float format) when it is released, and the
        ring when it is made, so that computing with a weight that is not in place changes the output.
    slow_copy_s: hold back every copy by this many seconds, so that a missing wait shows.
    verify: on the CPU, check every load's bytes against a CRC-32 of the weight taken when it was first
        read from its file; bytes that differ (the file was rewritten, the storage returns other data)
        raise `CorruptWeights` instead of being computed with. Costs one pass over the streamed bytes.
    time_stalls: on CUDA, time every op's wait for its loads with a pair of events, for
        `CallStats.stall_s` (otherwise None there). A timing event beside a copy costs a call about 10 us
        where it costs 4 alone (`benchmarks/slowdown_probe.py`); with these pairs in every call the fig6
        queue took 1.460 s against 1.353 s without, on one H200 (BENCHMARKS.md).
    """
    poison: bool = False
    slow_copy_s: float = 0.0
    verify: bool = False
    time_stalls: bool = False


@dataclass(frozen=True)
class CallStats:
    """What the last streamed call did."""
    peak_bytes: int  # device memory held by the call: arena, buffers and activations at their peak
    streamed_bytes: int  # weight bytes copied into the arena
    wall_s: float  # the call, from entry to its last kernel
    stall_s: float | None  # time compute waited for weights (CUDA: None unless DebugOptions.time_stalls)


@dataclass(frozen=True)
class Steps:
    """Per op, what to do on entry and exit; built once per plan so the hooks only walk lists."""
    issue: tuple[tuple[int, ...], ...]  # loads issued on entry
    wait: tuple[tuple[int, ...], ...]  # loads the op uses first
    bind: tuple[tuple[tuple[dict, str, torch.Tensor], ...], ...]  # (module's table, attr, arena view)
    unbind: tuple[tuple[tuple[dict, str, torch.Tensor], ...], ...]  # (module's table, attr, placeholder)
    release: tuple[tuple[int, ...], ...]  # loads released on exit


def build_steps(model: nn.Module, program: Program, plan: Plan, load_views: list[torch.Tensor],
                placeholders: dict[int, torch.Tensor]) -> Steps:
    n = len(program.ops)
    issue = [[] for _ in range(n)]
    wait = [[] for _ in range(n)]
    release = [[] for _ in range(n)]
    load_for: dict[tuple[int, int], int] = {}  # (weight, op) -> load serving it
    for j, load in enumerate(plan.loads):
        issue[load.start_step].append(j)
        wait[load.first_use].append(j)
        release[load.release_op].append(j)
        for step in range(load.first_use, load.last_use + 1):
            load_for[(load.weight, step)] = j
    slot_weight = {slot: w.index for w in program.weights for slot in w.slots}
    bind = [[] for _ in range(n)]
    unbind = [[] for _ in range(n)]
    for op in program.ops:
        module = model.get_submodule(op.module)
        owned = set()
        for table, attr, _ in owned_tensors(module):
            w = slot_weight[(op.module, attr)]
            owned.add(w)
            j = load_for.get((w, op.index))
            if j is not None:
                bind[op.index].append((table, attr, load_views[j]))
                unbind[op.index].append((table, attr, placeholders[w]))
        for w in op.weights:  # used by the op but held by modules that do not run (put in place everywhere)
            j = load_for.get((w, op.index))
            if w in owned or j is None:
                continue
            weight = program.weights[w]
            for mod_name, attr in weight.slots:
                holder = model.get_submodule(mod_name)
                table = holder._buffers if weight.is_buffer else holder._parameters
                bind[op.index].append((table, attr, load_views[j]))
                unbind[op.index].append((table, attr, placeholders[w]))
    return Steps(*(tuple(tuple(x) for x in table) for table in (issue, wait, bind, unbind, release)))


def arena_views(arena: torch.Tensor, program: Program, plan: Plan) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """Views of the arena for each load, and for each resident weight."""
    def view(weight: int, offset: int) -> nn.Parameter:
        w = program.weights[weight]
        return typed_view(arena[offset:offset + w.nbytes], w)

    loads = [view(load.weight, load.offset_bytes) for load in plan.loads]
    residents = {r.weight: view(r.weight, r.offset_bytes) for r in plan.residents}
    return loads, residents


class Executor:
    """Hooks that run `plan` whenever the model is called."""

    def __init__(self, model: nn.Module, program: Program, plan: Plan, mover, steps: Steps):
        self.model = model
        self.program = program
        self.plan = plan
        self.mover = mover
        self.steps = steps
        self.op_modules = tuple(model.get_submodule(op.module) for op in program.ops)
        self.cursor = 0
        self.entered: list[int] = []
        self.profiling = False  # time every op, not only those that wait for loads
        # Called as on_diverge(op, module) when the model leaves the traced order (module None: the
        # forward ended early); it takes over the rest of the call. Without it, TraceMismatch is raised.
        self.on_diverge = None
        self.diverged = False
        self.ever_diverged = False
        self.completed_calls = 0  # calls that ran the whole plan (a CUDA graph is captured after one)

    def begin(self) -> None:
        self.cursor = 0
        self.entered.clear()
        self.diverged = False
        self.mover.begin_call()

    def held_loads(self) -> frozenset[int]:
        """The loads whose bytes the ops now running may still read."""
        return frozenset(j for i in self.entered for j, load in enumerate(self.plan.loads)
                         if load.first_use <= i <= load.last_use)

    def diverge(self, op: int, module) -> None:
        """Leave the plan for the rest of this call: the pipeline stops (what the running ops hold stays)
        and `on_diverge` loads the rest on demand."""
        self.diverged = self.ever_diverged = True
        self.mover.abort_call(keep=self.held_loads())
        self.on_diverge(op, module)

    def end(self, failed: bool) -> None:
        if self.diverged:
            self._unbind_all()
            self.diverged = False
            if not failed:
                self.mover.end_call()
            return
        if not failed and not self.entered and self.cursor != len(self.op_modules) and self.on_diverge:
            self.diverge(self.cursor, None)  # the forward ended early: every op that ran had its weights
            self.diverged = False
            self.mover.end_call()
            return
        if self.entered or (self.cursor != len(self.op_modules) and not failed):
            ran = self.cursor
            self._unbind_all()
            self.mover.abort_call()
            if not failed:
                raise TraceMismatch(
                    f"the model ran {ran} of the {len(self.op_modules)} traced ops; its control flow depends "
                    f"on the input in a way the trace did not see; call it with inputs of the traced kind")
            return
        if failed:
            self.mover.abort_call()
        else:
            self.mover.end_call()
            self.completed_calls += 1

    def _unbind_all(self) -> None:
        for i in self.entered:
            for params, attr, ph in self.steps.unbind[i]:
                params[attr] = ph
        self.entered.clear()

    def pre_hook(self, module, _args):
        i = self.cursor
        if self.diverged:
            raise FlashmemError("internal: a diverged call reached the plan's hooks")
        if (i >= len(self.op_modules) or self.op_modules[i] is not module) and self.on_diverge is not None:
            self.diverge(i, module)
            return
        if i >= len(self.op_modules) or self.op_modules[i] is not module:
            expected = self.program.ops[i].module if i < len(self.op_modules) else "the end of the forward"
            raise TraceMismatch(f"op {i}: the model called a module other than the traced one (expected "
                                f"{expected!r}); its control flow differs from the trace")
        self.cursor = i + 1
        steps = self.steps
        if steps.issue[i]:
            self.mover.issue(steps.issue[i])
        if steps.wait[i] or self.profiling:
            self.mover.wait(steps.wait[i], i)
        for params, attr, view in steps.bind[i]:
            params[attr] = view
        self.entered.append(i)

    def post_hook(self, module, _args, _out):
        if not self.entered:
            return  # a pre-hook raised before this op was entered
        i = self.entered.pop()
        steps = self.steps
        for params, attr, ph in steps.unbind[i]:
            params[attr] = ph
        if steps.release[i]:
            self.mover.release(steps.release[i])

    def stats(self) -> CallStats:
        return self.mover.stats()


def check_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable("device 'cuda' was asked for but PyTorch sees no CUDA GPU "
                                    f"(torch {torch.__version__}); use device='cpu' or install a CUDA build")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {device} was asked for but only {torch.cuda.device_count()} "
                                    f"CUDA devices exist; use one of cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise FlashmemError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda'")
    return device
