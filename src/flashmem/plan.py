"""Plans: which weights stay resident and when each other weight's load starts and where it lands.

A plan is made once per model, budget, device and input signature, before any streamed call. The device
memory flashmem holds is one arena: resident weights at `[0, resident_bytes)`, streamed weights above.
A `Load` is issued when op `start_step` is entered, must be complete before op `first_use` runs, and
its bytes are released when op `release_op` exits (after op `last_use`, the last op that needs it).

`simple_plan` keeps what fits resident and prefetches the rest through a ring as early as the arena
allows (on CUDA a small load waits to share the next load's copy, `coalesce_loads`); the solver-made plans
fill the same format. `next_layer_plan` is the ablation baseline that
knows only "load layer L + 1 while layer L runs".
"""
from __future__ import annotations

import bisect

import json
from dataclasses import asdict, dataclass, replace

from .errors import BudgetTooSmall
from .trace import Program
from .units import align_up, fmt_bytes

PLAN_FORMAT = 1
# A load under this many bytes moves in about the time of a copy's fixed cost or less: on an H200, pinned
# copies of 64 KiB moved 8.5 GB/s and of 1 MiB 48 GB/s, against 55 GB/s for large ones, and a CUDA graph
# adds 3-6 us a copy. On CUDA such a load waits to move in one copy with the load after it (`coalesce_loads`).
SMALL_LOAD_BYTES = 2**20


@dataclass(frozen=True)
class Load:
    """One copy of one weight into the arena, for a run of consecutive uses."""
    weight: int
    start_step: int
    first_use: int
    last_use: int
    release_op: int
    offset_bytes: int
    nbytes: int


@dataclass(frozen=True)
class Resident:
    """A weight that stays in the arena between calls."""
    weight: int
    offset_bytes: int
    nbytes: int


@dataclass(frozen=True)
class Staging:
    """The storage link under a host budget (CUDA): each call reads its loads from storage into a pinned
    ring of `ring_bytes`, in `order` (the order they start), load j at `ring_offsets_bytes[j]` (first in,
    first out, wrapping at the end; spans rounded up to `alignment`). Load j is read only once the copy of
    `after[j]` has finished: the latest earlier load in `order` that held any of its ring bytes (-1: none).
    Copies run in `order` on one stream, so that copy finishing means every earlier one has."""
    ring_bytes: int
    alignment: int
    order: tuple[int, ...]
    ring_offsets_bytes: tuple[int, ...]
    after: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    device: str
    signature: str
    budget_bytes: int
    arena_bytes: int
    resident_bytes: int
    activation_bytes: int  # reserved for activations on the device
    fixed_bytes: int  # held on the device for good beside the arena: the CUDA math libraries' workspace
    alignment: int
    residents: tuple[Resident, ...]
    loads: tuple[Load, ...]
    n_ops: int
    status: str  # "simple" for the ring plan; the solver reports "optimal", "feasible" or "fallback"
    predicted_s: float | None = None  # latency the cost model predicts for one call
    solve_s: float = 0.0  # time the planner took
    note: str = ""  # which planner tier answered, and why
    staging: Staging | None = None  # with a host budget: how loads pass through the host's staging ring
    bound_s: float | None = None  # the solver's: no plan in this arena runs faster for its costs (bound.py)

    @property
    def streamed_bytes(self) -> int:
        """Weight bytes copied into the arena by one call."""
        return sum(load.nbytes for load in self.loads)

    @property
    def total_bytes(self) -> int:
        """Device bytes the plan may hold at once: arena, fixed bytes (workspace) and the activation reserve."""
        return self.arena_bytes + self.fixed_bytes + self.activation_bytes

    def to_json(self, program: Program | None = None) -> str:
        """The plan as JSON; with the program, weights and ops are named."""
        doc = asdict(self)
        doc["format"] = PLAN_FORMAT
        if program is not None:
            doc["weight_names"] = [w.name for w in program.weights]
            doc["op_modules"] = [op.module for op in program.ops]
        return json.dumps(doc, indent=1)

    def summary(self, program: Program) -> str:
        n_streamed = len({load.weight for load in self.loads})
        return (f"plan ({self.status}) on {self.device}: budget {fmt_bytes(self.budget_bytes)}; "
                f"{len(self.residents)} weights resident ({fmt_bytes(self.resident_bytes)}), "
                f"{n_streamed} streamed ({fmt_bytes(self.streamed_bytes)} per call) through a "
                f"{fmt_bytes(self.arena_bytes - self.resident_bytes)} ring; "
                f"{fmt_bytes(self.activation_bytes)} kept for activations; {len(program.ops)} ops")


def with_staging(plan: Plan, ring_bytes: int, alignment: int) -> Plan:
    """`plan` with the loads' passage through a host staging ring of `ring_bytes` (see `Staging`)."""
    order = tuple(sorted(range(len(plan.loads)), key=lambda j: (plan.loads[j].start_step, j)))
    offsets = [0] * len(plan.loads)
    after = [-1] * len(plan.loads)
    placed: list[int] = []
    cursor = 0
    for j in order:
        size = align_up(plan.loads[j].nbytes, alignment)
        if size > ring_bytes:
            raise BudgetTooSmall(f"load {j} ({fmt_bytes(size)}) does not fit the {fmt_bytes(ring_bytes)} staging "
                                 f"ring of the host budget; raise host_budget to at least {fmt_bytes(size)}",
                                 op=f"weight {plan.loads[j].weight}", need_bytes=size, budget_bytes=ring_bytes)
        if cursor + size > ring_bytes:
            cursor = 0
        offsets[j] = cursor
        for k in reversed(placed):  # copies finish in order: waiting for the latest holder is enough
            if offsets[k] < cursor + size and cursor < offsets[k] + align_up(plan.loads[k].nbytes, alignment):
                after[j] = k
                break
        placed.append(j)
        cursor += size
    return replace(plan, staging=Staging(ring_bytes, alignment, order, tuple(offsets), tuple(after)))


def previous_holders(loads, alignment: int) -> list[int | None]:
    """For each load, the earlier load of the same call that last held any of its bytes (the one
    released latest), whose release it must wait for; None where its bytes are fresh this call.
    A load owns its bytes rounded up to the alignment (copies may carry the padding). Releases happen
    in order of last use; of two with the same last use, the op entered first exits last; of two that
    tie there too, the later load.

    One sweep over the loads with a map of the arena's bytes, in segments, each holding the load released
    latest of those that covered it so far: a load's holder is the latest of its segments' before it takes
    them (a few segments per load in a ring; the pairwise scan this replaces took 0.6 s for 2,410 loads and
    grows with their square, a sequence of several models has 25,000)."""
    def later(k: int | None, j: int) -> bool:  # whether load j is released after load k
        return k is None or (loads[j].last_use, -loads[j].release_op, j) > (loads[k].last_use, -loads[k].release_op, k)

    starts: list[int] = [0]  # segment i covers bytes [starts[i], starts[i + 1]), the last one to the end
    holder: list[int | None] = [None]

    def boundary(x: int) -> int:
        """Index of the segment starting at byte x (split where one spans it)."""
        i = bisect.bisect_right(starts, x) - 1
        if starts[i] != x:
            starts.insert(i + 1, x)
            holder.insert(i + 1, holder[i])
            i += 1
        return i

    out: list[int | None] = []
    for j, load in enumerate(loads):
        lo = boundary(load.offset_bytes)
        hi = boundary(load.offset_bytes + align_up(load.nbytes, alignment))
        found = None
        for k in holder[lo:hi]:
            if k is not None and later(found, k):
                found = k
        out.append(found)
        merged_starts, merged = [], []  # load j now covers [lo, hi): each segment keeps the later of the two
        for x, k in zip(starts[lo:hi], holder[lo:hi]):
            k = j if later(k, j) else k
            if not merged or merged[-1] != k:
                merged_starts.append(x)
                merged.append(k)
        starts[lo:hi], holder[lo:hi] = merged_starts, merged
    return out


def coalesce_loads(plan: Plan, max_bytes: int = SMALL_LOAD_BYTES) -> Plan:
    """On CUDA, `plan` with each load under `max_bytes` that the next load (in issue order) follows in the
    arena and in weight order issued at that load's step, where that step is still at or before its first
    use: the two then move as one copy (`CudaMover`, `costs.copy_merges`), one fixed cost instead of two,
    for a small load that moves a little later. A later start only shortens what a load holds, so the plan
    stays within its arena, and the loads keep their order. Elsewhere (the CPU reads each load on its
    own) the plan is returned as it is."""
    if not plan.device.startswith("cuda"):
        return plan
    loads = list(plan.loads)
    for j in range(len(loads) - 2, -1, -1):  # from the end: a chain of small loads joins the copy after it
        a, b = loads[j], loads[j + 1]
        if a.nbytes < max_bytes and follows(a, b, plan.alignment) and a.start_step < b.start_step <= a.first_use:
            loads[j] = replace(a, start_step=b.start_step)
    return replace(plan, loads=tuple(loads))


def follows(a: Load, b: Load, alignment: int) -> bool:
    """Whether load `b` lands right after load `a` in the arena (only alignment padding between) and holds
    the next weight (the pinned buffer keeps weights in index order): on CUDA, the two can move as one copy
    where they are issued at one step."""
    gap = b.offset_bytes - (a.offset_bytes + a.nbytes)
    return b.weight == a.weight + 1 and 0 <= gap < alignment


@dataclass(frozen=True)
class UseRun:
    """Consecutive uses of one weight that one load serves."""
    weight: int
    first_use: int
    last_use: int
    release_op: int


def use_runs(program: Program) -> list[UseRun]:
    """Each weight's uses, merged where one use starts before or right after the previous one ends."""
    uses: dict[int, list[tuple[int, int]]] = {}
    for op in program.ops:
        for w in op.weights:
            uses.setdefault(w, []).append((op.index, op.end_index))
    runs = []
    for w, spans in uses.items():
        first, last, release = spans[0][0], spans[0][1], spans[0][0]
        for begin, end in spans[1:]:
            if begin <= last + 1:
                if end > last:
                    last, release = end, begin
            else:
                runs.append(UseRun(w, first, last, release))
                first, last, release = begin, end, begin
        runs.append(UseRun(w, first, last, release))
    return sorted(runs, key=lambda r: (r.first_use, r.weight))


def minimum_ring(program: Program, runs: list[UseRun], alignment: int) -> tuple[int, int]:
    """(bytes, op) of the most weight bytes that must be in place at once if nothing is resident."""
    live = [0] * len(program.ops)
    for r in runs:
        size = align_up(program.weights[r.weight].nbytes, alignment)
        for step in range(r.first_use, r.last_use + 1):
            live[step] += size
    step = max(range(len(live)), key=live.__getitem__)
    return live[step], step


class _Ring:
    """Last occupant of each byte range of the ring: sorted, disjoint [begin, end, last_use) segments."""

    def __init__(self, size: int, alignment: int):
        self.size = size
        self.alignment = alignment
        self.segments: list[tuple[int, int, int]] = []  # (begin, end, last_use)

    def conflict(self, begin: int, end: int, first_use: int) -> int | None:
        """End of a segment in [begin, end) still needed at `first_use`, or None."""
        for b, e, last in self.segments:
            if b < end and begin < e and last >= first_use:
                return e
        return None

    def free_step(self, begin: int, end: int) -> int:
        return max((last + 1 for b, e, last in self.segments if b < end and begin < e), default=0)

    def occupy(self, begin: int, end: int, last_use: int) -> None:
        kept = []
        for b, e, last in self.segments:
            if e <= begin or b >= end:
                kept.append((b, e, last))
                continue
            if b < begin:
                kept.append((b, begin, last))
            if e > end:
                kept.append((end, e, last))
        kept.append((begin, end, last_use))
        self.segments = sorted(kept)


def place_ring(program: Program, runs: list[UseRun], ring_base: int, ring_bytes: int, alignment: int,
               starts: list[int] | None = None) -> list[Load] | None:
    """Loads for `runs` (in issue order) in a ring of `ring_bytes`, by circular first fit, or None if one
    cannot be placed. Without `starts`, each load starts as soon as the bytes it lands on are free. With
    `starts`, each load starts at its given step if some bytes are free then, else as soon as bytes free
    up (never before the given step)."""
    ring = _Ring(ring_bytes, alignment)
    loads = []
    cursor, prev_start = 0, 0
    for u, r in enumerate(runs):
        nbytes = program.weights[r.weight].nbytes
        size = align_up(nbytes, alignment)
        if size > ring_bytes:
            return None
        wanted = max(prev_start, starts[u]) if starts is not None else None
        found = None
        for needed_free_at in ([wanted] if wanted is not None else []) + [r.first_use]:
            found = _circular_fit(ring, cursor, size, needed_free_at)
            if found is not None:
                break
        if found is None:
            return None
        start = max(prev_start, wanted or 0, ring.free_step(found, found + size))
        ring.occupy(found, found + size, r.last_use)
        loads.append(Load(r.weight, start, r.first_use, r.last_use, r.release_op, ring_base + found, nbytes))
        cursor, prev_start = found + size, start
    return loads


def _circular_fit(ring: _Ring, cursor: int, size: int, free_at: int) -> int | None:
    """First offset from `cursor` round the ring where `size` bytes are free at step `free_at`."""
    offset, wrapped = cursor, False
    while True:
        if offset + size > ring.size:
            if wrapped:
                return None
            offset, wrapped = 0, True
        blocker = ring.conflict(offset, offset + size, free_at)
        if blocker is None:
            return offset
        offset = align_up(blocker, ring.alignment)
        if wrapped and offset >= cursor:
            return None


def _smallest_ring(program: Program, runs: list[UseRun], low: int, alignment: int) -> int:
    """The smallest ring (to the alignment) through which every run can stream, by bisection in units of
    the alignment (a ring as large as every run together always places)."""
    lo = align_up(low, alignment) // alignment
    hi = max(lo, sum(align_up(program.weights[r.weight].nbytes, alignment) for r in runs) // alignment)
    while lo < hi:
        mid = (lo + hi) // 2
        if place_ring(program, runs, 0, mid * alignment, alignment) is not None:
            hi = mid
        else:
            lo = mid + 1
    return hi * alignment


def minimum_budget(program: Program, *, activation_bytes: int, alignment: int, granularity: int = 1) -> int:
    """The smallest budget `simple_plan` plans `program` in: the smallest ring every use run can stream
    through with nothing resident, in whole units of `granularity`, plus the activation reserve and the
    fixed bytes. Placement is not monotone in the ring's size, so a ring the bisection skipped might place
    too; this is the one `simple_plan` falls back to, so a plan at this budget always exists."""
    runs = use_runs(program)
    need, _ = minimum_ring(program, runs, alignment)
    ring = _smallest_ring(program, runs, need, alignment)
    return align_up(ring, granularity) + activation_bytes + program.fixed_bytes


def arena_limit(budget_bytes: int, activation_bytes: int, fixed_bytes: int, granularity: int = 1) -> int:
    """The most arena a budget leaves once activations and fixed bytes are off the top, in whole units of
    `granularity` (the allocator's block on CUDA)."""
    return (budget_bytes - activation_bytes - fixed_bytes) // granularity * granularity


def simple_plan(program: Program, *, budget_bytes: int, device: str, alignment: int,
                activation_bytes: int, granularity: int = 1) -> "Plan":
    """Keep what fits resident (the weights loaded most often first, then in order of first use) beside a
    ring of twice the largest working set of what streams (`ring_order`), stream the rest through that ring,
    each load starting as soon as the bytes it lands on are free (on CUDA a small load waits to move with
    the next, `coalesce_loads`). Raises BudgetTooSmall if nothing fits."""
    runs = use_runs(program)
    fixed = activation_bytes + program.fixed_bytes
    avail = arena_limit(budget_bytes, activation_bytes, program.fixed_bytes, granularity)
    need, need_step = minimum_ring(program, runs, alignment)
    if avail < need:
        total_need = align_up(need, granularity) + fixed
        op = program.ops[need_step]
        raise BudgetTooSmall(
            f"op {op.index} ({op.module!r}) needs {fmt_bytes(need)} of weights in place at once, plus "
            f"{fmt_bytes(activation_bytes)} for activations and {fmt_bytes(program.fixed_bytes)} of fixed workspace: "
            f"{fmt_bytes(total_need)} in all, but the budget is {fmt_bytes(budget_bytes)}; raise the budget to "
            f"at least {fmt_bytes(total_need)}", op=op.module, need_bytes=total_need, budget_bytes=budget_bytes)

    sizes = {w.index: align_up(w.nbytes, alignment) for w in program.weights}
    ranked = resident_ranking(runs)
    if sum(sizes[w] for w in ranked) <= avail:
        order = list(dict.fromkeys(r.weight for r in runs))  # everything fits, in order of first use
    else:
        order = ring_order(program, runs, ranked, sizes, avail, need, alignment)
    placed = ring_layout(program, runs, order, avail, alignment)
    if placed is None:
        # Placement is not monotone in the ring's size: the smallest ring that places every run may
        # succeed where the whole arena did not.
        smallest = _smallest_ring(program, runs, need, alignment)
        loads = place_ring(program, runs, 0, smallest, alignment) if smallest <= avail else None
        if loads is None:
            op = program.ops[need_step]
            total_need = align_up(smallest, granularity) + fixed
            raise BudgetTooSmall(
                f"the weights of op {op.index} ({op.module!r}) and its neighbours cannot be placed in "
                f"{fmt_bytes(avail)} of arena ({fmt_bytes(budget_bytes)} budget less "
                f"{fmt_bytes(fixed)} for activations and workspace); raise the budget to at least "
                f"{fmt_bytes(total_need)}", op=op.module, need_bytes=total_need, budget_bytes=budget_bytes)
        placed = ((), tuple(loads), 0, smallest)
    residents, loads, resident_bytes, ring_bytes = placed
    return coalesce_loads(Plan(device=device, signature=program.signature, budget_bytes=budget_bytes,
                               arena_bytes=resident_bytes + ring_bytes, resident_bytes=resident_bytes,
                               activation_bytes=activation_bytes, fixed_bytes=program.fixed_bytes,
                               alignment=alignment, residents=residents, loads=loads, n_ops=len(program.ops),
                               status="simple"))


def resident_ranking(runs: list[UseRun]) -> list[int]:
    """The weights `runs` use, in the order `simple_plan` keeps them resident: the weights loaded most often
    first (a tied head loaded at both ends of a call, a model called several times in a Workload's
    sequence: residency saves most there), then in order of first use."""
    first_use: dict[int, int] = {}
    loads_of: dict[int, int] = {}
    for r in runs:  # runs are in order of first use
        first_use.setdefault(r.weight, r.first_use)
        loads_of[r.weight] = loads_of.get(r.weight, 0) + 1
    return sorted(first_use, key=lambda w: -loads_of[w])  # stable: in order of first use among equals


def ring_order(program: Program, runs: list[UseRun], ranked: list[int], sizes: dict[int, int], avail: int,
               need: int, alignment: int) -> list[int]:
    """The weights of `ranked` that `simple_plan` keeps resident in `avail` bytes of arena: those that fit
    beside a ring of twice the largest working set (`need`); where that working set stays resident (a tied
    embedding, loaded at both ends of a call), then more of them, beside a ring of twice the largest working
    set of what still streams. The ring holds a load for the op in progress and one for the next. A large
    untied LM head streams through twice its size: keeping it resident to shrink the ring to two of a
    block's matrices made every copy wait for the op before it (7% slower on an H200, BENCHMARKS.md)."""
    order = fill(ranked, sizes, avail - min(avail, 2 * need))
    kept = set(order)
    streamed = [r for r in runs if r.weight not in kept]
    if streamed:
        less = minimum_ring(program, streamed, alignment)[0]
        room = avail - min(avail, 2 * less) - sum(sizes[w] for w in order)
        if less < need and room > 0:
            order += fill([w for w in ranked if w not in kept], sizes, room)
    return order


def fill(ranked: list[int], sizes: dict[int, int], capacity: int) -> list[int]:
    """The weights of `ranked`, in its order, that fit `capacity` bytes taken greedily (one that does not
    fit is skipped, later smaller ones may still go in)."""
    order, total = [], 0
    for w in ranked:
        if total + sizes[w] <= capacity:
            order.append(w)
            total += sizes[w]
    return order


def ring_layout(program: Program, runs: list[UseRun], order: list[int], avail: int, alignment: int
                ) -> tuple[tuple[Resident, ...], tuple[Load, ...], int, int] | None:
    """(residents, loads, resident bytes, ring bytes): the weights of `order` resident, packed from offset 0,
    the other runs streamed through a ring of the rest of `avail`, each load as early as its bytes are free.
    Where the ring does not place them, `order`'s last weights stream too; None where even an empty
    resident set does not place."""
    sizes = {w.index: align_up(w.nbytes, alignment) for w in program.weights}
    order = list(order)
    while True:
        resident_bytes = sum(sizes[w] for w in order)
        kept = set(order)
        streamed = [r for r in runs if r.weight not in kept]
        ring_bytes = avail - resident_bytes if streamed else 0
        loads = place_ring(program, streamed, resident_bytes, ring_bytes, alignment) if streamed else []
        if loads is not None:
            break
        if not order:
            return None
        order = order[:-1]
    residents, offset = [], 0
    for w in order:
        residents.append(Resident(w, offset, program.weights[w].nbytes))
        offset += sizes[w]
    return tuple(residents), tuple(loads), resident_bytes, ring_bytes


# -- the ablation baseline: prefetch the next layer, nothing resident -------------------------------------
def layer_key(module: str) -> str:
    """The layer a module belongs to: its name up to and including the first purely numeric path component
    ("transformer.h.3.attn.q_proj" -> "transformer.h.3"), or, with no numeric component, its top-level
    name ("transformer.wte" -> "transformer", "lm_head" -> "lm_head")."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isascii() and part.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0]


def op_layers(program: Program, layer_of=None) -> list[int]:
    """Per op, the index of its layer: a layer is a maximal run of consecutive ops whose modules have the
    same key (`layer_of(module)`, by default `layer_key`). So the embeddings before the numbered blocks form
    one layer and the final norm after them another, though both have the key "transformer"."""
    key_of = layer_of or layer_key
    out: list[int] = []
    previous = None
    for op in program.ops:
        key = key_of(op.module)
        out.append(out[-1] + (key != previous) if out else 0)
        previous = key
    return out


def next_layer_plan(program: Program, *, budget_bytes: int, device: str, alignment: int, activation_bytes: int,
                    granularity: int = 1, layer_of=None) -> Plan:
    """The "always prefetch the next layer" baseline: nothing resident; each load whose first use lies in
    layer L + 1 (`op_layers`) starts at the first op of layer L, loads for layer 0 at step 0, later where
    the bytes they land on are not free yet (`place_ring` with `starts`), through a ring of all the arena
    the budget leaves (no more than every load side by side), or where loads do not place there (placement
    is not monotone in the ring's size), the smallest ring that places them (`_smallest_ring`, grown by
    eighths where the starts' placement needs more). Raises BudgetTooSmall, naming the ring that places
    them, where it does not fit the budget."""
    runs = use_runs(program)
    fixed = activation_bytes + program.fixed_bytes
    avail = arena_limit(budget_bytes, activation_bytes, program.fixed_bytes, granularity)
    layer = op_layers(program, layer_of)
    first_op: dict[int, int] = {}
    for op in program.ops:
        first_op.setdefault(layer[op.index], op.index)
    starts = [first_op[layer[r.first_use] - 1] if layer[r.first_use] > 0 else 0 for r in runs]
    need, need_step = minimum_ring(program, runs, alignment) if runs else (0, 0)
    every_load = sum(align_up(program.weights[r.weight].nbytes, alignment) for r in runs)
    whole = min(avail, every_load) // alignment * alignment
    loads = place_ring(program, runs, 0, whole, alignment, starts=starts) if runs and whole >= need else None
    ring = whole if loads is not None else (_smallest_ring(program, runs, need, alignment) if runs else 0)
    while loads is None and (loads := place_ring(program, runs, 0, ring, alignment, starts=starts)) is None:
        # This ends: a ring of every run's bytes side by side places each load at its given step.
        grown = align_up(ring + max(ring // 8, alignment), alignment)
        ring = avail if ring < avail < grown else grown
    if ring > avail:
        op = program.ops[need_step]
        total_need = align_up(ring, granularity) + fixed
        raise BudgetTooSmall(
            f"streaming every weight layer by layer needs a ring of {fmt_bytes(ring)} (op {op.index}, "
            f"{op.module!r}, needs {fmt_bytes(need)} in place at once), but the budget of {fmt_bytes(budget_bytes)} "
            f"less {fmt_bytes(fixed)} for activations and workspace leaves {fmt_bytes(max(avail, 0))}; raise the "
            f"budget to at least {fmt_bytes(total_need)}", op=op.module, need_bytes=total_need,
            budget_bytes=budget_bytes)
    late = sum(1 for load, s in zip(loads, starts) if load.start_step > s)
    note = (f"next layer: {layer[-1] + 1 if layer else 0} layers, nothing resident, a {fmt_bytes(ring)} ring; "
            f"{late} of {len(loads)} loads start after the first op of the layer before their first use "
            f"(their bytes, or an earlier load's, were not free yet)")
    return Plan(device=device, signature=program.signature, budget_bytes=budget_bytes,
                arena_bytes=align_up(ring, granularity), resident_bytes=0,
                activation_bytes=activation_bytes, fixed_bytes=program.fixed_bytes, alignment=alignment,
                residents=(), loads=tuple(loads), n_ops=len(program.ops), status="next-layer", note=note)
