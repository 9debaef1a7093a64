"""Bounds: the least latency any plan of flashmem's can reach for a program in an arena, as a linear
program (OR-Tools' GLOP), independent of the planners.

The relaxation keeps what every plan obeys and drops what makes plans hard:
- ops run in order, op k for at least its compute time, longer by its slowdown for the part of the link's
  busy time in its interval that is neither its wait nor its own stretch;
- a call starts with only the resident weights in place; an op may wait for its loads, after the ops
  before it released theirs;
- a streamed use run's bytes all arrive before its first op and stay until its last op ends;
- the link moves at most `bandwidth` bytes per second while ops wait and `link_busy_factor` times that
  while they compute, as `simulate` moves it (per-copy overheads are dropped: loads that follow each other
  may share one copy);
- an op that first uses a streamed run waits `wait_s` (CUDA: the dependency on the copy stream, which
  `simulate` adds to every step that uses a load first) after its own loads arrived, counted at the
  largest streamed share of its first runs; the link moves at its idle rate then, as in `simulate`;
- the arena holds the resident bytes, the runs in use and the bytes already arrived for later runs
  (a plan reserves a load's whole span at its start, so it holds at least that).
A weight may be partly resident and a load may arrive in pieces over several steps. Every plan flashmem
can run is a solution of this program, so its optimum is a lower bound on the plan's simulated latency
(`costs.simulate`) for the same costs, and on measured latency as far as the costs are right.

`LatencyBound.resident_share` is the relaxation's resident fraction per weight: where it is near 1 the
weight is hard to hide behind compute, a guide for planners (`solve.py` rounds it into candidate plans).
"""
from __future__ import annotations

from dataclasses import dataclass

from .costs import CostModel
from .errors import FlashmemError
from .plan import use_runs
from .trace import Program
from .units import align_up


@dataclass(frozen=True)
class LatencyBound:
    latency_s: float  # no plan in this arena runs faster (for these costs)
    compute_s: float  # the steps' compute alone
    link_s: float  # the bytes that cannot stay resident, over the bandwidth: the simple bound
    arena_bytes: int
    resident_share: tuple[float, ...]  # per weight (by index), its resident fraction in the relaxation's optimum


class BoundNotSolved(FlashmemError):
    """The relaxation did not reach its optimum within the time it was given."""


def latency_bound(program: Program, costs: CostModel, arena_bytes: int, alignment: int,
                  window_steps: int | None = None, time_limit_s: float | None = None) -> LatencyBound:
    """Solve the relaxation (see the module docstring) for `program` streamed in an arena of `arena_bytes`.
    With `window_steps`, a load may arrive only in the steps that many before its first use: smaller and
    faster, a guide for planners but no longer a bound. With `time_limit_s`, raises BoundNotSolved where
    the simplex has not reached the optimum by then (a long program's linear program can take minutes)."""
    from ortools.linear_solver import pywraplp

    n = len(program.ops)
    if len(costs.steps) != n:
        raise FlashmemError(f"the costs have {len(costs.steps)} steps but the program has {n} ops; profile this "
                            f"program's input signature")
    bandwidth = costs.link.bandwidth_bytes_per_s
    size = {w.index: align_up(w.nbytes, alignment) for w in program.weights}
    spans: dict[int, list[tuple[int, int]]] = {}
    for r in use_runs(program):
        spans.setdefault(r.weight, []).append((r.first_use, r.last_use))
    # Weights with the same use runs are one variable: the relaxation cannot tell them apart.
    groups: dict[tuple, list[int]] = {}
    for w, runs in spans.items():
        groups.setdefault(tuple(runs), []).append(w)
    used = sum(size[w] for w in spans)
    link_s = max(0, used - arena_bytes) / bandwidth
    compute_s = costs.compute_s
    if used <= arena_bytes:
        share = tuple(1.0 if w.index in spans else 0.0 for w in program.weights)
        return LatencyBound(compute_s, compute_s, 0.0, arena_bytes, share)

    lp = pywraplp.Solver.CreateSolver("GLOP")
    inf = lp.infinity()
    scale = 1e-6  # bytes in MB, seconds in ms: coefficients near 1 for the simplex
    mb_per_ms = bandwidth * scale * 1e-3
    # Interval k: a wait (w[k] >= 0), then op k computing. Through interval k the arena holds what is resident,
    # the runs op k is inside (first <= k <= last; op k - 1's last runs are gone) and what has arrived for later
    # runs, most at its end. What arrives in interval k crosses the link while it lasts, at the idle rate in
    # the wait and at f = link_busy_factor times it in the compute; a run op k first uses arrives by the end of
    # its wait.
    f = costs.link_busy_factor
    compute_ms = [s.compute_s * 1e3 for s in costs.steps]
    # `simulate` adds wait_s to a step after the wait for its own loads: op k's own arrivals in its interval
    # fit the wait less wait_s x q[k], where q[k] (`pays`) is at least each of its first runs' streamed share.
    wait_ms = costs.wait_s * 1e3
    pays: dict[int, object] = {}
    w = [lp.NumVar(0.0, inf, "") for _ in range(n)]
    memory = [lp.Constraint(-inf, 0.0) for _ in range(n)]
    link = [lp.Constraint(-inf, f * mb_per_ms * compute_ms[k]) for k in range(n)]
    link_waiting = [lp.Constraint(-inf, 0.0) for _ in range(n)]  # arrivals for op k itself, in its wait
    for k in range(n):
        link[k].SetCoefficient(w[k], -mb_per_ms)
        link_waiting[k].SetCoefficient(w[k], -mb_per_ms)
    # An op slowed by s beside the link computes for c + (s - 1) x (the link's busy time during its compute),
    # and of the link's busy time in its interval, all but the wait and the stretch itself overlaps it. Of
    # what arrives in the interval, at most bandwidth x wait moved in the wait, the rest beside compute at
    # f x bandwidth, so the link was busy beside compute for at least (arrivals / bandwidth - wait) / f:
    # stretch e >= (s - 1) / s x (arrivals / bandwidth - wait) / f. The interval is that much longer.
    stretch: dict[int, tuple] = {}
    for k, step in enumerate(costs.steps):
        if step.slowdown > 1.0:
            factor = (step.slowdown - 1.0) / step.slowdown / f
            e = lp.NumVar(0.0, inf, "")
            row = lp.Constraint(-inf, 0.0)
            row.SetCoefficient(w[k], -factor)
            row.SetCoefficient(e, -1.0)
            link[k].SetCoefficient(e, -f * mb_per_ms)
            stretch[k] = (e, row, factor / mb_per_ms)

    def arrive(j: int, var, coef_mb: float) -> None:
        """`var` times `coef_mb` MB arrive in interval j."""
        link[j].SetCoefficient(var, coef_mb)
        if j in stretch:
            _, row, per_mb = stretch[j]
            row.SetCoefficient(var, coef_mb * per_mb)
    in_use = [0.0] * n  # MB of streamed runs in use at each interval, at rho = 0
    rho = {}
    for key, ws in groups.items():
        mb = sum(size[w_] for w_ in ws) * scale
        link_mb = sum(program.weights[w_].nbytes for w_ in ws) * scale
        r = rho[key] = lp.NumVar(0.0, 1.0, "")
        held = [mb] * n  # rho's coefficient per interval: resident bytes are held throughout
        for first, last in key:
            # y: the share of the weight arrived by the end of interval j (j < first; by op first's start at
            # j = first), non-decreasing.
            prev = None
            for j in range(0 if window_steps is None else max(0, first - window_steps), first + 1):
                y = lp.NumVar(0.0, 1.0, "")
                arrive(j, y, link_mb)
                if j == first:
                    link_waiting[j].SetCoefficient(y, link_mb)
                else:
                    memory[j].SetCoefficient(y, mb)
                if prev is not None:
                    arrive(j, prev, -link_mb)
                    if j == first:
                        link_waiting[j].SetCoefficient(prev, -link_mb)
                    grows = lp.Constraint(0.0, inf)
                    grows.SetCoefficient(y, 1.0)
                    grows.SetCoefficient(prev, -1.0)
                prev = y
            whole = lp.Constraint(1.0, 1.0)  # all of the streamed part is in place when op `first` starts
            whole.SetCoefficient(prev, 1.0)
            whole.SetCoefficient(r, 1.0)
            if wait_ms > 0:  # op `first` pays wait_s where the run streams: q >= 1 - rho
                if first not in pays:
                    pays[first] = lp.NumVar(0.0, 1.0, "")
                    link_waiting[first].SetCoefficient(pays[first], mb_per_ms * wait_ms)
                paid = lp.Constraint(1.0, inf)
                paid.SetCoefficient(pays[first], 1.0)
                paid.SetCoefficient(r, 1.0)
            for j in range(first, last + 1):  # held while its ops run
                in_use[j] += mb
                held[j] -= mb
        for j in range(n):
            memory[j].SetCoefficient(r, held[j])
    for j in range(n):
        memory[j].SetUb(arena_bytes * scale - in_use[j])
    objective = lp.Objective()
    for v in w + [e for e, _, _ in stretch.values()]:
        objective.SetCoefficient(v, 1.0)
    objective.SetOffset(sum(compute_ms))
    objective.SetMinimization()
    if time_limit_s is not None:
        lp.SetTimeLimit(max(1, int(time_limit_s * 1e3)))
    status = lp.Solve()
    if status != pywraplp.Solver.OPTIMAL and time_limit_s is not None:
        raise BoundNotSolved(f"the relaxation of {n} steps did not reach its optimum in {time_limit_s:.1f} s "
                             f"(status {status})")
    if status != pywraplp.Solver.OPTIMAL:
        raise FlashmemError(f"the latency bound's linear program did not solve (status {status}); an arena of "
                            f"{arena_bytes} bytes may not hold the largest op's weights")
    shares = {w: rho[key].solution_value() for key, ws in groups.items() for w in ws}
    share = tuple(shares.get(w.index, 0.0) for w in program.weights)
    return LatencyBound(objective.Value() * 1e-3, compute_s, link_s, arena_bytes, share)
