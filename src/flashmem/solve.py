"""The CP-SAT planner (Google OR-Tools): which weights stay resident and when each load starts, to
minimise the predicted latency under the budget.

Data -> variables -> constraints -> objective -> solve -> plan. Time is indexed by step: step 0 is the
call's start (nothing computes yet), step s >= 1 is op s - 1 computing. For each use run u of a weight
(first use at step f, last use at step l, size S) that is not resident, `held[u, s]` says its load has
started by step s (within `lookahead` steps before f, or in step f itself: a load issued as its first
user starts, which then waits for it); its bytes are held from then to l, and `moved[u, s]` units of it
cross the link in step s (what moves in step f adds to that step's compute instead of hiding behind it).
Loads start in order of first use (one copy queue). Per step, the bytes held fit the arena; the step
lasts at least its compute (longer by the measured slowdown while the link is busy) and at least its
transfer (bytes over the link's rate beside compute, `link_busy_factor` times its idle bandwidth, in a
step that computes, plus a per-copy overhead); a step that uses a streamed run first also waits `wait_s`
for the copy stream, after its own loads, as `costs.simulate` has it. The objective is the sum of step times, plus
`resident_weight` per resident byte (the paper's lambda).

Before CP-SAT, the latency bound's linear relaxation (`bound.py`) is rounded into candidate plans: weights
resident in order of their resident share there, rings of one to six times the largest working set, each
laid out as the simple plan lays out its ring and predicted by `costs.simulate`; on CUDA, where adjacent
loads merge into one copy, each also with its small resident weights between two streamed neighbours
streamed (`merge_breakers`). The simple plan's own resident order is tried with rings of the same sizes,
and its own residents with rings of those factors times the largest working set of what it streams
(`_ring_sweep`: no relaxation needed, so for a program of any length). Every candidate's small loads wait to share the next load's copy
(`plan.coalesce_loads`). The best of them and the simple plan is CP-SAT's hint. Past 600 steps the
relaxation is windowed (a guide, not a bound), limited to a share of the time limit and skipped where it
would be too large to build; past MAX_WINDOWS windows CP-SAT is skipped too (a Workload's sequence).
Long programs are solved in a rolling window of steps, each window with what
earlier windows decided fixed, and the hint complete (resident set, start steps, bytes moved). Where the
hint fits the arena, each window keeps the room the hint gives later windows' runs, so that the hint stays
a solution of every window beside the earlier windows' answers; a later window that still finds no
solution in its time keeps the hint's decisions where they fit, and the note counts such windows (where
the first window finds none, the tier gives up). Offsets are
assigned after solving (first fit in time and space). Tiers: the solver's plan; the solver with a tighter
arena (more room for placement); the rounded relaxation; the simple plan. The plan returned is the one
predicted fastest, where it beats the simple plan by at least `SolverSettings.min_gain` (else the simple
plan: a smaller gain lies within the cost model's error). `plan.status` says "optimal" or "feasible" (a
solver's or the relaxation's plan) or "fallback" (the simple plan), `plan.note` which tier answered and
why, and `plan.bound_s` the bound.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace

from ortools.sat.python import cp_model

from .check import find_problems
from .errors import FlashmemError
from .costs import CostModel, simulate
from .bound import BoundNotSolved, latency_bound
from .plan import (Load, Plan, Resident, UseRun, arena_limit, coalesce_loads, fill, minimum_ring, place_ring,
                   resident_ranking, ring_layout, simple_plan, use_runs)
from .trace import Program
from .units import align_up



@dataclass(frozen=True)
class SolverSettings:
    lookahead: int = 48  # steps before its first use a load may start
    window_steps: int = 200  # steps per rolling window
    time_limit_s: float = 20.0  # for the whole program
    resident_weight: float = 0.0  # objective cost per resident byte, in seconds (the paper's lambda)
    seed: int = 0
    workers: int = 2
    # The solver's plan (or a rounded relaxation) replaces the simple plan only where it is predicted at least
    # this share faster: a smaller gain lies within the cost model's error (predictions were 0.96-1.06 of
    # measured latencies on an H200), and an SD UNet's plan predicted 0.3% faster ran 2.5% slower.
    min_gain: float = 0.01


@dataclass
class _Decisions:
    resident: set[int] = field(default_factory=set)
    start: dict[int, int] = field(default_factory=dict)  # run index -> solver step its load starts in
    moved: dict[tuple[int, int], int] = field(default_factory=dict)  # (run, step) -> KiB moved
    optimal: bool = True


def _later_room(runs: list[UseRun], size_u: dict[int, int], hint: _Decisions, done: _Decisions,
                deciding: set[int], resident_weights: set[int], decided_weights: set[int], n_steps: int,
                lookahead: int, arena_u: int) -> tuple[bool, list[int], list[tuple[int, int, int, int]]]:
    """The room a window keeps for later windows' runs: whether the hint fits the arena at every step; the
    units the hint holds at each step for later runs of weights no window has decided (from their hinted
    start steps, and at every step for a later weight it keeps resident); and (weight, units, first step,
    last step) for later runs of weights this window decides, held only where it streams them. With that
    room kept, a later window's hint stays a solution beside this window's answer."""
    # difference arrays: what the hint holds at each step for all runs, and for later runs of undecided weights
    hint_total = [0] * (n_steps + 1)
    hint_room = [0] * (n_steps + 1)
    kept_later: set[int] = set()  # later weights no window has decided that the hint keeps resident
    later_spans: list[tuple[int, int, int, int]] = []
    for u, r in enumerate(runs):
        w, size = r.weight, size_u[r.weight]
        start, end = hint.start.get(u, max(0, r.first_use + 1 - lookahead)), min(r.last_use + 2, n_steps)
        if w not in hint.resident:
            hint_total[start] += size
            hint_total[end] -= size
        if u in done.start or u in deciding or w in done.resident:
            continue  # decided, or deciding now
        if w in resident_weights:
            later_spans.append((w, size, start, r.last_use + 1))
        elif w in hint.resident and w not in decided_weights:
            kept_later.add(w)
        else:
            hint_room[start] += size
            hint_room[end] -= size
    hint_total[0] += sum(size_u[w] for w in hint.resident)
    hint_room[0] += sum(size_u[w] for w in kept_later)
    return (max(itertools.accumulate(hint_total)) <= arena_u, list(itertools.accumulate(hint_room)), later_spans)


def _window(runs: list[UseRun], size_u: dict[int, int], unit: int, costs: CostModel, arena_u: int, lo: int, hi: int,
            done: _Decisions, hint: _Decisions, settings: SolverSettings, time_limit_s: float,
            as_hinted: bool = False) -> bool:
    """Decide the runs whose first use is at a step in [lo, hi); add the decisions to `done`. `as_hinted`:
    take the hint's decisions for them, where they fit beside what earlier windows decided."""
    n_steps = len(costs.steps) + 1
    ns_per_unit = unit / costs.link.bandwidth_bytes_per_s * 1e9  # sizes are in units of `unit` bytes
    overhead_ns = int(round(costs.link.overhead_s * 1e9))
    compute_ns = [0] + [int(round(s.compute_s * 1e9)) for s in costs.steps]
    slowdown = [1.0] + [s.slowdown for s in costs.steps]

    # -- data ------------------------------------------------------------------------------------------
    deciding = [u for u, r in enumerate(runs) if lo <= r.first_use + 1 < hi and r.weight not in done.resident]
    decided_weights = {runs[u].weight for u in done.start} | done.resident
    new_weights = sorted({runs[u].weight for u in deciding} - decided_weights)
    resident_weights = set(new_weights)  # those this window may keep resident
    window_lo = max(0, lo - settings.lookahead)
    held_before = [0] * n_steps  # KiB that earlier windows hold at each step
    moved_before = [0] * n_steps  # KiB that earlier windows move in each step
    for s in range(n_steps):
        held_before[s] = sum(size_u[w] for w in done.resident)
    for u, s0 in done.start.items():
        r = runs[u]
        for s in range(s0, r.last_use + 2):
            held_before[s] += size_u[r.weight]
    for (u, s), kib in done.moved.items():
        moved_before[s] += kib
    # units that runs of later windows (not decided, not resident) hold at each step: a difference array
    deciding_set = set(deciding)
    later_delta = [0] * (n_steps + 1)
    for u, r in enumerate(runs):
        if u not in done.start and u not in deciding_set and r.weight not in done.resident:
            later_delta[r.first_use + 1] += size_u[r.weight]
            later_delta[min(r.last_use + 2, n_steps)] -= size_u[r.weight]
    later = list(itertools.accumulate(later_delta))
    use_hint_room, hint_room, later_spans = _later_room(runs, size_u, hint, done, deciding_set, resident_weights,
                                                        decided_weights, n_steps, settings.lookahead, arena_u)

    model = cp_model.CpModel()
    # -- variables ----------------------------------------------------------------------------------------
    resident = {w: model.new_bool_var(f"resident_{w}") for w in new_weights}
    held: dict[tuple[int, int], cp_model.IntVar] = {}
    moved: dict[tuple[int, int], cp_model.IntVar] = {}
    window_of: dict[int, list[int]] = {}
    for u in deciding:
        r = runs[u]
        f = r.first_use + 1
        # Up to and including step f: a load issued as its first user starts (the simple plan's loads where
        # the ring is tight) moves while that op waits for it.
        steps = list(range(max(window_lo, f - settings.lookahead), f + 1))
        window_of[u] = steps
        for s in steps:
            held[u, s] = model.new_bool_var(f"held_{u}_{s}")
            moved[u, s] = model.new_int_var(0, size_u[r.weight], f"moved_{u}_{s}")

    def streamed(u):  # 1 if run u's weight is streamed
        w = runs[u].weight
        return 1 - resident[w] if w in resident else 1

    # -- constraints -------------------------------------------------------------------------------------
    for u in deciding:
        steps, size = window_of[u], size_u[runs[u].weight]
        for a, b in zip(steps, steps[1:]):
            model.add(held[u, a] <= held[u, b])  # once started, held until the last use
        model.add(held[u, steps[-1]] == streamed(u))
        model.add(sum(moved[u, s] for s in steps) == size * streamed(u))
        for s in steps:
            model.add(moved[u, s] <= size * held[u, s])
    for u, v in zip(deciding, deciding[1:]):  # one copy queue: loads start in order of first use
        for s in window_of[v]:
            if (u, s) in held:
                model.add(held[v, s] <= held[u, s] + (resident[runs[u].weight] if runs[u].weight in resident else 0))
            elif s < window_of[u][0]:
                model.add(held[v, s] == 0)

    def held_kib(s):
        terms = [size_u[w] * v for w, v in resident.items()]
        for u in deciding:
            r, size = runs[u], size_u[runs[u].weight]
            if (u, s) in held:
                terms.append(size * held[u, s])
            elif r.first_use + 1 <= s <= r.last_use + 1:
                terms.append(size * streamed(u))
        return sum(terms)

    def later_kib(s):
        """The room kept at step s for later windows' runs (`_later_room` where the hint fits)."""
        if not use_hint_room:
            return later[s]
        return hint_room[s] + sum(size * (1 - resident[w]) for w, size, a, b in later_spans if a <= s <= b)

    past = [u for u in deciding if runs[u].last_use + 1 >= hi]  # this window's runs still held after it
    for s in range(window_lo, n_steps):
        if s < hi:
            model.add(held_kib(s) + held_before[s] + later_kib(s) <= arena_u)
        elif resident or past:  # later runs still need room beside what this window keeps
            own = [size_u[runs[u].weight] * streamed(u) for u in past if runs[u].last_use + 1 >= s]
            model.add(sum(size_u[w] * v for w, v in resident.items()) + sum(own) + held_before[s] + later_kib(s)
                      <= arena_u)

    # -- the hint: the simple plan, complete (every variable), so the search starts from a solution ---------
    hint_resident = {w: int(w in hint.resident) for w in resident}
    # A run whose weight the hint keeps resident, where an earlier window streamed it: held from its first step.
    hint_start = {u: hint.start.get(u, window_of[u][0] if runs[u].weight not in resident else None) for u in deciding}
    hint_held = {(u, s): int(hint_start[u] is not None and hint_start[u] <= s) for (u, s) in held}
    hint_moved = {}
    for u in deciding:  # the hinted load moves all its bytes in the first step it is held
        first = next((s for s in window_of[u] if hint_held[u, s]), None)
        for s in window_of[u]:
            hint_moved[u, s] = size_u[runs[u].weight] if s == first else 0

    step_time = []
    scale = max(1, int(1000 / ns_per_unit))  # ns per size unit, kept as a fraction over `scale`
    coef = int(round(ns_per_unit * scale))  # at the idle rate: what the link moves while its op waits
    coef_busy = int(round(ns_per_unit * scale / costs.link_busy_factor))  # beside compute (the same if 1.0)
    # A step that uses a load first pays wait_s (the dependency on the copy stream, as `simulate` adds it)
    # after its own loads: `pay` is 1 where one of its first runs streams (always, where an earlier window
    # streamed one).
    wait_ns = int(round(costs.wait_s * 1e9))
    first_at: dict[int, list[int]] = {}
    for u in deciding:
        first_at.setdefault(runs[u].first_use + 1, []).append(u)
    streamed_before = {runs[u].first_use + 1 for u in done.start}
    for s in range(window_lo, min(hi, n_steps)):
        moves = [u for u in deciding if (u, s) in moved]
        t = model.new_int_var(compute_ns[s], 10**13, f"step_time_{s}")
        pay, pay_hint = 0, 0
        if wait_ns and (s in streamed_before or s in first_at):
            pay_hint = int(s in streamed_before or any(hint_start[u] is not None for u in first_at.get(s, [])))
            if s in streamed_before:
                pay = 1
            else:
                pay = model.new_bool_var(f"pays_{s}")
                for u in first_at[s]:
                    model.add(pay >= streamed(u))
                model.add_hint(pay, pay_hint)
            model.add(t >= compute_ns[s] + wait_ns * pay)
        t_hint = compute_ns[s] + wait_ns * pay_hint
        if moves or moved_before[s]:
            starts = [held[u, s] - (held[u, s - 1] if (u, s - 1) in held else 0) for u in moves]
            rate = coef_busy if compute_ns[s] > 0 else coef  # step 0 and ops of no compute: the idle link
            model.add(scale * t >= rate * (sum(moved[u, s] for u in moves) + moved_before[s])
                      + scale * overhead_ns * sum(starts))
            moved_hint = sum(hint_moved[u, s] for u in moves) + moved_before[s]
            starts_hint = sum(hint_held[u, s] - hint_held.get((u, s - 1), 0) for u in moves)
            t_hint = max(t_hint, -(-rate * moved_hint // scale) + overhead_ns * starts_hint)
            waited = [u for u in moves if runs[u].first_use + 1 == s]
            if waited:  # the op waits for what moves in its own step: that transfer adds to its compute
                model.add(scale * t >= scale * (compute_ns[s] + wait_ns * pay) + coef * sum(moved[u, s] for u in waited))
                t_hint = max(t_hint, compute_ns[s] + wait_ns * pay_hint
                             - (-coef * sum(hint_moved[u, s] for u in waited) // scale))
            if slowdown[s] > 1.02:
                busy = model.new_bool_var(f"busy_{s}")
                extra_ns = int((slowdown[s] - 1.0) * compute_ns[s])
                model.add(sum(moved[u, s] for u in moves) + moved_before[s] <= (sum(size_u.values()) + 1) * busy)
                model.add(t >= compute_ns[s] + extra_ns * busy)
                model.add_hint(busy, int(moved_hint > 0))
                t_hint = max(t_hint, compute_ns[s] + extra_ns * int(moved_hint > 0))
        model.add_hint(t, t_hint)
        step_time.append(t)

    # -- objective -----------------------------------------------------------------------------------
    ns_per_resident_unit = settings.resident_weight * unit * 1e9
    model.minimize(sum(step_time) + sum(int(round(ns_per_resident_unit * size_u[w])) * v
                                        for w, v in resident.items()))
    for w, v in resident.items():
        model.add_hint(v, hint_resident[w])
    for key, v in held.items():
        model.add_hint(v, hint_held[key])
    for key, v in moved.items():
        model.add_hint(v, hint_moved[key])

    # -- solve -----------------------------------------------------------------------------------------
    solver = cp_model.CpSolver()
    # A deterministic time limit (and interleaved workers) make the answer depend on the seed alone. The wall
    # clock only caps a runaway: 2 s more than 4x, so that a loaded machine (its deterministic time passing
    # slower) does not cut a short window early and change the answer.
    solver.parameters.max_deterministic_time = max(time_limit_s, 0.2)
    solver.parameters.max_time_in_seconds = 4 * max(time_limit_s, 0.2) + 2.0
    solver.parameters.num_workers = settings.workers
    solver.parameters.interleave_search = True
    solver.parameters.random_seed = settings.seed
    # One presolve pass: on programs of a few hundred steps (a ViT-L, 34k variables) presolve to a fix point
    # took the whole deterministic time limit, and the search, hint included, never started.
    solver.parameters.max_presolve_iterations = 1
    solver.parameters.fix_variables_to_their_hinted_value = as_hinted
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return False
    done.optimal &= status == cp_model.OPTIMAL
    done.resident |= {w for w, v in resident.items() if solver.value(v)}
    for u in deciding:
        if runs[u].weight in done.resident:
            continue
        done.start[u] = next(s for s in window_of[u] if solver.value(held[u, s]))
        for s in window_of[u]:
            if solver.value(moved[u, s]):
                done.moved[u, s] = solver.value(moved[u, s])
    return True


def _hint_from(plan: Plan, runs: list[UseRun]) -> _Decisions:
    hint = _Decisions(resident={r.weight for r in plan.residents})
    by_key = {(load.weight, load.first_use): load for load in plan.loads}
    for u, r in enumerate(runs):
        load = by_key.get((r.weight, r.first_use))
        if load is not None:
            hint.start[u] = 0 if load.start_step == 0 else load.start_step + 1
    return hint


def _place(program: Program, runs: list[UseRun], d: _Decisions, arena_bytes: int, alignment: int
           ) -> tuple[list[Resident], list[Load], int] | None:
    """Offsets for the decisions: residents packed at the bottom, loads round a ring above them at the
    solver's start steps (a load whose bytes are not free yet then starts as soon as they are)."""
    residents, offset = [], 0
    for w in sorted(d.resident):
        residents.append(Resident(w, offset, program.weights[w].nbytes))
        offset += align_up(program.weights[w].nbytes, alignment)
    order = sorted(d.start, key=lambda u: (d.start[u], runs[u].first_use, runs[u].weight))
    loads = place_ring(program, [runs[u] for u in order], offset, arena_bytes - offset, alignment,
                       starts=[max(0, d.start[u] - 1) for u in order])
    return None if loads is None else (residents, loads, offset)


MERGE_SMALL_BYTES = 64 * 2**10  # a weight this small moves in less time than one copy's fixed cost


def merge_breakers(program: Program, resident: list[int], streamed: list[int]) -> set[int]:
    """Small resident weights whose neighbours in the host store's order (weight index) both stream: kept
    resident, each splits what could be one copy (CUDA merges adjacent loads) in two."""
    res, moved = set(resident), set(streamed)
    return {w for w in res if w - 1 in moved and w + 1 in moved
            and program.weights[w].nbytes < MERGE_SMALL_BYTES}


RING_FACTORS = (1, 1.5, 2, 3, 4, 6)  # the rounded relaxation and the ring sweep: ring sizes, in largest working sets
EXACT_BOUND_OPS = 600  # longer programs get a windowed relaxation (a guide, not a bound)
# CP-SAT's deterministic time over its three tiers, as a share of time_limit_s: fixed, not what the wall clock
# leaves after the relaxation tier, so that a plan depends on the seed alone and not on the machine's load.
CP_SAT_SHARE = 0.7
GUIDE_SHARE = 0.25  # of time_limit_s: the windowed relaxation of a long program, skipped where it needs more
# The relaxation's residency rows have a term per use run and step: past this many, building it alone takes
# seconds (a 1,571-step program with 2,410 runs, 3.8M terms: 8 s to build, minutes to solve on 2 cores)
GUIDE_MAX_TERMS = 1_000_000
# CP-SAT's rolling windows per tier: past this many (a Workload's sequence of 50 calls makes 125), building
# the windows' models alone takes minutes (about 0.4 s each on 2 cores), and the prediction-guided tiers
# (the relaxation's rounding where it fits, the ring sweep) answer alone
MAX_WINDOWS = 24


class _Candidates:
    """Plans that keep an order of weights resident and stream the rest through the ring, as `simple_plan`
    lays them out, each checked and predicted; a resident set seen before is skipped."""

    def __init__(self, program: Program, costs: CostModel, runs: list[UseRun], simple: Plan, avail: int,
                 alignment: int, granularity: int):
        self.program, self.costs, self.runs, self.simple = program, costs, runs, simple
        self.avail, self.alignment, self.granularity = avail, alignment, granularity
        self.plans: list[Plan] = []
        self.seen: set[frozenset] = set()
        self.sizes = {w.index: align_up(w.nbytes, alignment) for w in program.weights}
        self.first_use: dict[int, int] = {}  # per weight used, its first use (in that order)
        for r in runs:
            self.first_use.setdefault(r.weight, r.first_use)
        self.need = minimum_ring(program, runs, alignment)[0]  # the largest working set

    def add(self, order: list[int], note: str) -> None:
        """The plan of `order` resident, where it places and is new; `note` says how it was made, `{n}` there
        the number of weights it keeps resident."""
        if frozenset(order) in self.seen:
            return
        self.seen.add(frozenset(order))
        placed = ring_layout(self.program, self.runs, order, self.avail, self.alignment)
        if placed is None:
            return
        residents, loads, resident_bytes, ring_bytes = placed
        plan = coalesce_loads(replace(self.simple, arena_bytes=align_up(resident_bytes + ring_bytes, self.granularity),
                                      resident_bytes=resident_bytes, residents=residents, loads=loads,
                                      status="feasible", note=note.format(n=len(residents))))
        if not list(find_problems(plan, self.program)):
            self.plans.append(replace(plan, predicted_s=simulate(plan, self.costs).total_s))
        self.add_merged(order, plan, note)

    def add_merged(self, order: list[int], plan: Plan, note: str) -> None:
        """On CUDA, where adjacent loads merge into one copy: `order` less the small resident weights that
        split two of `plan`'s streamed neighbours."""
        if self.simple.device.startswith("cuda"):
            breakers = merge_breakers(self.program, [r.weight for r in plan.residents], [l.weight for l in plan.loads])
            if breakers:
                self.add([w for w in order if w not in breakers],
                         f"{note}; {len(breakers)} small weights streamed with their neighbours")


def _ring_sweep(cands: _Candidates) -> None:
    """Rings of RING_FACTORS times the largest working set beside the simple plan's resident order
    (`plan.resident_ranking`), and of RING_FACTORS times the largest working set of what the simple plan
    streams beside its own residents (in their order, as far as they fit, then more of that order): the
    ring's size chosen by prediction, for any program's length (no relaxation needed)."""
    runs, avail, sizes = cands.runs, cands.avail, cands.sizes
    kept = {r.weight for r in cands.simple.residents}
    cands.seen.add(frozenset(kept))  # the simple plan's own resident set is the simple plan
    ranked = resident_ranking(runs)
    for factor in RING_FACTORS:
        cands.add(fill(ranked, sizes, avail - min(avail, int(factor * cands.need))),
                  f"the simple plan's order: {{n}} weights resident, a ring of {factor}x the largest working set")
    streamed = [r for r in runs if r.weight not in kept]
    if streamed:
        streamed_need = minimum_ring(cands.program, streamed, cands.alignment)[0]
        base = [r.weight for r in cands.simple.residents]  # in the simple plan's order (a tied weight first)
        rest = [w for w in ranked if w not in kept]
        for factor in RING_FACTORS:
            capacity = avail - min(avail, int(factor * streamed_need))
            order, held = [], 0
            for w in base:
                if held + sizes[w] > capacity:
                    break
                order.append(w)
                held += sizes[w]
            if len(order) == len(base):
                order += fill(rest, sizes, capacity - held)
            cands.add(order, f"the simple plan's residents: {{n}} weights resident, a ring of {factor}x the "
                             f"largest working set of what it streams")
    # its merge-aware variant is not the simple plan
    cands.add_merged(sorted(kept, key=cands.first_use.__getitem__), cands.simple, "the simple plan's resident set")


def _relaxed_plans(cands: _Candidates, settings: "SolverSettings") -> tuple[float | None, str | None]:
    """Plans rounded from the relaxation, into `cands`; the bound (None where the relaxation was windowed);
    and why there are none where the relaxation was skipped (else None)."""
    program, costs, runs, avail, alignment = cands.program, cands.costs, cands.runs, cands.avail, cands.alignment
    exact = len(program.ops) <= EXACT_BOUND_OPS
    if not exact and len(runs) * len(program.ops) > GUIDE_MAX_TERMS:
        return None, (f"relaxation skipped: {len(runs)} use runs over {len(program.ops)} steps would take "
                      f"longer to build than the time limit allows")
    try:  # a long program's windowed relaxation is a guide only, and gets a share of the time limit
        relaxed = latency_bound(program, costs, avail, alignment, window_steps=None if exact else 4 * settings.lookahead,
                                time_limit_s=None if exact else GUIDE_SHARE * settings.time_limit_s)
    except BoundNotSolved as err:
        return None, f"relaxation skipped: {err}"
    first = cands.first_use
    ranked = sorted(first, key=lambda w: (-relaxed.resident_share[w], first[w]))
    for factor in RING_FACTORS:
        order = sorted(fill(ranked, cands.sizes, avail - factor * cands.need), key=first.__getitem__)
        cands.add(order, f"relaxation rounded: {{n}} weights resident, a ring of {factor}x the largest working set")
    return relaxed.latency_s if exact else None, None


def solve_plan(program: Program, costs: CostModel, *, budget_bytes: int, device: str, alignment: int,
               activation_bytes: int, granularity: int = 1, settings: SolverSettings = SolverSettings()) -> Plan:
    """The solver's plan, or the best tier that places; never worse (predicted) than the simple plan."""
    if (settings.lookahead < 1 or settings.window_steps < 1 or settings.time_limit_s <= 0
            or not 0 <= settings.min_gain < 1):
        raise FlashmemError(f"solver settings out of range: lookahead {settings.lookahead} and window_steps "
                            f"{settings.window_steps} must be at least 1, time_limit_s "
                            f"{settings.time_limit_s} positive and min_gain {settings.min_gain} in [0, 1)")
    t0 = time.perf_counter()
    simple = simple_plan(program, budget_bytes=budget_bytes, device=device, alignment=alignment,
                         activation_bytes=activation_bytes, granularity=granularity)  # raises BudgetTooSmall
    simple = replace(simple, predicted_s=simulate(simple, costs).total_s)
    avail = arena_limit(budget_bytes, activation_bytes, program.fixed_bytes, granularity)
    runs = use_runs(program)
    # Sizes in units of the alignment: exact, as the arena allocates them.
    size_u = {w.index: align_up(w.nbytes, alignment) // alignment for w in program.weights}
    cands = _Candidates(program, costs, runs, simple, avail, alignment, granularity)
    bound_s, skipped = _relaxed_plans(cands, settings)
    _ring_sweep(cands)
    relaxed = cands.plans
    good_s = simple.predicted_s * (1 - settings.min_gain)  # what a plan must beat to replace the simple one
    best = min([simple] + [p for p in relaxed if p.predicted_s <= good_s], key=lambda p: p.predicted_s)
    hint = _hint_from(best, runs)
    n_steps = len(program.ops) + 1
    notes = [skipped] if skipped else []
    budget_s = CP_SAT_SHARE * settings.time_limit_s
    tiers = (("solver", 1.0), ("solver, arena tightened by 10% for placement", 0.9),
             ("solver, arena tightened by 25% for placement", 0.75))
    n_windows = -(-n_steps // settings.window_steps)
    if n_windows > MAX_WINDOWS:
        notes.append(f"CP-SAT skipped: {n_steps} steps make {n_windows} windows of {settings.window_steps}, more "
                     f"than {MAX_WINDOWS} (building each takes about 0.4 s); raise window_steps to plan them with it")
        tiers = ()
    for tier, shrink in tiers:
        arena_u = int(avail * shrink) // alignment
        done = _Decisions()
        ok, hinted = True, 0
        for lo in range(0, n_steps, settings.window_steps):
            hi = min(n_steps, lo + settings.window_steps)
            share = budget_s / 3 * (hi - lo) / n_steps
            if _window(runs, size_u, alignment, costs, arena_u, lo, hi, done, hint, settings, share):
                continue
            # No solution in its time. In the first window CP-SAT cannot cope at this size: the tier gives up.
            # Later, this window as the hint has it, where that fits beside the earlier windows' answers (it
            # does wherever the hint fits this tier's arena, `_later_room`).
            done.optimal = False
            if lo == 0 or not _window(runs, size_u, alignment, costs, arena_u, lo, hi, done, hint, settings, share,
                                      as_hinted=True):
                ok = False
                break
            hinted += 1
        if hinted:
            tier += f" ({hinted} of {n_windows} windows as the hint has them)"
        if not ok:
            notes.append(f"{tier}: no solution")
            continue
        placed = _place(program, runs, done, avail, alignment)
        if placed is None:
            notes.append(f"{tier}: offsets did not place")
            continue
        residents, loads, resident_bytes = placed
        ring_end = max([resident_bytes] + [l.offset_bytes + align_up(l.nbytes, alignment) for l in loads])
        plan = coalesce_loads(replace(simple, arena_bytes=align_up(ring_end, granularity),
                                      resident_bytes=resident_bytes, residents=tuple(residents), loads=tuple(loads),
                                      status="optimal" if done.optimal else "feasible",
                                      note=tier + (f"; {skipped}" if skipped else "")))
        if list(find_problems(plan, program)):
            notes.append(f"{tier}: rejected by the checker")
            continue
        plan = replace(plan, predicted_s=simulate(plan, costs).total_s)
        same = (plan.residents, plan.loads) == (simple.residents, simple.loads)  # a tie: the solver's answer
        if plan.predicted_s <= best.predicted_s and (plan.predicted_s <= good_s or same):
            return replace(plan, solve_s=time.perf_counter() - t0, bound_s=bound_s)
        if plan.predicted_s <= best.predicted_s:
            notes.append(f"{tier}: predicted {plan.predicted_s * 1e3:.2f} ms, less than min_gain "
                         f"({settings.min_gain:.1%}) below the simple plan's {simple.predicted_s * 1e3:.2f} ms")
        else:
            notes.append(f"{tier}: predicted {plan.predicted_s * 1e3:.2f} ms, slower than the "
                         f"{'simple plan' if best is simple else 'rounded relaxation'}'s "
                         f"{best.predicted_s * 1e3:.2f} ms")
        break
    if best is not simple:
        return replace(best, note=best.note + "; " + "; ".join(notes), solve_s=time.perf_counter() - t0,
                       bound_s=bound_s)
    return replace(simple, status="fallback", note="simple plan; " + "; ".join(notes),
                   solve_s=time.perf_counter() - t0, bound_s=bound_s)
